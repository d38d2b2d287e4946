"""The edge runner: follow closed 1-minute candles, predict with ONNX bundles, trade the strategy, persist.

One process follows one exchange symbol (run one per symbol). Each closed bar goes through the same steps,
whether it is fresh or fetched while catching up after a restart:

1. the streaming technical features (:class:`~cryptoml.features.streaming.StreamingFeatures`) of the bar,
   and the window of the last bars the Keras sequence model reads;
2. every loaded price model predicts (None while its inputs warm up): ``price_lgbm`` the forward log
   return over its ``horizon_minutes`` from the features, ``price_cnn_lstm`` the next bar's log return
   from the raw window. The **trade model** (``price_lgbm`` unless told otherwise) feeds the strategy;
   the others, and a challenger in a **shadow slot**, are logged (predictions table) but never traded;
3. the broker sees the bar (paper: resting stop-loss / take-profit orders fill on its high / low; live:
   the exchange's order states are read);
4. :func:`cryptoml.trading.strategy.decide` at the bar's close (the only trading logic; the backtest calls
   it too); an entry or exit is a market order at the close with a client order id derived from the bar
   (:func:`~cryptoml.trading.broker.make_client_order_id`), protective stop / take-profit orders follow
   an entry;
5. on the 5-minute snapshot grid (the bar's close a multiple of ``snapshots.interval_minutes``), when
   ``live.opportunity_scoring`` is on, the :class:`~cryptoml.edge.scorer.OpportunityScorer`:
   funding-arbitrage opportunities of this exchange from live prices and funding, scored by the
   opportunity ONNX models and by the rule scorer, each verdict a decision, each scorer's pick followed
   on paper (see the class);
6. one atomic :meth:`~cryptoml.edge.state.StateStore.commit_bar`: decisions, predictions (features included,
   for drift checks), fills, metrics, the realised returns that label earlier predictions, the paper
   arbitrage picks opened and ended, and the whole broker, strategy, feature and scorer state.

**One decision** (the per-bar latency of ``bench/bench_edge.py``) is steps 1-4 on a bar in memory: the
features, every price model, the strategy and the orders; it excludes the bar fetch and the SQLite commit
(an fsync). The opportunity scoring of step 5 runs on one bar in five and is measured apart.

Crash safety: nothing outside the state file changes a decision, so a runner killed at any moment and
restarted loads the last committed bar's state and replays the bars after it to the same decisions, orders
(same client order ids: the paper broker ignores a repeated id, an exchange refuses it) and rows as an
uninterrupted run. What is not stored is fetched again at restart from the exchange, which gives the same
history: the Keras window (the bars before the resume point) and the scorer's market (74 h of bars, 4
days of funding). The inputs that are not in the bars are the clock, used for the stale-data rule (no new
entry, no new arbitrage pick, on a bar older than ``strategy.max_bar_age_seconds``; catching up after a long
outage therefore blocks entries on the old bars, as it should) and the order books, which are live only.

Models come from a folder of bundles (``models/<name>``; a shadow challenger in ``models/<name>.challenger``)
or from the MLflow registry aliases ``champion`` / ``challenger`` over REST
(:mod:`cryptoml.edge.registry_client`). They are polled every ``live.model_poll_seconds``; a changed
bundle is loaded, checked (checksum, kind and feature list, a trial prediction, the parity sample stored
at export replayed through this onnxruntime) and swapped in between two bars; a corrupt, mismatched or
failing one is refused with a logged reason and the old model keeps running.

Imports: numpy, onnxruntime (through the bundle loader), ccxt (the client is given in by the caller;
``cryptoml live`` loads ccxt one exchange at a time through :mod:`cryptoml.market.lean_ccxt`), the standard
library and the project's numpy-only modules: never pandas, tensorflow, mlflow or prefect.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cryptoml.config import LiveParams, PaperBrokerParams, StrategyParams
from cryptoml.edge.models import EXPECTED, OPPORTUNITY_MODELS, ModelSet, SequencePredictor, check_edge_bundle
from cryptoml.edge.registry_client import RegistryClient
from cryptoml.edge.scorer import GridResult, OpportunityScorer
from cryptoml.edge.state import BarRecord, PortfolioSnapshot, Prediction, RealisedReturn, StateStore
from cryptoml.edge.state import Decision as DecisionRow
from cryptoml.edge.state import Fill as FillRow
from cryptoml.errors import ConfigError, CryptoMLError, ModelContractError, TemporaryError
from cryptoml.export.bundle import Bundle, check_parity_sample, load_bundle
from cryptoml.features.streaming import StreamingFeatures
from cryptoml.features.technical import BAR_MS, TECHNICAL_FEATURES
from cryptoml.models.sentiment import PRICE_FEATURES, PRICE_ONLY_MODEL, SENTIMENT_MODEL
from cryptoml.trading.broker import PaperBroker, make_client_order_id
from cryptoml.trading.strategy import StrategyState, decide, protective_prices

log = logging.getLogger("cryptoml.live")

PRICE_MODEL = "price_lgbm"
KERAS_MODEL = PRICE_ONLY_MODEL
PRICE_MODELS = (PRICE_MODEL, KERAS_MODEL)
# Load order: the biggest graph (the hold model's 55k tree nodes) first, so that its transient peak while
# onnxruntime builds it happens before the other models are resident (peak RSS is the edge's limit).
RUNNER_MODELS = (*reversed(OPPORTUNITY_MODELS), *PRICE_MODELS)
CHAMPION, SHADOW = "champion", "shadow"
BLOCKING_REASONS = ("cooldown", "kill_switch", "stale_data")
FETCH_LIMIT = 1000

SlotKey = tuple[str, str]  # (model name, CHAMPION | SHADOW)


def release_freed_memory() -> None:
    """Give the heap pages freed after a model load back to the OS (glibc only; a no-op elsewhere).

    Building an onnxruntime session allocates several times the model's final size; without this the
    freed pages stay in the process and every later allocation adds to the resident peak.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- models ------------------------------------------------------------------------------------------


@dataclass
class Slot:
    """One loaded model: the bundle, where it came from, the version recorded with its rows, and for a
    price model its forward horizon in minutes (None for the opportunity models)."""

    name: str
    bundle: Bundle
    version: str
    source: str  # folder path or name@alias
    horizon_minutes: int | None
    sequence: SequencePredictor | None = None  # the allocation-free path of a Keras sequence model

    def predict(self, features: Any) -> float:
        return float(self.bundle.predict(features)[0])


def verified_slot(name: str, folder: Path, version: str | None, source: str) -> Slot:
    """Load and check a bundle for ``name``: checksum and meta, kind and ordered features, a trial
    prediction, the parity sample; a price model also needs its horizon."""
    bundle = load_bundle(folder)
    if bundle.name != name:
        raise ModelContractError(f"{source}: the bundle's meta names {bundle.name!r}, expected {name!r}")
    check_edge_bundle(bundle)
    check_parity_sample(bundle)
    horizon: int | None = None
    sequence = None
    if name in PRICE_MODELS:
        label = bundle.meta.get("label") if isinstance(bundle.meta.get("label"), Mapping) else {}
        horizon = int(bundle.meta.get("horizon_minutes") or label.get("horizon_minutes") or 0)  # type: ignore[union-attr]
        if horizon <= 0:
            raise ModelContractError(f"{source}: the bundle's meta names no horizon_minutes")
        if EXPECTED[name][0] == "keras_sequence":
            sequence = SequencePredictor(bundle)
    return Slot(name, bundle, version or str(bundle.meta["onnx_sha256"])[:12], source, horizon, sequence)


class ModelSource:
    """Where the runner's models come from: a bundles folder or a registry server; polled for changes.

    ``names``: the models to follow (default :data:`RUNNER_MODELS`: ``price_lgbm``, ``price_cnn_lstm`` and
    the three opportunity models). ``price_cnn_lstm_sentiment`` is not among them: the runner has no
    sentiment feed, so :func:`~cryptoml.models.sentiment.choose_price_model` would never pick it and
    loading it would only cost memory. Shadow slots (``shadow=True``) exist for the price models.
    """

    def __init__(
        self,
        models_dir: Path,
        registry_url: str = "",
        shadow: bool = True,
        cache_dir: Path | None = None,
        names: Sequence[str] = RUNNER_MODELS,
    ):
        unknown = [n for n in names if n not in EXPECTED]
        if unknown:
            raise ConfigError(f"ModelSource: unknown model names {unknown} (known: {sorted(EXPECTED)})")
        self.models_dir = Path(models_dir)
        self.registry = RegistryClient(registry_url) if registry_url else None
        self.shadow = shadow
        self.names = tuple(names)
        self.cache_dir = cache_dir or self.models_dir / ".registry_cache"
        self._seen: dict[SlotKey, str] = {}  # slot -> identity of the last candidate tried (swapped or refused)
        if self.registry is None and (self.models_dir / SENTIMENT_MODEL).is_dir():
            log.info("%s is not loaded: the runner has no sentiment feed to run it with", SENTIMENT_MODEL)

    def keys(self) -> list[SlotKey]:
        shadows = [(n, SHADOW) for n in self.names if n in PRICE_MODELS] if self.shadow else []
        return [(n, CHAMPION) for n in self.names] + shadows

    def _candidate(self, key: SlotKey) -> tuple[str, Callable[[], Slot]] | None:
        """(identity, loader) of what ``key`` should run now, or None when nothing is configured for it."""
        name, slot = key
        if self.registry is not None:
            alias = "champion" if slot == CHAMPION else "challenger"
            target = self.registry.alias(name, alias)
            if target is None:
                return None
            registry = self.registry

            def load_registered() -> Slot:
                folder = registry.download_bundle(target, self.cache_dir)
                return verified_slot(name, folder, f"v{target.version}", f"{name}@{alias}")

            return f"v{target.version}", load_registered
        folder = self.models_dir / (name if slot == CHAMPION else f"{name}.challenger")
        meta = folder / "model_meta.json"
        if not meta.is_file():
            return None
        try:
            stat = meta.stat()
            ident = f"{stat.st_mtime_ns}:{stat.st_size}:{(folder / 'model.onnx').stat().st_mtime_ns}"
        except OSError:
            return None
        return ident, lambda: verified_slot(name, folder, None, str(folder))

    def poll(self, current: Mapping[SlotKey, Slot]) -> dict[SlotKey, Slot]:
        """The slots to run from now on: changed candidates swapped in when they verify, else the old ones."""
        out = dict(current)
        for key in self.keys():
            try:
                found = self._candidate(key)
            except TemporaryError as e:
                log.warning("model poll (%s %s): %s; keeping the current model", *key, e)
                continue
            if found is None:
                if key[1] == SHADOW:
                    out.pop(key, None)
                continue
            ident, loader = found
            if self._seen.get(key) == ident:
                continue
            self._seen[key] = ident
            try:
                new = loader()
            except (CryptoMLError, OSError) as e:
                kept = current.get(key)
                log.error(
                    "refused the %s %s model %s: %s; %s",
                    key[0], key[1], ident, e, f"keeping {kept.version}" if kept else "no model in this slot",
                )  # fmt: skip
                continue
            finally:
                release_freed_memory()
            old = current.get(key)
            out[key] = new
            log.info("%s %s model: %s -> %s (%s)", *key, old.version if old else "none", new.version, new.source)
        return out


class BarWindow:
    """The last ``steps`` consecutive closed bars (open, high, low, close, volume) as one contiguous
    ``(steps, 5)`` float64 view, without copying: each bar is written twice in a buffer of ``2 x steps``
    rows, so rows ``[i, i + steps)`` always hold the window in time order. A gap restarts it."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self._buf = np.zeros((2 * steps, len(PRICE_FEATURES)), dtype=np.float64)
        self._next = 0  # row the next bar goes to (mod steps)
        self._count = 0  # consecutive bars held, up to steps
        self.last_ts_ms: int | None = None

    def push(self, ts_ms: int, o: float, h: float, low: float, c: float, v: float) -> None:
        if self.last_ts_ms is not None and ts_ms != self.last_ts_ms + BAR_MS:
            self._count = 0
        row = self._next
        self._buf[row] = self._buf[row + self.steps] = (o, h, low, c, v)
        self._next = (row + 1) % self.steps
        self._count = min(self._count + 1, self.steps)
        self.last_ts_ms = ts_ms

    def window(self) -> np.ndarray | None:
        return self._buf[self._next : self._next + self.steps] if self._count == self.steps else None

    @property
    def count(self) -> int:
        """Consecutive bars held (up to ``steps``): stored with each bar so that a restart refills as many."""
        return self._count

    def last(self) -> np.ndarray:
        return self._buf[(self._next - 1) % self.steps]


class BarFeed(Protocol):
    """A source of closed bars tried before REST polling (e.g. :class:`cryptoml.edge.stream.KlineStream`)."""

    def closed_bars(self, since_ms: int) -> list[list[float]] | None:
        """Closed 1-minute bars ``[ts_ms, o, h, l, c, v]`` opening after ``since_ms``, oldest first; None
        when not connected or when a gap means the caller must fall back to REST."""
        ...


# --- the runner --------------------------------------------------------------------------------------


@dataclass
class RunnerStats:
    bars: int = 0
    fills: int = 0
    model_swaps: int = 0
    errors: int = 0
    stream_bars: int = 0  # bars that came from the bar feed rather than REST
    started_s: float = field(default_factory=time.monotonic)


class Runner:
    """Follows ``symbol`` on ``exchange`` (a ccxt client), trading on ``broker`` (paper unless one is given).

    ``trade_model``: the price model whose forecast the strategy trades (``price_lgbm`` or
    ``price_cnn_lstm``). ``scorer``: the opportunity scorer (None: off). ``broker``: a live broker
    (:class:`cryptoml.edge.live_broker.LiveBroker`) instead of the paper one; it restores its cached state
    from the snapshot (``load_dict``). ``bar_feed``: closed bars from a stream, tried before REST polling.
    ``model_options``: the :class:`~cryptoml.edge.models.ModelSet` options of the opportunity models.
    """

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
        trade_model: str = PRICE_MODEL,
        scorer: OpportunityScorer | None = None,
        broker: Any | None = None,
        bar_feed: BarFeed | None = None,
        model_options: Mapping[str, Any] | None = None,
    ) -> None:
        if trade_model not in PRICE_MODELS:
            raise ConfigError(f"trade model {trade_model!r} is not a price model ({list(PRICE_MODELS)})")
        self.exchange = exchange
        self.symbol = symbol
        self.store = store
        self.models = models
        self.params = strategy
        self.live = live
        self.trade_model = trade_model
        self.scorer = scorer
        self.bar_feed = bar_feed
        self.model_options = dict(model_options or {})  # ModelSet options: composite weights, Kelly, hold grid
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.sleep = sleep
        # First bar to fetch on an empty state (default: now - buffer_hours). A replay passes a fixed value
        # so a restart before the first commit fetches the same history.
        self.start_ms = start_ms
        self.stats = RunnerStats()
        self.slots: dict[SlotKey, Slot] = {}
        self._rng = random.Random(0)
        self._next_model_poll = 0.0
        self._opportunity_models: tuple[tuple[str, ...], ModelSet] | None = None
        buffer_bars = int(live.buffer_hours * 60)
        self.closes: deque[tuple[int, float]] = deque(maxlen=buffer_bars)  # (bar ts_ms, close)
        self.window: BarWindow | None = None
        self._window_count = 0  # bars the window held at the last committed bar (refilled from the exchange)
        stored = store.load_latest()
        if stored is None:
            self.broker = broker if broker is not None else PaperBroker(strategy.base_capital, broker_params)
            self.state = StrategyState()
            self.features = StreamingFeatures()
            self.last_bar_ts_ms: int | None = None
        else:
            extra = dict(stored.portfolio.strategy_state)
            if broker is None:
                self.broker = PaperBroker.from_dict(stored.portfolio.broker_state)
            else:
                self.broker = broker
                broker.load_dict(stored.portfolio.broker_state)
            self.state = StrategyState.from_dict(extra["strategy"])
            self.features = StreamingFeatures.from_snapshot(extra["features"])
            self.closes.extend((int(t), float(c)) for t, c in extra.get("closes", []))
            self._window_count = int(extra.get("window_bars", 0))
            if scorer is not None and "opportunities" in extra:
                scorer.load(extra["opportunities"])
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
        steps = max((s.sequence.steps for s in self.slots.values() if s.sequence is not None), default=0)
        if steps and (self.window is None or self.window.steps != steps):
            self._load_window(steps)

    def opportunity_models(self) -> ModelSet | None:
        """The champion opportunity models as a ModelSet (rebuilt only after a swap), None when none is loaded."""
        found = {n: self.slots[(n, CHAMPION)] for n in OPPORTUNITY_MODELS if (n, CHAMPION) in self.slots}
        if not found:
            return None
        ident = tuple(f"{n}={s.version}" for n, s in sorted(found.items()))
        if self._opportunity_models is None or self._opportunity_models[0] != ident:
            options = dict(self.model_options)
            self._opportunity_models = (ident, ModelSet({n: s.bundle for n, s in found.items()}, **options))
        return self._opportunity_models[1]

    def _load_window(self, steps: int) -> None:
        """The Keras window, refilled with the bars it held at the last committed bar: fetched again rather
        than stored (600 numbers a bar), as many as it held then, so that the replay predicts where the
        uninterrupted run did."""
        self.window = BarWindow(steps)
        count = min(self._window_count, steps)
        if self.last_bar_ts_ms is None or count == 0:
            return
        since = self.last_bar_ts_ms - (count - 1) * BAR_MS
        try:
            rows = self.exchange.fetch_ohlcv(self.symbol, "1m", since=since, limit=count)
        except Exception as e:
            if not retryable(e):
                raise
            log.warning("could not refill the %d-bar window (%s): the sequence model waits for new bars", steps, e)
            return
        for row in rows:
            ts = int(row[0])
            if since <= ts <= self.last_bar_ts_ms:
                self.window.push(ts, *(float(v) for v in row[1:6]))

    # -- bars --

    def fetch_closed_bars(self) -> list[list[float]]:
        """New closed bars after the last processed one (oldest first); [] when none yet.

        The bar feed answers first when it can (consecutive bars after the last processed one); None from
        it, or a first bar that does not follow on, falls back to REST polling.
        """
        now = self.clock_ms()
        if self.bar_feed is not None and self.last_bar_ts_ms is not None:
            streamed = self.bar_feed.closed_bars(self.last_bar_ts_ms)
            if streamed is not None:
                bars = [[int(r[0]), *(float(v) for v in r[1:6])] for r in streamed if int(r[0]) > self.last_bar_ts_ms]
                bars = [b for b in bars if b[0] + BAR_MS <= now]
                if not bars or bars[0][0] == self.last_bar_ts_ms + BAR_MS:
                    consecutive = [b for i, b in enumerate(bars) if b[0] == self.last_bar_ts_ms + (i + 1) * BAR_MS]
                    self.stats.stream_bars += len(consecutive)
                    return consecutive
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

    def _stale(self, ts_ms: int, now_ms: int) -> bool:
        return now_ms - (ts_ms + BAR_MS) > self.params.max_bar_age_seconds * 1000

    def refresh_market(self, bar: Sequence[float]) -> None:
        """The scorer's market fetch for the closed bar ``[ts_ms, o, h, l, c, v]`` of the runner's symbol when
        its close is a grid time (the bar itself is handed over, not fetched again)."""
        if self.scorer is None:
            return
        ts_ms = int(bar[0])
        self.scorer.add_bar(self.symbol, ts_ms, *(float(x) for x in bar[1:6]))
        close_ms = ts_ms + BAR_MS
        if self.scorer.on_grid_time(close_ms):
            self.scorer.refresh(close_ms, fresh=not self._stale(ts_ms, self.clock_ms()))

    def decide_bar(
        self, ts_ms: int, o: float, h: float, low: float, c: float, v: float
    ) -> tuple[Any, list[Prediction], dict[SlotKey, float | None], list[Any]]:
        """Steps 1-4 of the module docstring (one decision): features, every price model, the broker's view
        of the bar, the strategy and its orders. Returns (decision, predictions, forecasts, new fills)."""
        symbol = self.symbol
        now_ms = self.clock_ms()
        feats = self.features.update(ts_ms, o, h, low, c, v)
        self.closes.append((ts_ms, c))
        window = None
        if self.window is not None:
            self.window.push(ts_ms, o, h, low, c, v)
            window = self.window.window()
        predictions: list[Prediction] = []
        forecasts: dict[SlotKey, float | None] = {}
        for key, slot in sorted(self.slots.items()):
            name, slot_name = key
            value: float | None = None
            inputs: Any = None
            names: Sequence[str] = ()
            if name == PRICE_MODEL and feats is not None:
                value, inputs, names = slot.predict(feats), feats, TECHNICAL_FEATURES
            elif slot.sequence is not None and window is not None and slot.sequence.steps == len(window):
                value, inputs, names = slot.sequence(window), window[-1].copy(), PRICE_FEATURES
            else:
                continue
            forecasts[key] = value
            if math.isfinite(value):
                predictions.append(Prediction(symbol, name, slot.version, names, inputs, value, slot=slot_name))
        predicted = forecasts.get((self.trade_model, CHAMPION))
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
        return decision, predictions, forecasts, new_fills

    def process_bar(self, ts_ms: int, o: float, h: float, low: float, c: float, v: float) -> None:
        """Steps 1-6 of the module docstring for one closed bar; commits it atomically."""
        decision, predictions, forecasts, new_fills = self.decide_bar(ts_ms, o, h, low, c, v)
        grid = None
        close_ms = ts_ms + BAR_MS
        if self.scorer is not None:
            self.refresh_market((ts_ms, o, h, low, c, v))
        if self.scorer is not None and self.scorer.on_grid_time(close_ms):
            grid = self.scorer.on_grid(close_ms, self.opportunity_models(), stale=self._stale(ts_ms, self.clock_ms()))
        self._commit(ts_ms, c, decision, predictions, new_fills, forecasts, grid)
        self.last_bar_ts_ms = ts_ms
        self.stats.bars += 1

    def _commit(
        self,
        ts_ms: int,
        close: float,
        decision: Any,
        predictions: list[Prediction],
        fills: list[Any],
        forecasts: dict[SlotKey, float | None],
        grid: GridResult | None,
    ) -> None:
        symbol = self.symbol
        position = self.broker.position(symbol)
        summary = self.broker.summary({symbol: close})
        champion = self.slots.get((self.trade_model, CHAMPION))
        predicted = forecasts.get((self.trade_model, CHAMPION))
        predicted_bps = None if predicted is None or not math.isfinite(predicted) else predicted * 1e4
        action = decision.action
        if action == "exit":  # selling closes a long, buying closes a short
            action = "exit_long" if decision.side == "sell" else "exit_short"
        elif action == "hold" and decision.reason in BLOCKING_REASONS and predicted_bps is not None:
            action = "blocked" if abs(predicted_bps) > self.params.entry_bps else "hold"
        decisions = [
            DecisionRow(
                symbol, action, decision.reason, slot=CHAMPION, predicted_return_bps=predicted_bps,
                model_name=self.trade_model if champion else None,
                model_version=champion.version if champion else None,
                extra={"side": decision.side, "qty": decision.qty, "target_qty": decision.target_qty},
            )
        ]  # fmt: skip
        shadow = forecasts.get((self.trade_model, SHADOW))
        if shadow is not None and math.isfinite(shadow):
            shadow_bps = shadow * 1e4
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
                    model_name=self.trade_model, model_version=self.slots[(self.trade_model, SHADOW)].version,
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
        for name, horizon in sorted(self._horizons().items()):
            label = self._realised(ts_ms, close, horizon)
            if label is not None:
                realised.append(RealisedReturn(label[0], symbol, name, label[1]))
        keep = max(self._horizons().values(), default=0) + 1  # the closes the next labels need
        strategy_state: dict[str, Any] = {
            "strategy": self.state.to_dict(),
            "features": self.features.snapshot(),
            "closes": [list(x) for x in itertools.islice(self.closes, max(len(self.closes) - keep, 0), None)],
            "window_bars": self.window.count if self.window is not None else 0,
        }
        metrics = {"equity": summary.equity, "position_qty": position.qty}
        if self.scorer is not None:
            strategy_state["opportunities"] = self.scorer.to_dict()
        if grid is not None:
            decisions += grid.decisions
            metrics.update(grid.metrics)
        portfolio = PortfolioSnapshot(
            cash=summary.cash,
            equity=summary.equity,
            position_qty=position.qty,
            avg_entry_price=position.avg_entry_price,
            realised_pnl=summary.realised_pnl,
            unrealised_pnl=summary.unrealised_pnl,
            broker_state=self.broker.to_dict(),
            strategy_state=strategy_state,
        )
        self.store.commit_bar(
            BarRecord(
                bar_ts_ms=ts_ms, portfolio=portfolio, decisions=decisions, predictions=predictions,
                fills=fill_rows, metrics=metrics, realised_returns=realised,
                arbitrage_opened=grid.opened if grid else (), arbitrage_closed=grid.closed if grid else (),
            )
        )  # fmt: skip

    def _horizons(self) -> dict[str, int]:
        """Price model name -> forward horizon (minutes) of the loaded slots (the labels to write)."""
        return {s.name: s.horizon_minutes for s in self.slots.values() if s.horizon_minutes}

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

    def _retrying(self, what: str, fn: Callable[[], Any], attempt: list[int]) -> tuple[bool, Any]:
        """(True, result) or, after a retryable error and the backoff sleep, (False, None)."""
        try:
            result = fn()
        except Exception as e:  # ccxt's errors: network trouble is retried, the rest is fatal
            if not retryable(e):
                raise
            self.stats.errors += 1
            delay = min(self.live.retry_max_seconds, self.live.retry_base_seconds * 2 ** attempt[0])
            delay *= 0.5 + self._rng.random() / 2
            attempt[0] += 1
            log.warning("%s failed (%s); retrying in %.1f s", what, e, delay)
            self.sleep(delay)
            return False, None
        attempt[0] = 0
        return True, result

    def run(self, *, until_ms: int | None = None, max_bars: int | None = None) -> RunnerStats:
        """Poll, process every new closed bar, sleep; returns after bar ``until_ms`` or ``max_bars`` bars."""
        self.poll_models(force=True)
        if (self.trade_model, CHAMPION) not in self.slots:
            log.warning(
                "no champion %s model yet: decisions will be 'no_prediction' until one appears", self.trade_model
            )
        attempt = [0]
        while True:
            self.poll_models()
            ok, bars = self._retrying(f"fetching {self.symbol} bars", self.fetch_closed_bars, attempt)
            if not ok:
                continue
            for ts, o, h, low, c, v in bars:
                refresh = functools.partial(self.refresh_market, (ts, o, h, low, c, v))
                while not self._retrying("fetching the opportunity scorer's market", refresh, attempt)[0]:
                    pass
                self.process_bar(int(ts), o, h, low, c, v)
                if (until_ms is not None and ts >= until_ms) or (max_bars is not None and self.stats.bars >= max_bars):
                    return self.stats
            if not bars:
                self.sleep(self.live.poll_seconds)


def _fill_kind(client_order_id: str) -> str:
    code = client_order_id.rsplit("-", 1)[-1]  # make_client_order_id ends with the purpose code
    return {"sl": "stop_loss", "tp": "take_profit", "lm": "limit"}.get(code, "market")


def retryable(error: BaseException) -> bool:
    """Whether a fetch error is worth retrying with backoff: network trouble yes, a refusal no."""
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
