"""ModelSet.score_opportunities (lists of Python floats, one pass) against a straightforward reference.

The reference scores each row on its own with NumPy arrays: every candidate hold's features, the profit and
success models, the composite score, the first best candidate (``argmax``), the Kelly size and the hold
model's pick. Random rows mix the value types the API and the edge runner send (int epoch ms, bool, None,
Enum labels, NumPy scalars) with ones NumPy alone converts (numeric strings), given and chosen holds; the
answers must be equal to the bit, and a bad value must give the message NumPy's conversion gives.
"""

from __future__ import annotations

import enum
import math
import random
from typing import Any

import numpy as np
import pytest

from cryptoml.edge.models import (
    HOLD_MODEL,
    PROFIT_MODEL,
    SUCCESS_MODEL,
    ModelSet,
    _best_candidates,
)
from cryptoml.errors import DataValidationError
from cryptoml.features.opportunity import ENTRY_FEATURE_NAMES, FEATURE_NAMES, INPUT_COLUMNS, feature_matrix
from cryptoml.models.scoring import composite_score, kelly_fraction
from tests.edge.test_api import build_opportunity_bundles, synthetic_opportunities

HOLDS = (1.0, 4.0, 8.0, 24.0)
NULLABLE = (
    "break_even_hours",
    "funding_spread_avg_24h",
    "funding_spread_avg_3d",
    "spread_volatility_cv",
    "ret_vol_24h",
    "volume_24h",
    "orderbook_depth_usd",
    "bid_ask_spread_pct",
    "depth_is_proxy",
    "next_funding_ts_ms",
    "btc_ret_trailing",
)
NUMERIC = tuple(c for c in INPUT_COLUMNS if c not in ("hold_hours", "strategy", "regime"))


class Strategy(enum.Enum):
    SPOT_PERP = "spot_perp"
    CROSS_EXCHANGE = "cross_exchange"


@pytest.fixture(scope="module")
def model_set(tmp_path_factory: pytest.TempPathFactory) -> ModelSet:
    out = tmp_path_factory.mktemp("models")
    build_opportunity_bundles(out, rows=300, n_estimators=10)
    models = ModelSet.load(out)
    assert set(models.bundles) == {PROFIT_MODEL, SUCCESS_MODEL, HOLD_MODEL}
    return models


def reference(models: ModelSet, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row alone, on NumPy arrays: the documented scoring rule written plainly."""
    profit_b, success_b = models.bundles[PROFIT_MODEL], models.bundles[SUCCESS_MODEL]
    hold_b = models.bundles.get(HOLD_MODEL)
    win, loss = models.sizing if models.sizing is not None else (1.0, 1.0)
    answers = []
    for row in rows:
        h = row.get("hold_hours")
        assert models.hold_grid_hours is not None
        holds = np.asarray(models.hold_grid_hours if h is None else [float(h)], dtype=np.float64)
        cols: dict[str, Any] = {"hold_hours": holds}
        for c in INPUT_COLUMNS:
            if c == "hold_hours":
                continue
            value = row[c].value if isinstance(row[c], enum.Enum) else row[c]
            if c in ("strategy", "regime"):
                cols[c] = np.asarray([str(value)] * holds.size, dtype=object)
            else:
                cols[c] = np.full(holds.size, np.nan if value is None else np.float64(value))
        X = feature_matrix(cols)
        profit = profit_b.predict(X)
        proba = np.clip(success_b.predict(X), 0.0, 1.0)
        score = np.asarray(
            composite_score(profit, proba, holds, models.composite_profit_weight, models.composite_success_weight)
        )
        j = int(np.argmax(score))  # the first of equal maxima
        kelly = kelly_fraction(proba[j : j + 1], win, loss, models.kelly_fraction, models.kelly_cap)
        hold_hours = hold_prob = None
        if hold_b is not None:
            entry = X[j : j + 1, [FEATURE_NAMES.index(n) for n in ENTRY_FEATURE_NAMES]]
            probs = np.asarray(hold_b.predict(entry)).reshape(-1)
            hold_hours = float(hold_b.meta["classes"][int(np.argmax(probs))])
            hold_prob = float(probs.max())
        answers.append(
            {
                "predicted_profit_pct": float(profit[j]),
                "success_probability": float(proba[j]),
                "predicted_hold_hours": float(holds[j]),
                "composite_score": float(score[j]),
                "kelly_fraction": float(np.asarray(kelly).reshape(-1)[0]),
                "hold_choice": "best_composite" if h is None else "given",
                "hold_model_hours": hold_hours,
                "hold_model_probability": hold_prob,
                "model_version": models.opportunity_version(),
            }
        )
    return answers


def random_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows of varied value types: int epoch ms, bool proxy flags, None, Enum labels, NumPy scalars,
    numeric strings, and a given or chosen hold."""
    rng = random.Random(seed)
    cols = synthetic_opportunities(n, seed, HOLDS)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {c: cols[c][i].item() for c in INPUT_COLUMNS}
        row["ts_ms"] = int(row["ts_ms"])
        row["next_funding_ts_ms"] = int(row["next_funding_ts_ms"])
        row["depth_is_proxy"] = bool(row["depth_is_proxy"])
        row["hold_hours"] = rng.choice([None, None, rng.choice(HOLDS), rng.uniform(0.5, 100.0)])
        if rng.random() < 0.2:
            del row["hold_hours"]
        if rng.random() < 0.3:
            row["strategy"] = Strategy(row["strategy"])
        for c in NULLABLE:
            if rng.random() < 0.15:
                row[c] = None
        for c in NUMERIC:
            u = rng.random()
            if u < 0.05 and row[c] is not None:
                row[c] = np.float64(row[c])
            elif u < 0.08 and row[c] is not None:
                row[c] = repr(float(row[c]))  # NumPy parses a numeric string
            elif u < 0.1 and row[c] is not None:
                row[c] = np.float32(row[c])
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", range(12))
def test_matches_the_reference_on_random_rows(model_set: ModelSet, seed: int) -> None:
    rows = random_rows(1 + seed % 9, seed)
    assert model_set.score_opportunities(rows) == reference(model_set, rows)


def test_matches_the_reference_without_a_hold_model_nor_sizing(model_set: ModelSet) -> None:
    """The given hold grid (a repeated hold: the first of a tie wins) and an even payoff (b = 1)."""
    bundles = {k: v for k, v in model_set.bundles.items() if k != HOLD_MODEL}
    models = ModelSet(bundles, hold_grid_hours=(8.0, 2.0, 8.0, 1.0, 48.0, 48.0))
    models.sizing = None
    for seed in range(6):
        rows = random_rows(1 + seed, 100 + seed)
        answers = models.score_opportunities(rows)
        assert answers == reference(models, rows)
        assert all(a["hold_model_hours"] is None for a in answers)


@pytest.mark.parametrize(
    "bad", ["abc", [1.0, 2.0], {"a": 1}, 1 + 2j, object()], ids=["str", "list", "dict", "complex", "object"]
)
def test_a_bad_value_gets_numpys_message_naming_its_column(model_set: ModelSet, bad: Any) -> None:
    rows = random_rows(3, 7)
    rows[1]["fund_profit_8h"] = bad
    rows[2]["volume_24h"] = "not a number"  # a later column: the first bad column in INPUT_COLUMNS order is named
    values = [r["fund_profit_8h"] for r in rows]  # never None: a required field
    try:
        np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:
        expected = f"fund_profit_8h is not numeric: {e}"
    else:  # NumPy took it (a 2-value list makes the column too long)
        expected = "fund_profit_8h has 4 values, expected 3"
    with pytest.raises(DataValidationError) as info:
        model_set.score_opportunities(rows)
    assert str(info.value) == expected


def test_an_int_beyond_float_range_fails_as_numpy_does(model_set: ModelSet) -> None:
    rows = random_rows(1, 3)
    rows[0]["volume_24h"] = 10**400
    with pytest.raises(OverflowError) as info:
        model_set.score_opportunities(rows)
    with pytest.raises(OverflowError) as numpy_info:
        np.asarray([10**400], dtype=np.float64)
    assert str(info.value) == str(numpy_info.value)


def test_a_bad_row_is_named(model_set: ModelSet) -> None:
    rows = random_rows(4, 11)
    rows[2]["regime"] = "Sideways"
    with pytest.raises(DataValidationError, match=r"^opportunity 2: .*'regime' has unknown values \['Sideways'\]"):
        model_set.score_opportunities(rows)


def test_best_candidates_first_maximum_like_a_stable_sort() -> None:
    """Ties go to the first candidate; NaN scores rank last, as the stable lexsort on -score orders them."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        counts = rng.integers(1, 6, rng.integers(1, 6)).tolist()
        score = rng.choice([0.0, -0.0, 1.0, 2.0, -math.inf, math.inf, math.nan], sum(counts))
        entry = np.repeat(np.arange(len(counts)), counts)
        order = np.lexsort((-score, entry))
        expected = order[np.r_[0, np.flatnonzero(np.diff(entry[order])) + 1]].tolist()
        assert _best_candidates(score, score.tolist(), counts) == expected
