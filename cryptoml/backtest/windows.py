"""Walk-forward windows of the backtest: a pure function from a time span to purged train / test folds.

Every interval is half-open ``[start_ms, end_ms)`` of UTC epoch milliseconds, aligned to ``bar_ms``; a
bar belongs to an interval when its **open** time does. Layout over the data span ``[start_ms, end_ms)``::

    |<- train_ms ->|<- purge_ms ->|<------ fold 0: test_ms ------>|<---- fold 1 ---->| ... |<- last ->|
    ^ start_ms                    ^ first test start                                     end_ms (or before)

- **Folds** follow each other without gaps or overlap: fold ``k`` tests ``[t0 + k * test_ms, t0 + (k + 1)
  * test_ms)`` where ``t0 = start_ms + train_ms + purge_ms`` (the first fold starts after one full training
  window and its purge). A remainder shorter than ``test_ms`` but at least ``retrain_ms`` long becomes a
  last, shorter fold; a smaller remainder (less than one refit period) is left out.
- **Segments**: inside a fold the model is refitted every ``retrain_ms`` (from the fold's start) and used
  for the bars of ``[start_ms, end_ms)`` of the segment (the fold's last segment ends with the fold). The
  refit learns from the trailing ``train_ms`` of bars ending ``purge_ms`` before the segment starts:
  ``fit_end_ms = start_ms - purge_ms``, ``fit_start_ms = fit_end_ms - train_ms``.
- **Purge**: pass the label horizon (e.g. ``horizon_minutes * 60_000``). A training row at bar open ``t <
  fit_end_ms`` has a label that looks at most ``purge_ms`` past ``t``, i.e. at bars opening before the
  segment: no label of the training set reaches into the bars the model is used on.
- A fold's ``train_start_ms`` / ``train_end_ms`` are its first segment's fit window (the training set of
  the first model that trades the fold; the in-sample period of its report).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from cryptoml.errors import ConfigError

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Segment:
    """One refit: the model fitted on ``[fit_start_ms, fit_end_ms)`` predicts the bars of ``[start_ms, end_ms)``."""

    fit_start_ms: int
    fit_end_ms: int
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class Fold:
    """One reporting fold: test bars ``[test_start_ms, test_end_ms)`` tiled by ``segments`` (in time order)."""

    index: int
    train_start_ms: int
    train_end_ms: int
    test_start_ms: int
    test_end_ms: int
    segments: tuple[Segment, ...]


def walk_forward_windows(
    start_ms: int,
    end_ms: int,
    *,
    train_ms: int,
    test_ms: int,
    retrain_ms: int,
    purge_ms: int,
    bar_ms: int = 60_000,
) -> list[Fold]:
    """The folds of a walk-forward over the data span ``[start_ms, end_ms)`` (see the module docstring).

    ``start_ms`` is rounded up and ``end_ms`` down to ``bar_ms``; the lengths must be whole numbers of bars
    (``purge_ms`` may be 0). Raises :class:`ConfigError` for non-positive lengths, ``retrain_ms > test_ms``,
    lengths that are not multiples of ``bar_ms``, or a span shorter than ``train_ms + purge_ms + test_ms``
    (the message says how long it must be).
    """
    start_ms, end_ms = _ms("start_ms", start_ms), _ms("end_ms", end_ms)
    bar_ms = _ms("bar_ms", bar_ms)
    if bar_ms <= 0:
        raise ConfigError(f"walk-forward: bar_ms must be > 0, got {bar_ms}")
    train_ms, test_ms, retrain_ms = _ms("train_ms", train_ms), _ms("test_ms", test_ms), _ms("retrain_ms", retrain_ms)
    purge_ms = _ms("purge_ms", purge_ms)
    for name, value in (("train_ms", train_ms), ("test_ms", test_ms), ("retrain_ms", retrain_ms)):
        if value <= 0:
            raise ConfigError(f"walk-forward: {name} must be > 0, got {value}")
    if purge_ms < 0:
        raise ConfigError(f"walk-forward: purge_ms must be >= 0 (the label horizon), got {purge_ms}")
    for name, value in (
        ("train_ms", train_ms),
        ("test_ms", test_ms),
        ("retrain_ms", retrain_ms),
        ("purge_ms", purge_ms),
    ):
        if value % bar_ms:
            raise ConfigError(f"walk-forward: {name} ({value} ms) must be a whole number of bars of {bar_ms} ms")
    if retrain_ms > test_ms:
        raise ConfigError(
            f"walk-forward: retrain_ms ({retrain_ms} ms) must not exceed test_ms ({test_ms} ms): "
            "a fold needs at least one refit"
        )
    first_ms = -(-start_ms // bar_ms) * bar_ms  # ceil to the bar grid
    last_ms = end_ms // bar_ms * bar_ms
    needed_ms = train_ms + purge_ms + test_ms
    if last_ms - first_ms < needed_ms:
        raise ConfigError(
            f"walk-forward: the span [{start_ms}, {end_ms}) holds {max(last_ms - first_ms, 0) / HOUR_MS:g} h of bars; "
            f"one fold needs train + purge + test = {needed_ms / HOUR_MS:g} h ({needed_ms} ms)"
        )
    folds: list[Fold] = []
    test_start = first_ms + train_ms + purge_ms
    while last_ms - test_start >= retrain_ms:
        test_end = min(test_start + test_ms, last_ms)
        segments = []
        seg_start = test_start
        while seg_start < test_end:
            seg_end = min(seg_start + retrain_ms, test_end)
            fit_end = seg_start - purge_ms
            segments.append(Segment(fit_end - train_ms, fit_end, seg_start, seg_end))
            seg_start = seg_end
        first = segments[0]
        folds.append(Fold(len(folds), first.fit_start_ms, first.fit_end_ms, test_start, test_end, tuple(segments)))
        test_start = test_end
    return folds


def windows_from_hours(
    start_ms: int,
    end_ms: int,
    *,
    train_hours: float,
    test_hours: float,
    retrain_minutes: float,
    horizon_minutes: int,
    bar_ms: int = 60_000,
) -> list[Fold]:
    """:func:`walk_forward_windows` from the ``backtest`` params' units (hours, minutes; purge = label horizon)."""
    lengths = {
        "train_hours": train_hours * HOUR_MS,
        "test_hours": test_hours * HOUR_MS,
        "retrain_minutes": retrain_minutes * 60_000,
        "horizon_minutes": horizon_minutes * 60_000,
    }
    for name, value in lengths.items():
        if not math.isfinite(value) or value != round(value):
            raise ConfigError(f"walk-forward: {name} is not a whole number of milliseconds")
    return walk_forward_windows(
        start_ms,
        end_ms,
        train_ms=round(lengths["train_hours"]),
        test_ms=round(lengths["test_hours"]),
        retrain_ms=round(lengths["retrain_minutes"]),
        purge_ms=round(lengths["horizon_minutes"]),
        bar_ms=bar_ms,
    )


def _ms(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"walk-forward: {name} must be an integer number of milliseconds, got {value!r}")
    return int(value)
