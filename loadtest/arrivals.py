"""When requests are sent: open-loop inter-arrival times (Poisson, gamma, constant).

Only the schedule lives here; the closed loop (fixed concurrency) needs no schedule and is run by
the runner. Gamma with shape `burstiness` and mean 1/rate is vLLM's model: shape 1 is Poisson,
below 1 burstier, above 1 smoother.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

ARRIVAL_KINDS = ("poisson", "gamma", "constant")


@dataclass(frozen=True)
class ArrivalProcess:
    """Inter-arrival times for `rate` requests per second (`math.inf`: all at once)."""

    rate: float
    kind: str = "poisson"
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not self.rate > 0:
            problems.append(f"rate must be > 0 requests/s (or inf), got {self.rate}")
        if self.kind not in ARRIVAL_KINDS:
            problems.append(
                f"arrival kind must be one of {', '.join(ARRIVAL_KINDS)}, got {self.kind!r}"
            )
        if not self.burstiness > 0:
            problems.append(f"burstiness (gamma shape) must be > 0, got {self.burstiness}")
        if problems:
            raise ValueError("; ".join(problems))

    def intervals(self, rng: random.Random) -> Iterator[float]:
        """Endless seconds between consecutive sends; the first send waits one interval too."""
        if math.isinf(self.rate):
            while True:
                yield 0.0
        mean = 1.0 / self.rate
        if self.kind == "constant":
            while True:
                yield mean
        shape = 1.0 if self.kind == "poisson" else self.burstiness
        if shape == 1.0:
            while True:
                yield rng.expovariate(self.rate)
        scale = mean / shape
        while True:
            yield rng.gammavariate(shape, scale)

    def send_times(self, rng: random.Random, *, count: int) -> list[float]:
        """The first `count` send offsets in seconds from the start (cumulative intervals)."""
        times, t = [], 0.0
        for _, gap in zip(range(count), self.intervals(rng), strict=False):
            t += gap
            times.append(t)
        return times


def parse_arrival(kind: str, *, burstiness: float) -> str:
    """`poisson` with a burstiness other than 1 means gamma, as in `vllm bench serve`."""
    if kind == "poisson" and burstiness != 1.0:
        return "gamma"
    return kind
