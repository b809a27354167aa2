"""The base model adapters are served on, as the registry sees it: one identity, every name that
means that model, and its LoRA-able linear layers (names, in/out features, layer count) taken
from the model's own config.json.

PEFT records `base_model_name_or_path` as given at training time: a hub id, an absolute folder
on the trainer's machine, or nothing. All of those that mean the served model become its one
identity, so adapters trained in different ways can be versions of one name. Only config.json
is read, with `json` (no torch, no transformers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from registry.refs import base_model_identity

# The embedded default model (server.embedded_model installs it as HOME/models/<this folder>).
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODEL_FOLDER = "smollm2-135m-instruct"
MODEL_CONFIG = "config.json"
_MAX_CONFIG_BYTES = 1024**2

# Decoder families whose blocks use Llama's linear-layer names (self_attn.{q,k,v,o}_proj and
# mlp.{gate,up,down}_proj, as in transformers' modeling code for each), so their shapes follow
# from the config alone. Other families are served, but adapters for them are checked less.
LLAMA_LIKE_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2"}
)
_FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "vocab_size",
)


@dataclass(frozen=True, slots=True)
class BaseModel:
    """What an adapter is checked against. `modules` is None when the config could not tell
    (no folder, an unknown family); `problem` says why the config could not be used at all."""

    identity: str
    names: frozenset[str]
    folder: Path | None = None
    model_type: str | None = None
    num_layers: int | None = None
    modules: Mapping[str, tuple[int, int]] | None = None  # name -> (in_features, out_features)
    fingerprint: tuple[Any, ...] | None = None
    problem: str | None = None

    def canonical(self, declared: str | None) -> str:
        """The identity to record for an adapter whose config names `declared` as its base."""
        if declared is None or not declared.strip():
            return self.identity
        identity = base_model_identity(declared)
        if identity in self.names or self._same_config(declared):
            return self.identity
        return identity

    def same(self, first: str, second: str) -> bool:
        """Whether two recorded identities mean the same model (old rows used other names)."""
        return first == second or {first, second} <= self.names

    def _same_config(self, declared: str) -> bool:
        if self.fingerprint is None:
            return False
        try:
            config = _read_json(Path(declared).expanduser() / MODEL_CONFIG)
        except (OSError, ValueError):
            return False
        return fingerprint(config) == self.fingerprint


def load_base_model(identity: str, folder: Path | None, *, embedded: bool) -> BaseModel:
    """The base model called `identity`, described by `folder`/config.json where that exists.

    `embedded`: the folder is the embedded model's, so its hub id and folder name are names of
    it even before the model is prepared. An unreadable config is not raised: it is recorded in
    `problem`, which validation reports for every adapter.
    """
    own = base_model_identity(identity)
    names = {own}
    if embedded:
        names |= {base_model_identity(EMBEDDED_MODEL_ID), EMBEDDED_MODEL_FOLDER}
    if folder is None:
        return BaseModel(identity=own, names=frozenset(names))
    names.add(base_model_identity(folder.name))
    path = folder / MODEL_CONFIG
    if embedded and not path.exists():  # not prepared yet: nothing to check against
        return BaseModel(identity=own, names=frozenset(names), folder=folder)
    try:
        config = _read_json(path)
    except (OSError, ValueError) as e:
        return BaseModel(
            identity=own,
            names=frozenset(names),
            folder=folder,
            problem=f"the base model's {path} cannot be read: {e}",
        )
    if isinstance(config.get("_name_or_path"), str) and config["_name_or_path"].strip():
        names.add(base_model_identity(config["_name_or_path"]))
    return describe(config, identity=own, names=frozenset(names), folder=folder)


def describe(
    config: Mapping[str, Any], *, identity: str, names: frozenset[str], folder: Path | None
) -> BaseModel:
    """A BaseModel from a parsed config.json; invalid dimensions end in `problem`."""
    model_type = config.get("model_type")
    model_type = model_type if isinstance(model_type, str) else None
    base = BaseModel(
        identity=identity,
        names=names,
        folder=folder,
        model_type=model_type,
        fingerprint=fingerprint(config),
    )
    try:
        layers = _positive(config, "num_hidden_layers")
        modules = llama_like_modules(config) if model_type in LLAMA_LIKE_MODEL_TYPES else None
    except ValueError as e:
        return replace(base, problem=f"the base model's config cannot be used: {e}")
    return replace(base, num_layers=layers, modules=modules)


def llama_like_modules(config: Mapping[str, Any]) -> Mapping[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of a Llama-like decoder block."""
    hidden = _positive(config, "hidden_size")
    intermediate = _positive(config, "intermediate_size")
    heads = _positive(config, "num_attention_heads")
    kv_heads = (
        _positive(config, "num_key_value_heads") if "num_key_value_heads" in config else heads
    )
    if config.get("head_dim") is not None:
        head_dim = _positive(config, "head_dim")
    elif hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    else:
        head_dim = hidden // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    return MappingProxyType(
        {
            "q_proj": (hidden, q_out),
            "k_proj": (hidden, kv_out),
            "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden),
            "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        }
    )


def fingerprint(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values that make two configs the same architecture (weights aside)."""
    return tuple(config.get(key) for key in _FINGERPRINT_KEYS)


def _positive(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a small file; ValueError (or OSError) for anything else."""
    with path.open("rb") as f:
        raw = f.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{path.name} is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(str(e)) from e
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} does not hold a JSON object")
    return value
