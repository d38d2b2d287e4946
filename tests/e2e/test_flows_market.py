"""The market-data flows run in-process against the session's real Prefect server: backfill and validate on a
small synthetic market, the gate stopping on a corrupted store, and the pipeline stopping at validate.

Every run uses a params.yaml written in a tmp directory whose ``data_dir`` and ``reports_dir`` point there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from cryptoml.errors import DataValidationError
from cryptoml.market.store import DatasetKey, ParquetStore
from tests.e2e.conftest import write_params

pytestmark = pytest.mark.server

SMALL_MARKET = {"synthetic.days": 2}
PERP_CANDLES = DatasetKey("binance", "BTC/USDT:USDT", "ohlcv", "1m")
BAD_ROW = 100


def tmp_params(directory: Path, **changes: Any) -> Path:
    """params.yaml in ``directory``: a 2-day synthetic market stored and reported under ``directory``."""
    return write_params(
        directory,
        {
            **SMALL_MARKET,
            "market.data_dir": str(directory / "data" / "raw"),
            "market.reports_dir": str(directory / "reports"),
            **changes,
        },
    )


def store_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def backfilled(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A directory after ``backfill_flow`` on the small synthetic market, and the flow's result."""
    from flows.backfill import backfill_flow

    directory = tmp_path_factory.mktemp("backfilled")
    result = backfill_flow(params_path=str(tmp_params(directory)))
    return directory, result


def test_backfill_flow_writes_the_marked_synthetic_market(backfilled: tuple[Path, dict[str, Any]]) -> None:
    directory, result = backfilled
    store = ParquetStore(directory / "data" / "raw")
    keys = list(store.datasets())
    assert result["source"] == "synthetic" and result["data_dir"] == str(store.root)
    assert len(result["datasets"]) == len(keys) == len(list(store.root.rglob("*.parquet")))
    assert {k.exchange for k in keys} == {"binance", "bybit"}
    assert {k.symbol for k in keys} >= {"BTC/USDT", "BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT"}
    assert {k.kind for k in keys} == {"ohlcv", "funding", "book"}
    assert all(store.metadata(k)["synthetic"] == "true" for k in keys)
    assert len(store.read(PERP_CANDLES)) == 2 * 1440
    report = json.loads(Path(result["report"]).read_text())
    assert report["synthetic"] is True and report["missing_bars"] == 0
    assert sum(d["rows_total"] for d in report["datasets"]) == sum(len(store.read(k)) for k in keys)


def test_validate_flow_passes_on_the_backfilled_store(backfilled: tuple[Path, dict[str, Any]]) -> None:
    from flows.validate import validate_flow

    directory, backfill = backfilled
    result = validate_flow(params_path=str(directory / "params.yaml"))
    assert result["datasets"] == len(backfill["datasets"])
    assert result["rows"] == sum(d["rows_total"] for d in backfill["datasets"])
    report = json.loads((directory / "reports" / "validation.json").read_text())
    assert report["success"] is True and report["failed"] == 0 and report["synthetic"] == report["datasets"]


def test_validate_flow_raises_on_a_corrupted_file_and_reports_it(
    backfilled: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from flows.validate import validate_flow

    source, _ = backfilled
    shutil.copytree(source / "data", tmp_path / "data")
    store = ParquetStore(tmp_path / "data" / "raw")
    candles = store.read(PERP_CANDLES)
    # A high below the bar's open and close: only high >= max(open, close) breaks.
    high = candles["high"].to_numpy(copy=True)
    high[BAD_ROW] = min(candles["open"].to_numpy()[BAD_ROW], candles["close"].to_numpy()[BAD_ROW]) - 1.0
    candles["high"] = high
    bad_ts_ms = int(candles["ts_ms"].to_numpy()[BAD_ROW])
    store.write(PERP_CANDLES, candles, store.metadata(PERP_CANDLES))
    params = tmp_params(tmp_path)

    with pytest.raises(DataValidationError) as failure:
        validate_flow(params_path=str(params))
    message = str(failure.value)
    assert "high_ge_max_open_close" in message and PERP_CANDLES.label() in message, message
    report = json.loads((tmp_path / "reports" / "validation.json").read_text())
    assert report["success"] is False and report["failed"] == 1
    [bad] = [r for r in report["results"] if not r["success"]]
    assert bad["dataset"] == PERP_CANDLES.label()
    assert [(f["expectation"], f["unexpected_count"]) for f in bad["failures"]] == [("high_ge_max_open_close", 1)]
    assert bad["failures"][0]["examples"][0]["ts_ms"] == bad_ts_ms


def test_pipeline_flow_stops_at_validate_and_keeps_the_backfilled_files(
    backfilled: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.pipeline import pipeline_flow

    # A threshold no minute of any market meets: backfill succeeds, the gate must stop the DAG.
    params = tmp_params(tmp_path, **{"validation.max_abs_log_return": 1e-12})
    state = pipeline_flow(params_path=str(params), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, DataValidationError) and "abs_log_return_within_max" in str(error)

    # The server saw exactly two sub-runs: backfill completed, validate failed, nothing after it.
    pipeline_run_id: UUID = state.state_details.flow_run_id  # type: ignore[assignment]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline_run_id]))
        )
        sub_runs = {client.read_flow(run.flow_id).name: run.state_type.value for run in runs if run.state_type}
    assert sub_runs == {"backfill": "COMPLETED", "validate": "FAILED"}

    # backfill's files are whole: byte for byte what the same market gave the module's backfill.
    backfilled_dir, _ = backfilled
    assert store_digests(tmp_path / "data" / "raw") == store_digests(backfilled_dir / "data" / "raw")
    assert json.loads((tmp_path / "reports" / "validation.json").read_text())["success"] is False
