"""Backoff arithmetic and the transient/permanent classification of destination answers."""

from __future__ import annotations

import random

import pytest

from node.sender import DeliveryState, RetryPolicy, classify_rejection, classify_store_status


def test_delay_grows_exponentially_and_is_capped() -> None:
    policy = RetryPolicy(first_delay_s=5, factor=2, max_delay_s=60, jitter=0)
    assert [policy.delay(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert policy.delay(10_000) == 60  # no overflow for absurd attempt counts


def test_jitter_stays_within_its_fraction_and_is_reproducible() -> None:
    policy = RetryPolicy(first_delay_s=10, factor=1, jitter=0.1)
    delays = [policy.delay(3, random.Random(seed)) for seed in range(200)]
    assert all(9.0 <= d <= 11.0 for d in delays)
    assert len(set(delays)) > 100
    assert policy.delay(3, random.Random(7)) == policy.delay(3, random.Random(7))
    assert policy.delay(3) == 10  # no random source, no jitter


def test_exhausted_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.exhausted(n) for n in (0, 1, 2, 3, 4)] == [False, False, False, True, True]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"first_delay_s": -1}, {"factor": 0.5}, {"jitter": 1.0}, {"max_delay_s": -2}],
)
def test_invalid_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().delay(0)


DELIVERED = DeliveryState.DELIVERED
TRANSIENT = DeliveryState.FAILED_TRANSIENT
PERMANENT = DeliveryState.FAILED_PERMANENT


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (0x0000, DELIVERED),
        (0xB000, DELIVERED),  # coercion of data elements
        (0xB006, DELIVERED),  # elements discarded
        (0xB007, DELIVERED),  # data set does not match SOP class (warning)
        (0x0001, DELIVERED),
        (0xA700, TRANSIENT),  # out of resources
        (0xA7FF, TRANSIENT),
        (0x0213, TRANSIENT),  # resource limitation
        (0x0110, TRANSIENT),  # processing failure
        (None, TRANSIENT),  # no response: DIMSE timeout or association lost
        (0xA900, PERMANENT),  # data set does not match SOP class
        (0xA9FF, PERMANENT),
        (0xC000, PERMANENT),  # cannot understand
        (0xC123, PERMANENT),
        (0x0122, PERMANENT),  # SOP class not supported
        (0x0124, PERMANENT),  # not authorized
        (0xA800, PERMANENT),  # unknown failure: never loop on what is not understood
    ],
)
def test_store_status_classification(status: int | None, state: DeliveryState) -> None:
    verdict = classify_store_status(status)
    assert verdict.state is state
    assert (verdict.reason == "") == (status == 0x0000)
    if status not in (None, 0x0000):
        assert f"0x{status:04X}" in verdict.reason


def test_rejection_classification() -> None:
    transient = classify_rejection(2, "Service Provider (Presentation)", "Local limit exceeded")
    permanent = classify_rejection(1, "Service User", "Called AE title not recognised")
    assert transient.state is TRANSIENT and "transient" in transient.reason
    assert permanent.state is PERMANENT and "Called AE title" in permanent.reason
