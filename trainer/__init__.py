"""The trainer: chat data in, an evaluated, registered adapter out (validation, split, SFT, distillation)."""
