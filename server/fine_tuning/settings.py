"""Settings of the fine-tuning API and its workers: flags, else `LORAPLEX_*` variables, else
defaults (the registry's settings: database, artifacts, data dir)."""

from __future__ import annotations

from pydantic import Field

from registry.fine_tuning import STALE_SECONDS
from registry.settings import RegistrySettings

DEFAULT_MAX_FILE_BYTES = 512 * 1024**2


class FineTuningSettings(RegistrySettings):
    fine_tuning_worker: bool = Field(
        default=True, description="`loraplex serve` runs a fine-tuning worker in-process"
    )
    fine_tuning_max_file_bytes: int = Field(
        default=DEFAULT_MAX_FILE_BYTES, ge=1, description="largest uploaded file; above: 413"
    )
    fine_tuning_gate: bool = Field(
        default=True, description="a job's adapter must pass the trainer's serving gate"
    )
    fine_tuning_poll_seconds: float = Field(default=1.0, gt=0, description="queue poll period")
    fine_tuning_stale_seconds: float = Field(
        default=STALE_SECONDS, gt=0,
        description="a job whose worker has not beaten for this long is taken over",
    )  # fmt: skip
