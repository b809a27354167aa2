"""The dtype choice (loraplex.hardware) for every kind of machine, and its way to the engine.

The CPUs are given as /proc/cpuinfo text and flag sets, so the AVX2-only AMD EPYC case is
checked on any machine. The serving half checks that `--dtype` / LORAPLEX_DTYPE reach the
engine's settings (the engine is built, never started) and that /ready reports the choice.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from loraplex.cli import app as loraplex_app
from loraplex.hardware import (
    MATMUL_FLAGS,
    CpuInfo,
    choose_dtype,
    cpu_info,
    machine_record,
    parse_cpuinfo,
)
from server.engine import ModelInfo
from server.engine_fake import FakeEngine
from server.runner import build_engine
from server.settings import ServeSettings
from tests.support.adapters import ADAPTER_SPECS, LoraTrainingConfig, adapter_cache_key

# Abridged from the two kinds of CI machine (flags lines cut, order and neighbours kept).
ZEN3_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 vaes

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 vaes
"""
SAPPHIRE_RAPIDS_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_fp16 \
amx_bf16 amx_tile amx_int8 avx_vnni
"""

AVX2_ONLY = CpuInfo(model="AMD EPYC 7B13", flags=frozenset({"avx2"}))
ZEN4 = CpuInfo(model="AMD EPYC 9B14", flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
AMX_ONLY = CpuInfo(model="a CPU with AMX", flags=frozenset({"avx2", "amx_bf16", "amx_tile"}))
AVX512_NO_BF16 = CpuInfo(model="Intel Xeon (Skylake)", flags=frozenset({"avx2", "avx512f"}))


def test_parse_cpuinfo_reads_model_and_matmul_flags() -> None:
    zen3 = parse_cpuinfo(ZEN3_CPUINFO)
    assert zen3 == CpuInfo(model="AMD EPYC 7B13", flags=frozenset({"avx2"}))
    spr = parse_cpuinfo(SAPPHIRE_RAPIDS_CPUINFO)
    assert spr.model.startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert spr.flags == {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert parse_cpuinfo("processor\t: 0\n").flags == frozenset()


def test_cpu_info_without_proc_cpuinfo_has_no_flags(tmp_path: Path) -> None:
    info = cpu_info(tmp_path / "missing")
    assert info.flags == frozenset() and info.model
    assert choose_dtype(cpu=info, cuda=False).dtype == "float32"


def test_avx2_only_cpu_gets_float32_and_the_reason_names_what_is_missing() -> None:
    choice = choose_dtype(cpu=AVX2_ONLY, cuda=False)
    assert choice.dtype == "float32"
    assert "avx512_bf16" in choice.reason and "amx_bf16" in choice.reason
    assert choose_dtype(cpu=parse_cpuinfo(ZEN3_CPUINFO), cuda=False).dtype == "float32"
    # AVX-512 alone is not bf16: Skylake-class Xeons emulate it too.
    assert choose_dtype(cpu=AVX512_NO_BF16, cuda=False).dtype == "float32"


@pytest.mark.parametrize("cpu", [ZEN4, AMX_ONLY, parse_cpuinfo(SAPPHIRE_RAPIDS_CPUINFO)])
def test_native_bf16_cpu_gets_bfloat16(cpu: CpuInfo) -> None:
    choice = choose_dtype(cpu=cpu, cuda=False)
    assert choice.dtype == "bfloat16"
    assert any(flag in choice.reason for flag in ("avx512_bf16", "amx_bf16"))


def test_gpu_leaves_the_dtype_to_vllm() -> None:
    choice = choose_dtype(cpu=AVX2_ONLY, cuda=True)
    assert choice.dtype == "auto" and "vLLM" in choice.reason


def test_an_explicit_dtype_wins_and_forced_emulated_bf16_is_flagged() -> None:
    assert choose_dtype("float32", cpu=ZEN4, cuda=False).dtype == "float32"
    forced = choose_dtype("bfloat16", cpu=AVX2_ONLY, cuda=False)
    assert forced.dtype == "bfloat16"
    assert forced.reason.startswith("requested with --dtype") and "warning" in forced.reason
    native = choose_dtype("bfloat16", cpu=ZEN4, cuda=False)
    assert native.reason == "requested with --dtype"
    assert choose_dtype("float32", cpu=AVX2_ONLY, cuda=True).dtype == "float32"
    with pytest.raises(ValueError, match="auto, bfloat16, float32"):
        choose_dtype("float16", cpu=ZEN4, cuda=False)


def test_machine_record_describes_this_machine() -> None:
    record = machine_record(cuda=False)
    assert set(record["cpu_flags"]) == set(MATMUL_FLAGS)
    assert record["cpu_model"] == cpu_info().model
    assert record["torch_cpu_capability"]  # torch is installed in the test environment
    assert record["dtype"] == choose_dtype(cuda=False).dtype
    assert record["dtype_reason"] == choose_dtype(cuda=False).reason


def test_test_adapter_cache_key_follows_the_training_dtype(embedded_model_dir: Path) -> None:
    caps, recipe = ADAPTER_SPECS["caps"], LoraTrainingConfig()
    bf16 = adapter_cache_key(caps, model_dir=embedded_model_dir, config=recipe, dtype="bfloat16")
    fp32 = adapter_cache_key(caps, model_dir=embedded_model_dir, config=recipe, dtype="float32")
    assert bf16 != fp32
    assert bf16 == adapter_cache_key(caps, model_dir=embedded_model_dir, config=recipe)


# -- serving ----------------------------------------------------------------------------------


def test_engine_dtype_from_settings_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAPLEX_DTYPE", raising=False)
    auto = build_engine(ServeSettings(home=tmp_path), model_dir=tmp_path).info
    expected = choose_dtype(cuda=False)  # the CPU build of vLLM is installed
    assert (auto.dtype, auto.dtype_reason) == (expected.dtype, expected.reason)
    monkeypatch.setenv("LORAPLEX_DTYPE", "float32")
    forced = build_engine(ServeSettings(home=tmp_path), model_dir=tmp_path).info
    assert (forced.dtype, forced.dtype_reason) == ("float32", "requested with --dtype")


def test_serve_dtype_flag_reaches_the_engine_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[ModelInfo] = []

    def run_server(settings: ServeSettings, *, model_dir: Path, console: object) -> None:
        built.append(build_engine(settings, model_dir=model_dir).info)

    monkeypatch.setattr("server.runner.run_server", run_server)
    monkeypatch.setenv("LORAPLEX_DTYPE", "bfloat16")  # the flag wins over the environment
    args = ["serve", "--model", str(tmp_path), "--home", str(tmp_path), "--dtype", "float32"]
    result = CliRunner().invoke(loraplex_app, args)
    assert result.exit_code == 0, result.output
    assert [info.dtype for info in built] == ["float32"]
    refused = CliRunner().invoke(loraplex_app, [*args[:-1], "float16"])
    assert refused.exit_code == 2 and "dtype" in refused.output


class _Bf16FakeEngine(FakeEngine):
    @property
    def info(self) -> ModelInfo:
        return replace(super().info, dtype="bfloat16", dtype_reason="CPU has native bf16 (test)")


def test_ready_reports_the_dtype_and_why(fake_server) -> None:
    server = fake_server(engine=_Bf16FakeEngine())
    body = httpx.get(f"{server.url}/ready").json()
    assert body["status"] == "ready"
    assert (body["dtype"], body["dtype_reason"]) == ("bfloat16", "CPU has native bf16 (test)")


@pytest.mark.engine
def test_real_engine_runs_in_the_chosen_dtype(real_server) -> None:
    body = httpx.get(f"{real_server.url}/ready").json()
    expected = choose_dtype(ServeSettings().dtype, cuda=False)  # as the fixture's settings
    assert (body["dtype"], body["dtype_reason"]) == (expected.dtype, expected.reason)
