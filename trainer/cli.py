"""The trainer's commands, mounted by the `loraplex` root: `data validate|split` (more as they land)."""

from __future__ import annotations

from trainer.data_cli import data_app

__all__ = ["data_app"]
