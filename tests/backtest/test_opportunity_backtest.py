"""Walk-forward of the opportunity scorer (ML vs rule) on a small real chain over the synthetic market.

The chain is the real one (synthetic market -> store -> snapshots -> opportunities -> simulated positions
-> features) on 10 days, two bases, holds of 1-48 h and low fees (so that the rule, which needs a hold at
least as long as the break-even, finds entries in a grid this short).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptoml.backtest.opportunity import (
    MS_PER_DAY,
    MS_PER_HOUR,
    OpportunityBacktest,
    OpportunityBacktestSettings,
    OpportunityFold,
    backtest_opportunity_scorer,
    opportunity_fold_data,
    opportunity_folds,
    purge_ms_for,
    rule_hold_hours,
    write_opportunity_report,
)
from cryptoml.config import OpportunityModelParams, OpportunityParams, Params, SimulateParams, SyntheticParams
from cryptoml.edge.opportunities import rule_score
from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.features.opportunity import opportunity_features
from cryptoml.market.store import ParquetStore
from cryptoml.market.synthetic import write_market
from cryptoml.simulate.opportunities import detect_opportunities
from cryptoml.simulate.positions import build_funding_events, build_price_paths, simulate_positions
from cryptoml.simulate.snapshots import build_snapshots, load_market_frames

HOLDS = (1, 8, 24, 48)
MODEL = OpportunityModelParams()
SETTINGS = OpportunityBacktestSettings(top_k=5, n_estimators=30, min_train_days=1.0)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    synthetic = replace(SyntheticParams(), days=10, bases=("BTC", "ETH"))
    store = ParquetStore(tmp_path_factory.mktemp("raw"))
    write_market(synthetic, store)
    params = Params()
    sim = replace(SimulateParams(), hold_hours=HOLDS, taker_fee_bps={"default": 1.0})
    ex, bases, quote = list(synthetic.exchanges), list(synthetic.bases), synthetic.quote
    snaps = build_snapshots(store, ex, bases, quote, params.snapshots)
    opps = detect_opportunities(snaps, params.opportunities, sim)
    frames = load_market_frames(store, ex, bases, quote)
    prices = build_price_paths(frames, snaps)
    positions = simulate_positions(opps, prices, build_funding_events(frames, prices), sim).positions
    return positions, opportunity_features(positions)


@pytest.fixture(scope="module")
def result(chain: tuple[pd.DataFrame, pd.DataFrame]) -> OpportunityBacktest:
    return backtest_opportunity_scorer(*chain, MODEL, SETTINGS)


def test_folds_are_utc_days_purged_by_the_longest_hold(chain: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    positions, features = chain
    ts = positions["ts_ms"].to_numpy()
    purge = purge_ms_for(MODEL, HOLDS)
    assert purge == 48 * MS_PER_HOUR
    folds = opportunity_folds(ts, purge_ms=purge, min_train_ms=MS_PER_DAY)
    assert len(folds) >= 4
    for a, b in itertools.pairwise(folds):
        assert a.test_end_ms <= b.test_start_ms
    for fold in folds:
        assert fold.test_start_ms % MS_PER_DAY == 0 and fold.test_end_ms - fold.test_start_ms == MS_PER_DAY
        assert fold.train_end_ms == fold.test_start_ms - purge
        train = ts < fold.train_end_ms
        exits = ts[train] + positions["hold_hours"].to_numpy()[train] * MS_PER_HOUR
        assert exits.max() <= fold.test_start_ms  # every training label is known before the test day
    assert folds[0].train_end_ms - ts.min() >= MS_PER_DAY

    short = OpportunityFold(0, folds[0].test_start_ms - MS_PER_HOUR, folds[0].test_start_ms, folds[0].test_end_ms)
    with pytest.raises(DataValidationError, match="purge"):
        opportunity_fold_data(positions, features, short, SETTINGS)
    with pytest.raises(ConfigError, match="shorter than the longest hold"):
        purge_ms_for(replace(MODEL, purge_hours=24.0), HOLDS)
    with pytest.raises(DataValidationError, match="needs more than"):
        opportunity_folds(ts[ts < ts.min() + 2 * MS_PER_DAY], purge_ms=purge, min_train_ms=MS_PER_DAY)


def test_rule_hold_is_the_live_rule_scorers_hold() -> None:
    grid = (1.0, 8.0, 24.0, 48.0)
    be = np.array([0.5, 1.0, 7.9, 8.0, 30.0, 48.0])
    np.testing.assert_array_equal(rule_hold_hours(be, grid), [1.0, 1.0, 8.0, 8.0, 48.0, 48.0])
    assert np.isnan(rule_hold_hours(np.array([48.5, np.nan]), grid)).all()
    loose = OpportunityParams(min_fund_apr_pct=0.0, min_volume_24h_usd=0.0, min_depth_usd=0.0)
    for b in be:
        opp = {"fund_apr": 10.0, "break_even_hours": b, "volume_24h": 1e9, "bid_ask_spread_pct": 0.01}
        decided = rule_score({**opp, "orderbook_depth_usd": 1e9}, loose, hold_grid_hours=grid)
        assert decided["hold_hours"] == rule_hold_hours(np.array([b]), grid)[0]


def test_picks_follow_each_scorer_and_pnl_adds_up(result: OpportunityBacktest) -> None:
    picks = result.picks
    assert set(picks["scorer"]) == {"ml", "rule"}
    day = picks["ts_ms"] // MS_PER_DAY
    assert picks.groupby(["scorer", day]).size().max() <= SETTINGS.top_k
    assert not picks.duplicated(["scorer", "ts_ms", "opportunity_id"]).any()  # one hold per entry
    rule = picks[picks["scorer"] == "rule"]
    np.testing.assert_array_equal(rule["hold_hours"], rule_hold_hours(rule["break_even_hours"].to_numpy(), HOLDS))
    for fold in result.folds:
        for s in ("ml", "rule"):
            mine = picks[(picks["fold"] == fold["fold"]) & (picks["scorer"] == s)]
            assert fold[s]["picks"] == len(mine)
            assert fold[s]["pnl_usd"] == pytest.approx(mine["actual_profit_usd"].sum())
    for s in ("ml", "rule"):
        total = result.overall[s]["pnl_usd"]
        assert total == pytest.approx(sum(f[s]["pnl_usd"] for f in result.folds))
        curve = result.curve[result.curve["scorer"] == s]
        assert curve["cum_pnl_usd"].iloc[-1] == pytest.approx(total)
        assert (np.diff(curve["exit_ms"].to_numpy()) >= 0).all()
        mine = picks[picks["scorer"] == s]
        assert result.overall[s]["hit_rate"] == pytest.approx(mine["was_profitable"].mean())
    assert result.overall["rule"]["picks"] > 0 and result.overall["ml"]["picks"] > 0


def test_rule_picks_are_the_days_best_eligible_entries(
    chain: tuple[pd.DataFrame, pd.DataFrame], result: OpportunityBacktest
) -> None:
    positions, _ = chain
    for fold in result.folds:
        day = positions[(positions["ts_ms"] >= fold["test_start_ms"]) & (positions["ts_ms"] < fold["test_end_ms"])]
        eligible = day[day["hold_hours"] == rule_hold_hours(day["break_even_hours"].to_numpy(), HOLDS)]
        picked = result.picks[(result.picks["fold"] == fold["fold"]) & (result.picks["scorer"] == "rule")]
        if len(picked):
            best = np.sort(eligible["fund_apr"].to_numpy())[::-1][: len(picked)]
            np.testing.assert_allclose(np.sort(picked["fund_apr"].to_numpy())[::-1], best)


def test_the_models_never_see_the_test_days_outcomes(
    chain: tuple[pd.DataFrame, pd.DataFrame], result: OpportunityBacktest
) -> None:
    """Scramble every outcome from the first fold's purge on: that fold's ML picks must not move."""
    positions, features = chain
    first = result.folds[0]
    scrambled = positions.copy()
    later = scrambled["ts_ms"] >= first["train_end_ms"]
    rng = np.random.default_rng(1)
    scrambled.loc[later, "actual_profit_pct"] = rng.normal(0, 5, int(later.sum()))
    scrambled.loc[later, "was_profitable"] = rng.random(int(later.sum())) < 0.5
    again = backtest_opportunity_scorer(scrambled, features, MODEL, SETTINGS)
    keys = ["scorer", "ts_ms", "opportunity_id", "hold_hours", "score"]
    mine = result.picks[result.picks["fold"] == 0][keys].reset_index(drop=True)
    theirs = again.picks[again.picks["fold"] == 0][keys].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, theirs)


def test_deterministic_report(
    chain: tuple[pd.DataFrame, pd.DataFrame], result: OpportunityBacktest, tmp_path: Path
) -> None:
    again = backtest_opportunity_scorer(*chain, MODEL, SETTINGS)
    pd.testing.assert_frame_equal(again.picks, result.picks)
    a = write_opportunity_report(result, tmp_path / "a", settings={"top_k": SETTINGS.top_k})
    b = write_opportunity_report(again, tmp_path / "b", settings={"top_k": SETTINGS.top_k})
    for key in ("json", "png"):
        assert a[key].read_bytes() == b[key].read_bytes()
    doc = json.loads(a["json"].read_text())
    assert doc["overall"]["folds"] == len(result.folds) and doc["settings"] == {"top_k": SETTINGS.top_k}
    assert a["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
