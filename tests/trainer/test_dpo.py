"""DPO end to end on the embedded model: a preferred style learned from pairs, rewards in the
run's outputs, registration, continuing a registered version with `--from`, and refusals.

One real DPO run (through the CLI, with --register) is shared by the module; the `--from` test
continues the version it registered for two steps. Run under the engine lock (it trains).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from loraplex.hardware import choose_dtype
from registry.service import Registry
from registry.settings import RegistrySettings
from tests.support.adapters import HELD_OUT_PROMPTS, PREFIX_MARKER, TRAINING_PAIRS
from trainer.train_cli import train as train_command

NAME = "pirate"
STEPS, EVAL_EVERY = 16, 8
MARK = PREFIX_MARKER.strip()  # "ARRR!": the preferred answers open with it


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("train")(train_command)
    app.command("noop")(lambda: None)  # two commands, so `train` stays a subcommand
    return app


def pair_rows(pairs: tuple[tuple[str, str], ...]) -> list[dict[str, object]]:
    return [{"prompt": q, "chosen": PREFIX_MARKER + a, "rejected": a} for q, a in pairs]


def write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def registry_flags(home: Path) -> list[str]:
    return ["--home", str(home), "--registry", f"sqlite:///{home / 'registry.db'}",
            "--artifacts", (home / "artifacts").as_uri(), "--actor", "tester"]  # fmt: skip


def open_registry(home: Path) -> Registry:
    return Registry.open(
        RegistrySettings(home=home, registry=f"sqlite:///{home / 'registry.db'}",
                         artifacts=(home / "artifacts").as_uri())
    )  # fmt: skip


def dpo_args(
    data: Path, out: Path, model: Path, home: Path, *extra: str, gate: bool = False
) -> list[str]:
    return ["train", "--method", "dpo", "--data", str(data), "--name", NAME, "--out", str(out),
            "--model", str(model), "--batch-size", "4", "--max-seq-len", "96", "--seed", "7",
            "--schedule", "constant", "--register", "--gate" if gate else "--no-gate", "--json",
            *extra, *registry_flags(home)]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict[str, object]:
    """24 pairs (chosen: the answer opened by "ARRR! "; rejected: the plain answer), 4 held-out
    pairs for evaluation; a fresh LoRA trained (with the chosen answers' SFT loss: pure DPO on
    pairs this alike learns to repeat the marker and never stop), put through the serving gate
    (the real engine) and registered as NAME@1 through the CLI."""
    root = tmp_path_factory.mktemp("dpo")
    train = write_rows(root / "prefs.jsonl", pair_rows(TRAINING_PAIRS[:24]))
    val = write_rows(root / "val.jsonl", pair_rows(TRAINING_PAIRS[24:28]))
    home, out = root / "home", root / "run"
    args = dpo_args(train, out, embedded_model_dir, home, "--val", str(val), "--lr", "5e-4",
                    "--max-steps", str(STEPS), "--eval-every", str(EVAL_EVERY),
                    "--sft-weight", "1", "--events", str(root / "events.jsonl"),
                    gate=True)  # fmt: skip
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output + str(result.exception)
    return {"root": root, "home": home, "out": out, "train": train, "val": val,
            "printed": json.loads(result.stdout)}  # fmt: skip


def greedy_openings(model: object, tokenizer: object) -> list[str]:
    from loraplex.hardware import choose_dtype
    from tests.support.adapters import generate_answers

    dtype = choose_dtype("auto", cuda=False).dtype
    return generate_answers(model, tokenizer, HELD_OUT_PROMPTS, max_new_tokens=10, dtype=dtype)


def test_the_preferred_style_becomes_more_frequent_on_held_out_prompts(
    run: dict[str, object], embedded_model_dir: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run["out"] / "adapter")
    answers = greedy_openings(model, tokenizer)
    with model.disable_adapter():
        before = greedy_openings(model, tokenizer)
    tuned = sum(MARK in a for a in answers)
    assert tuned >= 3 and tuned > sum(MARK in a for a in before), (answers, before)


def test_metrics_have_rising_reward_margins_and_accuracy(run: dict[str, object]) -> None:
    out: Path = run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    rewards = metrics["rewards"]
    assert [e["step"] for e in rewards] == list(range(1, STEPS + 1))
    assert [e["step"] for e in metrics["train_loss"]] == list(range(1, STEPS + 1))
    # Step 1 is computed before any update: the fresh adapter is the base, the reference. In
    # bf16 the policy's and the reference's forwards (other batch shapes) round differently:
    # seen -0.008 on an AMX Xeon, against the > 0.5 the run must end with.
    same = 1e-3 if choose_dtype("auto").dtype == "float32" else 3e-2
    assert rewards[0]["margins"] == pytest.approx(0, abs=same)
    assert rewards[0]["chosen"] == pytest.approx(0, abs=same)
    last = rewards[-4:]
    assert min(e["margins"] for e in last) > 0.5
    assert sum(e["accuracies"] for e in last) / 4 > rewards[0]["accuracies"]
    assert all(e["chosen"] > e["rejected"] for e in last)
    assert [e["step"] for e in metrics["eval_rewards"]] == [8, 16]
    assert metrics["eval_rewards"][-1]["margins"] > metrics["eval_rewards"][0]["margins"] > 0
    assert metrics["final_val_reward_accuracy"] >= 0.75
    assert metrics["train_loss"][-1]["loss"] < metrics["train_loss"][0]["loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_events_carry_each_steps_rewards(run: dict[str, object]) -> None:
    events = [json.loads(line) for line in (run["root"] / "events.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    rewards = json.loads((run["out"] / "metrics.json").read_text())["rewards"]
    assert [e["step"] for e in train] == list(range(1, STEPS + 1))
    for event, logged in zip(train, rewards, strict=True):
        for key in ("chosen", "rejected", "margins", "accuracies"):
            assert event["rewards"][key] == logged[key], (key, event)
    assert [e["step"] for e in events if e["event"] == "eval"] == [8, 16]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [8, 16]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert events[-1]["version"] == f"{NAME}@1"


def test_manifest_and_registered_lineage(run: dict[str, object]) -> None:
    out: Path = run["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "dpo" and manifest["format"] == "loraplex.dpo/1"
    assert manifest["beta"] == 0.1 and manifest["hyperparameters"]["beta"] == 0.1
    assert manifest["hyperparameters"]["sft_weight"] == 1.0
    assert manifest["from"] is None and manifest["hyperparameters"]["start"] is None
    assert manifest["reference"] == "base model (adapter disabled)"
    assert manifest["datasets"]["train"]["used"] == 24
    assert manifest["datasets"]["val"]["path"] == str(run["val"].resolve())
    assert manifest["hyperparameters"]["lr"] == 5e-4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert run["printed"]["version"]["version"] == 1
    with open_registry(run["home"]) as registry:
        version = registry.store.resolve(f"{NAME}@1")
    assert dict(version.lineage) == manifest


def test_the_dpo_adapter_passes_the_serving_gate_and_its_lineage_says_so(
    run: dict[str, object],
) -> None:
    """Served by the real engine (`loraplex serve` child) on the held-out prompts before it was
    registered: accepted, agreeing with peft, stopping by itself, and not the base's answers."""
    manifest = json.loads((run["out"] / "manifest.json").read_text())
    gate = manifest["serving_gate"]
    assert gate["passed"] and gate["accepted"], gate["problems"]
    assert gate["held_out"] and gate["prompts_from"] == str(run["val"]) and not gate["forced"]
    assert gate["changed_share"] > 0 and gate["ended_share"] >= 0.75
    assert len(gate["checks"]) == 4
    assert sum(MARK in c["served"] for c in gate["checks"]) >= 2, gate["checks"]
    assert not any(MARK in c["base"] for c in gate["checks"]), gate["checks"]
    with open_registry(run["home"]) as registry:
        lineage = dict(registry.store.resolve(f"{NAME}@1").lineage)
    assert lineage["serving_gate"] == gate


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path: Path, embedded_model_dir: Path):
    """Killed after its step-2 checkpoint and resumed: same losses, rewards and weights as a run
    that was never stopped (optimizer, scheduler, step and data order restored)."""
    from safetensors.torch import load_file

    from trainer.dpo import DPOSettings, train_dpo
    from trainer.outputs import newest_checkpoint
    from trainer.sft import LoraSettings, TrainingError

    data = write_rows(tmp_path / "prefs.jsonl", pair_rows(TRAINING_PAIRS[:8]))
    settings = DPOSettings(lora=LoraSettings(rank=8), lr=5e-4, max_steps=4, batch_size=2,
                           max_seq_len=96, save_every=2, seed=3)  # fmt: skip

    def run_into(out: Path, **kwargs: object) -> object:
        return train_dpo(model_dir=embedded_model_dir, train=data, val=None, out_dir=out,
                         settings=settings, **kwargs)  # fmt: skip

    whole = run_into(tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_after_step_3(event: dict[str, object]) -> None:
        if event["event"] == "train" and event["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_into(tmp_path / "parts", progress=kill_after_step_3)
    assert newest_checkpoint(tmp_path / "parts").name == "checkpoint-2"
    assert not (tmp_path / "parts" / "adapter").exists()
    with pytest.raises(TrainingError, match="already holds a run: pass --resume"):
        run_into(tmp_path / "parts")
    trained: list[object] = []
    resumed = run_into(
        tmp_path / "parts", resume=True,
        progress=lambda e: trained.append(e["step"]) if e["event"] == "train" else None,
    )  # fmt: skip

    assert trained == [3, 4]  # continued, not started over
    assert resumed.manifest["resumed_from_step"] == 2
    assert resumed.manifest["steps"] == whole.manifest["steps"] == 4
    metrics = [json.loads(r.metrics_path.read_text()) for r in (whole, resumed)]
    assert [e["step"] for e in metrics[1]["train_loss"]] == [1, 2, 3, 4]
    for key, field in (("train_loss", "loss"), ("rewards", "margins"), ("rewards", "chosen")):
        expected = [e[field] for e in metrics[0][key]]
        assert [e[field] for e in metrics[1][key]] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    weights = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for key, tensor in weights[0].items():
        assert tensor.float().allclose(weights[1][key].float(), atol=1e-4), key


def test_from_continues_the_registered_version_against_itself(
    run: dict[str, object], embedded_model_dir: Path
) -> None:
    """Reference = the starting version (frozen): at step 1 policy and reference are equal, so
    rewards are 0, although that version scores far from the base (its own final margins)."""
    from safetensors.torch import load_file

    out = run["root"] / "from-run"
    args = dpo_args(run["train"], out, embedded_model_dir, run["home"], "--from", f"{NAME}@1",
                    "--max-steps", "2", "--lr", "1e-4", "--beta", "0.2")  # fmt: skip
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output + str(result.exception)
    assert json.loads(result.stdout)["version"]["version"] == 2
    first = json.loads((out / "metrics.json").read_text())["rewards"][0]
    assert first["chosen"] == pytest.approx(0, abs=1e-3)
    assert first["rejected"] == pytest.approx(0, abs=1e-3)
    start_margin = json.loads((run["out"] / "metrics.json").read_text())["rewards"][-1]["margins"]
    assert start_margin > 0.5  # under the bare base as reference, step 1 would not be 0

    manifest = json.loads((out / "manifest.json").read_text())
    with open_registry(run["home"]) as registry:
        v1, v2 = (registry.store.resolve(f"{NAME}@{n}") for n in (1, 2))
    assert manifest["from"]["ref"] == f"{NAME}@1" and manifest["from"]["sha256"] == v1.sha256
    assert manifest["from"]["lineage"]["method"] == "dpo"
    assert (
        manifest["from"]["lineage"]["datasets"]["train"]
        == v1.lineage["datasets"]["train"]["sha256"]
    )
    assert manifest["hyperparameters"]["start"] == f"{NAME}@1" and manifest["beta"] == 0.2
    assert manifest["reference"] == f"{NAME}@1 (frozen)"
    assert dict(v2.lineage) == manifest and v2.rank == v1.rank
    adapter = out / "adapter"
    assert not (adapter / "ref").exists()  # only the trained adapter, not the reference copy
    before = load_file(run["out"] / "adapter" / "adapter_model.safetensors")
    after = load_file(adapter / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not before[k].equal(after[k]) for k in before)  # trained on from there


def test_bad_preference_data_exits_2_listing_every_problem(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    rows = [
        json.dumps(pair_rows(TRAINING_PAIRS[:1])[0]),
        "{not json",
        json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}),
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."},
                ]
            }
        ),  # fmt: skip
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    home, out = tmp_path / "home", tmp_path / "run"
    result = CliRunner().invoke(cli_app(), dpo_args(bad, out, embedded_model_dir, home))
    assert result.exit_code == 2, result.output
    for line in (2, 3, 4):
        assert f"error: {bad}:{line}:" in result.stderr
    assert "chosen and rejected are identical" in result.stderr
    assert "a chat row in a preference dataset" in result.stderr
    assert "nothing was trained" in result.stderr
    assert not out.exists()


def test_flags_of_the_other_method_are_refused(tmp_path: Path, embedded_model_dir: Path) -> None:
    data = write_rows(tmp_path / "prefs.jsonl", pair_rows(TRAINING_PAIRS[:2]))
    home, out = tmp_path / "home", tmp_path / "run"
    cases = [
        (["--method", "lora", "--from", f"{NAME}@1", "--alpha", "8"], "--alpha shape a fresh"),
        (["--method", "lora", "--beta", "0.5"], "--beta applies to --method dpo only"),
        (["--method", "lora", "--sft-weight", "1"], "--sft-weight applies to --method dpo only"),
        (["--sft-weight", "-1"], "sft weight must be 0 or more"),
        (["--from", f"{NAME}@1", "--rank", "8"], "--rank shape a fresh adapter"),
        (["--beta", "0"], "beta must be positive"),
        (["--from", "nobody@3"], "nobody"),
    ]
    for extra, message in cases:
        args = dpo_args(data, out, embedded_model_dir, home)
        result = CliRunner().invoke(cli_app(), args + extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.stderr, (extra, result.stderr)
        assert not (out / "adapter").exists()
