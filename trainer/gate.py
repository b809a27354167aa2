"""The train/serve agreement gate: before an adapter is registered, prove the served adapter
behaves as trained.

The adapter is loaded into the real engine by starting `loraplex serve` on it (a child process,
spoken to over HTTP only, so the trainer does not depend on the server's code), and checked on
held-out prompts against peft's own greedy answers:

* vLLM accepts it: the server starts with it, lists it and answers through it;
* answers agree with peft's: greedy texts compared by similarity (bf16 kernels differ between the
  engine and torch, so exact equality is not the test; a chat-template or weight-mapping mistake
  gives unrelated texts);
* answers end: the served answer stops with the end-of-turn token within `max_tokens`, not by
  running out of length (the classic template / EOS mismatch that never stops);
* it is not a no-op: the served adapter's answers differ from the served base model's.

The child server is `trainer.serving`. The result goes into the run's manifest; `loraplex train --register` refuses a failing adapter
unless `--force`, which is recorded too.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.serving import ServeError, chat_completion, serve_child

GATE_ADAPTER = "gate-candidate"
DEFAULT_MAX_TOKENS = 96
DEFAULT_SIMILARITY = 0.6  # mean text similarity (difflib ratio) between peft and served answers
DEFAULT_ENDED_SHARE = 0.75  # share of served answers that must stop by themselves


class GateError(Exception):
    """The gate could not run (the server would not start, the model folder is wrong)."""


@dataclass(frozen=True, slots=True)
class PromptCheck:
    prompt: str
    peft: str
    served: str
    base: str
    similarity: float
    ended: bool  # served answer stopped with end-of-turn
    changed: bool  # served adapter answer differs from the served base answer


@dataclass(frozen=True, slots=True)
class GateResult:
    passed: bool
    accepted: bool
    agreement: float
    ended_share: float
    changed_share: float
    problems: list[str]
    checks: list[PromptCheck] = field(default_factory=list)
    seconds: float = 0.0
    forced: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_gate(
    *,
    model_dir: Path,
    adapter_dir: Path,
    prompts: Sequence[str],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    min_similarity: float = DEFAULT_SIMILARITY,
    min_ended_share: float = DEFAULT_ENDED_SHARE,
    dtype: str = "auto",
    max_lora_rank: int = 16,
    peft_answers: Callable[[Sequence[str]], list[str]] | None = None,
) -> GateResult:
    """Serve `adapter_dir` on `model_dir` and check it on `prompts` (a handful of held-out ones)."""
    if not prompts:
        raise GateError("the gate needs at least one held-out prompt")
    started = time.monotonic()
    peft = (peft_answers or _peft_answerer(model_dir, adapter_dir, max_tokens, dtype))(prompts)
    problems: list[str] = []
    try:
        with serve_child(
            model_dir, args=["--adapter", f"{GATE_ADAPTER}={adapter_dir}", "--served-name", "base"],
            dtype=dtype, max_lora_rank=max_lora_rank,
        ) as url:  # fmt: skip
            served_answers = [_chat(url, GATE_ADAPTER, p, max_tokens) for p in prompts]
            base_answers = [_chat(url, "base", p, max_tokens) for p in prompts]
    except ServeError as e:
        return GateResult(
            passed=False, accepted=False, agreement=0.0, ended_share=0.0, changed_share=0.0,
            problems=[f"the engine did not accept the adapter: {e}"],
            seconds=time.monotonic() - started,
        )  # fmt: skip
    checks = [
        PromptCheck(
            prompt=p,
            peft=pa,
            served=sa,
            base=ba,
            similarity=difflib.SequenceMatcher(None, pa, sa).ratio(),
            ended=finish == "stop",
            changed=sa.strip() != ba.strip(),
        )  # fmt: skip
        for p, pa, (sa, finish), (ba, _) in zip(
            prompts, peft, served_answers, base_answers, strict=True
        )
    ]
    n = len(checks)
    agreement = sum(c.similarity for c in checks) / n
    ended = sum(c.ended for c in checks) / n
    changed = sum(c.changed for c in checks) / n
    if agreement < min_similarity:
        problems.append(
            f"served answers differ from peft's (mean similarity {agreement:.2f} < "
            f"{min_similarity}): a chat-template or weight-loading mismatch"
        )
    if ended < min_ended_share:
        problems.append(
            f"only {ended:.0%} of served answers stop by themselves within {max_tokens} tokens "
            f"(need {min_ended_share:.0%}): the adapter does not produce the end-of-turn token"
        )
    if changed == 0:
        problems.append(
            "the served adapter answers exactly like the base model on every prompt: it is a "
            "no-op as served (not trained, or not applied by the engine)"
        )
    return GateResult(
        passed=not problems, accepted=True, agreement=agreement, ended_share=ended,
        changed_share=changed, problems=problems, checks=checks,
        seconds=time.monotonic() - started,
    )  # fmt: skip


# -- the training side: peft's own greedy answers ---------------------------------------------


def _peft_answerer(
    model_dir: Path, adapter_dir: Path, max_tokens: int, dtype: str
) -> Callable[[Sequence[str]], list[str]]:
    def answer(prompts: Sequence[str]) -> list[str]:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loraplex.hardware import choose_dtype

        chosen = choose_dtype(dtype, cuda=torch.cuda.is_available()).dtype
        torch_dtype = torch.bfloat16 if chosen == "bfloat16" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        answers = []
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True,
            )  # fmt: skip
            with torch.no_grad():
                out = model.generate(
                    **ids, max_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )  # fmt: skip
            new = out[0][ids["input_ids"].shape[1] :]
            answers.append(tokenizer.decode(new, skip_special_tokens=True))
        return answers

    return answer


def _chat(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    reply = chat_completion(
        url, model, [{"role": "user", "content": prompt}], max_tokens=max_tokens
    )
    return reply["content"], reply["finish_reason"]
