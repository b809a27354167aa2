"""The names a user writes: adapter names, aliases, `NAME`, `NAME@7`, `NAME@alias`, and the
identity of a base model. Pure parsing; nothing here touches a database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import InvalidReferenceError

DEFAULT_ALIAS = "production"
MAX_ACTOR_CHARS = 128  # the actor columns' width

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A parsed reference: exactly one of `version` and `alias` is set."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.version if self.version is not None else self.alias}"


def check_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise InvalidReferenceError."""
    if not _NAME.match(name):
        raise InvalidReferenceError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_alias(alias: str) -> str:
    """Return `alias` if it is a valid alias (a letter first, so it never reads as a version)."""
    if not _ALIAS.match(alias):
        raise InvalidReferenceError(
            f"invalid alias {alias!r}: use 1-32 letters, digits, '_' or '-', starting with a letter"
        )
    return alias


def check_actor(actor: str) -> str:
    """Return `actor` (who registers or moves an alias) if it is 1-128 printable characters."""
    if not actor or len(actor) > MAX_ACTOR_CHARS or not actor.isprintable():
        raise InvalidReferenceError(
            f"invalid actor {actor[:40]!r}: use 1-{MAX_ACTOR_CHARS} printable characters"
        )
    return actor


def check_version(version: int) -> int:
    if version < 1:
        raise InvalidReferenceError(f"invalid version {version}: versions start at 1")
    return version


def parse_ref(text: str, *, default_alias: str = DEFAULT_ALIAS) -> AdapterRef:
    """`NAME` -> alias `default_alias`; `NAME@7` -> version 7; `NAME@staging` -> alias staging."""
    name, sep, tail = text.strip().partition("@")
    check_name(name)
    if not sep:
        return AdapterRef(name, alias=default_alias)
    if tail.isdigit():
        return AdapterRef(name, version=check_version(int(tail)))
    return AdapterRef(name, alias=check_alias(tail))


def base_model_identity(value: str) -> str:
    """The comparable identity of a base model named by a hub id or a local folder.

    PEFT records `base_model_name_or_path` as given at training time, often an absolute path
    that differs between machines; the last path component, lower-cased, is what stays the same
    ("/root/.cache/x/SmolLM2-135M-Instruct" and "HuggingFaceTB/SmolLM2-135M-Instruct" agree).
    """
    return value.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
