"""Always-valid statistics for A/B experiments: confidence sequences and e-processes that may be
looked at after every user without inflating the false-alarm rate (formulas: shared AB-STATS.md).

- `MeanCS`, `DifferenceCS`: PrPl-EB confidence sequences (Waudby-Smith & Ramdas 2024, JRSSB) for a
  mean in [0, 1] and for the difference of two arm means under a known propensity.
- `FirstErrorEProcess`: relative-risk mixture e-process on the arms of users' first errors.
- `SequentialSRM`: Dirichlet-multinomial Bayes factor for sample-ratio mismatch (Lindon & Malek 2022).

Every class keeps O(1) state (`to_state` / `from_state`, plain JSON) and updates from a batch with
numpy cumsums; the `*_bounds` / `*_path` functions give the value after every observation along the
last axis (any leading axes, e.g. simulation replicates). Assignment and decisions live elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Sides = Literal["two", "lower", "upper"]
_SIDES = ("two", "lower", "upper")
_SIDES_BY_FLAGS = {(1, 1): "two", (1, 0): "lower", (0, 1): "upper"}  # (has_lower, has_upper)
_STATE_VERSION = 1


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {alpha!r}")
    return float(alpha)


def _check_sides(sides: str) -> str:
    if sides not in _SIDES:
        raise ValueError(f"sides must be one of {', '.join(_SIDES)}; got {sides!r}")
    return sides


def _check_propensity(propensity: float) -> float:
    if not 0.0 < propensity < 1.0:
        raise ValueError(f"propensity must be in (0, 1), got {propensity!r}")
    return float(propensity)


def _unit_interval(values: Any, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    # NaN fails both comparisons, so it is refused too.
    if not np.all((x >= 0.0) & (x <= 1.0)):
        raise ValueError(f"{name} must lie in [0, 1] (no NaN)")
    return x


def _zero_one(values: Any, name: str) -> np.ndarray:
    raw = np.asarray(values)
    if not np.all((raw == 0) | (raw == 1)):
        raise ValueError(f"{name} must be 0 or 1")
    return raw.astype(float)


def _shift(steps: np.ndarray, first: Any) -> np.ndarray:
    """The value before each step along the last axis: `first`, then steps[..., :-1]."""
    head = np.broadcast_to(np.asarray(first, dtype=float), steps.shape[:-1] + (1,))
    return np.concatenate([head, steps[..., :-1]], axis=-1)


def _read_state(state: dict, keys: tuple[str, ...], kind: str) -> dict:
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{kind} state lacks {', '.join(missing)}")
    if state["version"] != _STATE_VERSION:
        raise ValueError(f"{kind} state version {state['version']!r}, expected {_STATE_VERSION}")
    return state


# --- PrPl-EB betting sums --------------------------------------------------------------------


@dataclass(frozen=True)
class _Sums:
    """Running sums of PrPl-EB after t observations (floats, or arrays of per-step values)."""

    n: Any = 0
    sum_x: Any = 0.0  # Σ X_i
    sum_sq: Any = 0.0  # Σ (X_i − μ̃_i)²
    sum_lam: Any = 0.0  # Σ λ_i
    sum_lam_x: Any = 0.0  # Σ λ_i X_i
    sum_penalty: Any = 0.0  # Σ v_i ψ_E(λ_i)

    def last(self) -> _Sums:
        """The sums after the final step, as plain Python numbers."""
        values = {key: float(np.asarray(value).flat[-1]) for key, value in asdict(self).items()}
        return _Sums(**{**values, "n": int(values["n"])})


def _bet(x: np.ndarray, start: _Sums, log_inv_alpha: float) -> _Sums:
    """The sums after each observation of x (last axis), continuing from `start`."""
    t = start.n + np.arange(1, x.shape[-1] + 1, dtype=float)
    sum_x = start.sum_x + np.cumsum(x, axis=-1)
    # μ̃_t = (½ + Σ_{i≤t} X_i)/(t + 1): the paper's regularised mean, μ̃_0 = ½.
    mean = (0.5 + sum_x) / (t + 1.0)
    mean_before = _shift(mean, (0.5 + start.sum_x) / (start.n + 1.0))
    sum_sq = start.sum_sq + np.cumsum((x - mean) ** 2, axis=-1)
    # σ̂²_t = (¼ + Σ_{i≤t}(X_i − μ̃_i)²)/(t + 1), σ̂²_0 = ¼; λ_t uses σ̂²_{t−1} (predictable).
    var_before = _shift((0.25 + sum_sq) / (t + 1.0), (0.25 + start.sum_sq) / (start.n + 1.0))
    lam = np.minimum(0.5, np.sqrt(2.0 * log_inv_alpha / (var_before * t * np.log1p(t))))
    # v_t = (X_t − μ̃_{t−1})², ψ_E(λ) = −ln(1 − λ) − λ.
    penalty = (x - mean_before) ** 2 * (-np.log1p(-lam) - lam)
    return _Sums(
        n=t,
        sum_x=sum_x,
        sum_sq=sum_sq,
        sum_lam=start.sum_lam + np.cumsum(lam, axis=-1),
        sum_lam_x=start.sum_lam_x + np.cumsum(lam * x, axis=-1),
        sum_penalty=start.sum_penalty + np.cumsum(penalty, axis=-1),
    )


def _log_inv_alpha(alpha: float, sides: str) -> float:
    return math.log((2.0 if sides == "two" else 1.0) / alpha)


def _running_bounds(
    sums: _Sums, log_inv_alpha: float, sides: str, lower0: float = 0.0, upper0: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Running max of L_t and running min of U_t on the [0, 1] scale, after each step."""
    shape = np.shape(sums.sum_lam)
    if sides == "upper":
        lower = np.full(shape, lower0)
    else:
        l_t = (sums.sum_lam_x - log_inv_alpha - sums.sum_penalty) / sums.sum_lam
        lower = np.maximum(np.maximum.accumulate(l_t, axis=-1), lower0)
    if sides == "lower":
        upper = np.full(shape, upper0)
    else:
        # U_t = 1 − L_t computed on 1 − X, whose μ̃, σ̂², λ and v are those of X.
        u_t = (sums.sum_lam_x + log_inv_alpha + sums.sum_penalty) / sums.sum_lam
        upper = np.minimum(np.minimum.accumulate(u_t, axis=-1), upper0)
    return lower, upper


def mean_cs_bounds(
    x: Any, *, alpha: float = 0.05, sides: Sides = "two"
) -> tuple[np.ndarray, np.ndarray]:
    """MeanCS's (lower, upper) after each observation along the last axis of x."""
    x = _unit_interval(x, "observations")
    log_inv_alpha = _log_inv_alpha(_check_alpha(alpha), _check_sides(sides))
    return _running_bounds(_bet(x, _Sums(), log_inv_alpha), log_inv_alpha, sides)


class MeanCS:
    """Always-valid CS for the mean of observations in [0, 1]: PrPl-EB (Waudby-Smith & Ramdas 2024, JRSSB)."""

    _KEYS = ("version", "alpha", "has_lower", "has_upper", "lower", "upper", *_Sums.__annotations__)

    def __init__(self, alpha: float = 0.05, sides: Sides = "two"):
        self.alpha = _check_alpha(alpha)
        self.sides = _check_sides(sides)
        self._log_inv_alpha = _log_inv_alpha(self.alpha, self.sides)
        self._sums = _Sums()
        self.lower = 0.0
        self.upper = 1.0

    @property
    def n(self) -> int:
        return int(self._sums.n)

    @property
    def mean(self) -> float:
        return self._sums.sum_x / self.n if self.n else 0.5

    def update(self, x: Any) -> None:
        self._update(_unit_interval(x, "observations").ravel())

    def _update(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        sums = _bet(x, self._sums, self._log_inv_alpha)
        lower, upper = _running_bounds(
            sums, self._log_inv_alpha, self.sides, self.lower, self.upper
        )
        self._sums = sums.last()
        self.lower, self.upper = float(lower[-1]), float(upper[-1])

    def to_state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "alpha": self.alpha,
            "has_lower": int(self.sides != "upper"),
            "has_upper": int(self.sides != "lower"),
            "lower": self.lower,
            "upper": self.upper,
            **{key: (int(v) if key == "n" else float(v)) for key, v in asdict(self._sums).items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> MeanCS:
        state = _read_state(state, cls._KEYS, cls.__name__)
        sides = _SIDES_BY_FLAGS.get((state["has_lower"], state["has_upper"]))
        if sides is None:
            raise ValueError(f"{cls.__name__} state has neither a lower nor an upper side")
        cs = cls(state["alpha"], sides)  # type: ignore[arg-type]
        cs._sums = _Sums(**{key: state[key] for key in _Sums.__annotations__})
        cs.lower, cs.upper = state["lower"], state["upper"]
        return cs


# --- Difference of arm means -----------------------------------------------------------------


@dataclass(frozen=True)
class _Arms:
    """Users and outcome sums per arm so far."""

    n_treatment: int = 0
    n_control: int = 0
    sum_treatment: float = 0.0
    sum_control: float = 0.0


def _difference_x(y: np.ndarray, a: np.ndarray, propensity: float, start: _Arms) -> np.ndarray:
    """X_u = (ψ_u + B)/(2B) in [0, 1], where E[ψ_u | past] = Δ by randomisation alone."""
    # m1, m0: regularised arm means of EARLIER users only (predictable), ½ before any.
    n1 = _shift(start.n_treatment + np.cumsum(a, axis=-1), start.n_treatment)
    n0 = _shift(start.n_control + np.cumsum(1.0 - a, axis=-1), start.n_control)
    s1 = _shift(start.sum_treatment + np.cumsum(a * y, axis=-1), start.sum_treatment)
    s0 = _shift(start.sum_control + np.cumsum((1.0 - a) * y, axis=-1), start.sum_control)
    m1 = (0.5 + s1) / (1.0 + n1)
    m0 = (0.5 + s0) / (1.0 + n0)
    # ψ_u = m1 − m0 + A_u(y_u − m1)/π − (1 − A_u)(y_u − m0)/(1 − π)
    psi = m1 - m0 + np.where(a == 1.0, (y - m1) / propensity, (m0 - y) / (1.0 - propensity))
    bound = _psi_bound(propensity)
    # The clip only removes rounding below 0 or above 1; ψ lies in [−B, B] exactly.
    return np.clip((psi + bound) / (2.0 * bound), 0.0, 1.0)


def _psi_bound(propensity: float) -> float:
    return max(1.0 / propensity, 1.0 / (1.0 - propensity))


def _delta_bounds(lower: Any, upper: Any, propensity: float) -> tuple[Any, Any]:
    """Bounds for X's mean mapped back to Δ ∈ [2B·L − B, 2B·U − B], within [−1, 1]."""
    bound = _psi_bound(propensity)
    return (
        np.clip(2.0 * bound * lower - bound, -1.0, 1.0),
        np.clip(2.0 * bound * upper - bound, -1.0, 1.0),
    )


def _outcomes_and_arms(y: Any, a: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _unit_interval(y, "outcomes")
    a = _zero_one(a, "arms")
    if y.shape != a.shape:
        raise ValueError(f"outcomes and arms differ in shape: {y.shape} vs {a.shape}")
    return y, a


def difference_cs_bounds(
    y: Any, a: Any, *, alpha: float = 0.05, sides: Sides = "two", propensity: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """DifferenceCS's (lower, upper) on Δ after each user along the last axis."""
    y, a = _outcomes_and_arms(y, a)
    propensity = _check_propensity(propensity)
    log_inv_alpha = _log_inv_alpha(_check_alpha(alpha), _check_sides(sides))
    x = _difference_x(y, a, propensity, _Arms())
    lower, upper = _running_bounds(_bet(x, _Sums(), log_inv_alpha), log_inv_alpha, sides)
    return _delta_bounds(lower, upper, propensity)


class DifferenceCS:
    """CS for Δ = E[y | A=1] − E[y | A=0], y in [0,1], users in assignment order, A known-propensity π."""

    _KEYS = ("propensity", *_Arms.__annotations__)

    def __init__(self, alpha: float = 0.05, sides: Sides = "two", propensity: float = 0.5):
        self.propensity = _check_propensity(propensity)
        self._x = MeanCS(alpha, sides)
        self._arms = _Arms()

    @property
    def alpha(self) -> float:
        return self._x.alpha

    @property
    def sides(self) -> str:
        return self._x.sides

    @property
    def n(self) -> int:
        return self._x.n

    @property
    def n_treatment(self) -> int:
        return self._arms.n_treatment

    @property
    def n_control(self) -> int:
        return self._arms.n_control

    @property
    def mean_treatment(self) -> float:
        arms = self._arms
        return arms.sum_treatment / arms.n_treatment if arms.n_treatment else 0.5

    @property
    def mean_control(self) -> float:
        arms = self._arms
        return arms.sum_control / arms.n_control if arms.n_control else 0.5

    @property
    def estimate(self) -> float:
        return self.mean_treatment - self.mean_control

    @property
    def lower(self) -> float:
        return float(_delta_bounds(self._x.lower, self._x.upper, self.propensity)[0])

    @property
    def upper(self) -> float:
        return float(_delta_bounds(self._x.lower, self._x.upper, self.propensity)[1])

    def update(self, y: Any, a: Any) -> None:
        y, a = _outcomes_and_arms(y, a)
        y, a = y.ravel(), a.ravel()
        if y.size == 0:
            return
        self._x._update(_difference_x(y, a, self.propensity, self._arms))
        treated = int(a.sum())
        self._arms = _Arms(
            n_treatment=self._arms.n_treatment + treated,
            n_control=self._arms.n_control + (a.size - treated),
            sum_treatment=float(self._arms.sum_treatment + np.sum(a * y)),
            sum_control=float(self._arms.sum_control + np.sum((1.0 - a) * y)),
        )

    def to_state(self) -> dict:
        return {**self._x.to_state(), "propensity": self.propensity, **asdict(self._arms)}

    @classmethod
    def from_state(cls, state: dict) -> DifferenceCS:
        _read_state(state, MeanCS._KEYS + cls._KEYS, cls.__name__)
        x = MeanCS.from_state({key: state[key] for key in MeanCS._KEYS})
        cs = cls(x.alpha, x.sides, state["propensity"])  # type: ignore[arg-type]
        cs._x = x
        cs._arms = _Arms(**{key: state[key] for key in _Arms.__annotations__})
        return cs


# --- First errors ----------------------------------------------------------------------------


def first_error_log_e(n: Any, treatment: Any, *, propensity: float = 0.5) -> Any:
    """ln E_n after n first errors of which `treatment` came from the treatment arm (broadcasts).

    E_n = Σ_k w_k · r_k^{S_n} / Π_{j≤n}(1 + (r_k − 1)·π), w_k = 1/6, summed in log space.
    """
    propensity = _check_propensity(propensity)
    n = np.asarray(n, dtype=float)
    s = np.asarray(treatment, dtype=float)
    terms = np.stack(
        [
            s * math.log(r) - n * math.log1p((r - 1.0) * propensity)
            for r in FirstErrorEProcess.RATIOS
        ]
    )
    top = terms.max(axis=0)
    log_e = top + np.log(np.exp(terms - top).sum(axis=0)) - math.log(len(FirstErrorEProcess.RATIOS))
    return float(log_e) if log_e.ndim == 0 else log_e


class FirstErrorEProcess:
    """One-sided relative-risk mixture e-process on the arm labels of users' first errors (Lindon & Malek 2022)."""

    RATIOS = (1.1, 1.25, 1.5, 2.0, 3.0, 5.0)  # weights 1/6 each
    _KEYS = ("version", "propensity", "n", "treatment", "max_log_e")

    def __init__(self, propensity: float = 0.5):
        self.propensity = _check_propensity(propensity)
        self.n = 0
        self.treatment = 0
        self.max_log_e = 0.0  # E_0 = 1

    @property
    def log_e(self) -> float:
        return first_error_log_e(self.n, self.treatment, propensity=self.propensity)

    def update(self, labels: Any) -> None:
        labels = _zero_one(labels, "labels").ravel()
        if labels.size == 0:
            return
        n = self.n + np.arange(1, labels.size + 1)
        s = self.treatment + np.cumsum(labels)
        path = first_error_log_e(n, s, propensity=self.propensity)
        self.n, self.treatment = int(n[-1]), int(s[-1])
        self.max_log_e = max(self.max_log_e, float(path.max()))

    def fired(self, alpha: float) -> bool:
        return self.max_log_e >= math.log(1.0 / _check_alpha(alpha))

    def to_state(self) -> dict:
        return {
            key: getattr(self, key) if key != "version" else _STATE_VERSION for key in self._KEYS
        }

    @classmethod
    def from_state(cls, state: dict) -> FirstErrorEProcess:
        _read_state(state, cls._KEYS, cls.__name__)
        process = cls(state["propensity"])
        process.n, process.treatment = state["n"], state["treatment"]
        process.max_log_e = state["max_log_e"]
        return process


# --- Sample-ratio mismatch -------------------------------------------------------------------


def _weights(rho: Any) -> np.ndarray:
    weights = np.asarray(rho, dtype=float).ravel()
    if weights.size < 2 or not np.all(np.isfinite(weights) & (weights > 0)):
        raise ValueError(f"rho must be two or more positive weights, got {rho!r}")
    return weights / weights.sum()


def _check_c(c: float) -> float:
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"c must be a positive number, got {c!r}")
    return float(c)


def log_bayes_factor(counts: Any, rho: Any, c: float = 100.0) -> float:
    """ln BF of the Dirichlet-multinomial (concentration c around ρ) against multinomial(ρ).

    ln BF = lnΓ(c) − lnΓ(c + n) + Σ_k [lnΓ(cρ_k + n_k) − lnΓ(cρ_k) − n_k ln ρ_k]; ρ is normalised.
    """
    weights, c = _weights(rho), _check_c(c)
    counts = [int(k) for k in np.asarray(counts).ravel()]
    if len(counts) != weights.size or min(counts) < 0:
        raise ValueError(f"counts must be {weights.size} non-negative integers, got {counts!r}")
    log_bf = math.lgamma(c) - math.lgamma(c + sum(counts))
    for k, w in zip(counts, weights.tolist(), strict=True):
        log_bf += math.lgamma(c * w + k) - math.lgamma(c * w) - k * math.log(w)
    return log_bf


def log_bayes_factor_path(arms: Any, rho: Any, c: float = 100.0) -> np.ndarray:
    """ln BF after each user along the last axis; arms[..., u] is user u's arm index (0..K−1).

    A user joining arm k with n_k earlier users there, n in all, multiplies BF by
    (cρ_k + n_k) / ((c + n) ρ_k): the same Bayes factor as `log_bayes_factor`, as a cumsum.
    """
    weights, c = _weights(rho), _check_c(c)
    arms = np.asarray(arms)
    if not np.all((arms >= 0) & (arms < weights.size) & (arms == np.round(arms))):
        raise ValueError(f"arms must be integers in 0..{weights.size - 1}")
    arms = arms.astype(np.intp)
    same_arm_before = np.zeros(arms.shape)
    for k in range(weights.size):
        mine = arms == k
        same_arm_before += mine * (np.cumsum(mine, axis=-1) - 1.0)
    w = weights[arms]
    step = np.log(c * w + same_arm_before) - np.log(w)
    # Σ_{j<n} ln(c + j) is the same for every row: subtract it once, after the cumsum.
    return np.cumsum(step, axis=-1) - np.cumsum(np.log(c + np.arange(arms.shape[-1])))


class SequentialSRM:
    """Sequential sample-ratio-mismatch test: running max of the Dirichlet-multinomial Bayes factor."""

    _KEYS = ("version", "rho", "c", "counts", "log_bf", "max_log_bf")

    def __init__(self, rho: Any, c: float = 100.0):
        self.rho = [float(w) for w in _weights(rho)]
        self.c = _check_c(c)
        self.counts = [0] * len(self.rho)
        self.log_bf = 0.0
        self.max_log_bf = 0.0  # BF_0 = 1

    @property
    def p_value(self) -> float:
        return min(1.0, math.exp(-self.max_log_bf))

    def look(self, counts: Any) -> None:
        counts = [int(k) for k in np.asarray(counts).ravel()]
        if len(counts) != len(self.rho):
            raise ValueError(f"expected {len(self.rho)} counts, got {len(counts)}")
        if any(new < old for new, old in zip(counts, self.counts, strict=True)):
            raise ValueError(f"counts are cumulative and never decrease: {self.counts} -> {counts}")
        self.counts = counts
        self.log_bf = log_bayes_factor(counts, self.rho, self.c)
        self.max_log_bf = max(self.max_log_bf, self.log_bf)

    def fired(self, threshold: float = 0.001) -> bool:
        return self.max_log_bf >= math.log(1.0 / _check_alpha(threshold, "threshold"))

    def to_state(self) -> dict:
        state = {key: getattr(self, key) for key in self._KEYS[1:]}
        return {
            "version": _STATE_VERSION,
            **state,
            "rho": list(self.rho),
            "counts": list(self.counts),
        }

    @classmethod
    def from_state(cls, state: dict) -> SequentialSRM:
        _read_state(state, cls._KEYS, cls.__name__)
        srm = cls(state["rho"], state["c"])
        srm.rho = list(state["rho"])  # exactly as stored (re-normalising could move the last bit)
        srm.counts = list(state["counts"])
        srm.log_bf, srm.max_log_bf = state["log_bf"], state["max_log_bf"]
        return srm
