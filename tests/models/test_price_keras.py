"""Keras CNN+LSTM price models, the sentiment table and the model fallback rule.

The training runs are tiny (a few hundred windows, one epoch) on a seeded random walk: they check the
layer stack, the window alignment, train-only scaling, determinism and the artefacts, not skill.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import ConfigError, DataValidationError, ModelContractError
from cryptoml.models.price_keras import (
    WINDOW_BARS,
    MinMaxScaling,
    PriceKerasResult,
    build_price_model,
    make_windows,
    train_price_keras,
    window_ends,
)
from cryptoml.models.sentiment import (
    PRICE_FEATURES,
    PRICE_ONLY_MODEL,
    SENTIMENT_COLUMNS,
    SENTIMENT_MODEL,
    SENTIMENT_PRICE_FEATURES,
    align_sentiment,
    choose_price_model,
    load_sentiment_table,
    validate_sentiment_table,
)
from tests.models.test_price_lgbm import random_walk_ohlcv

BAR_MS = 60_000
N_BARS = 900  # ~780 windows: train ~545 (fit on the last 300), validation / test ~110 each
TINY = {"epochs": 1, "batch_size": 64, "max_windows": 300, "max_eval_windows": 100, "patience": None, "seed": 5}


def sentiment_table(ts_ms: np.ndarray, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"ts_ms": np.asarray(ts_ms, dtype=np.int64)})
    for i, col in enumerate(SENTIMENT_COLUMNS):
        table[col] = rng.normal(float(i), 1.0, len(table))
    return table


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    return random_walk_ohlcv(N_BARS, seed=2)


@pytest.fixture(scope="module")
def run_a(bars: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> PriceKerasResult:
    return train_price_keras(bars, **TINY, out_dir=tmp_path_factory.mktemp("keras_a"))


def _weights(result: PriceKerasResult, name: str = PRICE_ONLY_MODEL) -> list[np.ndarray]:
    return [np.asarray(w) for w in result.models[name].keras_model.get_weights()]


# --- network and windows -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_features", [len(PRICE_FEATURES), len(SENTIMENT_PRICE_FEATURES)])
def test_layer_stack_is_exactly_the_issue_network(n_features: int) -> None:
    model = build_price_model(n_features)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv1D", "Conv1D", "MaxPooling1D", "LSTM", "LSTM", "Dense", "Dense"]
    conv1, conv2, pool, lstm1, lstm2, dense, out = model.layers
    for conv in (conv1, conv2):
        assert conv.filters == 64 and conv.kernel_size == (3,) and conv.activation.__name__ == "relu"
    assert pool.pool_size == (2,)
    assert lstm1.units == 100 and lstm1.return_sequences is True
    assert lstm2.units == 100 and lstm2.return_sequences is False
    assert dense.units == 50 and dense.activation.__name__ == "relu"
    assert out.units == 1 and out.activation.__name__ == "linear"
    assert tuple(model.input_shape) == (None, WINDOW_BARS, n_features)
    assert tuple(model.output_shape) == (None, 1)
    # the ONNX converter's call: model(x, training=False) on float32 (batch, 120, n_features)
    y = model(np.zeros((3, WINDOW_BARS, n_features), dtype=np.float32), training=False)
    assert tuple(y.shape) == (3, 1)


def test_windows_end_at_t_and_target_is_the_next_bar() -> None:
    ts = 1_704_067_200_000 + BAR_MS * np.arange(11, dtype=np.int64)
    ts[7:] += 2 * BAR_MS  # two missing minutes between rows 6 and 7
    ends = window_ends(ts, window=3)
    # t needs rows t - 2 .. t + 1 on consecutive minutes: 2..5 before the gap, 9 after it (10 has no t + 1)
    np.testing.assert_array_equal(ends, [2, 3, 4, 5, 9])
    values = np.arange(22, dtype=np.float64).reshape(11, 2)
    win = make_windows(values, ends, window=3)
    assert win.shape == (5, 3, 2) and win.dtype == np.float32
    np.testing.assert_array_equal(win[0], values[0:3])
    np.testing.assert_array_equal(win[-1], values[7:10])


def test_windows_do_not_look_ahead(bars: pd.DataFrame) -> None:
    values = bars[list(PRICE_FEATURES)].to_numpy()
    ends = window_ends(bars["ts_ms"].to_numpy())
    changed = values.copy()
    cut = 500
    changed[cut + 1 :] *= 3.0
    early = ends[ends <= cut]
    np.testing.assert_array_equal(make_windows(values, early), make_windows(changed, early))


# --- training pipeline -------------------------------------------------------------------------------


def test_price_only_run_reports_metrics_and_writes_artefacts(run_a: PriceKerasResult) -> None:
    assert set(run_a.models) == {PRICE_ONLY_MODEL}
    assert "no sentiment table" in run_a.sentiment_reason
    m = run_a.models[PRICE_ONLY_MODEL]
    assert m.feature_names == PRICE_FEATURES and m.window_bars == WINDOW_BARS
    assert m.split["fit_windows"] == TINY["max_windows"] < m.split["train_windows"]
    assert m.split["fit_end_ts_ms"][1] == m.split["train_end_ts_ms"][1]  # the last N training windows
    assert m.split["train_end_ts_ms"][1] + BAR_MS <= m.split["valid_end_ts_ms"][0]  # one-bar purge
    assert set(m.metrics["test"]) == {"model", "persistence", "zero"}
    for report in m.metrics["test"].values():
        assert set(report) == {"mse", "mae", "r2", "directional_accuracy", "rows"}
        assert report["rows"] == m.split["test_windows"]
    assert m.metrics["test"]["zero"]["directional_accuracy"] == 0.0
    assert set(m.history) == {"loss", "val_loss"} and len(m.history["loss"]) == 1
    art = m.artifacts
    assert art["training_curve"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert MinMaxScaling.from_dict(json.loads(art["scaling"].read_text())) == m.scaling
    saved = json.loads(art["metrics"].read_text())
    assert saved["features"] == list(PRICE_FEATURES)


def test_scaling_is_json_able_and_predict_maps_back_to_log_returns(run_a: PriceKerasResult, bars: pd.DataFrame) -> None:
    m = run_a.models[PRICE_ONLY_MODEL]
    params = m.scaling.to_dict()
    assert json.loads(json.dumps(params)) == params
    assert params["kind"] == "minmax" and params["target"]["kind"] == "standard"
    assert params["feature_names"] == list(PRICE_FEATURES)
    assert all(lo < hi for lo, hi in zip(params["feature_min"], params["feature_max"], strict=True))
    ends = window_ends(bars["ts_ms"].to_numpy())[-4:]
    raw = make_windows(bars[list(PRICE_FEATURES)].to_numpy(), ends)
    direct = m.keras_model(m.scaling.transform(raw), training=False).numpy()
    np.testing.assert_allclose(m.predict(raw), m.scaling.target_from_scaled(direct), rtol=1e-5, atol=1e-9)
    with pytest.raises(ModelContractError, match="shape"):
        m.predict(raw[:, :, :3])


def test_same_seed_gives_identical_weights_and_test_data_never_reaches_the_fit(
    run_a: PriceKerasResult, bars: pd.DataFrame
) -> None:
    again = train_price_keras(bars, **TINY)
    for wa, wb in zip(_weights(run_a), _weights(again), strict=True):
        np.testing.assert_array_equal(wa, wb)
    # change every bar of the test span (and most of validation): neither the scaler nor the fit moves
    m = run_a.models[PRICE_ONLY_MODEL]
    changed = bars.copy()
    later = changed["ts_ms"] > m.split["valid_end_ts_ms"][0] + 20 * BAR_MS
    for col in ("open", "high", "low", "close"):
        changed.loc[later, col] *= 1.5
    changed.loc[later, "volume"] *= 10.0
    moved = train_price_keras(changed, **TINY)
    mm = moved.models[PRICE_ONLY_MODEL]
    assert mm.scaling == m.scaling
    assert mm.scaling.fit_last_ts_ms == m.split["train_end_ts_ms"][1]
    for wa, wb in zip(_weights(run_a), _weights(moved), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert mm.metrics["test"] != m.metrics["test"]


def test_sentiment_variant_trains_on_13_features(bars: pd.DataFrame, tmp_path: Path) -> None:
    ts = bars["ts_ms"].to_numpy()
    table = sentiment_table(ts[::3] + BAR_MS)  # a reading every 3 minutes, known at a bar's close
    result = train_price_keras(bars, sentiment=table, **TINY, out_dir=tmp_path)
    assert set(result.models) == {PRICE_ONLY_MODEL, SENTIMENT_MODEL}
    assert "trained the price-only and the sentiment models" in result.sentiment_reason
    m = result.models[SENTIMENT_MODEL]
    assert m.feature_names == SENTIMENT_PRICE_FEATURES and len(m.feature_names) == 13
    assert tuple(m.keras_model.input_shape) == (None, WINDOW_BARS, 13)
    assert m.scaling.to_dict()["feature_names"] == list(SENTIMENT_PRICE_FEATURES)
    assert (tmp_path / SENTIMENT_MODEL / "training_curve.png").is_file()


def test_sentiment_table_covering_too_few_bars_falls_back_to_price_only(bars: pd.DataFrame) -> None:
    ts = bars["ts_ms"].to_numpy()
    table = sentiment_table(ts[-60:])  # the last hour only: no complete 120-bar window
    result = train_price_keras(bars, sentiment=table, **TINY)
    assert set(result.models) == {PRICE_ONLY_MODEL}
    assert "too few" in result.sentiment_reason


def test_train_price_keras_rejects_bad_input(bars: pd.DataFrame) -> None:
    with pytest.raises(DataValidationError, match="missing columns"):
        train_price_keras(bars.drop(columns="volume"), **TINY)
    with pytest.raises(DataValidationError, match="strictly increasing"):
        train_price_keras(bars.iloc[::-1], **TINY)
    with pytest.raises(DataValidationError, match="complete 120-bar windows"):
        train_price_keras(bars.iloc[:100], **TINY)
    with pytest.raises(DataValidationError, match="missing columns"):
        train_price_keras(bars, sentiment=pd.DataFrame({"ts_ms": [0]}), **TINY)


# --- sentiment table ---------------------------------------------------------------------------------

GOOD_TS = 1_704_067_200_000 + BAR_MS * np.arange(5, dtype=np.int64)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop(columns=["sentiment_trend"]), r"missing columns \['sentiment_trend'\]"),
        (lambda t: t.assign(ts_ms=t["ts_ms"].astype(float)), "ts_ms must be integer"),
        (lambda t: t.assign(ts_ms=t["ts_ms"] + 1500), "minute-aligned"),
        (lambda t: t.assign(ts_ms=[*t["ts_ms"][:4], t["ts_ms"].iloc[0]]), "duplicate ts_ms"),
        (lambda t: t.assign(sentiment_score=[0.1, np.nan, 0.2, 0.3, 0.4]), "sentiment_score has 1 NaN/inf"),
        (lambda t: t.assign(sentiment_volume=["a"] * 5), "sentiment_volume must be numeric"),
        (lambda t: t.iloc[:0], "no rows"),
    ],
)
def test_sentiment_table_validation_names_the_problem(
    mutate: Callable[[pd.DataFrame], pd.DataFrame], message: str
) -> None:
    with pytest.raises(DataValidationError, match=message):
        validate_sentiment_table(mutate(sentiment_table(GOOD_TS)))


def test_sentiment_table_loads_from_parquet_and_csv(tmp_path: Path) -> None:
    table = sentiment_table(GOOD_TS).iloc[::-1].assign(source="x")  # unsorted, with an extra column
    table.to_parquet(tmp_path / "s.parquet")
    table.to_csv(tmp_path / "s.csv", index=False)
    for name in ("s.parquet", "s.csv"):
        loaded = load_sentiment_table(tmp_path / name)
        assert list(loaded.columns) == ["ts_ms", *SENTIMENT_COLUMNS]
        np.testing.assert_array_equal(loaded["ts_ms"].to_numpy(), GOOD_TS)
        assert all(loaded[c].dtype == np.float64 for c in SENTIMENT_COLUMNS)
    with pytest.raises(ConfigError, match=r"\.parquet or \.csv"):
        load_sentiment_table(tmp_path / "s.json")
    with pytest.raises(ConfigError, match="no such"):
        load_sentiment_table(tmp_path / "absent.csv")


def test_as_of_alignment_takes_the_last_reading_known_at_the_bar_close() -> None:
    t0 = 1_704_067_200_000
    table = validate_sentiment_table(sentiment_table(t0 + BAR_MS * np.array([2, 5, 6])))
    bars_ts = t0 + BAR_MS * np.arange(8)  # bar k closes at t0 + (k + 1) minutes
    aligned = align_sentiment(bars_ts, table)
    score = table["sentiment_score"].to_numpy()
    # bar 0 closes at minute 1: nothing known yet; bar 1 closes at minute 2: the minute-2 reading counts
    expected = [np.nan, score[0], score[0], score[0], score[1], score[2], score[2], score[2]]
    np.testing.assert_array_equal(aligned[:, 0], expected)
    assert aligned.shape == (8, len(SENTIMENT_COLUMNS))
    stale = align_sentiment(bars_ts, table, max_age_ms=BAR_MS)
    assert np.isnan(stale[3, 0]) and stale[4, 0] == score[1]  # bar 3's reading is 2 minutes old


# --- model choice at inference -----------------------------------------------------------------------


def test_choose_price_model_prefers_sentiment_then_price_only(caplog: pytest.LogCaptureFixture) -> None:
    both = {SENTIMENT_MODEL: object(), PRICE_ONLY_MODEL: object()}
    assert choose_price_model(both, True)[0] == SENTIMENT_MODEL
    name, reason = choose_price_model(both, False)
    assert name == PRICE_ONLY_MODEL and "no current sentiment" in reason
    name, reason = choose_price_model({PRICE_ONLY_MODEL: object()}, True)
    assert name == PRICE_ONLY_MODEL and "sentiment model is not available" in reason
    name, reason = choose_price_model({SENTIMENT_MODEL: None, PRICE_ONLY_MODEL: object()}, True)
    assert name == PRICE_ONLY_MODEL
    with caplog.at_level(logging.WARNING, logger="cryptoml.models.sentiment"):
        for available in ({}, None, {SENTIMENT_MODEL: object()}, [1, 2, 3]):
            name, reason = choose_price_model(available, False)
            assert name is None and "price-only model is not available" in reason
    assert caplog.records and all("no price forecast" in r.getMessage() for r in caplog.records)


def test_sentiment_module_and_lgbm_model_do_not_import_tensorflow() -> None:
    code = (
        "import sys, cryptoml.models.sentiment, cryptoml.models.price_lgbm\n"
        "print('HEAVY', [m for m in ('tensorflow', 'keras', 'mlflow') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_keras_backend_is_tensorflow() -> None:
    assert keras.backend.backend() == "tensorflow"


def test_saved_keras_models_are_byte_stable(tmp_path: Path) -> None:
    """Two builds of the same seeded model save to the same bytes: no save time, zip clock or object address
    (Keras writes `shared_object_id` = id() of Python objects) survives in the archive; it still loads."""
    import keras

    from cryptoml.models.price_keras import build_price_model, save_keras_model

    paths = []
    for i in range(2):
        keras.backend.clear_session()  # as in a new process: auto-names (adam, adam_1, ...) start again
        keras.utils.set_random_seed(3)
        paths.append(save_keras_model(build_price_model(5, 16), tmp_path / f"m{i}.keras"))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    loaded = keras.models.load_model(paths[0], compile=False)
    assert [layer.__class__.__name__ for layer in loaded.layers][:2] == ["Conv1D", "Conv1D"]
