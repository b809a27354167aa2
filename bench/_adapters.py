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


def ensure_adapters(
    model_dir: Path, cache_dir: Path, names: tuple[str, ...] = ADAPTER_NAMES
) -> dict[str, Path]:
    """Return {name: folder} for the bench adapters `names`, creating the missing ones."""
    folders = {name: cache_dir / name for name in names}
    missing = [n for n, f in folders.items() if not _is_complete(f, model_dir)]
    if missing:
        _create(model_dir, {n: folders[n] for n in missing})
    return folders


def _is_complete(folder: Path, model_dir: Path) -> bool:
    marker = folder / _MARKER
    if not (folder / "adapter_model.safetensors").is_file() or not marker.is_file():
        return False
    return json.loads(marker.read_text()) == _recipe(model_dir)


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
