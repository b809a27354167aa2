"""The trainer's commands, mounted by the `loraplex` root: `data validate|split`, `distill`."""

from __future__ import annotations

from trainer.data_cli import data_app
from trainer.distill_cli import distill

__all__ = ["data_app", "distill"]
