"""LightGBM forward-return model: target alignment, no look-ahead, purged split, metrics, estimator contract.

One realistic run on two weeks of the real BTC/USDT 1-minute month (skipped when ../shared/data is absent)
prints its test metrics next to the zero and persistence baselines (run pytest with -s to see them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import DataValidationError, ModelContractError
from cryptoml.features.technical import TECHNICAL_FEATURES
from cryptoml.market.files import import_ohlcv
from cryptoml.models.price_lgbm import (
    MINUTES_PER_YEAR,
    ForwardReturnModel,
    directional_accuracy,
    forward_return_target,
    information_coefficient,
    make_price_dataset,
    non_overlapping_rows,
    price_metrics,
    purged_price_split,
    threshold_rule_sharpe,
    trailing_return,
    train_price_lgbm,
)
from tests.conftest import shared_file

BAR_MS = 60_000
START_MS = 1_704_067_200_000  # 2024-01-01T00:00Z
BTC_1M = "binance_spot_btcusdt_1m_20230417-20230517.parquet"
SMALL = {"n_estimators": 60, "num_leaves": 15, "max_depth": 4, "learning_rate": 0.1, "early_stopping_rounds": 10}


def random_walk_ohlcv(n: int, seed: int = 0, start_ms: int = START_MS, vol: float = 8e-4) -> pd.DataFrame:
    """``n`` gap-free 1-minute bars (store schema) of a seeded log-normal random walk."""
    rng = np.random.default_rng(seed)
    close = 30_000.0 * np.exp(np.cumsum(rng.normal(0.0, vol, n)))
    open_ = np.concatenate(([close[0]], close[:-1]))
    wiggle = np.abs(rng.normal(0.0, vol / 2, n)) * close
    return pd.DataFrame(
        {
            "ts_ms": start_ms + np.arange(n, dtype=np.int64) * BAR_MS,
            "open": open_,
            "high": np.maximum(open_, close) + wiggle,
            "low": np.minimum(open_, close) - wiggle,
            "close": close,
            "volume": rng.gamma(2.0, 5.0, n),
        }
    )


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return random_walk_ohlcv(3000, seed=1)


# --- target and dataset ------------------------------------------------------------------------------


def test_forward_return_is_log_return_to_the_bar_h_minutes_later() -> None:
    ohlcv = random_walk_ohlcv(50)
    y = forward_return_target(ohlcv, 5)
    c = ohlcv["close"].to_numpy()
    assert y.name == "fwd_ret_5m"
    np.testing.assert_allclose(y.to_numpy()[:-5], np.log(c[5:] / c[:-5]), rtol=0, atol=1e-15)
    assert y.iloc[-5:].isna().all() and y.iloc[:-5].notna().all()
    back = trailing_return(ohlcv, 5).to_numpy()
    assert np.isnan(back[:5]).all()
    np.testing.assert_allclose(back[5:], y.to_numpy()[:-5], rtol=0, atol=1e-15)


def test_forward_return_is_nan_across_a_gap_never_the_wrong_bar() -> None:
    ohlcv = random_walk_ohlcv(40)
    gapped = ohlcv.drop(index=[20, 21, 22]).reset_index(drop=True)  # bars 20..22 missing
    y = forward_return_target(gapped, 2).to_numpy()
    ts = gapped["ts_ms"].to_numpy()
    c = gapped["close"].to_numpy()
    for i in range(len(gapped)):
        j = np.flatnonzero(ts == ts[i] + 2 * BAR_MS)
        if j.size:
            assert y[i] == pytest.approx(math.log(c[j[0]] / c[i]), abs=1e-15)
        else:
            assert np.isnan(y[i])
    assert np.isnan(y[18]) and np.isnan(y[19])  # their future bars (20, 21) are missing


@pytest.mark.parametrize("h", [0, -3, 1.5, True])
def test_horizon_must_be_a_positive_integer(h: object) -> None:
    with pytest.raises(DataValidationError, match="horizon_minutes"):
        forward_return_target(random_walk_ohlcv(10), h)


def test_dataset_drops_warmup_and_rows_without_target(bars: pd.DataFrame) -> None:
    h = 15
    X, y, ts = make_price_dataset(bars, h)
    assert list(X.columns) == list(TECHNICAL_FEATURES)
    assert len(X) == len(y) == len(ts) == len(bars) - 60 - h
    assert ts[0] == bars["ts_ms"].iloc[60] and ts[-1] == bars["ts_ms"].iloc[-h - 1]
    assert np.isfinite(X.to_numpy()).all() and np.isfinite(y).all()


def test_no_look_ahead_changing_later_bars_leaves_earlier_features_unchanged(bars: pd.DataFrame) -> None:
    h, cut = 10, 2000
    X, y, ts = make_price_dataset(bars, h)
    changed = bars.copy()
    later = changed.index > cut
    for col in ("open", "high", "low", "close"):
        changed.loc[later, col] *= 1.37
    changed.loc[later, "volume"] *= 5.0
    X2, y2, ts2 = make_price_dataset(changed, h)
    np.testing.assert_array_equal(ts, ts2)
    t_cut = bars["ts_ms"].iloc[cut]
    upto = ts <= t_cut
    pd.testing.assert_frame_equal(X[upto], X2[upto])  # exact: features at t only read bars <= t
    assert not X[~upto].equals(X2[~upto])
    # targets change exactly for the rows whose horizon reaches past the cut
    unaffected = ts + h * BAR_MS <= t_cut
    np.testing.assert_array_equal(y[unaffected], y2[unaffected])
    assert (y[upto & ~unaffected] != y2[upto & ~unaffected]).all()


def test_purged_split_leaves_a_gap_of_one_horizon_between_labels(bars: pd.DataFrame) -> None:
    h = 30
    _, _, ts = make_price_dataset(bars, h)
    train, valid, test = purged_price_split(ts, h, 0.6, 0.2)
    assert train.size and valid.size and test.size
    assert train[-1] < valid[0] and valid[-1] < test[0]
    # label of row t runs from t's close to the close of bar t + h: it must end by the next window's first close
    for before, after in ((train, valid), (valid, test)):
        last_label_end = ts[before[-1]] + (h + 1) * BAR_MS
        first_label_start = ts[after[0]] + BAR_MS
        assert last_label_end <= first_label_start
        assert ts[after[0]] - ts[before[-1]] >= h * BAR_MS
    # the gap is not wider than needed (rows are consecutive minutes)
    assert ts[valid[0]] - ts[train[-1]] <= (h + 1) * BAR_MS


# --- metrics -----------------------------------------------------------------------------------------


def test_directional_accuracy_counts_sign_agreement_on_nonzero_truths() -> None:
    y_true = np.array([1.0, -1.0, 0.0, 2.0, -0.5])
    y_pred = np.array([0.5, 0.5, -1.0, -3.0, 0.0])
    # non-zero truths: rows 0, 1, 3, 4; only row 0 agrees (a zero prediction is a miss)
    assert directional_accuracy(y_true, y_pred) == pytest.approx(0.25)
    assert math.isnan(directional_accuracy(np.zeros(3), np.ones(3)))


def test_information_coefficient_is_spearman() -> None:
    y = np.array([0.3, -0.1, 0.2, 0.5, -0.4])
    assert information_coefficient(y, np.exp(10 * y)) == pytest.approx(1.0)  # any increasing map
    assert information_coefficient(y, -(y**3)) == pytest.approx(-1.0)
    assert information_coefficient(y, [1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(-0.3)  # 1 - 6 * 26 / (5 * 24)
    assert math.isnan(information_coefficient(y, np.zeros(5)))


def test_sharpe_of_threshold_rule_by_hand() -> None:
    h = 3
    # decisions at rows 0, 3, 6, 9 (non-overlapping); other rows must be ignored
    y_true = np.array([0.002, 9, 9, -0.001, 9, 9, 0.001, 9, 9, 0.001])
    y_pred = np.array([0.001, 0, 0, -0.002, 0, 0, -0.005, 0, 0, 0.0005])  # long, short, short, flat (5 bps)
    out = threshold_rule_sharpe(y_true, y_pred, h, threshold_bps=8.0)
    pnl = np.array([0.002, 0.001, -0.001, 0.0])
    expected = pnl.mean() / pnl.std(ddof=1) * math.sqrt(MINUTES_PER_YEAR / h)
    assert out["sharpe"] == pytest.approx(expected)
    assert out["periods"] == 4 and out["exposure"] == pytest.approx(0.75)
    assert out["hit_rate"] == pytest.approx(2 / 3) and out["mean_pnl_bps"] == pytest.approx(5.0)


def test_sharpe_sign_follows_the_forecast_quality() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(0.0, 2e-3, 2000)
    good = threshold_rule_sharpe(y, y, 5)["sharpe"]
    bad = threshold_rule_sharpe(y, -y, 5)["sharpe"]
    assert good > 10 and bad == pytest.approx(-good)
    flat = threshold_rule_sharpe(y, np.full(y.size, 7e-4), 5)  # never beyond 8 bps
    assert flat["sharpe"] == 0.0 and flat["exposure"] == 0.0 and math.isnan(flat["hit_rate"])


def test_non_overlapping_rows_use_time_not_position() -> None:
    ts = START_MS + BAR_MS * np.array([0, 1, 2, 3, 10, 11, 12, 13, 14])
    np.testing.assert_array_equal(non_overlapping_rows(ts, 3 * BAR_MS), [0, 3, 4, 7])
    rows = threshold_rule_sharpe(np.ones(9) * 1e-3, np.ones(9), 3, ts_ms=ts)
    assert rows["periods"] == 4


def test_price_metrics_keys_and_input_checks() -> None:
    y = np.array([1e-3, -2e-3, 5e-4, 0.0])
    out = price_metrics(y, y, threshold_bps=1.0)
    assert out["rmse"] == 0.0 and out["directional_accuracy"] == 1.0 and out["ic"] == pytest.approx(1.0)
    assert {"rmse_bps", "sharpe", "exposure", "hit_rate", "periods", "rows"} <= set(out)
    with pytest.raises(DataValidationError, match="y_pred has 3"):
        price_metrics(y, y[:3])
    with pytest.raises(DataValidationError, match="finite"):
        price_metrics([np.nan, 1.0], [0.0, 1.0])


# --- the estimator -----------------------------------------------------------------------------------


class SplitData(NamedTuple):
    X: pd.DataFrame
    y: np.ndarray
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


@pytest.fixture(scope="module")
def split_data(bars: pd.DataFrame) -> SplitData:
    X, y, ts = make_price_dataset(bars, 5)
    return SplitData(X, y, *purged_price_split(ts, 5))


def _fit(d: SplitData, **params: Any) -> ForwardReturnModel:
    model = ForwardReturnModel(**{**SMALL, **params})
    return model.fit(d.X.iloc[d.train], d.y[d.train], eval_set=[(d.X.iloc[d.valid], d.y[d.valid])])


def test_init_stores_hyperparameters_only_with_the_issue_defaults() -> None:
    model = ForwardReturnModel()
    assert vars(model) == model.get_params()
    assert model.get_params() == {
        "num_leaves": 64,
        "max_depth": 8,
        "n_estimators": 1000,
        "learning_rate": 0.03,
        "subsample": 0.8,
        "subsample_freq": 1,
        "early_stopping_rounds": 50,
        "random_state": 42,
        "n_jobs": 2,
        "deterministic": True,
    }
    assert "ForwardReturnModel(num_leaves=64" in repr(model)


def test_fit_returns_self_with_learned_state(split_data: SplitData) -> None:
    d = split_data
    model = ForwardReturnModel(**SMALL)
    before = model.get_params()
    assert model.fit(d.X.iloc[d.train], d.y[d.train], eval_set=[(d.X.iloc[d.valid], d.y[d.valid])]) is model
    assert model.get_params() == before
    assert model.feature_names_ == TECHNICAL_FEATURES
    assert model.booster_ is model.model_
    assert model.booster_.num_trees() == model.best_iteration_ + 1 <= SMALL["n_estimators"]
    assert "bagging_freq: 1" in model.booster_.model_to_string()  # subsample takes effect
    pred = model.predict(d.X.iloc[d.test])
    assert pred.dtype == np.float64 and pred.shape == (d.test.size,)
    assert set(model.evals_result_) == {"valid"}
    imp = model.feature_importance()
    assert list(imp.columns) == ["feature", "gain", "split"] and set(imp["feature"]) == set(TECHNICAL_FEATURES)


def test_two_fits_are_identical(split_data: SplitData) -> None:
    a, b = _fit(split_data, random_state=11), _fit(split_data, random_state=11)
    X = split_data.X
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    assert a.booster_.model_to_string() == b.booster_.model_to_string()
    assert a.best_iteration_ == b.best_iteration_


def test_predict_checks_fitted_state_and_columns(split_data: SplitData) -> None:
    X = split_data.X
    with pytest.raises(ModelContractError, match="not fitted"):
        ForwardReturnModel().predict(X)
    model = _fit(split_data)
    with pytest.raises(ModelContractError, match="different order"):
        model.predict(X[list(reversed(X.columns))])
    with pytest.raises(ModelContractError, match="19"):
        model.predict(X.to_numpy()[:, :5])
    np.testing.assert_array_equal(model.predict(X.to_numpy()), model.predict(X))


def test_fit_rejects_bad_targets_and_hyperparameters(split_data: SplitData) -> None:
    X = split_data.X
    y = np.zeros(len(X))
    y[3] = np.nan
    with pytest.raises(DataValidationError, match="NaN"):
        ForwardReturnModel(**SMALL).fit(X, y)
    with pytest.raises(DataValidationError, match="rows"):
        ForwardReturnModel(**SMALL).fit(X, np.zeros(5))
    with pytest.raises(ModelContractError, match="subsample"):
        ForwardReturnModel(subsample=1.5).fit(X, np.zeros(len(X)))
    with pytest.raises(ModelContractError, match="unknown hyperparameter"):
        ForwardReturnModel().set_params(colsample=0.5)


def test_fit_without_eval_set_keeps_every_round(split_data: SplitData) -> None:
    X, y = split_data.X, split_data.y
    model = ForwardReturnModel(n_estimators=12, num_leaves=7, n_jobs=1).fit(X, y)
    assert model.best_iteration_ == 11 and model.booster_.num_trees() == 12


# --- the training entry point ------------------------------------------------------------------------


def test_train_price_lgbm_writes_metrics_and_importance(bars: pd.DataFrame, tmp_path: Path) -> None:
    result = train_price_lgbm(bars, 5, **SMALL, n_jobs=1, out_dir=tmp_path)
    assert set(result.metrics["test"]) == {"model", "zero", "persistence"}
    assert result.metrics["test"]["zero"]["sharpe"] == 0.0
    assert result.split["purge_ms"] == 5 * BAR_MS
    assert result.split["train"]["last_ts_ms"] + 5 * BAR_MS <= result.split["valid"]["first_ts_ms"]
    saved = json.loads(result.artifacts["metrics"].read_text())  # strict JSON: NaN written as null
    assert saved["test"]["zero"]["ic"] is None
    assert saved["params"]["num_leaves"] == SMALL["num_leaves"]
    assert pd.read_csv(result.artifacts["importance"])["feature"].nunique() == 19
    assert result.fit_seconds > 0


def test_real_btc_two_weeks_against_baselines(tmp_path: Path) -> None:
    bars = import_ohlcv(shared_file(BTC_1M), timeframe="1m").iloc[: 14 * 1440].reset_index(drop=True)
    h = 15
    result = train_price_lgbm(bars, h, out_dir=tmp_path)  # the issue's hyperparameters
    test = result.metrics["test"]
    for name in ("model", "zero", "persistence"):
        m = test[name]
        print(
            f"BTC/USDT 1m, 14 days, h={h} min, test {name:>11}: rmse {m['rmse_bps']:.2f} bps, "
            f"DA {m['directional_accuracy']:.3f}, IC {m['ic']:.4f}, Sharpe {m['sharpe']:.2f} "
            f"(exposure {m['exposure']:.3f} of {m['periods']:.0f} periods)"
        )
    print(f"best iteration {result.model.best_iteration_}, fit {result.fit_seconds:.1f} s, split {result.split}")
    assert test["model"]["rows"] == test["zero"]["rows"] > 2500
    assert math.isfinite(test["model"]["ic"]) and math.isfinite(test["model"]["rmse"])
    # 1-minute returns are mostly noise: the model must at least not be far worse than predicting no move
    assert test["model"]["rmse"] < 1.2 * test["zero"]["rmse"]
    assert result.model.best_iteration_ < 1000 - 1  # early stopping engaged on the validation window
