"""The benchmark's own LoRA adapters: rank 16 on q/k/v/o, alpha 32, random non-zero weights.

Made once with peft from the base model and cached on disk (one folder per adapter, PEFT layout).
They teach nothing; their only job is to change every output the way a trained adapter would,
so that the serving cost of LoRA is real. Seeds are fixed, so a rebuilt set is the same set.
"""

from __future__ import annotations

import json
from pathlib import Path

ALL_ADAPTER_NAMES = tuple(f"a{i}" for i in range(1, 9))  # seeds 1..8
ADAPTER_NAMES = ALL_ADAPTER_NAMES[:4]  # the serving benchmark's mixed scenario
RANK = 16
ALPHA = 32
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# init_lora_weights=False keeps nn.Linear's default (Kaiming-uniform) init on both A and B, so
# B is non-zero: answers change visibly (e.g. a different haiku) and stay text.
INIT = "nn.Linear default (init_lora_weights=False)"
_MARKER = "bench-adapter.json"


def rank_adapter_names(rank: int, count: int) -> tuple[str, ...]:
    """The scaling bench's adapters of one rank: `r16-01`, `r16-02`, ..."""
    return tuple(f"r{rank}-{i:02d}" for i in range(1, count + 1))


def ensure_rank_adapters(
    model_dir: Path, cache_dir: Path, *, rank: int, count: int
) -> dict[str, Path]:
    """Return {name: folder} for `count` adapters of `rank` (alpha 2 x rank, q/k/v/o, random
    non-zero A and B, seeded by rank and number), creating the missing ones.

    One peft model per rank is built and its LoRA weights re-drawn for each adapter, so 64
    adapters take seconds, not 64 model loads.
    """
    names = rank_adapter_names(rank, count)
    folders = {name: cache_dir / name for name in names}
    recipe = _recipe(model_dir) | {"rank": rank, "alpha": 2 * rank}
    missing = [n for n, f in folders.items() if not _is_complete(f, model_dir, recipe)]
    if not missing:
        return folders
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGET_MODULES),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        init_lora_weights=False)  # fmt: skip
    model = get_peft_model(base, config)
    for name in missing:
        torch.manual_seed(rank * 1000 + names.index(name) + 1)
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_A["default"].reset_parameters()  # nn.Linear's default init
                module.lora_B["default"].reset_parameters()
        folders[name].mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folders[name])
        (folders[name] / _MARKER).write_text(json.dumps(recipe, sort_keys=True, indent=2))
    return folders


def ensure_adapters(
    model_dir: Path, cache_dir: Path, names: tuple[str, ...] = ADAPTER_NAMES
) -> dict[str, Path]:
    """Return {name: folder} for the bench adapters `names`, creating the missing ones."""
    folders = {name: cache_dir / name for name in names}
    missing = [n for n, f in folders.items() if not _is_complete(f, model_dir)]
    if missing:
        _create(model_dir, {n: folders[n] for n in missing})
    return folders


def _is_complete(folder: Path, model_dir: Path, recipe: dict[str, object] | None = None) -> bool:
    marker = folder / _MARKER
    if not (folder / "adapter_model.safetensors").is_file() or not marker.is_file():
        return False
    return json.loads(marker.read_text()) == (recipe or _recipe(model_dir))


def _recipe(model_dir: Path) -> dict[str, object]:
    return {
        "base_model": str(model_dir.resolve()),
        "rank": RANK,
        "alpha": ALPHA,
        "target_modules": list(TARGET_MODULES),
        "init": INIT,
    }


def _create(model_dir: Path, folders: dict[str, Path]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, folder in folders.items():
        seed = ALL_ADAPTER_NAMES.index(name) + 1
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=list(TARGET_MODULES),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )
        model = get_peft_model(base, config)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        (folder / _MARKER).write_text(json.dumps(_recipe(model_dir), sort_keys=True, indent=2))
