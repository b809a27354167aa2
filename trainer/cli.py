"""The trainer's commands, mounted by the `loraplex` root: `data validate|split`, `train`,
`distill`, `eval`."""

from __future__ import annotations

from trainer.data_cli import data_app
from trainer.distill_cli import distill
from trainer.eval_cli import eval_command
from trainer.train_cli import train

__all__ = ["data_app", "distill", "eval_command", "train"]
