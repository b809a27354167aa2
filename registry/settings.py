"""Runtime settings of the registry: flags, else `LORAPLEX_*` environment variables, else defaults.

Built once by the CLI (or the server's app factory, or a test) and passed down; nothing below
reads the environment. Defaults need no service: SQLite and a folder under the data dir.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry.base_model import EMBEDDED_MODEL_FOLDER


class RegistrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    home: Path = Field(default=Path("~/.loraplex"), description="data dir")
    registry: str | None = Field(
        default=None, description="database URL; default sqlite:///<home>/registry.db"
    )
    artifacts: str | None = Field(
        default=None, description="artifact store URL; default file://<home>/artifacts"
    )
    max_lora_rank: int = Field(default=16, ge=1, description="largest rank accepted")
    base_model: str = Field(
        default="smollm2",
        description="identity recorded for the base model adapters are served on",
    )
    base_model_dir: Path | None = Field(
        default=None,
        description="folder (config.json) of the base model adapters are checked against; "
        "default: the embedded model's folder under the data dir",
    )

    def data_dir(self) -> Path:
        return self.home.expanduser()

    def base_model_folder(self) -> Path:
        return (
            self.base_model_dir or self.data_dir() / "models" / EMBEDDED_MODEL_FOLDER
        ).expanduser()

    def database_url(self) -> str:
        return self.registry or f"sqlite:///{self.data_dir() / 'registry.db'}"

    def artifacts_url(self) -> str:
        return self.artifacts or (self.data_dir() / "artifacts").resolve().as_uri()
