"""The schema check itself: OpenAI's 3.0-style exclusive bounds read as OpenAI means them."""

from __future__ import annotations

import pytest

from tests.fine_tuning.schemas import problems


@pytest.mark.parametrize(
    ("beta", "valid"), [(0.1, True), (2, True), ("auto", True), (0, False), (2.5, False)]
)
def test_dpo_beta_is_greater_than_zero_and_at_most_two(beta: object, valid: bool) -> None:
    found = problems({"beta": beta}, "FineTuneDPOHyperparameters")
    assert (found == []) is valid, found


@pytest.mark.parametrize(("multiplier", "valid"), [(0.5, True), (10, True), (0, False)])
def test_learning_rate_multiplier_is_greater_than_zero(multiplier: float, valid: bool) -> None:
    found = problems({"learning_rate_multiplier": multiplier}, "FineTuneDPOHyperparameters")
    assert (found == []) is valid, found
