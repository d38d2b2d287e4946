"""Walk-forward windows: purged, aligned, tiling, never overlapping their training windows; nonsense refused."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptoml.backtest.windows import Fold, Segment, walk_forward_windows, windows_from_hours
from cryptoml.errors import ConfigError

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


def defaults(start_ms: int, end_ms: int) -> list[Fold]:
    """The params defaults: train 48 h, test 24 h, retrain every 60 min, purge = the 10-minute label horizon."""
    return walk_forward_windows(start_ms, end_ms, train_ms=48 * HOUR, test_ms=DAY, retrain_ms=HOUR, purge_ms=10 * MIN)


def check_invariants(folds: list[Fold], start_ms: int, end_ms: int, train_ms: int, purge_ms: int, bar_ms: int) -> None:
    assert folds
    for k, fold in enumerate(folds):
        assert fold.index == k
        # segments tile the fold exactly, in order
        assert fold.segments[0].start_ms == fold.test_start_ms
        assert fold.segments[-1].end_ms == fold.test_end_ms
        for a, b in pairwise(fold.segments):
            assert a.end_ms == b.start_ms
        assert (fold.train_start_ms, fold.train_end_ms) == (fold.segments[0].fit_start_ms, fold.segments[0].fit_end_ms)
        for seg in fold.segments:
            assert seg.start_ms < seg.end_ms
            # the training window (plus the purge of its last label) ends before the bars it is used on
            assert seg.fit_end_ms + purge_ms <= seg.start_ms
            assert seg.fit_end_ms - seg.fit_start_ms == train_ms
            assert seg.fit_start_ms >= start_ms  # only data that exists
            for t in (seg.fit_start_ms, seg.fit_end_ms, seg.start_ms, seg.end_ms):
                assert t % bar_ms == 0
        assert fold.test_start_ms % bar_ms == 0 and fold.test_end_ms % bar_ms == 0
        assert fold.test_end_ms <= end_ms
    # folds tile [first test start, last test end): consecutive, never overlapping
    for a, b in pairwise(folds):
        assert a.test_end_ms == b.test_start_ms
    # no test bar of any fold falls in the training window of the model trading it
    for fold in folds:
        for seg in fold.segments:
            assert not (seg.fit_start_ms < seg.end_ms and seg.start_ms < seg.fit_end_ms + purge_ms)


def test_defaults_over_thirty_days() -> None:
    folds = defaults(T0, T0 + 30 * DAY)
    check_invariants(folds, T0, T0 + 30 * DAY, 48 * HOUR, 10 * MIN, MIN)
    first = folds[0]
    assert first.test_start_ms == T0 + 48 * HOUR + 10 * MIN  # after a full training window and its purge
    assert first.train_start_ms == T0 and first.train_end_ms == T0 + 48 * HOUR
    assert first.segments[1] == Segment(T0 + HOUR, T0 + 49 * HOUR, T0 + 49 * HOUR + 10 * MIN, T0 + 50 * HOUR + 10 * MIN)
    assert all(len(f.segments) == 24 for f in folds[:-1])
    # 30 days - 48 h 10 min = 27 full folds + a 23 h 50 min last fold (>= one refit period, so it is kept)
    assert len(folds) == 28
    assert folds[-1].test_end_ms == T0 + 30 * DAY
    assert folds[-1].test_end_ms - folds[-1].test_start_ms == 23 * HOUR + 50 * MIN
    assert len(folds[-1].segments) == 24 and folds[-1].segments[-1].end_ms - folds[-1].segments[-1].start_ms == 50 * MIN


def test_months_give_many_folds_and_short_remainders_are_dropped() -> None:
    folds = defaults(T0, T0 + 90 * DAY)
    check_invariants(folds, T0, T0 + 90 * DAY, 48 * HOUR, 10 * MIN, MIN)
    assert len(folds) == 88 and sum(len(f.segments) for f in folds) == 88 * 24
    # a remainder shorter than one refit period is not a fold
    exact = walk_forward_windows(
        T0, T0 + 3 * DAY + 30 * MIN, train_ms=2 * DAY, test_ms=DAY, retrain_ms=HOUR, purge_ms=0
    )
    assert len(exact) == 1 and exact[0].test_end_ms == T0 + 3 * DAY


def test_unaligned_span_is_rounded_inwards() -> None:
    folds = defaults(T0 + 12_345, T0 + 4 * DAY + 59_999)
    assert folds[0].train_start_ms == T0 + MIN  # start rounded up to the bar grid
    assert folds[-1].test_end_ms <= T0 + 4 * DAY
    check_invariants(folds, T0 + 12_345, T0 + 4 * DAY + 59_999, 48 * HOUR, 10 * MIN, MIN)


def test_from_hours_matches_the_params_units() -> None:
    a = windows_from_hours(
        T0, T0 + 5 * DAY, train_hours=48.0, test_hours=24.0, retrain_minutes=60.0, horizon_minutes=10
    )
    assert a == defaults(T0, T0 + 5 * DAY)
    with pytest.raises(ConfigError, match="train_hours"):
        windows_from_hours(T0, T0 + 5 * DAY, train_hours=1e-9, test_hours=24, retrain_minutes=60, horizon_minutes=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_ms": 0}, "train_ms must be > 0"),
        ({"test_ms": -HOUR}, "test_ms must be > 0"),
        ({"retrain_ms": 0}, "retrain_ms must be > 0"),
        ({"purge_ms": -MIN}, "purge_ms must be >= 0"),
        ({"retrain_ms": 2 * DAY}, "must not exceed test_ms"),
        ({"train_ms": HOUR + 1}, "whole number of bars"),
        ({"train_ms": 1.5 * HOUR}, "integer number of milliseconds"),
        ({"bar_ms": 0}, "bar_ms must be > 0"),
    ],
)
def test_nonsense_is_refused(kwargs: dict, message: str) -> None:
    args = {"train_ms": 48 * HOUR, "test_ms": DAY, "retrain_ms": HOUR, "purge_ms": 10 * MIN} | kwargs
    with pytest.raises(ConfigError, match=message):
        walk_forward_windows(T0, T0 + 30 * DAY, **args)


def test_too_short_span_says_how_long_it_must_be() -> None:
    with pytest.raises(ConfigError, match=r"holds 72 h of bars; one fold needs train \+ purge \+ test = 72.1667 h"):
        defaults(T0, T0 + 3 * DAY)
    with pytest.raises(ConfigError, match="holds 0 h"):
        defaults(T0 + DAY, T0)


@settings(max_examples=200, deadline=None)
@given(
    bar_ms=st.sampled_from([MIN, 5 * MIN, HOUR]),
    start_bars=st.integers(0, 10_000),
    train_bars=st.integers(1, 300),
    purge_bars=st.integers(0, 50),
    test_bars=st.integers(1, 200),
    retrain_frac=st.floats(0.0, 1.0),
    extra_bars=st.integers(0, 2_000),
    offset_ms=st.integers(0, 59_999),
)
def test_invariants_hold_for_any_layout(
    bar_ms: int,
    start_bars: int,
    train_bars: int,
    purge_bars: int,
    test_bars: int,
    retrain_frac: float,
    extra_bars: int,
    offset_ms: int,
) -> None:
    retrain_bars = max(1, round(test_bars * retrain_frac))
    start = T0 + start_bars * bar_ms + offset_ms % bar_ms
    end = T0 + (start_bars + 1 + train_bars + purge_bars + test_bars + extra_bars) * bar_ms
    train_ms, purge_ms = train_bars * bar_ms, purge_bars * bar_ms
    folds = walk_forward_windows(
        start, end, train_ms=train_ms, test_ms=test_bars * bar_ms, retrain_ms=retrain_bars * bar_ms,
        purge_ms=purge_ms, bar_ms=bar_ms,
    )  # fmt: skip
    check_invariants(folds, start, end, train_ms, purge_ms, bar_ms)
    first_bar = -(-start // bar_ms) * bar_ms
    assert folds[0].test_start_ms == first_bar + train_ms + purge_ms
    for fold in folds[:-1]:
        assert fold.test_end_ms - fold.test_start_ms == test_bars * bar_ms
    # what is left after the last fold is shorter than one refit period
    assert end // bar_ms * bar_ms - folds[-1].test_end_ms < retrain_bars * bar_ms
    for fold in folds:
        for seg in fold.segments[:-1]:
            assert seg.end_ms - seg.start_ms == retrain_bars * bar_ms
