"""params.yaml -> frozen dataclasses: the single source of truth for every tunable.

Defaults live here and nowhere else; ``params.yaml`` overrides them. Loading is strict: an unknown or
misspelled key raises :class:`ConfigError` naming the key and the closest valid one, and invalid values
(negative durations, empty symbol lists, unknown ccxt exchange ids, ...) raise with the offending path.
Functions receive the typed section they need (``MarketParams``, ``FetchParams``...), never the dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from cryptoml.errors import ConfigError

SOURCES = ("synthetic", "ccxt", "files")
DATA_KINDS = ("ohlcv", "funding", "book")
TIMEFRAME_UNITS_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def timeframe_ms(timeframe: str) -> int:
    """Length of a ccxt timeframe string in milliseconds (``'1m'`` -> 60000)."""
    unit = timeframe[-1:]
    amount = timeframe[:-1]
    if unit not in TIMEFRAME_UNITS_MS or not amount.isdigit() or int(amount) <= 0:
        raise ConfigError(f"invalid timeframe {timeframe!r}; expected e.g. '1m', '5m', '1h', '1d'")
    return int(amount) * TIMEFRAME_UNITS_MS[unit]


def parse_utc_ms(value: str | int | datetime, what: str = "time") -> int:
    """ISO-8601 (naive = UTC) or epoch-ms -> UTC epoch milliseconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected an ISO-8601 time or epoch ms, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError as e:
            raise ConfigError(f"{what}: {value!r} is not an ISO-8601 time (e.g. 2024-01-01T00:00)") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def known_ccxt_exchanges() -> frozenset[str]:
    import ccxt  # local: only configs naming ccxt exchanges pay for the import

    return frozenset(ccxt.exchanges)


def check_exchange_id(exchange: str, where: str) -> None:
    """Raise ConfigError when ``exchange`` is not a ccxt exchange id, suggesting the closest one."""
    known = known_ccxt_exchanges()
    if exchange not in known:
        close = difflib.get_close_matches(exchange, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown ccxt exchange id {exchange!r}{hint}")


@dataclass(frozen=True)
class MarketParams:
    """What to backfill: which source, exchanges, symbols, window and data kinds."""

    source: str = "synthetic"
    exchanges: tuple[str, ...] = ("binanceusdm", "bybit")
    symbols: tuple[str, ...] = ("BTC/USDT:USDT", "ETH/USDT:USDT", "SOL/USDT:USDT")
    timeframe: str = "1m"
    since: str = "2024-01-01T00:00"
    until: str = "2024-01-31T00:00"
    kinds: tuple[str, ...] = ("ohlcv", "funding", "book")
    data_dir: str = "data/raw"
    reports_dir: str = "reports"
    # exchange id -> base URL (testnets, proxies, a local stub): every API URL is re-pointed there.
    api_urls: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"market.source: {self.source!r} is not one of {SOURCES}")
        if not self.symbols:
            raise ConfigError("market.symbols: the symbol list is empty")
        if not self.exchanges:
            raise ConfigError("market.exchanges: the exchange list is empty")
        for kind in self.kinds:
            if kind not in DATA_KINDS:
                raise ConfigError(f"market.kinds: {kind!r} is not one of {DATA_KINDS}")
        timeframe_ms(self.timeframe)
        if self.since_ms >= self.until_ms:
            raise ConfigError(f"market.since ({self.since}) must be before market.until ({self.until})")
        if self.source == "ccxt":
            for ex in self.exchanges:
                check_exchange_id(ex, "market.exchanges")

    @property
    def since_ms(self) -> int:
        return parse_utc_ms(self.since, "market.since")

    @property
    def until_ms(self) -> int:
        return parse_utc_ms(self.until, "market.until")


@dataclass(frozen=True)
class FetchParams:
    """How the ccxt source talks to an exchange: pages, timeouts and the retry budget."""

    page_limit: int = 1000
    timeout_ms: int = 10_000
    max_retry_seconds: float = 60.0
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 20.0
    flush_every_pages: int = 20
    book_levels: int = 20
    rate_limit_ms: int = 0  # 0 = ccxt's own per-exchange rate limit

    def validate(self) -> None:
        for name in ("page_limit", "timeout_ms", "flush_every_pages", "book_levels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"fetch.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_retry_seconds", "backoff_base_seconds", "backoff_max_seconds", "rate_limit_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"fetch.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SyntheticParams:
    """The embedded seeded market used when offline (the default source)."""

    seed: int = 7
    start: str = "2024-01-01T00:00"
    days: int = 30
    exchanges: tuple[str, ...] = ("binance", "bybit")
    bases: tuple[str, ...] = ("BTC", "ETH", "SOL")
    quote: str = "USDT"
    funding_interval_hours: int = 8
    book_interval_minutes: int = 15
    book_levels: int = 10

    def validate(self) -> None:
        if self.days <= 0:
            raise ConfigError(f"synthetic.days must be > 0, got {self.days}")
        if len(self.exchanges) < 1 or not self.bases:
            raise ConfigError("synthetic.exchanges and synthetic.bases must not be empty")
        for name in ("funding_interval_hours", "book_interval_minutes", "book_levels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"synthetic.{name} must be > 0, got {getattr(self, name)}")
        parse_utc_ms(self.start, "synthetic.start")


@dataclass(frozen=True)
class CollectParams:
    """Live order-book collection."""

    interval_seconds: float = 10.0
    levels: int = 20

    def validate(self) -> None:
        if self.interval_seconds <= 0:
            raise ConfigError(f"collect.interval_seconds must be > 0, got {self.interval_seconds}")
        if self.levels <= 0:
            raise ConfigError(f"collect.levels must be > 0, got {self.levels}")


@dataclass(frozen=True)
class ValidationParams:
    """Thresholds of the great-expectations gate."""

    max_abs_log_return: float = 0.25  # per bar; larger moves are 'absurd jumps'
    max_abs_funding_rate: float = 0.05  # per funding interval, as a fraction
    funding_interval_hours: int = 8
    funding_time_tolerance_ms: int = 60_000  # exchanges stamp funding a few ms after the hour
    examples: int = 5  # how many offending rows a failure report shows

    def validate(self) -> None:
        if self.max_abs_log_return <= 0 or self.max_abs_funding_rate <= 0:
            raise ConfigError("validation thresholds must be > 0")
        if self.funding_interval_hours <= 0:
            raise ConfigError("validation.funding_interval_hours must be > 0")


@dataclass(frozen=True)
class SnapshotParams:
    """Market snapshots rebuilt from stored candles, funding and books (issue 3, step 1)."""

    interval_minutes: int = 5
    btc_base: str = "BTC"
    regime_lookback_hours: int = 72  # BTC trailing return window for the regime
    bull_threshold: float = 0.03  # trailing return above -> "Bull"
    bear_threshold: float = -0.03  # trailing return below -> "Bear"; between -> "Ranging"
    book_max_age_minutes: int = 60  # older book snapshots are ignored (volume proxy instead)
    proxy_depth_fraction: float = 0.001  # proxy depth = this fraction of 24 h USD volume
    proxy_spread_bps: float = 2.0  # proxy spread when no book: this floor, widened by volatility

    def validate(self) -> None:
        for name in ("interval_minutes", "regime_lookback_hours", "book_max_age_minutes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"snapshots.{name} must be > 0, got {getattr(self, name)}")
        if not self.bear_threshold < self.bull_threshold:
            raise ConfigError("snapshots.bear_threshold must be below snapshots.bull_threshold")
        if self.proxy_depth_fraction <= 0 or self.proxy_spread_bps < 0:
            raise ConfigError("snapshots.proxy_depth_fraction must be > 0 and proxy_spread_bps >= 0")


@dataclass(frozen=True)
class OpportunityParams:
    """Which funding-arbitrage opportunities are detected, and their minimum thresholds."""

    strategies: tuple[str, ...] = ("spot_perp", "cross_exchange")
    allow_short_spot: bool = False  # reverse cash-and-carry (short spot / long perp) on negative funding
    min_fund_apr_pct: float = 5.0  # annualised funding income of the pair, percent
    min_volume_24h_usd: float = 1_000_000.0
    max_bid_ask_spread_pct: float = 0.5
    min_depth_usd: float = 10_000.0
    high_liquidity_depth_usd: float = 250_000.0  # liquidity_status "high" at or above
    medium_liquidity_depth_usd: float = 50_000.0  # "medium" at or above, else "low"

    def validate(self) -> None:
        for s in self.strategies:
            if s not in ("spot_perp", "cross_exchange"):
                raise ConfigError(f"opportunities.strategies: {s!r} is not spot_perp or cross_exchange")
        if not self.strategies:
            raise ConfigError("opportunities.strategies: the list is empty")
        for name in ("min_volume_24h_usd", "max_bid_ask_spread_pct", "min_depth_usd"):
            if getattr(self, name) < 0:
                raise ConfigError(f"opportunities.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SimulateParams:
    """Position simulation: hold durations, size, costs (issue 3, step 3)."""

    hold_hours: tuple[int, ...] = (1, 4, 8, 12, 24, 48, 72, 120, 168)
    position_usd: float = 10_000.0  # notional per leg
    taker_fee_bps: dict[str, float] = field(
        default_factory=lambda: {"binance": 4.0, "binanceusdm": 4.0, "bybit": 5.5, "default": 5.0}
    )
    # Slippage = half the bid-ask spread x a multiplier chosen by position size / book depth:
    # below tiers[0] -> multipliers[0], ..., at or above tiers[-1] -> multipliers[-1].
    slippage_tiers: tuple[float, ...] = (0.01, 0.05, 0.10)
    slippage_multipliers: tuple[float, ...] = (1.0, 1.5, 2.5, 5.0)
    chunk_positions: int = 250_000  # positions per vectorised chunk (bounds memory)

    def validate(self) -> None:
        if not self.hold_hours:
            raise ConfigError("simulate.hold_hours: the list is empty")
        if any(h <= 0 for h in self.hold_hours):
            raise ConfigError(f"simulate.hold_hours must all be > 0, got {list(self.hold_hours)}")
        if self.position_usd <= 0:
            raise ConfigError(f"simulate.position_usd must be > 0, got {self.position_usd}")
        if len(self.slippage_multipliers) != len(self.slippage_tiers) + 1:
            raise ConfigError("simulate.slippage_multipliers needs exactly one more entry than slippage_tiers")
        if list(self.slippage_tiers) != sorted(self.slippage_tiers):
            raise ConfigError("simulate.slippage_tiers must be increasing")
        if any(v < 0 for v in self.taker_fee_bps.values()):
            raise ConfigError("simulate.taker_fee_bps values must be >= 0")
        if self.chunk_positions <= 0:
            raise ConfigError("simulate.chunk_positions must be > 0")

    def fee_bps(self, exchange: str) -> float:
        return self.taker_fee_bps.get(exchange, self.taker_fee_bps.get("default", 5.0))


@dataclass(frozen=True)
class OpportunityModelParams:
    """XGBoost profit / success / hold-duration models, their split, evaluation and sizing."""

    n_estimators: int = 600
    max_depth: int = 6
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 1.0
    early_stopping_rounds: int = 50
    n_jobs: int = 2
    random_state: int = 42
    train_frac: float = 0.6
    valid_frac: float = 0.2  # test = the rest; purge gaps between the three
    purge_hours: float = 0.0  # 0 = the longest simulated hold (the minimum that avoids leakage)
    top_k: int = 20  # opportunities picked per evaluation period by each scorer
    # composite = w_profit * predicted_profit_pct * success_probability / sqrt(hold_hours / 24) ...
    composite_profit_weight: float = 1.0
    composite_success_weight: float = 1.0
    kelly_fraction: float = 0.25  # fractional Kelly multiplier
    kelly_cap: float = 0.2  # never size above this fraction of capital

    def validate(self) -> None:
        for name in ("n_estimators", "max_depth", "early_stopping_rounds", "n_jobs", "top_k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"opportunity_model.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.learning_rate <= 1:
            raise ConfigError(f"opportunity_model.learning_rate must be in (0, 1], got {self.learning_rate}")
        if not (0 < self.train_frac < 1 and 0 < self.valid_frac < 1 and self.train_frac + self.valid_frac < 1):
            raise ConfigError("opportunity_model.train_frac + valid_frac must be < 1 and each in (0, 1)")
        if self.purge_hours < 0:
            raise ConfigError(f"opportunity_model.purge_hours must be >= 0, got {self.purge_hours}")
        if not (0 < self.kelly_fraction <= 1 and 0 < self.kelly_cap <= 1):
            raise ConfigError("opportunity_model.kelly_fraction and kelly_cap must be in (0, 1]")


@dataclass(frozen=True)
class PriceParams:
    """The price-model branch: which stored 1-minute series it learns from, horizon and split (issue 4)."""

    exchange: str = "binance"  # stored exchange name (synthetic names or ccxt ids)
    symbol: str = "BTC/USDT:USDT"  # unified symbol of the stored series
    horizon_minutes: int = 10  # LightGBM target: log return over the next horizon_minutes
    train_frac: float = 0.7
    valid_frac: float = 0.15  # test = the rest; purge gaps of one label between the three
    threshold_bps: float = 8.0  # the rule scored in the metrics: enter when |predicted return| > threshold

    def validate(self) -> None:
        if not self.exchange or not self.symbol:
            raise ConfigError("price.exchange and price.symbol must be set")
        if self.horizon_minutes <= 0:
            raise ConfigError(f"price.horizon_minutes must be > 0, got {self.horizon_minutes}")
        if not (0 < self.train_frac < 1 and 0 < self.valid_frac < 1 and self.train_frac + self.valid_frac < 1):
            raise ConfigError("price.train_frac + valid_frac must be < 1 and each in (0, 1)")
        if self.threshold_bps < 0:
            raise ConfigError(f"price.threshold_bps must be >= 0, got {self.threshold_bps}")


@dataclass(frozen=True)
class PriceLgbmParams:
    """LightGBM forward-return model hyperparameters (the issue's defaults)."""

    num_leaves: int = 64
    max_depth: int = 8
    n_estimators: int = 1000
    learning_rate: float = 0.03
    subsample: float = 0.8
    subsample_freq: int = 1  # LightGBM bags only when this is > 0
    early_stopping_rounds: int = 50
    n_jobs: int = 2
    random_state: int = 42

    def validate(self) -> None:
        for name in ("num_leaves", "n_estimators", "early_stopping_rounds", "n_jobs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"price_lgbm.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.learning_rate <= 1:
            raise ConfigError(f"price_lgbm.learning_rate must be in (0, 1], got {self.learning_rate}")
        if not 0 < self.subsample <= 1:
            raise ConfigError(f"price_lgbm.subsample must be in (0, 1], got {self.subsample}")


@dataclass(frozen=True)
class PriceKerasParams:
    """Keras CNN+LSTM price models: CPU budget, training and the optional sentiment table."""

    window_bars: int = 120
    epochs: int = 3
    batch_size: int = 128
    max_windows: int = 4000  # the last N training windows (CPU budget on 2 cores)
    max_eval_windows: int = 2000  # evenly spaced validation / test windows
    learning_rate: float = 0.001
    patience: int = 2  # early stopping on the validation loss; 0 = off
    seed: int = 42
    # "synthetic": a seeded table derived from past returns only (the embedded default; no future information);
    # "none": no table (only the price-only model is trained); anything else: a Parquet / CSV path.
    sentiment: str = "synthetic"
    sentiment_max_age_minutes: int = 60  # older readings count as missing

    def validate(self) -> None:
        for name in ("window_bars", "epochs", "batch_size", "max_windows", "max_eval_windows", "seed"):
            if getattr(self, name) <= 0 and name != "seed":
                raise ConfigError(f"price_keras.{name} must be > 0, got {getattr(self, name)}")
        if self.window_bars < 8:
            raise ConfigError(f"price_keras.window_bars must be >= 8, got {self.window_bars}")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"price_keras.learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.patience < 0 or self.sentiment_max_age_minutes <= 0:
            raise ConfigError("price_keras.patience must be >= 0 and sentiment_max_age_minutes > 0")
        if not self.sentiment:
            raise ConfigError("price_keras.sentiment: 'synthetic', 'none' or a path to a sentiment table")


@dataclass(frozen=True)
class RegistryParams:
    """MLflow registry: promotion rule of `cryptoml promote` and of the register stage."""

    # A challenger is promoted when it beats the champion on the same holdout by more than this
    # (in the units of the model's holdout metric; per model name, "default" for the rest).
    margin: dict[str, float] = field(default_factory=lambda: {"default": 0.0})
    # With no champion yet, the first registered version becomes champion (so consumers have a model).
    promote_first: bool = True

    def validate(self) -> None:
        if any(v < 0 for v in self.margin.values()):
            raise ConfigError(f"registry.margin values must be >= 0, got {self.margin}")

    def margin_for(self, name: str) -> float:
        return float(self.margin.get(name, self.margin.get("default", 0.0)))


@dataclass(frozen=True)
class LiveParams:
    """The edge runner (`cryptoml live`) and the prediction API (`cryptoml serve`)."""

    exchange: str = "binanceusdm"  # ccxt id the runner follows
    symbols: tuple[str, ...] = ("BTC/USDT:USDT",)
    models_dir: str = "models"  # bundles folder (used unless registry_url is set)
    registry_url: str = ""  # MLflow tracking server (http://host:port): follow the `champion` alias over REST
    model_poll_seconds: float = 60.0  # how often the runner checks for a new champion / changed bundles
    shadow: bool = True  # run the `challenger` (or models_dir/<name>.challenger) in a shadow slot
    state_path: str = "state/live.sqlite"
    buffer_hours: float = 48.0  # rolling window of 1-minute bars kept in memory (48-72 h)
    poll_seconds: float = 5.0  # how often closed candles are polled
    retry_base_seconds: float = 1.0  # reconnect backoff: base * 2^attempt, capped, with jitter
    retry_max_seconds: float = 60.0
    opportunity_scoring: bool = True  # also score funding-arbitrage opportunities from live funding and prices
    trade_model: str = "price_lgbm"  # the price model whose forecast the strategy trades (price_lgbm | price_cnn_lstm)
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_max_batch: int = 256

    def validate(self) -> None:
        check_exchange_id(self.exchange, "live.exchange")
        if not self.symbols:
            raise ConfigError("live.symbols: the list is empty")
        if not 1 <= self.buffer_hours <= 24 * 7:
            raise ConfigError(f"live.buffer_hours must be in [1, 168], got {self.buffer_hours}")
        for name in ("model_poll_seconds", "poll_seconds", "retry_base_seconds", "retry_max_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"live.{name} must be > 0, got {getattr(self, name)}")
        if self.trade_model not in ("price_lgbm", "price_cnn_lstm"):
            raise ConfigError(f"live.trade_model must be 'price_lgbm' or 'price_cnn_lstm', got {self.trade_model!r}")
        if not 0 < self.api_port < 65536 or self.api_max_batch <= 0:
            raise ConfigError("live.api_port must be in 1..65535 and live.api_max_batch > 0")


def _finite(x: Any) -> bool:
    if type(x) is float or type(x) is int:  # fast path: ABC isinstance checks dominate a per-bar call
        return math.isfinite(x)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class StrategyParams:
    """Thresholds and risk limits of the rule set (``strategy`` section of params.yaml)."""

    entry_bps: float = 8.0  # enter long above +entry_bps predicted forward return, short below -entry_bps
    exit_reversal_bps: float = 4.5  # exit a long below -this, a short above +this
    stop_loss_pct: float = 1.0  # percent of the entry price
    take_profit_pct: float = 3.0  # percent of the entry price
    cooldown_minutes: float = 3.0  # no new entry until this long after an exit (bar-close times)
    kill_switch_drawdown_pct: float = 3.0  # percent below the UTC day's starting equity
    base_capital: float = 10_000.0  # starting cash of the account (quote currency, USD(T))
    # Notional of a new position as a fraction of current equity. 1.0 = fully invested, no leverage: with the
    # 1 % stop a stopped trade costs about 1 % of equity plus fees, so the 3 % kill switch allows ~3 losers a day.
    position_fraction: float = 1.0
    max_bar_age_seconds: float = 150.0  # no NEW entries when now - bar close exceeds this
    allow_short: bool = True

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field (``strategy.<field>``)."""
        for name in ("entry_bps", "exit_reversal_bps", "cooldown_minutes"):
            if not _finite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"strategy.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("stop_loss_pct", "take_profit_pct", "base_capital", "max_bar_age_seconds"):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"strategy.{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.stop_loss_pct >= 100:
            raise ConfigError(f"strategy.stop_loss_pct must be < 100, got {self.stop_loss_pct!r}")
        if not _finite(self.kill_switch_drawdown_pct) or not 0 < self.kill_switch_drawdown_pct <= 100:
            raise ConfigError(
                f"strategy.kill_switch_drawdown_pct must be in (0, 100], got {self.kill_switch_drawdown_pct!r}"
            )
        if not _finite(self.position_fraction) or not 0 < self.position_fraction <= 10:
            raise ConfigError(f"strategy.position_fraction must be in (0, 10], got {self.position_fraction!r}")
        if not isinstance(self.allow_short, bool):
            raise ConfigError(f"strategy.allow_short must be true or false, got {self.allow_short!r}")


@dataclass(frozen=True)
class PaperBrokerParams:
    """Costs and fill assumptions of the paper broker (a flat section of params.yaml, e.g. ``broker``)."""

    taker_fee_bps: float = 4.0  # market, stop, take-profit and marketable limit fills (Binance USDⓈ-M taker)
    maker_fee_bps: float = 2.0  # resting limit fills
    limit_fill_probability: float = 0.5  # chance a resting limit fills on a bar that trades through it
    seed: int = 0
    spread_pct: float = 0.01  # assumed bid-ask spread in percent of price when no book is passed (1 bp)
    depth_usd: float = 250_000.0  # assumed top-of-book depth (both sides, USD) when no book is passed
    book_exhausted_penalty_bps: float = 50.0  # beyond the book's last level: last price worsened by this

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field (``broker.<field>``)."""
        for name in ("taker_fee_bps", "maker_fee_bps", "spread_pct", "book_exhausted_penalty_bps"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ConfigError(f"broker.{name} must be a finite number >= 0, got {value!r}")
        if not _finite(self.depth_usd) or self.depth_usd <= 0:
            raise ConfigError(f"broker.depth_usd must be a finite number > 0, got {self.depth_usd!r}")
        if not _finite(self.limit_fill_probability) or not 0 <= self.limit_fill_probability <= 1:
            raise ConfigError(f"broker.limit_fill_probability must be in [0, 1], got {self.limit_fill_probability!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"broker.seed must be an integer >= 0, got {self.seed!r}")


def _check_cron(expr: str, where: str) -> None:
    """A five-field cron expression (minute hour day-of-month month day-of-week), checked for shape only."""
    fields = expr.split()
    allowed = set("0123456789*/,-")
    if len(fields) != 5 or any(not f or not set(f) <= allowed for f in fields):
        raise ConfigError(f"{where}: expected a 5-field cron expression like '0 3 * * 1', got {expr!r}")


@dataclass(frozen=True)
class BacktestParams:
    """Walk-forward backtest of the price strategy and of the opportunity scorer (`cryptoml backtest`)."""

    train_hours: float = 48.0  # each refit's training window: the bars before the segment (label-purged)
    test_hours: float = 24.0  # one reporting fold; folds follow each other and never overlap
    retrain_minutes: float = 60.0  # inside a fold the model is refitted on the trailing window this often
    max_days: float = 0.0  # 0 = the whole stored history of price.exchange / price.symbol; else the last N days
    funding: bool = True  # perp funding on open positions, a PnL component of its own
    lgbm_rounds: int = 100  # boosting rounds of each refit (price_lgbm's other settings are reused)
    opportunity: bool = True  # also walk-forward ML vs rule over the simulated opportunities
    opportunity_top_k: int = 20  # picks per UTC day for both scorers
    dsr_trials: int = 0  # strategy variants tried, for the deflated Sharpe (0 = the number of folds)

    def validate(self) -> None:
        for name in ("train_hours", "test_hours", "retrain_minutes"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ConfigError(f"backtest.{name} must be a finite number > 0, got {value!r}")
        if self.retrain_minutes > self.test_hours * 60:
            raise ConfigError(
                f"backtest.retrain_minutes ({self.retrain_minutes}) must not exceed test_hours * 60 "
                f"({self.test_hours * 60})"
            )
        if not _finite(self.max_days) or self.max_days < 0:
            raise ConfigError(f"backtest.max_days must be >= 0, got {self.max_days!r}")
        if self.lgbm_rounds < 1 or self.opportunity_top_k < 1 or self.dsr_trials < 0:
            raise ConfigError("backtest.lgbm_rounds and opportunity_top_k must be >= 1, dsr_trials >= 0")


@dataclass(frozen=True)
class DriftParams:
    """Drift and performance triggers of the `drift_check` flow (reads the runner's state file)."""

    psi_threshold: float = 0.25  # a feature drifts when its PSI exceeds this
    psi_bins: int = 10  # bins from the reference window's quantiles
    psi_floor: float = 1e-4  # proportion given to an empty bin (keeps the log finite)
    min_samples: int = 500  # fewer recent rows than this: no PSI alarm (calibrated in tests/monitoring)
    # The recent predictions compared with the training window. Consecutive bars share a volatility regime, so
    # a short window of the same market drifts by PSI anyway: on the real BTC month, any-feature false alarms
    # were ~85 % with 24 h windows, ~38 % with 3 days and 0 % with 7 days (tests/monitoring/test_drift.py).
    window_hours: float = 168.0
    rolling_sharpe_min: float = 0.4  # performance trigger: annualised Sharpe of the recent bars below this
    directional_accuracy_min: float = 0.6  # recent sign accuracy of the champion's predictions below this
    accuracy_ratio_min: float = 0.9  # recent accuracy below this times the historical (holdout) one
    min_outcomes: int = 200  # fewer labelled predictions than this: no performance alarm

    def validate(self) -> None:
        if not _finite(self.psi_threshold) or self.psi_threshold <= 0:
            raise ConfigError(f"drift.psi_threshold must be > 0, got {self.psi_threshold!r}")
        if self.psi_bins < 2:
            raise ConfigError(f"drift.psi_bins must be >= 2, got {self.psi_bins}")
        if not _finite(self.psi_floor) or not 0 < self.psi_floor < 0.1:
            raise ConfigError(f"drift.psi_floor must be in (0, 0.1), got {self.psi_floor!r}")
        if self.min_samples < self.psi_bins or self.min_outcomes < 1:
            raise ConfigError("drift.min_samples must be >= psi_bins and drift.min_outcomes >= 1")
        if not _finite(self.window_hours) or self.window_hours <= 0:
            raise ConfigError(f"drift.window_hours must be > 0, got {self.window_hours!r}")
        if not 0 < self.directional_accuracy_min < 1 or not 0 < self.accuracy_ratio_min <= 1:
            raise ConfigError("drift.directional_accuracy_min must be in (0, 1), accuracy_ratio_min in (0, 1]")


@dataclass(frozen=True)
class RetrainParams:
    """Drift- or schedule-triggered retraining with a shadow period before promotion (the `retrain` flow)."""

    families: tuple[str, ...] = ("price_lgbm",)  # model families retrained (export families of `cryptoml export`)
    window_days: float = 30.0  # rolling training window: the newest N days of data
    backfill: bool = True  # fetch the newest data first (the configured market source)
    shadow_hours: float = 24.0  # the challenger runs in the runner's shadow slot at least this long
    min_shadow_predictions: int = 500  # labelled shadow predictions needed before a comparison counts
    auto_promote: bool = False  # promote a better challenger by itself; false = a person moves the alias

    def validate(self) -> None:
        known = ("opportunity", "price_lgbm", "price_keras")
        if not self.families or any(f not in known for f in self.families):
            raise ConfigError(f"retrain.families: choose from {list(known)}, got {list(self.families)}")
        for name in ("window_days", "shadow_hours"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ConfigError(f"retrain.{name} must be a finite number > 0, got {value!r}")
        if self.min_shadow_predictions < 1:
            raise ConfigError(f"retrain.min_shadow_predictions must be >= 1, got {self.min_shadow_predictions}")


@dataclass(frozen=True)
class OrchestrationParams:
    """Prefect deployments (schedules) and the task runner that fans work out."""

    task_runner: str = "local"  # local | dask
    dask_address: str = ""  # an existing scheduler (tcp://host:8786); "" = a LocalCluster on 127.0.0.1
    dask_workers: int = 2  # LocalCluster size (one thread each)
    retrain_cron: str = "0 3 * * 1"  # weekly retrain: Monday 03:00
    backfill_cron: str = "0 * * * *"  # hourly incremental backfill
    drift_cron: str = "*/15 * * * *"  # drift_check every 15 minutes
    shadow_review_cron: str = "30 * * * *"  # challenger vs champion on the shadow predictions, hourly
    timezone: str = "UTC"

    def validate(self) -> None:
        if self.task_runner not in ("local", "dask"):
            raise ConfigError(f"orchestration.task_runner must be 'local' or 'dask', got {self.task_runner!r}")
        if self.dask_address and not self.dask_address.startswith(("tcp://", "tls://", "inproc://", "ws://")):
            raise ConfigError(f"orchestration.dask_address must look like tcp://host:port, got {self.dask_address!r}")
        if self.dask_workers < 1:
            raise ConfigError(f"orchestration.dask_workers must be >= 1, got {self.dask_workers}")
        for name in ("retrain_cron", "backfill_cron", "drift_cron", "shadow_review_cron"):
            _check_cron(getattr(self, name), f"orchestration.{name}")
        if not self.timezone:
            raise ConfigError("orchestration.timezone: empty")


@dataclass(frozen=True)
class Params:
    market: MarketParams = field(default_factory=MarketParams)
    fetch: FetchParams = field(default_factory=FetchParams)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    collect: CollectParams = field(default_factory=CollectParams)
    validation: ValidationParams = field(default_factory=ValidationParams)
    snapshots: SnapshotParams = field(default_factory=SnapshotParams)
    opportunities: OpportunityParams = field(default_factory=OpportunityParams)
    simulate: SimulateParams = field(default_factory=SimulateParams)
    opportunity_model: OpportunityModelParams = field(default_factory=OpportunityModelParams)
    price: PriceParams = field(default_factory=PriceParams)
    price_lgbm: PriceLgbmParams = field(default_factory=PriceLgbmParams)
    price_keras: PriceKerasParams = field(default_factory=PriceKerasParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    strategy: StrategyParams = field(default_factory=StrategyParams)
    broker: PaperBrokerParams = field(default_factory=PaperBrokerParams)
    live: LiveParams = field(default_factory=LiveParams)
    backtest: BacktestParams = field(default_factory=BacktestParams)
    drift: DriftParams = field(default_factory=DriftParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)
    orchestration: OrchestrationParams = field(default_factory=OrchestrationParams)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, path)  # type: ignore[arg-type]
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} does not fit {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, datetime):
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[Any], data: Mapping[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"unknown key {where!r}{hint} (valid keys here: {valid})")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def params_from_dict(data: Mapping[str, Any] | None) -> Params:
    """Build and validate :class:`Params` from a mapping shaped like params.yaml."""
    params: Params = _build(Params, data or {}, "")
    params.validate()
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load params.yaml (a missing file means all defaults) into validated frozen dataclasses."""
    p = Path(path)
    if not p.exists():
        return params_from_dict({})
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return params_from_dict(data)


def replace_section(params: Params, section: str, **changes: Any) -> Params:
    """A copy of ``params`` with fields of one section changed (CLI overrides), re-validated."""
    current = getattr(params, section)
    data = dataclasses.asdict(current)
    data.update({k: v for k, v in changes.items() if v is not None})
    new_section = _build(type(current), data, section)
    out = dataclasses.replace(params, **{section: new_section})
    out.validate()
    return out
