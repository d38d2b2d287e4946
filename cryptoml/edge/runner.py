"""The edge runner: follow closed 1-minute candles, predict with ONNX bundles, trade the strategy on paper, persist.

One process follows one exchange symbol (run one per symbol). Each closed bar goes through the same steps,
whether it is fresh or fetched while catching up after a restart:

1. the streaming technical features (:class:`~cryptoml.features.streaming.StreamingFeatures`) of the bar;
2. the champion ``price_lgbm`` bundle's forward log return over its ``horizon_minutes`` (None while the
   features warm up); a challenger in the **shadow slot** predicts too, logged but never traded;
3. the broker sees the bar (resting stop-loss / take-profit orders fill on its high / low);
4. :func:`cryptoml.trading.strategy.decide` at the bar's close (the only trading logic; the backtest calls
   it too); an entry or exit is a market order at the close with a client order id derived from the bar
   (:func:`~cryptoml.trading.broker.make_client_order_id`), protective stop / take-profit orders follow
   an entry;
5. one atomic :meth:`~cryptoml.edge.state.StateStore.commit_bar`: decision, predictions (features included,
   for drift checks), fills, metrics, the realised return that labels the prediction made ``horizon`` bars
   ago, and the whole broker, strategy and feature state.

Crash safety: nothing outside the state file changes a decision, so a runner killed at any moment and
restarted loads the last committed bar's state and replays the bars after it to the same decisions, orders
(same client order ids: the paper broker ignores a repeated id, an exchange refuses it) and rows as an
uninterrupted run. The one input that is not in the bars is the clock, used for the stale-data rule (no
new entry on a bar older than ``strategy.max_bar_age_seconds``); catching up after a long outage therefore
blocks entries on the old bars, as it should.

Models come from a folder of bundles (``models/price_lgbm``; a shadow challenger in
``models/price_lgbm.challenger``) or from the MLflow registry aliases ``champion`` / ``challenger`` over
REST (:mod:`cryptoml.edge.registry_client`). They are polled every ``live.model_poll_seconds``; a changed
bundle is loaded, checked (checksum, feature list, the parity sample stored at export replayed through this
onnxruntime) and swapped in between two bars; a corrupt, mismatched or failing one is refused with a
logged reason and the old model keeps running.

Imports: numpy, onnxruntime (through the bundle loader), ccxt (given in by the caller), the standard
library and the project's numpy-only modules: never pandas, tensorflow, mlflow or prefect.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptoml.config import LiveParams, PaperBrokerParams, StrategyParams
from cryptoml.edge.registry_client import RegistryClient
from cryptoml.edge.state import BarRecord, PortfolioSnapshot, Prediction, RealisedReturn, StateStore
from cryptoml.edge.state import Decision as DecisionRow
from cryptoml.edge.state import Fill as FillRow
from cryptoml.errors import ConfigError, CryptoMLError, ModelContractError, TemporaryError
from cryptoml.export.bundle import Bundle, check_features, check_parity_sample, load_bundle
from cryptoml.features.streaming import StreamingFeatures
from cryptoml.features.technical import BAR_MS, TECHNICAL_FEATURES
from cryptoml.trading.broker import PaperBroker, make_client_order_id
from cryptoml.trading.strategy import StrategyState, decide, protective_prices

log = logging.getLogger("cryptoml.live")

PRICE_MODEL = "price_lgbm"
CHAMPION, SHADOW = "champion", "shadow"
BLOCKING_REASONS = ("cooldown", "kill_switch", "stale_data")
FETCH_LIMIT = 1000


# --- models ------------------------------------------------------------------------------------------


@dataclass
class Slot:
    """One loaded model: the bundle, where it came from and the version string recorded with its rows."""

    bundle: Bundle
    version: str
    source: str  # folder path or name@alias
    horizon_minutes: int

    def predict(self, features: Any) -> float:
        return float(self.bundle.predict(features)[0])


def verified_slot(folder: Path, version: str | None, source: str) -> Slot:
    """Load and check a price bundle: checksum and meta, the 19 technical features, the parity sample."""
    bundle = load_bundle(folder)
    if bundle.kind != "lightgbm_regressor":
        raise ModelContractError(f"{source}: a {bundle.kind} bundle cannot be the runner's price model")
    check_features(bundle.feature_names, TECHNICAL_FEATURES, where=source)
    check_parity_sample(bundle)
    horizon = int(bundle.meta.get("horizon_minutes") or bundle.meta["label"].get("horizon_minutes", 0))
    if horizon <= 0:
        raise ModelContractError(f"{source}: the bundle's meta names no horizon_minutes")
    return Slot(bundle, version or str(bundle.meta["onnx_sha256"])[:12], source, horizon)


class ModelSource:
    """Where the runner's models come from: a bundles folder or a registry server; polled for changes."""

    def __init__(self, models_dir: Path, registry_url: str = "", shadow: bool = True, cache_dir: Path | None = None):
        self.models_dir = Path(models_dir)
        self.registry = RegistryClient(registry_url) if registry_url else None
        self.shadow = shadow
        self.cache_dir = cache_dir or self.models_dir / ".registry_cache"
        self._seen: dict[str, str] = {}  # slot -> identity of the last candidate tried (swapped or refused)

    def _candidate(self, slot: str) -> tuple[str, Callable[[], Slot]] | None:
        """(identity, loader) of what ``slot`` should run now, or None when nothing is configured for it."""
        if self.registry is not None:
            alias = "champion" if slot == CHAMPION else "challenger"
            target = self.registry.alias(PRICE_MODEL, alias)
            if target is None:
                return None
            registry = self.registry

            def load_registered() -> Slot:
                folder = registry.download_bundle(target, self.cache_dir)
                return verified_slot(folder, f"v{target.version}", f"{PRICE_MODEL}@{alias}")

            return f"v{target.version}", load_registered
        folder = self.models_dir / (PRICE_MODEL if slot == CHAMPION else f"{PRICE_MODEL}.challenger")
        meta = folder / "model_meta.json"
        if not meta.is_file():
            return None
        try:
            stat = meta.stat()
            ident = f"{stat.st_mtime_ns}:{stat.st_size}:{(folder / 'model.onnx').stat().st_mtime_ns}"
        except OSError:
            return None
        return ident, lambda: verified_slot(folder, None, str(folder))

    def poll(self, current: dict[str, Slot]) -> dict[str, Slot]:
        """The slots to run from now on: changed candidates swapped in when they verify, else the old ones."""
        out = dict(current)
        for slot in (CHAMPION, SHADOW) if self.shadow else (CHAMPION,):
            try:
                found = self._candidate(slot)
            except TemporaryError as e:
                log.warning("model poll (%s): %s; keeping the current model", slot, e)
                continue
            if found is None:
                if slot == SHADOW:
                    out.pop(SHADOW, None)
                continue
            ident, loader = found
            if self._seen.get(slot) == ident:
                continue
            self._seen[slot] = ident
            try:
                new = loader()
            except (CryptoMLError, OSError) as e:
                kept = current.get(slot)
                log.error(
                    "refused the %s model %s: %s; %s",
                    slot, ident, e, f"keeping {kept.version}" if kept else "no model in this slot",
                )  # fmt: skip
                continue
            old = current.get(slot)
            out[slot] = new
            log.info("%s model: %s -> %s (%s)", slot, old.version if old else "none", new.version, new.source)
        return out


# --- the runner --------------------------------------------------------------------------------------


@dataclass
class RunnerStats:
    bars: int = 0
    fills: int = 0
    model_swaps: int = 0
    errors: int = 0
    started_s: float = field(default_factory=time.monotonic)


class Runner:
    """Follows ``symbol`` on ``exchange`` (a ccxt client), trading on ``broker`` (paper unless told otherwise)."""

    def __init__(
        self,
        *,
        exchange: Any,
        symbol: str,
        store: StateStore,
        models: ModelSource,
        strategy: StrategyParams,
        broker_params: PaperBrokerParams,
        live: LiveParams,
        clock_ms: Callable[[], int] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        start_ms: int | None = None,
    ) -> None:
        self.exchange = exchange
        self.symbol = symbol
        self.store = store
        self.models = models
        self.params = strategy
        self.live = live
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.sleep = sleep
        # First bar to fetch on an empty state (default: now - buffer_hours). A replay passes a fixed value
        # so a restart before the first commit fetches the same history.
        self.start_ms = start_ms
        self.stats = RunnerStats()
        self.slots: dict[str, Slot] = {}
        self._rng = random.Random(0)
        self._next_model_poll = 0.0
        buffer_bars = int(live.buffer_hours * 60)
        self.closes: deque[tuple[int, float]] = deque(maxlen=buffer_bars)  # (bar ts_ms, close)
        stored = store.load_latest()
        if stored is None:
            self.broker = PaperBroker(strategy.base_capital, broker_params)
            self.state = StrategyState()
            self.features = StreamingFeatures()
            self.last_bar_ts_ms: int | None = None
        else:
            extra = dict(stored.portfolio.strategy_state)
            self.broker = PaperBroker.from_dict(stored.portfolio.broker_state)
            self.state = StrategyState.from_dict(extra["strategy"])
            self.features = StreamingFeatures.from_snapshot(extra["features"])
            self.closes.extend((int(t), float(c)) for t, c in extra.get("closes", []))
            self.last_bar_ts_ms = stored.bar_ts_ms
            log.info("resumed from %s after bar %d", store.path, stored.bar_ts_ms)

    # -- models --

    def poll_models(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_model_poll:
            return
        self._next_model_poll = now + self.live.model_poll_seconds
        before = {k: v.version for k, v in self.slots.items()}
        self.slots = self.models.poll(self.slots)
        self.stats.model_swaps += sum(1 for k, v in self.slots.items() if before.get(k) != v.version)

    # -- bars --

    def fetch_closed_bars(self) -> list[list[float]]:
        """New closed bars after the last processed one (oldest first); [] when none yet."""
        now = self.clock_ms()
        if self.last_bar_ts_ms is None:
            since = (self.start_ms if self.start_ms is not None else now) - int(self.live.buffer_hours * 3_600_000)
            since -= since % BAR_MS
        else:
            since = self.last_bar_ts_ms + BAR_MS
        rows = self.exchange.fetch_ohlcv(self.symbol, "1m", since=since, limit=FETCH_LIMIT)
        out: list[list[float]] = []
        for row in rows:
            ts = int(row[0])
            if ts < since or ts + BAR_MS > now:  # an older overlap, or the bar still forming
                continue
            if out and ts <= out[-1][0]:
                continue
            out.append([ts, *(float(v) for v in row[1:6])])
        return out

    def process_bar(self, ts_ms: int, o: float, h: float, low: float, c: float, v: float) -> None:
        """Steps 1-5 of the module docstring for one closed bar; commits it atomically."""
        symbol = self.symbol
        now_ms = self.clock_ms()
        feats = self.features.update(ts_ms, o, h, low, c, v)
        self.closes.append((ts_ms, c))
        predictions: list[Prediction] = []
        forecasts: dict[str, float | None] = {}
        for slot_name, slot in sorted(self.slots.items()):
            value = None if feats is None else slot.predict(feats)
            forecasts[slot_name] = value
            if value is not None and feats is not None:
                predictions.append(
                    Prediction(symbol, PRICE_MODEL, slot.version, TECHNICAL_FEATURES, feats, value, slot=slot_name)
                )
        champion = self.slots.get(CHAMPION)
        predicted = forecasts.get(CHAMPION)
        predicted_bps = None if predicted is None or not math.isfinite(predicted) else predicted * 1e4

        fills_before = len(self.broker.fills())
        self.broker.on_bar(symbol, ts_ms, o, h, low, c)
        position = self.broker.position(symbol)
        equity = self.broker.equity({symbol: c})
        decision, self.state = decide(
            self.state, self.params,
            bar_ts_ms=ts_ms, now_ms=max(now_ms, ts_ms + BAR_MS), close=c, high=h, low=low,
            predicted_return_bps=predicted_bps, position_qty=position.qty,
            entry_price=position.avg_entry_price, equity=equity,
        )  # fmt: skip
        close_ms = ts_ms + BAR_MS
        if decision.action in ("enter_long", "enter_short", "exit") and decision.side and decision.qty > 0:
            purpose = "exit" if decision.action == "exit" else "entry"
            if decision.action == "exit":
                for order in self.broker.open_orders(symbol):  # the strategy's exit replaces the protective orders
                    self.broker.cancel(order.client_order_id, ts_ms=close_ms)
            order = self.broker.submit_market(
                make_client_order_id(symbol, ts_ms, purpose), symbol, decision.side, decision.qty,
                ts_ms=close_ms, price=c,
            )  # fmt: skip
            if purpose == "entry" and order.fill is not None:
                sign = 1 if decision.side == "buy" else -1
                stop, take = protective_prices(self.params, sign, order.fill.price)
                protect_side = "sell" if sign > 0 else "buy"
                qty = order.fill.qty
                self.broker.submit_stop(
                    make_client_order_id(symbol, ts_ms, "stop"), symbol, protect_side, qty, stop, ts_ms=close_ms
                )
                self.broker.submit_take_profit(
                    make_client_order_id(symbol, ts_ms, "take_profit"), symbol, protect_side, qty, take,
                    ts_ms=close_ms,
                )  # fmt: skip
        new_fills = self.broker.fills()[fills_before:]
        self.stats.fills += len(new_fills)
        self._commit(ts_ms, c, decision, predicted_bps, champion, predictions, new_fills, forecasts)
        self.last_bar_ts_ms = ts_ms
        self.stats.bars += 1

    def _commit(
        self,
        ts_ms: int,
        close: float,
        decision: Any,
        predicted_bps: float | None,
        champion: Slot | None,
        predictions: list[Prediction],
        fills: list[Any],
        forecasts: dict[str, float | None],
    ) -> None:
        symbol = self.symbol
        position = self.broker.position(symbol)
        summary = self.broker.summary({symbol: close})
        action = decision.action
        if action == "exit":  # selling closes a long, buying closes a short
            action = "exit_long" if decision.side == "sell" else "exit_short"
        elif action == "hold" and decision.reason in BLOCKING_REASONS and predicted_bps is not None:
            action = "blocked" if abs(predicted_bps) > self.params.entry_bps else "hold"
        decisions = [
            DecisionRow(
                symbol, action, decision.reason, slot=CHAMPION, predicted_return_bps=predicted_bps,
                model_name=PRICE_MODEL if champion else None, model_version=champion.version if champion else None,
                extra={"side": decision.side, "qty": decision.qty, "target_qty": decision.target_qty},
            )
        ]  # fmt: skip
        if SHADOW in self.slots and forecasts.get(SHADOW) is not None:
            shadow_bps = float(forecasts[SHADOW]) * 1e4  # type: ignore[arg-type]
            would = (
                "enter_long"
                if shadow_bps > self.params.entry_bps
                else "enter_short"
                if shadow_bps < -self.params.entry_bps
                else "hold"
            )
            decisions.append(
                DecisionRow(
                    symbol, "hold", f"shadow_would_{would}", slot=SHADOW, predicted_return_bps=shadow_bps,
                    model_name=PRICE_MODEL, model_version=self.slots[SHADOW].version,
                )
            )  # fmt: skip
        fill_rows = [
            FillRow(
                f.client_order_id, f.ts_ms, f.symbol, f.side, f.qty, f.price, f.fee, f.slippage_cost,
                f.realised_pnl, _fill_kind(f.client_order_id), champion.version if champion else None,
            )
            for f in fills
        ]  # fmt: skip
        realised = []
        for slot in {s.horizon_minutes for s in self.slots.values()}:
            label = self._realised(ts_ms, close, slot)
            if label is not None:
                realised.append(RealisedReturn(label[0], symbol, PRICE_MODEL, label[1]))
        portfolio = PortfolioSnapshot(
            cash=summary.cash,
            equity=summary.equity,
            position_qty=position.qty,
            avg_entry_price=position.avg_entry_price,
            realised_pnl=summary.realised_pnl,
            unrealised_pnl=summary.unrealised_pnl,
            broker_state=self.broker.to_dict(),
            strategy_state={
                "strategy": self.state.to_dict(),
                "features": self.features.snapshot(),
                "closes": [list(x) for x in self.closes][-(max(self._horizons(), default=0) + 1) :],
            },
        )
        metrics = {"equity": summary.equity, "position_qty": position.qty}
        self.store.commit_bar(
            BarRecord(
                bar_ts_ms=ts_ms, portfolio=portfolio, decisions=decisions, predictions=predictions,
                fills=fill_rows, metrics=metrics, realised_returns=realised,
            )
        )  # fmt: skip

    def _horizons(self) -> set[int]:
        return {s.horizon_minutes for s in self.slots.values()}

    def _realised(self, ts_ms: int, close: float, horizon_minutes: int) -> tuple[int, float] | None:
        """(bar whose prediction this bar labels, ln(close now / close then)) when that bar is in the buffer."""
        start = ts_ms - horizon_minutes * BAR_MS
        for t, c in reversed(self.closes):
            if t == start:
                return start, math.log(close / c)
            if t < start:
                return None
        return None

    # -- the loop --

    def run(self, *, until_ms: int | None = None, max_bars: int | None = None) -> RunnerStats:
        """Poll, process every new closed bar, sleep; returns after bar ``until_ms`` or ``max_bars`` bars."""
        self.poll_models(force=True)
        if CHAMPION not in self.slots:
            log.warning("no champion price model yet: decisions will be 'no_prediction' until one appears")
        attempt = 0
        while True:
            self.poll_models()
            try:
                bars = self.fetch_closed_bars()
                attempt = 0
            except Exception as e:  # ccxt's errors: network trouble is retried, the rest is fatal
                if not _retryable(e):
                    raise
                self.stats.errors += 1
                delay = min(self.live.retry_max_seconds, self.live.retry_base_seconds * 2**attempt)
                delay *= 0.5 + self._rng.random() / 2
                attempt += 1
                log.warning("fetching %s bars failed (%s); retrying in %.1f s", self.symbol, e, delay)
                self.sleep(delay)
                continue
            for ts, o, h, low, c, v in bars:
                self.process_bar(int(ts), o, h, low, c, v)
                if (until_ms is not None and ts >= until_ms) or (max_bars is not None and self.stats.bars >= max_bars):
                    return self.stats
            if not bars:
                self.sleep(self.live.poll_seconds)


def _fill_kind(client_order_id: str) -> str:
    code = client_order_id.rsplit("-", 1)[-1]  # make_client_order_id ends with the purpose code
    return {"sl": "stop_loss", "tp": "take_profit", "lm": "limit"}.get(code, "market")


def _retryable(error: BaseException) -> bool:
    import ccxt

    if isinstance(error, TemporaryError):
        return True
    if isinstance(error, ccxt.AuthenticationError | ccxt.BadSymbol | ccxt.BadRequest):
        return False
    return isinstance(error, ccxt.NetworkError | ccxt.ExchangeNotAvailable)


def check_symbol(symbols: tuple[str, ...], symbol: str | None) -> str:
    """The one symbol this process follows (``--symbol`` or the only entry of ``live.symbols``)."""
    if symbol:
        return symbol
    if len(symbols) != 1:
        raise ConfigError(
            f"live.symbols lists {len(symbols)} symbols: one runner process follows one symbol "
            "(pass --symbol, and run one process per symbol)"
        )
    return symbols[0]
