"""Time-ordered train / validation / test split with purge gaps, so overlapping holds cannot leak.

A simulated position's label (its realised profit) covers ``[ts_ms, ts_ms + hold]``. Positions entered
minutes apart share most of that window, so a random split would put near-copies of a test label in the
training set. Here the rows are split by entry time into three consecutive windows separated by two gaps
of ``purge_ms`` each; with ``purge_ms`` >= the longest hold, every training position has exited before
the first validation entry, and every validation position before the first test entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cryptoml.errors import DataValidationError

if TYPE_CHECKING:
    import pandas as pd

MS_PER_HOUR = 3_600_000


def purged_time_split(
    table: pd.DataFrame,
    train_frac: float,
    valid_frac: float,
    purge_ms: int,
    time_col: str = "ts_ms",
    hold_col: str | None = "hold_hours",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positional indices (int64, ascending) of the train, validation and test rows of ``table``.

    The entry times span ``[t0, t1]``; after removing the two gaps the usable span is
    ``U = t1 - t0 - 2 * purge_ms`` and the windows are, in entry time (ms):

    - train: ``[t0, a)`` with ``a = t0 + train_frac * U``
    - validation: ``[a + purge_ms, b)`` with ``b = a + purge_ms + valid_frac * U``
    - test: ``[b + purge_ms, t1]``

    Fractions are of the time span (not of the row count), so the windows stay contiguous in time
    whatever the density of opportunities. When ``hold_col`` is present its longest hold (hours) must
    fit in ``purge_ms``, which guarantees ``entry + hold < next window's first entry`` for every row.
    Raises :class:`DataValidationError` when a window would be empty or the data are too short.
    """
    if not (0 < train_frac < 1 and 0 < valid_frac < 1 and train_frac + valid_frac < 1):
        raise DataValidationError(
            f"purged_time_split: need 0 < train_frac, valid_frac and train_frac + valid_frac < 1, "
            f"got {train_frac}, {valid_frac}"
        )
    if purge_ms < 0:
        raise DataValidationError(f"purged_time_split: purge_ms must be >= 0, got {purge_ms}")
    if time_col not in table.columns:
        raise DataValidationError(f"purged_time_split: no time column {time_col!r}")
    ts = table[time_col].to_numpy(dtype=np.int64)
    if ts.size == 0:
        raise DataValidationError("purged_time_split: the table is empty")
    if hold_col is not None and hold_col in table.columns:
        longest_ms = float(table[hold_col].max()) * MS_PER_HOUR
        if longest_ms > purge_ms:
            raise DataValidationError(
                f"purged_time_split: purge gap {purge_ms / MS_PER_HOUR:g} h is shorter than the longest "
                f"hold {longest_ms / MS_PER_HOUR:g} h; train labels would overlap validation entries"
            )
    t0, t1 = int(ts.min()), int(ts.max())
    usable = t1 - t0 - 2 * purge_ms
    if usable <= 0:
        raise DataValidationError(
            f"purged_time_split: entries span {(t1 - t0) / MS_PER_HOUR:g} h, not more than the two purge "
            f"gaps of {purge_ms / MS_PER_HOUR:g} h each"
        )
    train_end = t0 + int(train_frac * usable)
    valid_start = train_end + purge_ms
    valid_end = valid_start + int(valid_frac * usable)
    test_start = valid_end + purge_ms
    train = np.flatnonzero(ts < train_end)
    valid = np.flatnonzero((ts >= valid_start) & (ts < valid_end))
    test = np.flatnonzero(ts >= test_start)
    for name, idx in (("train", train), ("validation", valid), ("test", test)):
        if idx.size == 0:
            raise DataValidationError(
                f"purged_time_split: the {name} window is empty (entries span "
                f"{(t1 - t0) / MS_PER_HOUR:g} h, purge gaps {purge_ms / MS_PER_HOUR:g} h)"
            )
    return train.astype(np.int64), valid.astype(np.int64), test.astype(np.int64)
