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
DEFAULT_PARAMS = "params.yaml"


def _params_file(value: str) -> str:
    """``--params``: the default may be absent (all defaults apply); a file named explicitly must exist."""
    if value != DEFAULT_PARAMS and not Path(value).is_file():
        raise typer.BadParameter(f"{value}: no such params file")
    return value


ParamsOpt = Annotated[str, typer.Option("--params", help="params.yaml to read", callback=_params_file)]


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


def _stage(flow_attr: str, params: str, module: str = "flows.opportunity", **kwargs: Any) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        import importlib

        stages = importlib.import_module(module)
        result: dict[str, Any] = getattr(stages, flow_attr)(params_path=params, **kwargs)
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


@app.command("price-features")
def price_features(params: ParamsOpt = "params.yaml") -> None:
    """Bars + 19 technical features of price.symbol, and the sentiment table of the Keras variant."""
    r = _stage("price_features_flow", params, "flows.price")
    typer.echo(
        f"price features: {r['bars']} bars x {r['features']} features -> data/price_features.parquet; "
        f"sentiment: {r['sentiment_rows']} readings ({r['sentiment_source']})"
    )


@app.command("train-price-lgbm")
def train_price_lgbm(
    horizon_minutes: Annotated[
        int | None, typer.Option(help="forward-return horizon (default price.horizon_minutes)")
    ] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Train the LightGBM forward-return model on the 19 technical features."""
    r = _stage("train_price_lgbm_flow", params, "flows.price", horizon_minutes=horizon_minutes)
    typer.echo(
        f"price_lgbm ({r['horizon_minutes']} min): IC {r['ic']:.4f} (persistence {r['persistence_ic']:.4f}), "
        f"RMSE {r['rmse']:.3e} (no-move {r['zero_rmse']:.3e}), 8-bps rule Sharpe {r['rule_sharpe']:.2f}"
    )


@app.command("train-price-keras")
def train_price_keras(
    epochs: Annotated[int | None, typer.Option(help="training epochs (default price_keras.epochs)")] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Train the Keras CNN+LSTM next-bar models (price-only, and with sentiment when a table is given)."""
    r = _stage("train_price_keras_flow", params, "flows.price", epochs=epochs)
    typer.echo(f"price_keras: {r['sentiment_reason']}")
    for name in r["models"]:
        m = r[name]
        typer.echo(
            f"  {name}: mse {m['mse']:.3e} (persistence {m['persistence_mse']:.3e}), "
            f"direction {m['directional_accuracy']:.3f} (persistence {m['persistence_directional_accuracy']:.3f})"
        )


@app.command()
def export(
    family: Annotated[str, typer.Argument(help="opportunity | price_lgbm | price_keras")],
    params: ParamsOpt = "params.yaml",
) -> None:
    """Export a model family to ONNX bundles under models/<name>/, gated by parity on the holdout."""
    r = _stage("export_flow", params, "flows.price", family=family)
    for row in r["models"]:
        if row["exported"]:
            typer.echo(
                f"{row['name']}: models/{row['name']}/  parity {row['parity_max_abs_diff']:.1e} "
                f"<= {row['parity_tolerance']:.0e} on {row['holdout_rows']} holdout rows"
            )
        else:
            typer.echo(f"{row['name']}: not trained ({row['reason']})")


@app.command()
def register(params: ParamsOpt = "params.yaml") -> None:
    """Register every exported bundle in MLflow as `challenger` (a bundle already registered is skipped)."""
    r = _stage("register_flow", params, "flows.price")
    for name, row in r.items():
        if row["registered"]:
            state = "new version" if row["new_version"] else "unchanged"
            typer.echo(f"{name}: v{row['version']} ({state}), holdout {row['metric']} {row['holdout_value']:.4g}")
        else:
            typer.echo(f"{name}: not registered ({row['reason']})")


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


def _model_rows(reports: Path) -> list[tuple[str, str, float | None, float | None, str]]:
    """(model, metric, value, baseline value, baseline name) from the training reports that exist."""

    def load(name: str) -> dict[str, Any]:
        path = reports / name
        return json.loads(path.read_text()) if path.exists() else {}

    rows: list[tuple[str, str, float | None, float | None, str]] = []
    opp = load("train_opportunity.json")
    if opp:
        rows += [
            ("opportunity_profit", "R² (test)", opp.get("profit_r2"), 0.0, "mean of train"),
            ("opportunity_success", "AUC", opp.get("success_auc"), opp.get("rule_auc_fund_apr"), "rule: fund APR"),
            (
                "opportunity_hold",
                "MAE hours",
                opp.get("hold_mae_hours"),
                opp.get("hold_baseline_median_mae_hours"),
                "median hold",
            ),
        ]
    lgbm = load("train_price_lgbm.json")
    if lgbm:
        rows.append(
            ("price_lgbm", f"IC {lgbm['horizon_minutes']}m", lgbm.get("ic"), lgbm.get("persistence_ic"), "persistence")
        )
    keras_report = load("train_price_keras.json")
    for name in ("price_cnn_lstm", "price_cnn_lstm_sentiment"):
        if name in keras_report:
            m = keras_report[name]
            rows.append((name, "MSE next bar", m.get("mse"), m.get("zero_mse"), "no move"))
    return rows


def print_model_table(reports: Path) -> None:
    """Each model: headline metric vs its baseline, registered version and aliases (the end of `make run`)."""
    from rich.console import Console
    from rich.table import Table

    rows = _model_rows(reports)
    if not rows:
        return
    registry_path = reports / "registry.json"
    registry = json.loads(registry_path.read_text()) if registry_path.exists() else {}
    table = Table(title="Models (test window) and their registry state")
    for col in ("model", "metric", "model value", "baseline", "version", "aliases"):
        table.add_column(col, justify="left" if col in ("model", "metric", "aliases") else "right", no_wrap=True)

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.5g}"

    for name, metric, value, base, base_name in rows:
        reg = registry.get(name, {})
        version = f"v{reg['version']}" if reg.get("registered") else "-"
        aliases = ", ".join(reg.get("aliases", [])) if reg.get("registered") else reg.get("reason", "not registered")
        table.add_row(name, metric, fmt(value), f"{fmt(base)} ({base_name})", version, aliases)
    keras_report = reports / "train_price_keras.json"
    if keras_report.exists():
        table.caption = json.loads(keras_report.read_text()).get("sentiment_reason", "")
    Console(width=max(Console().width, 120)).print(table)


def print_backtest_summary(folder: Path) -> None:
    """The walk-forward headline (out of sample, with buy-and-hold beside it) and the opportunity scorers."""
    metrics_file = folder / "metrics.json"
    if not metrics_file.exists():
        return
    overall = json.loads(metrics_file.read_text())["overall"]

    def fmt(key: str, spec: str) -> str:
        value = overall.get(key)
        return "n/a" if value is None else format(value, spec)

    typer.echo(
        f"backtest:   {folder}/  walk-forward, out of sample: return {fmt('total_return', '+.2%')} "
        f"(buy-and-hold {fmt('buy_hold_total_return', '+.2%')}), Sharpe {fmt('sharpe', '.2f')} "
        f"(in sample {fmt('sharpe_in_sample', '.2f')}, deflated {fmt('deflated_sharpe', '.2f')}), "
        f"max drawdown {fmt('max_drawdown', '.2%')}, {fmt('n_trades', 'd')} trades"
    )
    opportunity_file = folder / "opportunity_backtest.json"
    if opportunity_file.exists():
        o = json.loads(opportunity_file.read_text()).get("overall", {})
        rows = [
            f"{s} {o[s]['pnl_usd']:+,.0f} USD"
            for s in ("ml", "rule")
            if isinstance(o.get(s), dict) and o[s].get("pnl_usd") is not None
        ]
        if rows:
            typer.echo(f"            opportunity scorer, walk-forward by day: {', '.join(rows)}")


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
            typer.echo(f"models:     models/<name>/ ONNX bundles, natives in models/native/ (reports in {reports}/)")
            print_ml_vs_rule(json.loads(train_report.read_text()))
        print_model_table(reports)
        print_backtest_summary(reports / "backtest")
        if (reports / "registry.json").exists():
            typer.echo(
                "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db "
                "--default-artifact-root mlruns/artifacts  (then open http://127.0.0.1:5000)"
            )

    run_guarded(body)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="registered model name, e.g. price_lgbm")],
    version: Annotated[
        str | None, typer.Option("--version", help="version to promote (default: the challenger)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="promote even if not better (needs --reason)")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="why --force overrides the holdout check")] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Move `champion` to a version only if it beats the champion on the same holdout by the margin in params.

    A refusal is a normal outcome (exit 0, printed as "refused: ..."); a corrupt or feature-mismatched
    bundle exits 4 (ModelContractError).
    """

    def body() -> Any:
        from cryptoml.config import load_params
        from tasks.registry import promote as promote_version

        margin = load_params(params).registry.margin_for(name)
        return promote_version(name, version, margin=margin, force=force, reason=reason)

    d = run_guarded(body)
    if d.status == "refused":
        typer.secho(
            f"refused: {d.name} v{d.version} stays challenger; champion remains v{d.champion_version}", bold=True
        )
    elif d.status == "already_champion":
        typer.echo(f"{d.name} v{d.version} is already the champion")
    else:
        typer.secho(f"{d.status}: {d.name} v{d.version} is now the champion", bold=True)
    typer.echo(f"  {d.reason}")


@app.command()
def compare(
    name: Annotated[str, typer.Argument(help="registered model name")],
    v1: Annotated[str, typer.Argument(help="first version")],
    v2: Annotated[str, typer.Argument(help="second version")],
    on: Annotated[str | None, typer.Option("--on", help="version whose holdout scores both (default: newer)")] = None,
) -> None:
    """Two versions of a model side by side, both scored on the same holdout."""

    def body() -> Any:
        from tasks.registry import compare as compare_versions

        return compare_versions(name, v1, v2, on=on)

    rows = run_guarded(body)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name}: v{v1} vs v{v2}")
    table.add_column("")
    table.add_column(f"v{v1}", justify="right")
    table.add_column(f"v{v2}", justify="right")

    def cell(value: Any, wins: bool) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        return f"[bold green]{text}[/]" if wins else text

    for row in rows[1:]:  # the first row is the version numbers, already in the header
        table.add_row(row.field, cell(row.first, row.better == 1), cell(row.second, row.better == 2))
    Console().print(table)


@app.command()
def backtest(params: ParamsOpt = "params.yaml") -> None:
    """Walk-forward backtest of the strategy (and of the opportunity scorer, ML vs rule) into reports/backtest/."""
    r = _stage("backtest_flow", params, "flows.backtest")

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.2%}"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    typer.echo(
        f"backtest: {r['folds']} folds, {r['refits']} refits, {r['n_trades']} trades; total return "
        f"{pct(r['total_return'])}, Sharpe {num(r['sharpe'])} out of sample (in sample {num(r['sharpe_in_sample'])}), "
        f"deflated Sharpe {num(r['deflated_sharpe'])}"
    )
    for scorer, row in (r.get("opportunity") or {}).items():
        pnl = "n/a" if row["pnl_usd"] is None else f"{row['pnl_usd']:+,.0f} USD"
        hit = "n/a" if row["hit_rate"] is None else f"{row['hit_rate']:.3f}"
        typer.echo(f"  opportunity scorer {scorer}: {row['picks']} picks, PnL {pnl}, hit rate {hit}")
    typer.echo(f"reports: {Path(r['reports']['metrics']).parent}/  (MLflow run {r['mlflow_run_id']})")


@app.command("drift-check")
def drift_check(
    state: Annotated[str | None, typer.Option("--state", help="runner state file (default live.state_path)")] = None,
    models: Annotated[str | None, typer.Option("--models", help="bundles folder (default live.models_dir)")] = None,
    retrain: Annotated[bool, typer.Option("--retrain/--no-retrain", help="retrain when a check fires")] = True,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Feature drift (PSI) and performance triggers of the live price model; retrains when one fires."""
    r = _stage("drift_check_flow", params, "flows.drift", state_path=state, models_dir=models, retrain=retrain)
    fired = ", ".join(r["fired"]) or "nothing"
    typer.echo(f"drift_check: {r['status']}; fired: {fired}; report {r['report']}")
    info = r["retrain"]
    if info.get("started"):
        typer.echo(f"retrain started: {info['reason']}")
    elif info.get("skipped"):
        typer.echo(f"retrain not started: {info['skipped']}")


@app.command()
def deploy(
    limit: Annotated[int | None, typer.Option(help="at most this many flow runs at once")] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Serve the Prefect deployments (pipeline, hourly backfill, drift_check, weekly retrain, shadow_review).

    Needs a Prefect server: PREFECT_API_URL=http://127.0.0.1:4200/api (docs/orchestration.md).
    Blocks, running the scheduled and triggered flow runs; Ctrl+C or SIGTERM pauses the schedules.
    """

    def body() -> None:
        from flows.deployments import serve_deployments

        serve_deployments(params, limit=limit)

    _edge_guard(body)  # the same error mapping, without a progress display over the serve process's log


@app.command()
def retrain(
    reason: Annotated[str, typer.Option("--reason", help="why (recorded as an MLflow tag)")] = "manual",
    params: ParamsOpt = "params.yaml",
) -> None:
    """Backfill the newest data, retrain retrain.families on the rolling window, register challengers."""
    r = _stage("retrain_flow", params, "flows.retrain", reason=reason)
    typer.echo(json.dumps(r, indent=2, default=str))


@app.command("shadow-review")
def shadow_review(
    state: Annotated[str | None, typer.Option("--state", help="runner state file (default live.state_path)")] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Compare each challenger's shadow predictions with the champion's; promote when allowed and better."""
    r = _stage("shadow_review_flow", params, "flows.retrain", state_path=state)
    typer.echo(json.dumps(r, indent=2, default=str))


def _edge_guard(fn: Callable[[], T]) -> T:
    """run_guarded for the edge commands: same error mapping, without the pipeline's rich progress display."""
    try:
        return fn()
    except CryptoMLError as e:
        raise _fail(f"{type(e).__name__}: {e}", e.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None


@app.command()
def live(
    paper: Annotated[
        bool,
        typer.Option(
            "--paper/--live",
            help="paper trading (default), or --live: real orders on the exchange, with the API key and secret "
            "read from the environment variables CRYPTOML_API_KEY and CRYPTOML_API_SECRET",
        ),
    ] = True,
    exchange: Annotated[str | None, typer.Option(help="ccxt exchange id (default live.exchange)")] = None,
    symbol: Annotated[
        str | None, typer.Option(help="unified symbol, e.g. BTC/USDT:USDT (default live.symbols)")
    ] = None,
    api_url: Annotated[str | None, typer.Option(help="base URL replacing the exchange's API host")] = None,
    state: Annotated[str | None, typer.Option(help="SQLite state file (default live.state_path)")] = None,
    models: Annotated[str | None, typer.Option(help="bundles folder (default live.models_dir)")] = None,
    registry_url: Annotated[str | None, typer.Option(help="MLflow server to follow `champion` from")] = None,
    trade_model: Annotated[
        str | None, typer.Option(help="price model the strategy trades: price_lgbm (default) or price_cnn_lstm")
    ] = None,
    ws: Annotated[
        bool | None,
        typer.Option(
            "--ws/--no-ws",
            help="closed bars from the exchange's websocket (ccxt.pro) before REST polling; default: on where "
            "ccxt.pro has the exchange, off with --api-url unless --ws-url is given",
        ),
    ] = None,
    ws_url: Annotated[str | None, typer.Option(help="websocket base URL replacing the exchange's")] = None,
    until: Annotated[str | None, typer.Option(help="stop after the bar opening at this ISO-8601 UTC time")] = None,
    max_bars: Annotated[int | None, typer.Option(help="stop after processing this many bars")] = None,
    clock_start: Annotated[str | None, typer.Option(help="replay: the clock starts at this UTC time")] = None,
    clock_speed: Annotated[float, typer.Option(help="replay: simulated seconds per wall second")] = 1.0,
    reset_kill_switch: Annotated[bool, typer.Option(help="untrip the kill switch before starting")] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG | INFO | WARNING")] = "INFO",
    params: ParamsOpt = "params.yaml",
) -> None:
    """Run the edge runner: closed 1-minute candles -> ONNX predictions -> strategy -> broker -> SQLite.

    Paper trading unless --live. With live.opportunity_scoring on, funding-arbitrage opportunities of the
    exchange are scored on the 5-minute grid by the ONNX models and by the rule scorer, both followed on paper.
    """
    import logging

    def body() -> dict[str, Any]:
        import time as _time

        from cryptoml.market.lean_ccxt import prepare

        prepare()  # before anything imports ccxt: one exchange's modules, not ~100 (the edge's budget is 150 MiB)
        from cryptoml.config import load_params, parse_utc_ms, replace_section
        from cryptoml.edge.runner import ModelSource, Runner, check_symbol
        from cryptoml.edge.state import StateStore
        from cryptoml.market.exchange import make_exchange

        p = load_params(params)
        p = replace_section(
            p, "live", exchange=exchange, models_dir=models, registry_url=registry_url, state_path=state
        )
        sym = check_symbol(p.live.symbols, symbol)
        clock, start_ms = None, None
        if clock_start is not None:
            start_ms, t0 = parse_utc_ms(clock_start, "--clock-start"), _time.monotonic()
            origin = start_ms
            if clock_speed <= 0:
                raise ConfigError(f"--clock-speed must be > 0, got {clock_speed}")

            def clock() -> int:
                return origin + int((_time.monotonic() - t0) * clock_speed * 1000)

        broker = None
        client = make_exchange(p.live.exchange, api_url=api_url, timeout_ms=p.fetch.timeout_ms)
        if not paper:
            from cryptoml.edge.live_broker import LiveBroker, credentials_from_env

            broker = LiveBroker(client, credentials_from_env(), taker_fee_bps=p.broker.taker_fee_bps)
        feed = _live_bar_feed(p.live.exchange, sym, ws, ws_url, api_url, p.fetch.timeout_ms)
        state_path = Path(p.live.state_path)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with StateStore(state_path) as store:
                runner = Runner(
                    exchange=client, symbol=sym, store=store,
                    models=ModelSource(Path(p.live.models_dir), p.live.registry_url, p.live.shadow),
                    strategy=p.strategy, broker_params=p.broker, live=p.live, clock_ms=clock,
                    sleep=(lambda s: _time.sleep(s / clock_speed)) if clock_start else _time.sleep,
                    start_ms=start_ms, trade_model=trade_model or p.live.trade_model,
                    scorer=_live_scorer(p, client, sym, api_url) if p.live.opportunity_scoring else None,
                    broker=broker, bar_feed=feed, model_options=_model_options(p),
                )  # fmt: skip
                if reset_kill_switch:
                    from cryptoml.trading.strategy import reset_kill_switch as reset

                    runner.state = reset(runner.state)
                stats = runner.run(until_ms=parse_utc_ms(until, "--until") if until else None, max_bars=max_bars)
        finally:
            if feed is not None:
                feed.close()
        return {
            "bars": stats.bars, "fills": stats.fills, "errors": stats.errors, "stream_bars": stats.stream_bars,
            "mode": "paper" if paper else "live", "state": str(state_path),
        }  # fmt: skip

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    typer.echo(json.dumps(_edge_guard(body)))


def _live_scorer(p: Any, client: Any, symbol: str, api_url: str | None) -> Any:
    """The runner's opportunity scorer: this exchange's perps, and the spot client beside it."""
    from cryptoml.edge.scorer import SPOT_CLIENT_OPTIONS, OpportunityScorer, scorer_bases, spot_exchange_id
    from cryptoml.market.exchange import make_exchange

    spot_id = spot_exchange_id(p.live.exchange)
    spot = make_exchange(
        spot_id, api_url=api_url, timeout_ms=p.fetch.timeout_ms, options=SPOT_CLIENT_OPTIONS.get(spot_id)
    )
    bases, quote = scorer_bases(p.market.symbols, symbol, p.snapshots.btc_base)
    return OpportunityScorer(
        exchange=p.live.exchange, perp_client=client, spot_client=spot, bases=bases, quote=quote,
        snapshot_params=p.snapshots, opportunity_params=p.opportunities, simulate_params=p.simulate,
        spot_exchange=spot_id,  # the spot legs' venue: their series and their taker fee
    )  # fmt: skip


def _live_bar_feed(
    exchange_id: str, symbol: str, ws: bool | None, ws_url: str | None, api_url: str | None, timeout_ms: int
) -> Any:
    """A KlineStream when websockets are asked for (or by default where ccxt.pro has the exchange), else None.

    With --api-url (a stub or a proxy) and no --ws-url the exchange's real websocket would not match the
    REST data, so the default is then off.
    """
    import logging

    if ws is False or (ws is None and api_url is not None and ws_url is None):
        return None
    from cryptoml.edge.stream import KlineStream, watch_ohlcv_class

    if watch_ohlcv_class(exchange_id) is None:
        if ws:
            raise ConfigError(f"--ws: ccxt.pro has no watchOHLCV for {exchange_id}; run with --no-ws")
        logging.getLogger("cryptoml.live").info("%s has no ccxt.pro watchOHLCV: polling REST only", exchange_id)
        return None
    return KlineStream(exchange_id, symbol, ws_url=ws_url, api_url=api_url, timeout_ms=timeout_ms)


def _model_options(p: Any) -> dict[str, Any]:
    """ModelSet options from params.yaml: the scoring weights, Kelly sizing, hold grid, sentiment age."""
    m = p.opportunity_model
    return {
        "composite_profit_weight": m.composite_profit_weight,
        "composite_success_weight": m.composite_success_weight,
        "kelly_fraction": m.kelly_fraction,
        "kelly_cap": m.kelly_cap,
        "hold_grid_hours": tuple(float(h) for h in p.simulate.hold_hours),
        "sentiment_max_age_ms": p.price_keras.sentiment_max_age_minutes * 60_000,
    }


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default live.api_host = 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default live.api_port)")] = None,
    models: Annotated[str | None, typer.Option(help="bundles folder (default live.models_dir)")] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """HTTP prediction API over the ONNX bundles: /health, /predict, /predict/batch, /predict/price, /docs."""

    def body() -> None:
        from cryptoml.config import load_params
        from cryptoml.edge.api import serve as run_server

        p = load_params(params)
        run_server(
            host=host or p.live.api_host, port=port or p.live.api_port,
            models_dir=Path(models or p.live.models_dir), max_batch=p.live.api_max_batch, **_model_options(p),
        )  # fmt: skip

    _edge_guard(body)


@app.command()
def predict(
    opportunity: Annotated[str, typer.Argument(help="one opportunity as JSON (the schema of POST /predict)")],
    models: Annotated[str | None, typer.Option(help="bundles folder (default live.models_dir)")] = None,
    params: ParamsOpt = "params.yaml",
) -> None:
    """Score one opportunity from the command line; same request and answer schema as POST /predict."""

    def body() -> dict[str, Any]:
        from pydantic import ValidationError

        from cryptoml.config import load_params
        from cryptoml.edge.api import OpportunityIn
        from cryptoml.edge.models import ModelSet
        from cryptoml.errors import DataValidationError

        p = load_params(params)
        try:
            request = OpportunityIn.model_validate_json(opportunity)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
            )
            raise DataValidationError(f"invalid opportunity: {problems}") from None
        result: dict[str, Any] = ModelSet.load(
            Path(models or p.live.models_dir), **_model_options(p)
        ).score_opportunity(request.model_dump())
        return result

    typer.echo(json.dumps(_edge_guard(body), indent=2, sort_keys=True))


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
