"""``read_probe``: the smallest rank keeping a share of the log-loss reduction, read off a loss
curve it asks for lazily."""

from __future__ import annotations

import math

import pytest

from lora_monitor.analysis.probe import read_probe
from lora_monitor.analysis.rank_rule import RULE

GRID, KEEP, KEEP_LOW, KEEP_HIGH = RULE.grid, RULE.keep, RULE.keep_low, RULE.keep_high


def _curve(losses: dict[int, float]):
    asked: list[int] = []

    def loss_at(k: int) -> float:
        asked.append(k)
        return losses[k]

    return loss_at, asked


def _kept(losses, k, r):
    return (math.log(losses[0]) - math.log(losses[k])) / (math.log(losses[0]) - math.log(losses[r]))


def test_the_suggestion_is_the_first_rank_keeping_the_share():
    # A loss falling geometrically to a floor at k = 4: log reductions 0, 60 %, 85 %, 96 %, 100 %.
    r = 16
    losses = {k: 1e-4 * 100 ** (1 - min(k, 4) / 4) ** 1.5 for k in range(r + 1)}
    loss_at, asked = _curve(losses)
    reading = read_probe(loss_at, r)
    shares = (KEEP_LOW, KEEP, KEEP_HIGH)
    expected = {share: min(k for k in [*GRID, r] if k <= r and _kept(losses, k, r) >= share) for share in shares}
    assert (reading.low, reading.rank, reading.high) == (expected[KEEP_LOW], expected[KEEP], expected[KEEP_HIGH])
    assert reading.low <= reading.rank <= reading.high
    assert reading.kept(reading.rank) >= KEEP > reading.kept(max(k for k in GRID if k < reading.rank))
    assert asked[:2] == [0, r] and max(asked[2:]) == reading.high  # scanned upwards, stopped there
    assert set(reading.losses) == set(asked)


def test_noise_that_raises_the_loss_never_counts():
    # The whole update is worse than its top 3 directions (noise that hurts): rank 3 keeps it all.
    r = 64
    losses = {0: 1.0, 1: 0.2, 2: 0.05, 3: 0.01, 4: 0.011, 5: 0.012, 6: 0.013, 8: 0.015, 64: 0.03}
    loss_at, asked = _curve(losses)
    reading = read_probe(loss_at, r)
    assert reading.lowest == 0.01 and reading.rank == 3 and reading.high == 3
    assert max(asked) == r and 5 not in asked  # walked one past the bottom, no further


def test_a_cut_that_beats_a_noisy_whole_update_does_not_end_the_walk_while_the_loss_falls():
    # rsLoRA-like: 1 direction already beats the whole update (its noise directions hurt), but
    # the curve goes on falling to k = 4. Measured against loss(r), k = 1 "keeps 100 %" and
    # would be the answer; measured to the bottom of the curve, 1 keeps only 73 % of it.
    r = 64
    bottom = {0: 1.0, 1: 0.04, 2: 0.02, 3: 0.015, 4: 0.012, 5: 0.0125, 6: 0.013}
    losses = {**bottom, **{k: 0.014 for k in GRID if k > 6}, r: 0.05}
    loss_at, asked = _curve(losses)
    reading = read_probe(loss_at, r)
    assert reading.lowest == 0.012
    expected = {share: min(k for k in bottom if k and _kept(bottom, k, 4) >= share) for share in (KEEP_LOW, KEEP)}
    assert (reading.low, reading.rank) == (expected[KEEP_LOW], expected[KEEP]) == (3, 4)
    assert reading.kept(1) < KEEP_LOW and reading.kept(reading.r) < 1
    assert asked == [0, r, 1, 2, 3, 4, 5]  # stopped at the first k that did not fall further


def test_a_curve_falling_to_r_is_walked_no_further_than_the_share():
    # The loss at r is the lowest: the walk stops at the first k keeping RULE.keep_high of it.
    r = 64
    losses = {k: 0.01 + 0.99 * math.exp(-k) for k in range(r + 1)}
    loss_at, asked = _curve(losses)
    reading = read_probe(loss_at, r)
    assert reading.lowest == losses[r] and max(asked[2:]) == reading.high < 12


@pytest.mark.parametrize("full", [1.0, 1.5, float("nan")])
def test_an_update_that_did_not_lower_the_loss_suggests_nothing(full):
    reading = read_probe(_curve({0: 1.0, 8: full})[0], 8)
    assert reading.rank is None and reading.low is None and reading.high is None
    assert set(reading.losses) == {0, 8}


def test_a_known_loss_with_no_update_gives_the_same_reading_one_forward_fewer():
    losses = {0: 2.0, 1: 1.2, 2: 0.7, 3: 0.52, 4: 0.5, 5: 0.5, 6: 0.5, 8: 0.5, 10: 0.5, 12: 0.5, 16: 0.5}
    loss_at, asked = _curve(losses)
    full = read_probe(loss_at, 16)
    known_at, asked_known = _curve(losses)
    known = read_probe(known_at, 16, base=losses[0])
    assert (known.losses, known.rank, known.low, known.high) == (full.losses, full.rank, full.low, full.high)
    assert asked_known == asked[1:] and 0 not in asked_known
