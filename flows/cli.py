"""The ``cryptoml`` command line: one subcommand per DAG stage, each running the Prefect flow of the same name.

Errors of the project's classes end the command with one line on stderr and the class's exit code
(ConfigError 2, DataValidationError 3, ModelContractError 4, TemporaryError 5, SourceError 6); anything
else is a bug and keeps its traceback. Flow modules are imported inside the commands so that the edge
commands never import prefect, pandas or mlflow.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cryptoml.errors import ConfigError, CryptoMLError

app = typer.Typer(
    name="cryptoml",
    help="Orchestrated ML pipeline for crypto trading (Prefect + DVC + MLflow, ONNX at the edge).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

T = TypeVar("T")
ParamsOpt = Annotated[str, typer.Option("--params", help="params.yaml to read")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def run_guarded(fn: Callable[[], T]) -> T:
    """Run a command body; map project errors to one line + exit code."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see flows/common.py
    from tasks.progress import progress_display

    try:
        with progress_display():
            return fn()
    except CryptoMLError as e:
        raise _fail(f"{type(e).__name__}: {e}", e.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None


def parse_mapping(items: list[str] | None) -> dict[str, str]:
    """``["ts_ms=timestamp", "volume=vol"]`` -> ``{"ts_ms": "timestamp", "volume": "vol"}``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--map {item!r}: expected STORE_COLUMN=FILE_COLUMN")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@app.command()
def backfill(
    source: Annotated[str | None, typer.Option(help="synthetic | ccxt | files (default: params.yaml)")] = None,
    exchange: Annotated[list[str] | None, typer.Option("--exchange", "-e", help="ccxt exchange id (repeat)")] = None,
    symbol: Annotated[list[str] | None, typer.Option("--symbol", "-s", help="unified symbol (repeat)")] = None,
    timeframe: Annotated[str | None, typer.Option(help="candle timeframe, e.g. 1m")] = None,
    since: Annotated[str | None, typer.Option(help="start, ISO-8601 UTC (inclusive)")] = None,
    until: Annotated[str | None, typer.Option(help="end, ISO-8601 UTC (exclusive)")] = None,
    kind: Annotated[list[str] | None, typer.Option("--kind", "-k", help="ohlcv | funding | book (repeat)")] = None,
    api_url: Annotated[str | None, typer.Option(help="base URL replacing the exchange's API host")] = None,
    path: Annotated[str | None, typer.Option(help="file to import (--source files)")] = None,
    map_: Annotated[list[str] | None, typer.Option("--map", help="STORE_COL=FILE_COL column mapping")] = None,
    data_dir: Annotated[str | None, typer.Option(help="store root (default market.data_dir)")] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Fill the raw Parquet store: synthetic market, an exchange through ccxt, or a file."""

    def body() -> dict[str, Any]:
        from flows.backfill import backfill_flow

        return backfill_flow(
            params_path=params,
            source=source,
            exchanges=exchange,
            symbols=symbol,
            timeframe=timeframe,
            since=since,
            until=until,
            kinds=kind,
            api_url=api_url,
            data_dir=data_dir,
            path=path,
            mapping=parse_mapping(map_),
        )

    result = run_guarded(body)
    rows = sum(int(d["rows_total"]) for d in result["datasets"])
    missing = sum(int(d["missing_bars"]) for d in result["datasets"])
    tag = " (SYNTHETIC data)" if result["source"] == "synthetic" else ""
    typer.echo(f"backfill{tag}: {len(result['datasets'])} datasets, {rows} rows in {result['data_dir']}")
    if missing:
        typer.echo(f"  {missing} candles missing (not filled) - see the gaps in {result['report']}")
    typer.echo(f"  report: {result['report']}")


@app.command()
def validate(
    target: Annotated[str | None, typer.Argument(help="a store folder or one Parquet file")] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Run the great-expectations gate; exit 3 naming the failed expectation on bad data."""

    def body() -> dict[str, Any]:
        from flows.validate import validate_flow

        return validate_flow(params_path=params, target=target)

    result = run_guarded(body)
    typer.echo(f"validation passed: {result['datasets']} datasets, {result['rows']} rows")
    typer.echo(f"  report: {result['report']}")


@app.command()
def collect(
    exchange: Annotated[str, typer.Option("--exchange", "-e", help="ccxt exchange id")] = "binanceusdm",
    symbol: Annotated[list[str] | None, typer.Option("--symbol", "-s", help="unified symbol (repeat)")] = None,
    api_url: Annotated[str | None, typer.Option(help="base URL replacing the exchange's API host")] = None,
    interval: Annotated[float | None, typer.Option(help="seconds between snapshots (default 10)")] = None,
    levels: Annotated[int | None, typer.Option(help="book levels per side (default 20)")] = None,
    rounds: Annotated[int | None, typer.Option(help="stop after N rounds (default: run until Ctrl-C)")] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Collect live order-book snapshots every N seconds into the store."""

    def body() -> dict[str, Any]:
        from flows.collect import collect_flow

        return collect_flow(
            params_path=params,
            exchange=exchange,
            symbols=symbol,
            api_url=api_url,
            interval_seconds=interval,
            levels=levels,
            rounds=rounds,
        )

    result = run_guarded(body)
    typer.echo(json.dumps(result))


def _stage(flow_attr: str, params: str) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        import flows.opportunity as stages

        result: dict[str, Any] = getattr(stages, flow_attr)(params_path=params)
        return result

    return run_guarded(body)


@app.command()
def snapshots(params: ParamsOpt = "params.yaml") -> None:
    """Rebuild 5-minute market snapshots and detect funding-arbitrage opportunities."""
    r = _stage("snapshots_flow", params)
    typer.echo(f"snapshots: {r['snapshots']} rows, {r['opportunities']} opportunities {r['by_strategy']}")


@app.command()
def simulate(params: ParamsOpt = "params.yaml") -> None:
    """Simulate every opportunity at every hold duration -> data/positions.parquet."""
    r = _stage("simulate_flow", params)
    typer.echo(
        f"simulate: {r['positions']} positions -> data/positions.parquet "
        f"({r['dropped_past_data']} dropped past the data, {r['dropped_gap']} across gaps)"
    )


@app.command()
def features(params: ParamsOpt = "params.yaml") -> None:
    """Entry-time opportunity features of every simulated position."""
    r = _stage("opportunity_features_flow", params)
    typer.echo(f"features: {r['rows']} rows x {r['features']} features -> data/opportunity_features.parquet")


@app.command()
def train(params: ParamsOpt = "params.yaml") -> None:
    """Train the profit / success / hold-duration models and compare ML with the rule-based scorer."""
    r = _stage("train_opportunity_flow", params)
    print_ml_vs_rule(r)


def print_ml_vs_rule(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Opportunity scoring on the test window: ML vs rule (top-k per day)")
    for col in ("scorer", "precision@k", "mean profit of picks %", "success AUC"):
        table.add_column(col, justify="right")
    table.add_row(
        "ML (composite)",
        f"{r['ml_precision_at_k']:.3f}",
        f"{r['ml_topk_mean_profit_pct']:+.4f}",
        f"{r['success_auc']:.3f}",
    )
    table.add_row(
        "rule (apr, break-even)",
        f"{r['rule_precision_at_k']:.3f}",
        f"{r['rule_topk_mean_profit_pct']:+.4f}",
        f"{r['rule_auc_fund_apr']:.3f}",
    )
    table.add_row("all entries", "", f"{r['all_entries_mean_profit_pct']:+.4f}", "")
    Console().print(table)


@app.command()
def run(params: ParamsOpt = "params.yaml") -> None:
    """Run the whole DAG as one Prefect flow (the same stages as `dvc repro`)."""

    def body() -> dict[str, Any]:
        from flows.pipeline import pipeline_flow

        return pipeline_flow(params_path=params)

    run_guarded(body)
    summary(params)


@app.command()
def summary(params: ParamsOpt = "params.yaml") -> None:
    """Print where the data and the reports of the last run are."""

    def body() -> None:
        from cryptoml.config import load_params

        p = load_params(params)
        reports = Path(p.market.reports_dir)
        backfill_report = reports / "backfill.json"
        validation_report = reports / "validation.json"
        if not backfill_report.exists():
            raise ConfigError(f"no run yet: {backfill_report} is missing (run `make run` or `dvc repro`)")
        b = json.loads(backfill_report.read_text())
        tag = " - SYNTHETIC market" if b.get("synthetic") else ""
        typer.echo(f"data:       {p.market.data_dir}/  ({len(b['datasets'])} datasets{tag})")
        typer.echo(f"backfill:   {backfill_report}  (missing candles: {b.get('missing_bars', 0)})")
        if validation_report.exists():
            v = json.loads(validation_report.read_text())
            status = "passed" if v.get("success") else "FAILED"
            typer.echo(f"validation: {validation_report}  ({status})")
        positions = Path("data/positions.parquet")
        if positions.exists():
            typer.echo(f"positions:  {positions}  (simulated funding-arbitrage positions)")
        train_report = reports / "train_opportunity.json"
        if train_report.exists():
            typer.echo(f"models:     models/opportunity/  (reports in {reports}/opportunity/)")
            print_ml_vs_rule(json.loads(train_report.read_text()))
            typer.echo("MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")

    run_guarded(body)


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
