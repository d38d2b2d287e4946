"""Purged time split: windows in time order, and no training position still open at a later entry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import DataValidationError
from cryptoml.models.split import purged_time_split

MS_PER_HOUR = 3_600_000


def _leaks(table: pd.DataFrame, earlier: np.ndarray, later: np.ndarray) -> bool:
    """True when some position of ``earlier`` is still open (exit >= entry) at an entry of ``later``."""
    exit_ms = table["ts_ms"].to_numpy()[earlier] + table["hold_hours"].to_numpy()[earlier] * MS_PER_HOUR
    return bool(exit_ms.max() >= table["ts_ms"].to_numpy()[later].min())


def test_purge_gap_separates_every_exit_from_later_entries(planted_positions: pd.DataFrame) -> None:
    longest_ms = int(planted_positions["hold_hours"].max() * MS_PER_HOUR)
    train, valid, test = purged_time_split(planted_positions, 0.6, 0.2, purge_ms=longest_ms)
    ts = planted_positions["ts_ms"].to_numpy()
    assert train.size and valid.size and test.size
    assert not set(train) & set(valid) and not set(valid) & set(test) and not set(train) & set(test)
    assert ts[train].max() < ts[valid].min() and ts[valid].max() < ts[test].min()
    assert not _leaks(planted_positions, train, valid)
    assert not _leaks(planted_positions, train, test)
    assert not _leaks(planted_positions, valid, test)
    assert ts[valid].min() - ts[train].max() > longest_ms - 5 * 60_000  # the gap is (about) the purge


def test_a_random_split_would_leak(planted_positions: pd.DataFrame) -> None:
    # The checker above has teeth: a shuffled split puts open training positions across later entries.
    perm = np.random.default_rng(0).permutation(len(planted_positions))
    train, valid = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])
    assert _leaks(planted_positions, train, valid)


@pytest.mark.parametrize("seed", range(5))
def test_property_holds_for_random_tables(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(200, 2000))
    holds = rng.choice([1.0, 4.0, 24.0, 72.0], size=n)
    table = pd.DataFrame(
        {"ts_ms": np.sort(rng.integers(0, 40 * 24 * MS_PER_HOUR, size=n)), "hold_hours": holds}
    ).sample(frac=1.0, random_state=seed)  # row order must not matter
    train_frac, valid_frac = float(rng.uniform(0.3, 0.6)), float(rng.uniform(0.1, 0.3))
    purge_ms = int(72 * MS_PER_HOUR + rng.integers(0, 24 * MS_PER_HOUR))
    train, valid, test = purged_time_split(table, train_frac, valid_frac, purge_ms)
    assert not _leaks(table, train, valid) and not _leaks(table, valid, test)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(valid) > 0) and np.all(np.diff(test) > 0)
    ts = table["ts_ms"].to_numpy()
    assert ts[valid].min() - ts[train].max() > purge_ms - 1 and ts[test].min() - ts[valid].max() > purge_ms


def test_fractions_are_of_the_span_left_after_the_gaps() -> None:
    table = pd.DataFrame({"ts_ms": np.arange(0, 100 * MS_PER_HOUR + 1, MS_PER_HOUR), "hold_hours": 10.0})
    train, valid, test = purged_time_split(table, 0.5, 0.25, purge_ms=10 * MS_PER_HOUR)
    hours = table["ts_ms"].to_numpy() // MS_PER_HOUR
    # usable = 100 - 2 * 10 = 80 h -> train [0, 40), valid [50, 70), test [80, 100]
    assert (hours[train].min(), hours[train].max()) == (0, 39)
    assert (hours[valid].min(), hours[valid].max()) == (50, 69)
    assert (hours[test].min(), hours[test].max()) == (80, 100)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_frac": 0.7, "valid_frac": 0.3}, "train_frac"),
        ({"train_frac": 0.0}, "train_frac"),
        ({"purge_ms": -1}, "purge_ms"),
        ({"purge_ms": 5 * MS_PER_HOUR}, "shorter than the longest hold"),
        ({"purge_ms": 60 * MS_PER_HOUR}, "purge gaps"),
        ({"time_col": "entry_ms"}, "entry_ms"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    table = pd.DataFrame({"ts_ms": np.arange(0, 100 * MS_PER_HOUR, MS_PER_HOUR), "hold_hours": 10.0})
    args: dict[str, object] = {"train_frac": 0.6, "valid_frac": 0.2, "purge_ms": 10 * MS_PER_HOUR, **kwargs}
    with pytest.raises(DataValidationError, match=match):
        purged_time_split(table, **args)  # type: ignore[arg-type]


def test_empty_window_raises() -> None:
    # All entries at two instants: the validation window between them is empty.
    table = pd.DataFrame({"ts_ms": [0] * 10 + [100 * MS_PER_HOUR] * 10, "hold_hours": 1.0})
    with pytest.raises(DataValidationError, match="validation window is empty"):
        purged_time_split(table, 0.6, 0.2, purge_ms=MS_PER_HOUR)
    with pytest.raises(DataValidationError, match="empty"):
        purged_time_split(table.iloc[:0], 0.6, 0.2, purge_ms=MS_PER_HOUR)
