"""Which variant of a running experiment serves a user: a pure function of (salt, user key).

Sticky without state (AB-STATS.md, design choice 3): the bucket is the first 8 bytes of
sha256(f"{salt}.{user}") big-endian, mod 10,000, so every replica, and every restart, puts a user
in the same bucket. Two layouts:

* a ramp (control and one candidate): with treatment share f, buckets [0, 10000 f) get the
  candidate and [5000, 5000 + 10000 f) the control; both ranges only grow as f rises, so raising
  the share adds users to both arms and never moves one between arms, and the analysed slice
  stays 1:1 for the whole ramp. Everyone else is served the control and left out of the analysis.
* weighted variants (no ramp): contiguous bucket ranges in proportion to the weights, everyone
  analysed.

A request without a user key is assigned per request (a random bucket, same layout) and is never
part of the analysis. A new experiment has a new salt, so users are reshuffled between
experiments.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from registry.experiment_records import ExperimentRecord, Variant

BUCKETS = 10_000
HALF = BUCKETS // 2
HASH_VERSION = 1  # recorded with each experiment; a different hash would need a new number
MAX_USER_KEY_CHARS = 256


def _digest(salt: str, user: str) -> bytes:
    return hashlib.sha256(f"{salt}.{user}".encode()).digest()


def bucket_of(salt: str, user: str) -> int:
    return int.from_bytes(_digest(salt, user)[:8], "big") % BUCKETS


def user_hash(salt: str, user: str) -> str:
    """What the database stores for a user: salted, so raw user keys are never written."""
    return _digest(salt, user)[:16].hex()


@dataclass(frozen=True, slots=True)
class Assignment:
    experiment_id: int
    variant: Variant
    analysed: bool  # counts in the statistics (a keyed user inside the analysed slice)
    user_hash: str | None  # None for a request without a user key

    @property
    def keyed(self) -> bool:
        return self.user_hash is not None


class Splitter:
    """The assignment rule of one experiment at its current ramp step."""

    def __init__(self, experiment: ExperimentRecord, *, rng: random.Random | None = None):
        if experiment.hash_version != HASH_VERSION:
            raise ValueError(
                f"experiment {experiment.id} uses hash version {experiment.hash_version}; "
                f"this server knows version {HASH_VERSION}"
            )
        self.experiment = experiment
        self._rng = rng or random.Random()
        self._variants = experiment.variants
        self.share = treatment_share(experiment)
        if self.share is None:
            total = sum(v.weight for v in self._variants)
            edges, running = [], 0.0
            for v in self._variants:
                running += v.weight
                edges.append(round(BUCKETS * running / total))
            self._edges = edges
        else:
            self._edges = []
            self._cut = round(BUCKETS * self.share)

    def variant_for_bucket(self, bucket: int) -> tuple[Variant, bool]:
        """(variant served, whether this bucket is in the analysed slice)."""
        if self.share is None:
            for variant, edge in zip(self._variants, self._edges, strict=True):
                if bucket < edge:
                    return variant, True
            return self._variants[-1], True
        control, candidate = self._variants
        if bucket < self._cut:
            return candidate, True
        if HALF <= bucket < HALF + self._cut:
            return control, True
        return control, False

    def assign(self, user: str | None) -> Assignment:
        if user is None:
            variant, _ = self.variant_for_bucket(self._rng.randrange(BUCKETS))
            return Assignment(self.experiment.id, variant, analysed=False, user_hash=None)
        variant, analysed = self.variant_for_bucket(bucket_of(self.experiment.salt, user))
        return Assignment(
            self.experiment.id,
            variant,
            analysed=analysed,
            user_hash=user_hash(self.experiment.salt, user),
        )


def treatment_share(experiment: ExperimentRecord) -> float | None:
    """The candidate's share of all traffic at the current ramp step (None without a ramp)."""
    if not experiment.ramp:
        return None
    step = min(max(experiment.step, 0), len(experiment.ramp) - 1)
    return experiment.ramp[step] / 100.0


def propensity(experiment: ExperimentRecord, candidate: Variant) -> float:
    """P(candidate | user in the comparison of candidate vs control), fixed by the design."""
    if experiment.ramp:
        return 0.5
    control = experiment.control
    return candidate.weight / (candidate.weight + control.weight)
