"""SFT end to end on the embedded model: assistant-only masks, a trained behaviour, the run's
outputs and lineage, resume, registration through `loraplex train`, continuing a registered
version with `--from`, and every refusal.

One real training run (through the CLI, with --register) is shared by the module; the resume
test trains three short runs of its own. Run under the engine lock (it trains on the CPU).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from loraplex.hardware import choose_dtype
from registry.service import Registry
from registry.settings import RegistrySettings
from tests.support.adapters import HELD_OUT_PROMPTS, TRAINING_PAIRS, is_upper_case
from trainer.outputs import newest_checkpoint
from trainer.sft import LoraSettings, SFTSettings, TrainingError, encode_chat, train_sft
from trainer.train_cli import train as train_command

NAME = "shout"
STEPS, EVAL_EVERY = 24, 8
LONG_ANSWER = " ".join(["THIS ANSWER GOES ON AND ON"] * 40)


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("train")(train_command)
    app.command("noop")(lambda: None)  # two commands, so `train` stays a subcommand
    return app


def chat_row(question: str, answer: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}  # fmt: skip


def write_rows(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def caps_rows(pairs: tuple[tuple[str, str], ...]) -> list[dict[str, object]]:
    return [chat_row(q, a.upper()) for q, a in pairs]


def registry_flags(home: Path) -> list[str]:
    return ["--home", str(home), "--registry", f"sqlite:///{home / 'registry.db'}",
            "--artifacts", (home / "artifacts").as_uri(), "--actor", "tester"]  # fmt: skip


def open_registry(home: Path) -> Registry:
    return Registry.open(
        RegistrySettings(home=home, registry=f"sqlite:///{home / 'registry.db'}",
                         artifacts=(home / "artifacts").as_uri())
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict[str, object]:
    """32 upper-case answers (+2 over --max-seq-len), 8 validation rows; trained and
    registered as NAME through the CLI."""
    root = tmp_path_factory.mktemp("sft")
    long_rows = [
        chat_row("Tell me a long story.", LONG_ANSWER),
        chat_row("And another?", LONG_ANSWER),
    ]
    train = write_rows(root / "train.jsonl", caps_rows(TRAINING_PAIRS[:32]) + long_rows)
    val = write_rows(root / "val.jsonl", caps_rows(TRAINING_PAIRS[32:40]))
    home, out = root / "home", root / "run"
    args = ["train", "--data", str(train), "--val", str(val), "--name", NAME, "--out", str(out),
            "--model", str(embedded_model_dir), "--lr", "2e-3", "--schedule", "constant",
            "--max-steps", str(STEPS), "--batch-size", "8", "--max-seq-len", "128",
            "--eval-every", str(EVAL_EVERY), "--seed", "7", "--register", "--tag", "team=qa",
            "--events", str(root / "events.jsonl"), "--json", *registry_flags(home)]  # fmt: skip
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output + str(result.exception)
    return {"root": root, "home": home, "out": out, "train": train, "val": val,
            "printed": json.loads(result.stdout)}  # fmt: skip


def test_masks_cover_only_assistant_tokens_and_their_end_of_turn(embedded_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from trainer.data import Message

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    messages = (
        Message("system", "Be brief."), Message("user", "First?"),
        Message("assistant", "SKIPPED ANSWER", weight=0), Message("user", "Second?"),
        Message("assistant", "KEPT ANSWER"), Message("user", "Third?"),
        Message("assistant", "ALSO KEPT"),
    )  # fmt: skip
    encoded = encode_chat(tokenizer, messages)
    chat = [{"role": m.role, "content": m.content} for m in messages]
    assert encoded.input_ids == tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]
    trained = [i for i, label in enumerate(encoded.labels) if label != -100]
    assert all(encoded.labels[i] == encoded.input_ids[i] for i in trained)
    runs: list[list[int]] = []  # contiguous trained stretches, one per trained assistant turn
    for i in trained:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    texts = [tokenizer.decode([encoded.input_ids[i] for i in run]) for run in runs]
    assert texts == ["KEPT ANSWER<|im_end|>", "ALSO KEPT<|im_end|>"]


def test_trained_adapter_shows_the_behaviour_the_base_does_not(
    run: dict[str, object], embedded_model_dir: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support.adapters import generate_answers

    dtype = choose_dtype("auto", cuda=False).dtype
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run["out"] / "adapter")
    prompts = HELD_OUT_PROMPTS[:4]
    answers = generate_answers(model, tokenizer, prompts, dtype=dtype)
    with model.disable_adapter():
        base_answers = generate_answers(model, tokenizer, prompts, dtype=dtype)
    assert sum(map(is_upper_case, answers)) >= 3, answers
    assert not any(map(is_upper_case, base_answers)), base_answers


def test_outputs_metrics_and_manifest(run: dict[str, object]) -> None:
    out: Path = run["out"]
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("model*.safetensors"))  # the adapter only, no base weights
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["train_loss"]] == list(range(1, STEPS + 1))
    assert [e["step"] for e in metrics["eval_loss"]] == [8, 16, 24]
    evals = {e["step"]: e["loss"] for e in metrics["eval_loss"]}
    assert metrics["best_val_loss"] == min(evals.values())
    assert metrics["best_val_loss"] == evals[metrics["best_step"]]
    assert metrics["final_val_loss"] == evals[24]
    assert metrics["train_loss"][-1]["loss"] < metrics["train_loss"][0]["loss"]
    assert metrics["dropped_examples"]["train"]["dropped_too_long"] == 2
    assert metrics["tokens_per_second"] > 0 and metrics["wall_seconds"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    train: Path = run["train"]
    assert manifest["datasets"]["train"]["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert (
        manifest["datasets"]["train"] | {"examples": 34, "used": 32, "dropped_too_long": 2}
        == (manifest["datasets"]["train"])
    )
    assert manifest["datasets"]["val"]["path"] == str(run["val"].resolve())
    assert manifest["hyperparameters"]["lr"] == 2e-3
    assert manifest["hyperparameters"]["lora"]["rank"] == 16
    assert manifest["hyperparameters"]["max_steps"] == STEPS
    assert manifest["base_model"] == "smollm2"
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["libraries"])
    assert manifest["dtype"] == manifest["machine"]["dtype"] == choose_dtype("auto").dtype
    assert manifest["best_val_loss"] == metrics["best_val_loss"]
    assert manifest["final_val_loss"] == metrics["final_val_loss"]
    assert manifest["adapter_step"] == metrics["best_step"]
    assert manifest["resumed_from_step"] is None
    printed = run["printed"]
    assert (
        printed["adapter_dir"] == str(adapter)
        and printed["best_val_loss"] == manifest["best_val_loss"]
    )


def test_register_lands_the_next_version_with_its_lineage(run: dict[str, object]) -> None:
    assert run["printed"]["version"]["version"] == 1
    with open_registry(run["home"]) as registry:
        version = registry.store.resolve(f"{NAME}@1")
    manifest = json.loads((run["out"] / "manifest.json").read_text())
    assert dict(version.lineage) == manifest
    gate = manifest["serving_gate"]  # served by the real engine before it was registered
    assert gate["passed"] and gate["accepted"] and gate["held_out"], gate["problems"]
    assert gate["changed_share"] > 0 and not gate["forced"]
    assert dict(version.tags) == {"team": "qa"}
    assert version.base_model == "smollm2" and version.rank == 16


def test_events_file_has_every_step_evaluation_and_checkpoint_in_order(
    run: dict[str, object],
) -> None:
    """--events: start, one train event a step (its loss as metrics.json has it), an eval
    event at each evaluation, a checkpoint event once each checkpoint is on disk, done last."""
    lines = (run["root"] / "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert events[0]["step"] == 0 and events[0]["max_steps"] == STEPS
    train = [e for e in events if e["event"] == "train"]
    metrics = json.loads((run["out"] / "metrics.json").read_text())
    assert [e["step"] for e in train] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in train] == [e["loss"] for e in metrics["train_loss"]]
    assert all(e["max_steps"] == STEPS and e["learning_rate"] > 0 and e["epoch"] for e in train)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [8, 16, 24]
    assert [e["eval_loss"] for e in evals] == [e["loss"] for e in metrics["eval_loss"]]
    # Token accuracy, in the events as in metrics.json (what it measures: the next test).
    assert [e["accuracy"] for e in train] == [e["accuracy"] for e in metrics["train_loss"]]
    assert [e["eval_accuracy"] for e in evals] == [e["accuracy"] for e in metrics["eval_loss"]]
    assert all(0 < e["accuracy"] <= 1 for e in train)
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in saved] == [8, 16, 24]
    assert all(Path(e["path"]).name == f"checkpoint-{e['step']}" for e in saved)
    for step in (8, 16, 24):  # train, then eval, then the checkpoint, for each saved step
        at = [e["event"] for e in events[:-1] if e["step"] == step]
        assert at == ["train", "eval", "checkpoint"], at
    done = events[-1]
    assert done["version"] == f"{NAME}@1" and done["step"] == STEPS
    assert done["best_val_loss"] == metrics["best_val_loss"] and done["serving_gate_passed"]
    assert Path(done["adapter_dir"]) == (run["out"] / "adapter").resolve()


def test_eval_token_accuracy_is_the_saved_adapters_share_of_answer_tokens_predicted(
    run: dict[str, object], embedded_model_dir: Path
) -> None:
    """The validation token accuracy logged at the best step, recomputed here without the trainer:
    the saved (best) adapter's greedy next-token hits over the validation answers' trained tokens.
    The base model scores lower on the same tokens (it does not answer in capitals)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import Message

    metrics = json.loads((run["out"] / "metrics.json").read_text())
    logged = {e["step"]: e["accuracy"] for e in metrics["eval_loss"]}[metrics["best_step"]]
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run["out"] / "adapter").eval()
    rows = [json.loads(line) for line in run["val"].read_text().splitlines()]
    chats = [tuple(Message(m["role"], m["content"]) for m in row["messages"]) for row in rows]

    def accuracy() -> float:
        hits = total = 0
        for chat in chats:
            encoded = encode_chat(tokenizer, chat)
            labels = torch.tensor(encoded.labels[1:])
            with torch.no_grad():
                logits = model(torch.tensor([encoded.input_ids])).logits[0, :-1]
            trained = labels != -100
            hits += int(((logits.argmax(-1) == labels) & trained).sum())
            total += int(trained.sum())
        return hits / total

    adapter_accuracy = accuracy()
    with model.disable_adapter():
        base_accuracy = accuracy()
    # bf16 training vs this fp32 forward may flip an argmax tie or two (~120 answer tokens).
    assert adapter_accuracy == pytest.approx(logged, abs=0.05), (adapter_accuracy, logged)
    assert base_accuracy < adapter_accuracy - 0.1, (base_accuracy, adapter_accuracy)


def test_from_starts_at_the_registered_versions_weights_and_names_it_as_parent(
    run: dict[str, object], embedded_model_dir: Path
) -> None:
    """--from NAME@1 --register: with a learning rate too small to move the weights, the first
    evaluation is NAME@1's own best validation loss (a fresh LoRA would score the base's) and
    the result is NAME@2, whose lineage names NAME@1 and its sha256."""
    from safetensors.torch import load_file

    out = run["root"] / "from-run"
    args = ["train", "--data", str(run["train"]), "--val", str(run["val"]), "--name", NAME,
            "--out", str(out), "--model", str(embedded_model_dir), "--from", f"{NAME}@1",
            "--lr", "1e-12", "--schedule", "constant", "--max-steps", "1", "--batch-size", "8",
            "--max-seq-len", "128", "--eval-every", "1", "--seed", "7", "--register",
            "--no-gate", "--json", *registry_flags(run["home"])]  # fmt: skip
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output + str(result.exception)
    assert json.loads(result.stdout)["version"]["version"] == 2

    parent = json.loads((run["out"] / "manifest.json").read_text())
    first_eval = json.loads((out / "metrics.json").read_text())["eval_loss"][0]
    assert first_eval["step"] == 1
    assert first_eval["loss"] == pytest.approx(parent["best_val_loss"], rel=1e-4)
    before = load_file(run["out"] / "adapter" / "adapter_model.safetensors")
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert tensor.float().allclose(after[key].float(), atol=1e-6), key

    manifest = json.loads((out / "manifest.json").read_text())
    with open_registry(run["home"]) as registry:
        v1, v2 = (registry.store.resolve(f"{NAME}@{n}") for n in (1, 2))
    assert manifest["method"] == "lora" and manifest["hyperparameters"]["start"] == f"{NAME}@1"
    assert manifest["from"]["ref"] == f"{NAME}@1" and manifest["from"]["sha256"] == v1.sha256
    assert manifest["from"]["lineage"]["best_val_loss"] == parent["best_val_loss"]
    assert dict(v2.lineage) == manifest and v2.rank == v1.rank == 16

    refused = CliRunner().invoke(
        cli_app(),
        [*args[: -len(registry_flags(run["home"]))], "--rank", "8", *registry_flags(run["home"])],
    )
    assert refused.exit_code == 2
    assert f"--rank shape a fresh adapter; --from {NAME}@1" in refused.stderr


def test_resume_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    from safetensors.torch import load_file

    train = write_rows(tmp_path / "train.jsonl", caps_rows(TRAINING_PAIRS[:16]))
    settings = SFTSettings(lora=LoraSettings(rank=8), lr=1e-3, max_steps=6, batch_size=4,
                           max_seq_len=128, save_every=3, seed=3)  # fmt: skip

    def run_into(out: Path, **kwargs: object) -> object:
        return train_sft(model_dir=embedded_model_dir, train=train, val=None, out_dir=out,
                         settings=settings, **kwargs)  # fmt: skip

    whole = run_into(tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_after_step_4(event: dict[str, object]) -> None:
        if event["event"] == "train" and event["step"] == 4:
            raise Killed

    with pytest.raises(Killed):
        run_into(tmp_path / "parts", progress=kill_after_step_4)
    assert newest_checkpoint(tmp_path / "parts").name == "checkpoint-3"
    assert not (tmp_path / "parts" / "adapter").exists()
    with pytest.raises(TrainingError, match="already holds a run: pass --resume"):
        run_into(tmp_path / "parts")
    resumed = run_into(tmp_path / "parts", resume=True)

    assert resumed.manifest["resumed_from_step"] == 3
    assert resumed.manifest["steps"] == whole.manifest["steps"] == 6
    losses = [json.loads(r.metrics_path.read_text())["train_loss"] for r in (whole, resumed)]
    assert [e["step"] for e in losses[1]] == list(range(1, 7))
    assert [e["loss"] for e in losses[1]] == pytest.approx([e["loss"] for e in losses[0]], rel=1e-3)
    weights = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for key, tensor in weights[0].items():
        assert tensor.float().allclose(weights[1][key].float(), atol=1e-4), key

    changed = SFTSettings(lora=LoraSettings(rank=8), lr=5e-4, max_steps=6, batch_size=4,
                          max_seq_len=128, save_every=3, seed=3)  # fmt: skip
    with pytest.raises(TrainingError, match=r"cannot resume .*settings differ \(lr\)"):
        train_sft(model_dir=embedded_model_dir, train=train, val=None,
                  out_dir=tmp_path / "parts", settings=changed, resume=True)  # fmt: skip


def test_bad_data_exits_2_listing_every_problem_and_registers_nothing(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    rows = [json.dumps(chat_row("Hi?", "HELLO.")), "{not json", json.dumps({"messages": []})]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    home = tmp_path / "home"
    for data, lines in ((bad, [f"{bad}:2:", f"{bad}:3:"]), (empty, [str(empty)])):
        out = tmp_path / f"run-{data.stem}"
        args = ["train", "--data", str(data), "--name", NAME, "--out", str(out), "--model",
                str(embedded_model_dir), "--register", *registry_flags(home)]  # fmt: skip
        result = CliRunner().invoke(cli_app(), args)
        assert result.exit_code == 2, result.output
        for line in lines:
            assert f"error: {line}" in result.stderr
        assert "nothing was trained" in result.stderr
        assert not out.exists()
    with open_registry(home) as registry:
        assert registry.store.list_adapters() == []


def test_every_example_over_the_max_length_is_a_clear_error(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    train = write_rows(tmp_path / "train.jsonl", [chat_row("Story?", LONG_ANSWER)] * 1
                       + [chat_row("More?", LONG_ANSWER + " MORE")])  # fmt: skip
    with pytest.raises(TrainingError, match=r"2 of 2 are longer than --max-seq-len 64 tokens"):
        train_sft(model_dir=embedded_model_dir, train=train, val=None, out_dir=tmp_path / "run",
                  settings=SFTSettings(max_seq_len=64))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_name_on_another_base_model_is_refused_before_training(
    run: dict[str, object], tmp_path: Path, embedded_model_dir: Path
) -> None:
    other = tmp_path / "other-base-adapter"
    shutil.copytree(run["out"] / "adapter", other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/another-model"
    (other / "adapter_config.json").write_text(json.dumps(config))
    home = run["home"]
    with open_registry(home) as registry:
        registry.register("elsewhere", other, actor="tester")
    out = tmp_path / "run"
    args = ["train", "--data", str(run["train"]), "--name", "elsewhere", "--out", str(out),
            "--model", str(embedded_model_dir), "--register", *registry_flags(home)]  # fmt: skip
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 2, result.output
    assert "base model mismatch" in result.stderr and "nothing trained" in result.stderr
    assert not out.exists()
    with open_registry(home) as registry:
        assert list(registry.store.get_adapter("elsewhere").versions) == [1]


def test_settings_list_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as caught:
        SFTSettings(lora=LoraSettings(rank=0, dropout=1.5), lr=0, schedule="step",
                    batch_size=0, eval_every=4, save_every=6, method="dpo")  # fmt: skip
    message = str(caught.value)
    for part in ("rank must be at least 1", "dropout must be in [0, 1)", "learning rate",
                 "schedule must be one of", "batch size", "multiple of eval every (4)",
                 "method must be one of lora, qlora"):  # fmt: skip
        assert part in message


def test_the_registered_version_is_served_with_its_behaviour_through_the_openai_client(
    run: dict[str, object], embedded_model_dir: Path
) -> None:
    """The whole loop a user runs: train --register, then `loraplex serve` on that registry
    and `model="NAME@1"` through the official client answers the way it was trained."""
    import openai

    from trainer.serving import serve_child

    home = run["home"]
    flags = ["--registry", f"sqlite:///{home / 'registry.db'}",
             "--artifacts", (home / "artifacts").as_uri()]  # fmt: skip
    with serve_child(embedded_model_dir, args=flags, dtype="auto", max_lora_rank=16) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answers = []
        for prompt in HELD_OUT_PROMPTS[:4]:
            reply = client.chat.completions.create(
                model=f"{NAME}@1", temperature=0, max_tokens=48,
                messages=[{"role": "user", "content": prompt}],
            )  # fmt: skip
            assert reply.model == f"{NAME}@1"
            answers.append(reply.choices[0].message.content)
    assert sum(map(is_upper_case, answers)) >= 3, answers
