"""Shadow comparison on constructed series: the join on shared bars, the metrics, and the three verdicts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.models.holdout import information_coefficient
from cryptoml.monitoring.shadow import (
    BETTER,
    INSUFFICIENT,
    NOT_BETTER,
    Outcomes,
    align_on_bars,
    compare_shadow,
    score,
)

T0_MS = 1_704_067_200_000  # 2024-01-01T00:00Z
BAR_MS = 60_000


def market(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` consecutive 1-minute bar open times and their realised 10-minute log returns (~10 bp)."""
    rng = np.random.default_rng(seed)
    return T0_MS + BAR_MS * np.arange(n, dtype=np.int64), rng.normal(0.0, 1e-3, n)


def skilled(realised: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """Predictions = the realised return + noise of ``noise`` times its scale (0 = perfect)."""
    return realised + np.random.default_rng(seed).normal(0.0, noise * 1e-3, realised.size)


def outcomes(ts: np.ndarray, pred: np.ndarray, realised: np.ndarray, symbol: str | None = None) -> Outcomes:
    return Outcomes.of(ts, pred, realised, None if symbol is None else [symbol] * ts.size)


def verdict(champion: Outcomes, challenger: Outcomes, **kw: object) -> object:
    args: dict[str, object] = {"min_hours": 1.0, "min_predictions": 50, "margin": 0.0, **kw}
    return compare_shadow(champion, challenger, **args)  # type: ignore[arg-type]


# --- the join -----------------------------------------------------------------------------------------------


def test_only_bars_both_models_predicted_are_compared() -> None:
    """The challenger joined mid-way: the champion's earlier bars (where it was excellent) do not count."""
    ts, r = market(300)
    champ_pred = np.where(np.arange(300) < 150, r, -r)  # perfect before bar 150, exactly wrong after
    champion = outcomes(ts, champ_pred, r)
    challenger = outcomes(ts[150:], skilled(r[150:], 0.5, 1), r[150:])
    joined = align_on_bars(champion, challenger)
    assert np.array_equal(joined.bar_ts_ms, ts[150:])
    assert np.array_equal(joined.champion_prediction, -r[150:])
    result = verdict(champion, challenger)
    assert result.n == 150 and result.first_bar_ts_ms == ts[150] and result.last_bar_ts_ms == ts[-1]
    assert result.champion.ic == pytest.approx(-1.0) and result.champion.directional_accuracy == 0.0
    assert result.hours == pytest.approx(150 / 60)  # first bar open to last bar close
    assert result.status == BETTER


def test_join_matches_symbol_and_bar_not_bar_alone() -> None:
    ts, _ = market(4)
    champion = Outcomes.of(np.r_[ts[:2], ts[:2]], [1.0, 2.0, 3.0, 4.0], [0.1] * 4, ["BTC", "BTC", "ETH", "ETH"])
    challenger = Outcomes.of(ts[1:3], [20.0, 30.0], [0.1, 0.1], ["ETH", "ETH"])
    joined = align_on_bars(champion, challenger)
    assert joined.bar_ts_ms.tolist() == [ts[1]]
    assert (joined.champion_prediction.tolist(), joined.challenger_prediction.tolist()) == ([4.0], [20.0])
    with pytest.raises(DataValidationError, match="symbols for both"):
        align_on_bars(champion, Outcomes.of(ts[1:3], [1.0, 2.0], [0.1, 0.1]))


def test_each_model_is_scored_against_its_own_label_with_spearman_ic() -> None:
    ts, r = market(500, seed=3)
    pred = skilled(r, 1.0, 4)
    champion = outcomes(ts, pred, r)
    # A monotone transform keeps the ranks: same Spearman IC and direction, very different MSE.
    challenger = outcomes(ts, pred * 1e3 + np.sign(pred) * 1.0, r)
    result = verdict(champion, challenger, min_predictions=10)
    assert result.metric == "ic" and result.higher_is_better
    assert result.challenger.ic == pytest.approx(result.champion.ic, abs=1e-12)
    assert result.champion.ic == pytest.approx(information_coefficient(r, pred))
    assert result.challenger.directional_accuracy == result.champion.directional_accuracy
    assert result.challenger.mse > 1e3 * result.champion.mse
    assert result.status == NOT_BETTER  # equal IC: a gain of 0 is not above a margin of 0
    direct = score(pred, r)
    assert (direct.n, direct.mse) == (500, pytest.approx(float(np.mean((r - pred) ** 2))))


# --- the verdicts ------------------------------------------------------------------------------------------------


def test_better_challenger_is_better_and_a_worse_one_is_not() -> None:
    ts, r = market(400)
    good, bad = skilled(r, 0.5, 1), skilled(r, 5.0, 2)
    better = verdict(outcomes(ts, bad, r), outcomes(ts, good, r))
    assert better.status == BETTER and better.better
    assert better.gain == pytest.approx(better.challenger.ic - better.champion.ic) and better.gain > 0.3
    assert "> margin 0" in better.reason
    worse = verdict(outcomes(ts, good, r), outcomes(ts, bad, r))
    assert worse.status == NOT_BETTER and not worse.better and worse.gain < 0
    assert "<= margin 0" in worse.reason


def test_margin_is_strict_and_in_the_metric_units() -> None:
    ts, r = market(400)
    champion, challenger = outcomes(ts, skilled(r, 2.0, 1), r), outcomes(ts, skilled(r, 1.0, 2), r)
    gain = verdict(champion, challenger).gain
    assert verdict(champion, challenger, margin=gain * 0.99).status == BETTER
    assert verdict(champion, challenger, margin=gain).status == NOT_BETTER  # not *more* than the margin
    assert verdict(champion, challenger, margin=gain * 1.01).status == NOT_BETTER


def test_lower_is_better_metric_flips_the_direction() -> None:
    ts, r = market(400)
    champion, challenger = outcomes(ts, skilled(r, 2.0, 1), r), outcomes(ts, skilled(r, 0.5, 2), r)
    result = verdict(champion, challenger, metric="mse")
    assert not result.higher_is_better and result.challenger.mse < result.champion.mse
    assert result.gain == pytest.approx(result.champion.mse - result.challenger.mse)
    assert result.status == BETTER
    assert verdict(challenger, champion, metric="mse").status == NOT_BETTER


@pytest.mark.parametrize(
    ("bars", "min_hours", "min_predictions", "why"),
    [
        (100, 1.0, 500, "100 < 500 compared predictions"),  # enough time, too few labelled pairs
        (100, 2.0, 50, "1.7 h < 2 h of shadow"),  # enough pairs, too short
        (0, 1.0, 50, "0 < 50 compared predictions, 0.0 h < 1 h"),
    ],
)
def test_too_little_shadow_evidence_is_insufficient_even_when_better(
    bars: int, min_hours: float, min_predictions: int, why: str
) -> None:
    ts, r = market(bars)
    result = verdict(
        outcomes(ts, skilled(r, 5.0, 1), r),
        outcomes(ts, skilled(r, 0.1, 2), r),
        min_hours=min_hours,
        min_predictions=min_predictions,
    )
    assert result.status == INSUFFICIENT and not result.better
    assert why in result.reason
    assert result.n == bars


def test_exactly_the_minimum_counts() -> None:
    ts, r = market(120)
    result = verdict(outcomes(ts, skilled(r, 5.0, 1), r), outcomes(ts, r, r), min_hours=2.0, min_predictions=120)
    assert result.hours == pytest.approx(2.0) and result.status == BETTER


def test_an_undefined_metric_is_never_better() -> None:
    """A challenger predicting a constant has no IC: it cannot be shown better, whatever the champion's."""
    ts, r = market(200)
    result = verdict(outcomes(ts, skilled(r, 9.0, 1), r), outcomes(ts, np.full(200, 1e-4), r))
    assert math.isnan(result.challenger.ic) and math.isnan(result.gain)
    assert result.status == NOT_BETTER and "cannot win" in result.reason


def test_to_dict_is_json_with_nan_as_null() -> None:
    ts, r = market(60)
    result = verdict(outcomes(ts, r, r), outcomes(ts, np.zeros(60), r), min_predictions=1)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["challenger"]["ic"] is None and data["gain"] is None
    assert data["champion"]["ic"] == pytest.approx(1.0) and data["n"] == 60
    assert data["status"] == NOT_BETTER and data["metric"] == "ic"


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_raises_naming_what_is_wrong() -> None:
    ts, r = market(5)
    with pytest.raises(DataValidationError, match=r"shadow\.prediction: 1 non-finite"):
        Outcomes.of(ts, [0.1, np.nan, 0.1, 0.1, 0.1], r, what="shadow")
    with pytest.raises(DataValidationError, match="different lengths"):
        Outcomes.of(ts, r[:4], r)
    with pytest.raises(DataValidationError, match="appears more than once"):
        Outcomes.of(np.r_[ts[:2], ts[1]], r[:3], r[:3])
    with pytest.raises(DataValidationError, match="integer epoch ms"):
        Outcomes.of(ts.astype(float), r, r)
    a = outcomes(ts, r, r)
    with pytest.raises(ConfigError, match="unknown metric 'sharpe'"):
        compare_shadow(a, a, metric="sharpe", min_hours=0, min_predictions=1)
    with pytest.raises(ConfigError, match="margin"):
        compare_shadow(a, a, margin=-0.1, min_hours=0, min_predictions=1)
    with pytest.raises(ConfigError, match="min_predictions >= 1"):
        compare_shadow(a, a, min_hours=0, min_predictions=0)
