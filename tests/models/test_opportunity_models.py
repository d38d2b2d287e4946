"""Opportunity models: the estimator contract, training entry point, artefacts, and ML vs rule.

Tolerances of the shuffled-label checks (labels permuted across rows, so nothing is learnable):
the ML success AUC must lie within 0.06 of 0.5 (about 3.5 standard errors for ~2000 test rows at a
15 % positive rate), its AUC may not exceed the rule's by more than 0.05, and the ML top-k mean profit
may not exceed the rule's by more than 3 standard errors of a difference of two means of ``picks``
random positions.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cryptoml.config import OpportunityModelParams, SimulateParams
from cryptoml.errors import ConfigError, DataValidationError, ModelContractError
from cryptoml.features.opportunity import ENTRY_FEATURE_NAMES, FEATURE_NAMES, opportunity_features
from cryptoml.models.opportunity import (
    HoldDurationModel,
    ProfitRegressor,
    SuccessClassifier,
    TrainResult,
    predict_candidate_holds,
    train_opportunity_models,
)
from tests.models.conftest import TEST_HOLDS

MS_PER_HOUR = 3_600_000
PARAMS = OpportunityModelParams(
    n_estimators=300, max_depth=4, learning_rate=0.1, early_stopping_rounds=20, n_jobs=1, top_k=10
)
SIM = SimulateParams(hold_hours=tuple(int(h) for h in TEST_HOLDS))
SMALL = {"n_estimators": 40, "max_depth": 3, "learning_rate": 0.2, "early_stopping_rounds": 5, "n_jobs": 1}


@pytest.fixture(scope="module")
def planted_result(planted_positions: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train_opportunity_models(planted_positions, PARAMS, SIM, tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def shuffled_result(shuffled_positions: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train_opportunity_models(shuffled_positions, PARAMS, SIM, tmp_path_factory.mktemp("shuffled"))


@pytest.fixture(scope="module")
def small_data(planted_positions: pd.DataFrame) -> dict[str, Any]:
    rows = planted_positions.iloc[:3000]
    X = opportunity_features(rows)
    entries = rows.drop_duplicates(["ts_ms", "opportunity_id"])
    return {
        "X": X.iloc[:2400],
        "X_valid": X.iloc[2400:],
        "profit": rows["actual_profit_pct"].to_numpy(),
        "won": rows["was_profitable"].to_numpy(),
        "X_entry": opportunity_features(entries)[list(ENTRY_FEATURE_NAMES)],
        "hold": np.random.default_rng(0).choice(TEST_HOLDS, size=len(entries)),
    }


def _fit_args(kind: str, data: dict[str, Any]) -> tuple[Any, Any, list[tuple[Any, Any]]]:
    if kind == "hold":
        n = len(data["X_entry"]) * 4 // 5
        X, y = data["X_entry"], data["hold"]
        return X.iloc[:n], y[:n], [(X.iloc[n:], y[n:])]
    y = data["profit"] if kind == "profit" else data["won"]
    return data["X"], y[:2400], [(data["X_valid"], y[2400:])]


MODELS = {
    "profit": lambda: ProfitRegressor(**SMALL, random_state=7),
    "success": lambda: SuccessClassifier(**SMALL, random_state=7),
    "hold": lambda: HoldDurationModel(**SMALL, random_state=7, holds=TEST_HOLDS),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_estimator_contract(kind: str, small_data: dict[str, Any]) -> None:
    model = MODELS[kind]()
    before = copy.deepcopy(model.get_params())
    assert not [k for k in vars(model) if k.endswith("_")]  # __init__ stores hyperparameters only
    with pytest.raises(ModelContractError, match="not fitted"):
        model.predict(small_data["X"])
    X, y, eval_set = _fit_args(kind, small_data)
    assert model.fit(X, y, eval_set=eval_set) is model
    assert model.get_params() == before
    assert model.feature_names_ == tuple(X.columns)
    assert 0 <= model.best_iteration_ < SMALL["n_estimators"]
    assert model.booster_.num_boosted_rounds() == model.best_iteration_ + 1  # cut to the best iteration
    again = MODELS[kind]().fit(X, y, eval_set=eval_set)
    np.testing.assert_array_equal(model.predict(X), again.predict(X))
    if kind != "profit":
        proba = model.predict_proba(X)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(proba, again.predict_proba(X))
    with pytest.raises(ModelContractError, match="differ"):
        model.predict(X[list(reversed(X.columns))])


def test_from_params_copies_the_config() -> None:
    model = ProfitRegressor.from_params(PARAMS)
    assert model.get_params() == {
        k: getattr(PARAMS, k)
        for k in (
            "n_estimators",
            "max_depth",
            "learning_rate",
            "subsample",
            "colsample_bytree",
            "min_child_weight",
            "early_stopping_rounds",
            "n_jobs",
            "random_state",
        )
    }
    assert HoldDurationModel.from_params(PARAMS, holds=(1.0, 2.0)).holds == (1.0, 2.0)


def test_model_input_errors(small_data: dict[str, Any]) -> None:
    X = small_data["X"]
    with pytest.raises(DataValidationError, match="rows"):
        ProfitRegressor(**SMALL).fit(X, np.zeros(5))
    with pytest.raises(DataValidationError, match="NaN"):
        ProfitRegressor(**SMALL).fit(X, np.full(len(X), np.nan))
    with pytest.raises(DataValidationError, match="0-1"):
        SuccessClassifier(**SMALL).fit(X, np.full(len(X), 2.0))
    with pytest.raises(DataValidationError, match="not in the grid"):
        HoldDurationModel(**SMALL, holds=(1.0, 8.0)).fit(X, np.full(len(X), 24.0))
    with pytest.raises(DataValidationError, match="two candidate holds"):
        HoldDurationModel(**SMALL).fit(X, np.full(len(X), 24.0))
    model = ProfitRegressor(**SMALL).fit(X.to_numpy(), small_data["profit"][:2400])  # plain arrays work
    assert model.feature_names_[0] == "f0"
    with pytest.raises(ModelContractError, match="columns"):
        model.predict(X.to_numpy()[:, :5])


def test_hold_model_predicts_grid_hours(small_data: dict[str, Any]) -> None:
    X, y, eval_set = _fit_args("hold", small_data)
    model = HoldDurationModel(**SMALL, holds=TEST_HOLDS).fit(X, y, eval_set=eval_set)
    assert model.predict_proba(X).shape == (len(X), len(TEST_HOLDS))
    assert set(np.unique(model.predict_hours(X))) <= set(TEST_HOLDS)


def test_ml_beats_the_rule_on_the_planted_edge(planted_result: TrainResult) -> None:
    m = planted_result.metrics
    assert m["success"]["auc"] > m["success"]["rule_auc_fund_apr"] + 0.1
    table = pd.DataFrame(m["ml_vs_rule"]).set_index("scorer")
    assert table.loc["ml_profit", "mean_profit_pct"] > table.loc["rule", "mean_profit_pct"] + 0.1
    assert table.loc["ml_profit", "precision_at_k"] > table.loc["rule", "precision_at_k"]
    assert table.loc["ml_composite", "mean_profit_pct"] > table.loc["rule", "mean_profit_pct"]
    assert m["profit"]["r2"] > 0.3
    assert m["hold"]["classifier_mae_hours"] < m["hold"]["baseline_median_mae_hours"]


def test_ml_does_not_beat_the_rule_when_labels_are_shuffled(
    shuffled_result: TrainResult, shuffled_positions: pd.DataFrame
) -> None:
    m = shuffled_result.metrics
    assert abs(m["success"]["auc"] - 0.5) < 0.06
    assert m["success"]["auc"] - m["success"]["rule_auc_fund_apr"] < 0.05
    table = pd.DataFrame(m["ml_vs_rule"]).set_index("scorer")
    test = shuffled_positions["ts_ms"] >= shuffled_result.split.first_entry_ms["test"]
    profit_sd = float(shuffled_positions.loc[test, "actual_profit_pct"].std())
    tolerance = 3 * profit_sd * np.sqrt(2 / table.loc["rule", "picks"])
    assert table.loc["ml_profit", "mean_profit_pct"] - table.loc["rule", "mean_profit_pct"] < tolerance


def test_training_result_and_artefacts(planted_result: TrainResult, planted_positions: pd.DataFrame) -> None:
    r = planted_result
    assert r.feature_names == FEATURE_NAMES and r.profit_model.feature_names_ == FEATURE_NAMES
    assert r.hold_feature_names == ENTRY_FEATURE_NAMES == r.hold_model.feature_names_
    assert r.holds == TEST_HOLDS
    assert r.split.purge_ms == 48 * MS_PER_HOUR
    assert r.split.last_entry_ms["train"] + r.split.purge_ms < r.split.first_entry_ms["valid"]
    assert r.split.last_entry_ms["valid"] + r.split.purge_ms < r.split.first_entry_ms["test"]
    assert sum(r.split.rows.values()) < len(planted_positions)  # the gaps are dropped
    for name in ("importance", "shap_summary", "calibration", "ml_vs_rule", "metrics"):
        assert r.artifacts[name].is_file() and r.artifacts[name].stat().st_size > 0, name
    for png in ("shap_summary", "calibration"):
        assert r.artifacts[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    importance = pd.read_csv(r.artifacts["importance"])
    assert list(importance.columns) == ["feature", "profit_gain", "success_gain", "hold_gain"]
    assert set(importance["feature"]) == set(FEATURE_NAMES)
    assert (importance[["profit_gain", "success_gain", "hold_gain"]] >= 0).all().all()
    saved = json.loads(Path(r.artifacts["metrics"]).read_text())
    assert saved["split"]["purge_ms"] == r.split.purge_ms
    assert {"profit", "success", "calibration", "hold", "ml_vs_rule", "sizing"} <= set(saved)
    assert r.metrics["sizing"]["mean_win_pct"] > 0 and r.metrics["sizing"]["mean_loss_pct"] > 0


def test_candidate_holds_scored_with_the_profit_model(
    planted_result: TrainResult, planted_positions: pd.DataFrame
) -> None:
    entries = planted_positions.drop_duplicates(["ts_ms", "opportunity_id"]).iloc[:50]
    profit, proba = predict_candidate_holds(
        entries, TEST_HOLDS, planted_result.profit_model, planted_result.success_model
    )
    assert profit.shape == proba.shape == (50, len(TEST_HOLDS))
    assert ((proba >= 0) & (proba <= 1)).all()
    assert np.ptp(profit, axis=1).max() > 0  # the hold input matters


def test_purge_shorter_than_the_longest_hold_is_refused(planted_positions: pd.DataFrame, tmp_path: Path) -> None:
    params = OpportunityModelParams(purge_hours=24.0)
    with pytest.raises(ConfigError, match="purge_hours"):
        train_opportunity_models(planted_positions, params, SIM, tmp_path)


def test_bad_positions_tables_are_refused(planted_positions: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="was_profitable"):
        train_opportunity_models(planted_positions.drop(columns=["was_profitable"]), PARAMS, SIM, tmp_path)
    doubled = pd.concat([planted_positions.iloc[:10], planted_positions.iloc[:10]])
    with pytest.raises(DataValidationError, match="duplicate"):
        train_opportunity_models(doubled, PARAMS, SIM, tmp_path)
