"""The registry's exceptions: domain code raises these, the CLI (and later the HTTP layer) maps them.

RegistryError
├── RegistryUserError                  the request cannot be honoured as asked (CLI exit 2)
│   ├── InvalidReferenceError          a malformed name, alias or NAME@VERSION|ALIAS
│   ├── AdapterRejectedError           validation found problems (.problems lists every one)
│   ├── NotFoundError
│   │   ├── AdapterNotFoundError       no adapter of that name
│   │   ├── VersionNotFoundError       the adapter has no such version
│   │   ├── AliasNotFoundError         the adapter has no such alias
│   │   ├── ExperimentNotFoundError    no experiment of that id (or none on that name)
│   │   └── CompletionNotFoundError    feedback for a completion unknown or too old to rate
│   ├── NothingToRollBackError         the alias has no earlier version to return to
│   ├── InvalidExperimentError         an experiment plan or step breaks the rules (.problems)
│   ├── ExperimentConflictError        the name already has a running experiment
│   ├── ExperimentNotRunningError      the experiment has already ended
│   ├── InvalidFeedbackError           a feedback score outside [0, 1]
│   └── UnknownArtifactSchemeError     an artifact store URL with a scheme nobody handles
├── ArtifactError                      moving adapter archives (CLI exit 1)
│   ├── ArtifactNotFoundError          the store has no archive for that sha256
│   ├── ArtifactIntegrityError         bytes do not match their sha256, or an unsafe archive
│   │   └── ArchiveTooLargeError       an archive unpacks (or decompresses) beyond its cap
│   └── ArtifactStoreError             the store itself failed (I/O, S3, missing bucket)
├── RegistryDatabaseError              the metadata database cannot be opened or migrated
├── RegistryUnavailableError           the metadata database cannot be reached (or read) now
└── ImmutableRecordError               code tried to change a version or an alias event
"""

from __future__ import annotations

from collections.abc import Sequence


class RegistryError(Exception):
    """Base of every error the registry raises on purpose."""


class RegistryUserError(RegistryError):
    """The caller asked for something that cannot be done; retrying as-is will not help."""


class InvalidReferenceError(RegistryUserError):
    """A name, alias or reference does not follow the rules."""


class AdapterRejectedError(RegistryUserError):
    """The adapter folder failed validation; nothing was stored."""

    def __init__(self, name: str, problems: Sequence[str]) -> None:
        self.name = name
        self.problems = list(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"{name} rejected ({count} {noun}): " + "; ".join(self.problems))


class NotFoundError(RegistryUserError):
    """What was asked for does not exist; the message says what does."""


class AdapterNotFoundError(NotFoundError):
    pass


class VersionNotFoundError(NotFoundError):
    pass


class AliasNotFoundError(NotFoundError):
    pass


class ExperimentNotFoundError(NotFoundError):
    pass


class CompletionNotFoundError(NotFoundError):
    pass


class NothingToRollBackError(RegistryUserError):
    pass


class InvalidExperimentError(RegistryUserError):
    """An experiment's plan (variants, ramp, config) or a step change breaks the rules."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"invalid experiment ({count} {noun}): " + "; ".join(self.problems))


class ExperimentConflictError(RegistryUserError):
    """Only one experiment per adapter name runs at a time."""


class ExperimentNotRunningError(RegistryUserError):
    pass


class InvalidFeedbackError(RegistryUserError):
    pass


class UnknownArtifactSchemeError(RegistryUserError):
    pass


class ArtifactError(RegistryError):
    """Storing or fetching an adapter archive failed."""


class ArtifactNotFoundError(ArtifactError):
    pass


class ArtifactIntegrityError(ArtifactError):
    pass


class ArchiveTooLargeError(ArtifactIntegrityError):
    pass


class ArtifactStoreError(ArtifactError):
    pass


class RegistryDatabaseError(RegistryError):
    pass


class RegistryUnavailableError(RegistryError):
    """The metadata database cannot be reached or read right now (down, refusing connections,
    unreadable); the request itself may be fine, so retrying later may work."""


class ImmutableRecordError(RegistryError):
    """Versions and alias events are written once; a change is a bug in the caller."""
