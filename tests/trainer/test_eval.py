"""`loraplex eval`: the metrics on hand-computed values, the shipped forgetting set, the result
document, assistant-token masking with the real tokenizer, one-line errors, and an end-to-end
evaluation of a registered adapter through `loraplex serve` on the real engine, stored on the
version and shown by `registry show`."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from registry.cli import app as registry_app
from registry.service import Registry
from registry.settings import RegistrySettings
from tests.support.adapters import HELD_OUT_PROMPTS
from trainer.data import ChatExample, Message
from trainer.eval_cli import eval_app
from trainer.evaluate import (
    FORGETTING_SET,
    EvalConfig,
    ForgettingItem,
    build_document,
    contains,
    exact_match,
    forgetting_report,
    generation_scores,
    lcs_length,
    normalize,
    read_forgetting_set,
    rouge_l,
    token_f1,
)

# -- metrics ----------------------------------------------------------------------------------


def test_normalize_drops_punctuation_case_and_extra_whitespace():
    assert normalize("  The Cat,  sat!\n") == "the cat sat"
    assert normalize("The Cat", case_sensitive=True) == "The Cat"


def test_exact_match_and_contains():
    assert exact_match("Paris.", " paris") == 1.0
    assert exact_match("Paris", "paris", case_sensitive=True) == 0.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert contains("The capital is Paris.", "paris") == 1.0
    assert contains("Parisian food", "paris") == 0.0  # whole words only
    assert contains("anything", "") == 0.0


def test_token_f1_is_squad_style():
    # the cat sat on the mat -> cat sat on mat; a cat on a mat -> cat on mat: 3 common,
    # precision 3/4, recall 1 -> F1 = 2 * 0.75 / 1.75.
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # Multiset overlap: cat 1, dog 1 -> 2 of 3 each way.
    assert token_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert token_f1("yes", "no") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert token_f1("CAT", "cat", case_sensitive=True) == 0.0


def test_rouge_l_is_the_lcs_f_measure():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example
    # LCS of the six-word sequences is 5 (all but sat/was): P = R = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)  # LCS 1: P = R = 1/4
    # LCS 2 of answer 2, reference 4: P = 1, R = 1/2 -> F = 2/3.
    assert rouge_l("b d", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


def test_generation_scores_average_over_examples():
    scores = generation_scores(["Paris.", "blue sky"], ["paris", "the sky is blue"])
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["contains"] == pytest.approx(0.5)
    # second pair: tokens [blue, sky] vs [sky, is, blue]: F1 = 2 * 1 * 2/3 / (5/3) = 0.8
    assert scores["token_f1"] == pytest.approx((1 + 0.8) / 2)
    # LCS([blue, sky], [the, sky, is, blue]) = 1: P 1/2, R 1/4 -> F = 1/3
    assert scores["rouge_l"] == pytest.approx((1 + 1 / 3) / 2)


# -- the forgetting set -----------------------------------------------------------------------


def test_the_shipped_forgetting_set_loads():
    items = read_forgetting_set()
    assert 35 <= len(items) <= 50
    assert {i.kind for i in items} == {"contains", "exact", "regex"}
    assert len({i.prompt for i in items}) == len(items)
    assert FORGETTING_SET.name == "forgetting.jsonl"
    by_prompt = {i.prompt: i for i in items}
    assert by_prompt["What is the capital of France?"].passes("It is PARIS.")
    assert not by_prompt["What is the capital of France?"].passes("It is Lyon.")
    assert by_prompt["Answer with only the word yes."].passes("YES.")
    assert not by_prompt["Answer with only the word yes."].passes("Yes, of course.")


def test_forgetting_checks_and_report():
    items = [
        ForgettingItem("q1", "contains", "Paris"),
        ForgettingItem("q2", "exact", "yes"),
        ForgettingItem("q3", "regex", r"\b(4|four)\b"),
        ForgettingItem("q4", "regex", r"\w+\s*,\s*\w+\s*,\s*\w+"),
    ]
    version = ["paris, of course", "no", "Four.", "red green blue"]
    baseline = ["Lyon", "Yes!", "4", "red, green, blue"]
    report = forgetting_report(items, version, baseline)
    assert report["version_pass_rate"] == 0.5  # q1, q3
    assert report["baseline_pass_rate"] == 0.75  # q2, q3, q4
    assert report["forgetting"] == pytest.approx(0.25)
    assert [r["prompt"] for r in report["lost"]] == ["q2", "q4"]
    assert report["gained"] == [
        {"prompt": "q1", "check": {"contains": "Paris"}, "version": version[0], "baseline": "Lyon"}
    ]


def test_a_bad_forgetting_file_is_refused(tmp_path):
    from trainer.evaluate import EvaluationError

    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "x", "check": {"judge": "y"}}\n')
    with pytest.raises(EvaluationError, match="line 1"):
        read_forgetting_set(path)


# -- the document -----------------------------------------------------------------------------


def _example(prompt: str, answer: str) -> ChatExample:
    return ChatExample(1, (Message("user", prompt), Message("assistant", answer)))


def test_the_document_holds_both_sides_deltas_forgetting_and_samples():
    examples = [_example("p1", "Paris"), _example("p2", "blue")]
    items = [ForgettingItem("f1", "exact", "yes")]
    answers = {"a@2": ["Paris", "blue", "no"], "base": ["Lyon", "blue", "yes"]}
    losses = {"a@2": {"loss": 1.0, "perplexity": 2.7}, "base": {"loss": 3.0, "perplexity": 20.1}}
    doc = build_document(
        version="a@2", baseline="base", examples=examples, answers=answers, losses=losses,
        items=items, config=EvalConfig(samples=1),
    )  # fmt: skip
    assert doc["metrics"]["version"]["exact_match"] == 1.0
    assert doc["metrics"]["baseline"]["exact_match"] == 0.5
    assert doc["deltas"]["exact_match"] == 0.5 and doc["deltas"]["loss"] == -2.0
    assert doc["metrics"]["version"]["forgetting_pass_rate"] == 0.0
    assert doc["forgetting"]["forgetting"] == 1.0 and doc["forgetting"]["lost"][0]["prompt"] == "f1"
    assert doc["samples"] == [
        {"prompt": "p1", "reference": "Paris", "version": "Paris", "baseline": "Lyon"}
    ]
    json.dumps(doc, allow_nan=False)


def test_the_plot_is_a_png(tmp_path):
    from trainer.eval_cli import write_plot

    examples = [_example("p", "x")]
    doc = build_document(
        version="a@1", baseline="base", examples=examples, answers={"a@1": ["x"], "base": ["y"]},
        losses={"a@1": {"loss": 1.0, "perplexity": 2.7}, "base": {"loss": None, "perplexity": None}},
        items=[], config=EvalConfig(),
    )  # fmt: skip
    path = write_plot(doc, tmp_path / "out" / "eval.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- assistant tokens with the real tokenizer --------------------------------------------------


def test_only_assistant_tokens_count_for_the_loss(embedded_model_dir):
    from transformers import AutoTokenizer

    from trainer.evaluate import _labelled

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    example = ChatExample(
        1,
        (
            Message("user", "Say hi."),
            Message("assistant", "HELLO THERE"),
            Message("user", "Again, louder."),
            Message("assistant", "HI AGAIN"),
        ),
    )
    ids, mask = _labelled(tokenizer, example)
    kept = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert "HELLO THERE" in kept and "HI AGAIN" in kept
    assert "Say hi" not in kept and "louder" not in kept and "assistant" not in kept
    assert kept.count("<|im_end|>") == 2
    skipped = ChatExample(1, (*example.messages[:1], Message("assistant", "HELLO THERE", 0),
                              *example.messages[2:]))  # fmt: skip
    ids, mask = _labelled(tokenizer, skipped)
    kept = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert "HI AGAIN" in kept and "HELLO" not in kept


def test_peft_losses_switch_between_adapters_and_the_base(embedded_model_dir, test_adapters):
    from trainer.evaluate import validation_losses

    shouted = [
        _example(p, a.upper()) for p, a in zip(HELD_OUT_PROMPTS[:3], CAPS_ANSWERS[:3], strict=True)
    ]
    pirate = [
        _example(p, "ARRR! " + a)
        for p, a in zip(HELD_OUT_PROMPTS[:3], CAPS_ANSWERS[:3], strict=True)
    ]
    folders = {"caps.x@1": test_adapters["caps"], "pre.fix@2": test_adapters["prefix"],
               "base": None}  # fmt: skip
    on_caps = validation_losses(embedded_model_dir, shouted, folders)
    on_pirate = validation_losses(embedded_model_dir, pirate, folders)
    assert on_caps["caps.x@1"]["loss"] < min(on_caps["base"]["loss"], on_caps["pre.fix@2"]["loss"])
    assert on_pirate["pre.fix@2"]["loss"] < min(
        on_pirate["base"]["loss"], on_pirate["caps.x@1"]["loss"]
    )
    assert on_caps["base"]["perplexity"] == pytest.approx(math.exp(on_caps["base"]["loss"]))


# -- the command's errors ---------------------------------------------------------------------


@pytest.fixture
def eval_cli(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(eval_app, ["eval", *args, "--model", str(model),
                                        "--home", str(tmp_path / "home")])  # fmt: skip

    return invoke


def test_bad_data_lists_every_problem_and_exits_2(eval_cli, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": []}\nnot json\n')
    result = eval_cli("a@1", "--data", str(data))
    assert result.exit_code == 2
    assert f"error: {data}:1:" in result.stderr and f"error: {data}:2: bad JSON" in result.stderr
    assert "2 problem(s)" in result.stderr


def test_an_unknown_version_exits_2(eval_cli, tmp_path):
    data = tmp_path / "ok.jsonl"
    data.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    result = eval_cli("ghost@1", "--data", str(data), "--no-forgetting")
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert "ghost" in result.stderr
    missing = CliRunner().invoke(
        eval_app, ["eval", "a@1", "--data", str(data), "--model", str(tmp_path / "none")]
    )
    assert missing.exit_code == 2 and "no base model at" in missing.stderr


# -- end to end on the real engine ------------------------------------------------------------


CAPS_ANSWERS = (
    "The capital of France is Paris.",
    "Red is a primary color.",
    "Put your phone away while you work.",
    "There are seven days in a week.",
    "You could call your cat Whiskers.",
    "Bees make honey.",
)


@pytest.mark.engine
def test_eval_of_a_registered_adapter_through_the_serving_path(
    embedded_model_dir: Path, test_adapters, tmp_path
):
    settings = RegistrySettings(home=tmp_path / "home")
    name = f"caps-{uuid.uuid4().hex[:6]}"
    with Registry.open(settings) as registry:
        registry.register(name, test_adapters["caps"], actor="test")
    data = tmp_path / "heldout.jsonl"
    rows = [
        {"prompt": p, "completion": a.upper()}
        for p, a in zip(HELD_OUT_PROMPTS, CAPS_ANSWERS, strict=True)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot = tmp_path / "eval.png"
    stores = ["--home", str(settings.home)]
    result = CliRunner().invoke(
        eval_app,
        ["eval", f"{name}@1", "--data", str(data), "--baseline", "base", "--model",
         str(embedded_model_dir), "--max-tokens", "48", "--case-sensitive", "--plot", str(plot),
         "--json", "--actor", "tester", *stores],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    ours, base = doc["metrics"]["version"], doc["metrics"]["baseline"]
    assert (doc["version"], doc["baseline"], doc["served"][f"{name}@1"]) == (
        f"{name}@1", "base", f"{name}@1",
    )  # fmt: skip
    assert ours["rouge_l"] > base["rouge_l"] + 0.3, doc["samples"]
    assert ours["exact_match"] >= base["exact_match"]
    assert ours["loss"] < base["loss"] and ours["perplexity"] < base["perplexity"]
    assert all(s["version"].upper() == s["version"] for s in doc["samples"])
    forgetting = doc["forgetting"]
    assert forgetting["items"] == len(read_forgetting_set())
    assert forgetting["baseline_pass_rate"] >= 0.6, forgetting  # the base does most of the set
    print("forgetting:", json.dumps(forgetting, indent=1))
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert doc["stored"] is not None and doc["dataset"]["examples"] == 6

    shown = CliRunner().invoke(registry_app, ["show", f"{name}@1", *stores])
    assert shown.exit_code == 0, shown.output
    assert f"evaluation:     vs base: loss {ours['loss']:.3f}" in shown.stdout
    listed = json.loads(
        CliRunner().invoke(registry_app, ["show", f"{name}@1", "--json", *stores]).stdout
    )["evaluations"]
    assert [(e["id"], e["baseline"], e["created_by"]) for e in listed] == [
        (doc["stored"], "base", "tester")
    ]
    assert listed[0]["metrics"]["metrics"] == doc["metrics"]
