"""Assignment without generating text: sticky, split in proportion, ramping only adds users."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import pytest

from server.ab.assignment import BUCKETS, Splitter, bucket_of, propensity, user_hash
from tests.ab.factories import experiment

USERS = [f"user-{i}" for i in range(20_000)]


def _within(count: int, n: int, p: float, *, z: float = 4.5) -> bool:
    """count ~ Binomial(n, p) within z standard deviations (a 1-in-~150,000 miss)."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_bucket_is_the_documented_sha256_rule():
    salt = "abc"
    digest = hashlib.sha256(b"abc.alice").digest()
    assert bucket_of(salt, "alice") == int.from_bytes(digest[:8], "big") % BUCKETS
    assert user_hash(salt, "alice") == digest[:16].hex()


def test_same_user_same_variant_every_time_and_on_every_splitter():
    exp = experiment(ramp=(50.0,))
    first, second = Splitter(exp), Splitter(exp)  # two replicas, or before and after a restart
    for user in USERS[:2000]:
        a = first.assign(user)
        assert all(first.assign(user).variant == a.variant for _ in range(3))
        assert second.assign(user) == a


def test_even_split_at_fifty_percent():
    s = Splitter(experiment(ramp=(50.0,)))
    candidates = sum(s.assign(u).variant.index == 1 for u in USERS)
    assert _within(candidates, len(USERS), 0.5)
    assert all(s.assign(u).analysed for u in USERS[:500])


@pytest.mark.parametrize("share", [1.0, 5.0, 10.0, 25.0])
def test_ramp_step_shares_and_a_one_to_one_analysed_slice(share):
    s = Splitter(experiment(ramp=(share,)))
    got = [s.assign(u) for u in USERS]
    treated = sum(a.variant.index == 1 for a in got)
    analysed_control = sum(a.analysed and a.variant.index == 0 for a in got)
    assert _within(treated, len(USERS), share / 100)
    assert _within(analysed_control, len(USERS), share / 100)
    assert all(a.analysed for a in got if a.variant.index == 1)
    outside = [a for a in got if not a.analysed]
    assert outside and all(a.variant.index == 0 for a in outside)


def test_ramping_never_moves_a_user_between_arms():
    ramp = (1.0, 5.0, 10.0, 25.0, 50.0)
    previous = None
    for step in range(len(ramp)):
        s = Splitter(experiment(ramp=ramp, step=step))
        now = {u: s.assign(u) for u in USERS}
        if previous is not None:
            for u, before in previous.items():
                if before.analysed:  # in the slice: stays in it, in the same arm
                    assert now[u].analysed and now[u].variant == before.variant
        previous = now


def test_weighted_variants_split_by_weight_and_are_all_analysed():
    s = Splitter(experiment(versions=(3, 4, 5), weights=(70, 20, 10), ramp=None))
    got = [s.assign(u) for u in USERS]
    for index, p in enumerate((0.7, 0.2, 0.1)):
        assert _within(sum(a.variant.index == index for a in got), len(USERS), p)
    assert all(a.analysed for a in got)
    exp = s.experiment
    assert propensity(exp, exp.variants[1]) == pytest.approx(20 / 90)


def test_a_new_salt_reshuffles_users():
    a = Splitter(experiment(ramp=(50.0,)))
    b = Splitter(experiment(ramp=(50.0,), salt="another-salt"))
    same = sum(a.assign(u).variant == b.assign(u).variant for u in USERS[:4000])
    assert _within(same, 4000, 0.5)  # independent, not identical


def test_requests_without_a_key_are_split_per_request_and_not_analysed():
    s = Splitter(experiment(ramp=(50.0,)))
    got = [s.assign(None) for _ in range(4000)]
    assert not any(a.analysed or a.keyed for a in got)
    assert _within(sum(a.variant.index == 1 for a in got), 4000, 0.5)


def test_an_unknown_hash_version_is_refused():
    with pytest.raises(ValueError, match="hash version"):
        Splitter(replace(experiment(), hash_version=2))
