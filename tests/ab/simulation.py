"""A/A simulation harness for server.ab.stats: replicates of an experiment with no effect, every
procedure looked at after EVERY user (the worst case), a replicate counted as a false alarm when any
look rejects. Data are 2-D arrays (replicate x user) so a thousand replicates take seconds.

The always-valid procedures keep running bounds (running max / min), so "any look rejected" is read
off their value after the last user. The negative controls (tests that are not valid under peeking
or with the request as the unit) are computed here from cumsums.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from server.ab.stats import (
    difference_cs_bounds,
    first_error_log_e,
    log_bayes_factor_path,
)

ALPHA = 0.05
SRM_THRESHOLD = 0.05  # 0.001 in production; 0.05 so that R = 1000 replicates can check the bound
_CHUNK = 250  # replicates per batch: bounds memory to a few hundred MB at 4000 users


@dataclass(frozen=True)
class Replicates:
    """One scenario's data: row r is replicate r, column u its u-th user in assignment order."""

    y: np.ndarray  # per-user outcome in [0, 1]
    a: np.ndarray  # arm: 1 treatment, 0 control
    had_error: np.ndarray  # the user had at least one error in the window
    propensity: float = 0.5
    requests: np.ndarray | None = None  # per-user request and error counts, where modelled
    errors: np.ndarray | None = None


def binom_quantile(q: float, n: int, p: float) -> int:
    """Smallest k with P(Binomial(n, p) <= k) >= q (scipy's binom.ppf), summed in log space."""
    cdf = 0.0
    for k in range(n + 1):
        log_pmf = math.log(math.comb(n, k)) + k * math.log(p) + (n - k) * math.log1p(-p)
        cdf += math.exp(log_pmf)
        if cdf >= q * (1 - 1e-12):
            return k
    return n


def _arms(rng: np.random.Generator, shape: tuple[int, int], propensity: float = 0.5) -> np.ndarray:
    return (rng.random(shape) < propensity).astype(np.int8)


def _errors(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.random(shape) < 0.1


def iid_beta(rng: np.random.Generator, shape: tuple[int, int]) -> Replicates:
    return Replicates(rng.beta(5, 2, shape), _arms(rng, shape), _errors(rng, shape))


def five_point(rng: np.random.Generator, shape: tuple[int, int]) -> Replicates:
    """A skewed 1-5 rating mapped to [0, 1]: most users give 5."""
    y = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=shape, p=[0.04, 0.03, 0.08, 0.25, 0.6])
    return Replicates(y, _arms(rng, shape), _errors(rng, shape))


def bernoulli(rng: np.random.Generator, shape: tuple[int, int]) -> Replicates:
    return Replicates(
        (rng.random(shape) < 0.2).astype(float), _arms(rng, shape), _errors(rng, shape)
    )


def mostly_silent(rng: np.random.Generator, shape: tuple[int, int]) -> Replicates:
    """60 % of users give no feedback and get the frozen neutral value 0.5."""
    y = np.where(rng.random(shape) < 0.6, 0.5, rng.beta(5, 2, shape))
    return Replicates(y, _arms(rng, shape), _errors(rng, shape))


def common_drift(rng: np.random.Generator, shape: tuple[int, int]) -> Replicates:
    """A diurnal trend shared by both arms: four 'days' over the run, mean 0.3 .. 0.9."""
    day = np.arange(shape[1]) / (shape[1] / 4)
    mean = 0.6 + 0.3 * np.sin(2 * np.pi * day)
    y = rng.beta(8 * mean, 8 * (1 - mean), shape)
    had_error = rng.random(shape) < 0.1 + 0.08 * np.sin(2 * np.pi * day)
    return Replicates(y, _arms(rng, shape), had_error)


def heavy_users(rng: np.random.Generator, shape: tuple[int, int]) -> Replicates:
    """Pareto request counts and a Beta per-user error propensity; y is the user's error rate."""
    requests = 1 + np.floor(3 * rng.pareto(1.1, shape)).astype(np.int64)
    errors = rng.binomial(requests, rng.beta(0.3, 6, shape))
    return Replicates(
        errors / requests, _arms(rng, shape), errors > 0, requests=requests, errors=errors
    )


def sha256_buckets(rng: np.random.Generator, shape: tuple[int, int]) -> Replicates:
    """Production assignment: a fresh salt per replicate, bucket = sha256 % 10,000, T below 5000."""
    salts = rng.integers(0, 2**62, shape[0])
    sha = hashlib.sha256
    buckets = np.array(
        [
            [
                int.from_bytes(sha(f"{salt}.user-{u}".encode()).digest()[:8], "big") % 10000
                for u in range(shape[1])
            ]
            for salt in salts.tolist()
        ]
    )
    return Replicates(rng.beta(5, 2, shape), (buckets < 5000).astype(np.int8), _errors(rng, shape))


def unequal_split(rng: np.random.Generator, shape: tuple[int, int]) -> Replicates:
    """30 % of users in treatment; the procedures are told the propensity."""
    a = _arms(rng, shape, 0.3)
    return Replicates(rng.beta(5, 2, shape), a, _errors(rng, shape), propensity=0.3)


SCENARIOS: dict[str, Callable[[np.random.Generator, tuple[int, int]], Replicates]] = {
    "iid_beta": iid_beta,
    "five_point": five_point,
    "bernoulli": bernoulli,
    "mostly_silent": mostly_silent,
    "common_drift": common_drift,
    "heavy_users": heavy_users,
    "sha256_buckets": sha256_buckets,
    "unequal_split": unequal_split,
}


def generate(scenario: str, *, replicates: int, users: int, seed: int) -> Replicates:
    return SCENARIOS[scenario](np.random.default_rng(seed), (replicates, users))


def _chunks(data: Replicates) -> Iterator[slice]:
    for start in range(0, data.y.shape[0], _CHUNK):
        yield slice(start, start + _CHUNK)


def difference_alarms(data: Replicates, *, sides: str, alpha: float = ALPHA) -> int:
    """Replicates in which some look's DifferenceCS excluded Δ = 0 (on the tested side)."""
    alarms = 0
    for rows in _chunks(data):
        lower, upper = difference_cs_bounds(
            data.y[rows], data.a[rows], alpha=alpha, sides=sides, propensity=data.propensity
        )
        alarms += int(np.sum((lower[:, -1] > 0) | (upper[:, -1] < 0)))
    return alarms


def first_error_alarms(data: Replicates, *, alpha: float = ALPHA) -> int:
    """Replicates in which the first-error e-process reached 1/alpha at some user."""
    n = np.cumsum(data.had_error, axis=1)
    treatment = np.cumsum(data.had_error & (data.a == 1), axis=1)
    # E_n changes only at a first error: evaluating it there is evaluating it after every user.
    log_e = np.zeros(n.shape)  # E_0 = 1
    at = data.had_error
    log_e[at] = first_error_log_e(n[at], treatment[at], propensity=data.propensity)
    return int(np.sum(log_e.max(axis=1) >= math.log(1 / alpha)))


def srm_alarms(data: Replicates, *, threshold: float = SRM_THRESHOLD) -> int:
    """Replicates in which the sequential SRM test fired at some user."""
    rho = (1 - data.propensity, data.propensity)  # arm index = a: control 0, treatment 1
    log_bf = log_bayes_factor_path(data.a, rho)
    return int(np.sum(log_bf.max(axis=1) >= math.log(1 / threshold)))


def peeked_z_alarms(data: Replicates, *, z: float = 1.96, min_per_arm: int = 10) -> int:
    """Negative control: a fixed-horizon two-sample z-test on user means, looked at after every
    user once both arms have `min_per_arm` users."""
    alarms = 0
    for rows in _chunks(data):
        y, a = data.y[rows], data.a[rows]
        stats = []
        for arm in (a == 1, a == 0):
            n = np.cumsum(arm, axis=1)
            mean = np.cumsum(y * arm, axis=1) / np.maximum(n, 1)
            var = np.cumsum(y**2 * arm, axis=1) / np.maximum(n, 1) - mean**2
            stats.append((n, mean, np.maximum(var, 0) / np.maximum(n - 1, 1)))
        (n1, m1, v1), (n0, m0, v0) = stats
        ready = (n1 >= min_per_arm) & (n0 >= min_per_arm) & (v1 + v0 > 0)
        score = np.abs(m1 - m0) / np.sqrt(np.where(ready, v1 + v0, 1.0))
        alarms += int(np.sum(np.any(ready & (score >= z), axis=1)))
    return alarms


def _two_proportion_z(x1: np.ndarray, n1: np.ndarray, x0: np.ndarray, n0: np.ndarray) -> np.ndarray:
    pooled = (x1 + x0) / (n1 + n0)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    return np.abs(x1 / n1 - x0 / n0) / se


def per_request_alarms(data: Replicates, *, z: float = 1.96) -> int:
    """Negative control: a two-proportion z-test with the REQUEST as the unit, looked at once, at
    the end. Heavy users make requests far from independent, so it rejects far too often."""
    if data.requests is None or data.errors is None:
        raise ValueError("this scenario does not model requests")
    t, c = data.a == 1, data.a == 0
    score = _two_proportion_z(
        np.sum(data.errors * t, axis=1),
        np.sum(data.requests * t, axis=1),
        np.sum(data.errors * c, axis=1),
        np.sum(data.requests * c, axis=1),
    )
    return int(np.sum(score >= z))


def per_user_fixed_alarms(data: Replicates, *, z: float = 1.96) -> int:
    """Contrast for `per_request_alarms`: the same data with the USER as the unit (a z-test on
    per-user error rates, looked at once, at the end): close to its nominal 5 %."""
    t, c = data.a == 1, data.a == 0
    n1, n0 = t.sum(axis=1), c.sum(axis=1)
    m1, m0 = (data.y * t).sum(axis=1) / n1, (data.y * c).sum(axis=1) / n0
    v1 = ((data.y - m1[:, None]) ** 2 * t).sum(axis=1) / (n1 - 1) / n1
    v0 = ((data.y - m0[:, None]) ** 2 * c).sum(axis=1) / (n0 - 1) / n0
    return int(np.sum(np.abs(m1 - m0) / np.sqrt(v1 + v0) >= z))
