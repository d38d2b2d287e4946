"""The embedded synthetic market: seeded 1m candles, 8h funding and L2 books, the default offline source.

Model (all times UTC, one step = one minute; "instant i" = ``start + i`` minutes, bar i spans
instants i..i+1, so a bar's open is the previous bar's close):

- a latent **fair** log price per base = ``beta`` x a common market factor + an idiosyncratic part,
  each driven by Student-t shocks with GARCH(1,1) variance, times an intraday activity profile and a
  market-wide calm/turbulent volatility regime (fat tails, volatility clustering, cross-asset beta);
- each venue's **spot** price = fair x (1 + dev), dev a fast mean-reverting (OU) deviation of a few
  bps per exchange x base; the **perp** = spot x (1 + basis), basis an OU process per exchange x base
  pulled towards a per-base sentiment regime (normal / hot / cold) whose strength differs by exchange;
- **funding** at each ``funding_interval_hours`` boundary = clamp(1e-4 + basis averaged over the
  preceding interval + noise, +-0.75 %), so it follows the basis and differs across exchanges;
- **volume** (base currency per bar) follows the activity profile and rises with |return|;
- **books** every ``book_interval_minutes`` around the venue price at that instant, see
  :mod:`cryptoml.market.synthetic_book`.

Every series draws from its own child stream ``SeedSequence(seed, spawn_key=crc32 of its name)``, so
a series does not change when exchanges or bases are added, and the same seed gives the same bytes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryptoml.config import SyntheticParams, parse_utc_ms
from cryptoml.errors import ConfigError
from cryptoml.market.store import DatasetKey, ParquetStore
from cryptoml.market.synthetic_book import BookShape, book_frame, decimals_of

GENERATOR = "cryptoml.market.synthetic/1"
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MIN = 1440


@dataclass(frozen=True)
class AssetProfile:
    """Static traits of one base asset; volatilities are per 1m bar at nominal (calm, average-hour) level."""

    start_price: float  # quote currency at params.start
    tick: float  # price increment
    lot: float  # volume / size increment, base currency
    beta: float  # loading on the market factor
    idio_sigma: float  # sd of the idiosyncratic 1m log return
    volume_per_min: float  # mean spot volume on a liquidity-1.0 venue, base currency per minute
    spread_bps: float  # nominal perp spread on a liquidity-1.0 venue


ASSETS: dict[str, AssetProfile] = {
    "BTC": AssetProfile(42_000.0, 0.01, 1e-5, 1.0, 0.00015, 30.0, 0.5),
    "ETH": AssetProfile(2_300.0, 0.01, 1e-4, 1.1, 0.00045, 400.0, 0.7),
    "SOL": AssetProfile(100.0, 0.001, 0.01, 1.4, 0.0009, 4_000.0, 1.5),
    "BNB": AssetProfile(310.0, 0.01, 0.001, 0.9, 0.0005, 300.0, 1.5),
    "XRP": AssetProfile(0.6, 0.0001, 0.1, 1.2, 0.0008, 200_000.0, 1.5),
    "DOGE": AssetProfile(0.09, 0.00001, 1.0, 1.3, 0.001, 1_000_000.0, 2.0),
}
# Relative size of each venue (volume and book depth scale with it; spreads with its -0.3 power).
EXCHANGE_LIQUIDITY = {"binance": 1.0, "binanceusdm": 1.0, "bybit": 0.55, "okx": 0.6}
DEFAULT_LIQUIDITY = 0.4

# Mean activity by UTC hour (volume x, volatility x sqrt): Asian night trough, US-open peak.
HOURLY_ACTIVITY = np.array(
    [0.95, 0.9, 0.8, 0.7, 0.62, 0.65, 0.75, 0.85, 0.95, 0.95, 0.95, 1.0,
     1.15, 1.3, 1.45, 1.5, 1.4, 1.3, 1.2, 1.15, 1.1, 1.05, 1.0, 0.98]
)  # fmt: skip
HOURLY_ACTIVITY = HOURLY_ACTIVITY / HOURLY_ACTIVITY.mean()

MARKET_SIGMA = 0.00055  # sd of the market factor's 1m log return (~40 %/yr)
T_DOF = 5.0  # Student-t degrees of freedom of every shock (fat tails, finite kurtosis)
SHOCK_CLIP = 15.0  # |standardised shock| cap: keeps a 1m move far below the validation gate
GARCH_ALPHA, GARCH_BETA = 0.06, 0.92  # unit-variance GARCH(1,1); persistence 0.98 ~ 35 min half-life
VOL_REGIME_MULT = (0.8, 1.8)  # calm, turbulent volatility multipliers (market-wide)
VOL_REGIME_MEAN_MIN = (18 * 60, 5 * 60)  # mean regime durations, minutes

# Basis sentiment regimes per base: normal, hot (longs pay), cold (shorts pay).
BASIS_LEVEL = (0.00003, 0.0009, -0.0004)  # basis the OU is pulled towards, fraction of spot
BASIS_REGIME_MEAN_MIN = (3 * DAY_MIN, 30 * 60, 18 * 60)
BASIS_NEXT = ((0.0, 0.65, 0.35), (1.0, 0.0, 0.0), (1.0, 0.0, 0.0))  # regime transition probabilities
EXCHANGE_INTENSITY_SIGMA = 0.5  # lognormal sd of an exchange's regime strength, redrawn per episode
BASIS_HALF_LIFE_MIN = 90.0
BASIS_NOISE_SD = 0.0001  # stationary sd of the basis around its regime level
DEV_HALF_LIFE_MIN = 5.0
DEV_SD = 0.0002  # stationary sd of a venue's deviation from fair (2 bps)

FUNDING_BASE_RATE = 0.0001  # the usual 0.01 % per interval
FUNDING_BASIS_LOADING = 1.0
FUNDING_NOISE_SD = 0.00003
FUNDING_CAP = 0.0075

PERP_VOLUME_MULT = 2.5  # perps trade more than spot
VOLUME_RETURN_LOADING = 0.65  # share of volume that scales with |return| / nominal sigma
VOLUME_NOISE_SIGMA = 0.5
SPOT_SPREAD_MULT = 1.3  # spot books are a little wider than perp books
LEVEL_GAP_FRACTION = 0.6  # gap between book levels, as a fraction of the spread
TOP_SIZE_MINUTES = 0.05  # best-level size = this many minutes of the venue's mean volume
REALISED_VOL_WINDOW_MIN = 30  # books react to the realised volatility of the last 30 bars


@dataclass(frozen=True)
class SyntheticDataset:
    """One generated dataset, ready for :meth:`ParquetStore.write`."""

    key: DatasetKey
    frame: pd.DataFrame  # columns exactly store.SCHEMAS[key.kind].names, sorted by key
    metadata: dict[str, str]


def _rng(seed: int, *name: str) -> np.random.Generator:
    """The child stream of one named series (independent of every other name)."""
    key = tuple(zlib.crc32(part.encode()) for part in name)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def _linear_recursion(coef: np.ndarray, drive: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """x[:, 0] = x0, x[:, t] = coef[:, t] * x[:, t-1] + drive[:, t]; shapes (series, time).

    One Python loop over time, vectorised across all series.
    """
    coef_t = np.ascontiguousarray(np.broadcast_to(coef, drive.shape).T)
    drive_t = np.ascontiguousarray(drive.T)
    out = np.empty_like(drive_t)
    out[0] = x0
    for t in range(1, len(out)):
        out[t] = coef_t[t] * out[t - 1] + drive_t[t]
    return out.T


def _t_shocks(rng: np.random.Generator, n: int) -> np.ndarray:
    z = rng.standard_t(T_DOF, n) * np.sqrt((T_DOF - 2.0) / T_DOF)  # unit variance
    return np.clip(z, -SHOCK_CLIP, SHOCK_CLIP)


def _regime_path(
    rng: np.random.Generator, n: int, mean_min: tuple[int, ...], nxt: tuple[tuple[float, ...], ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(state, episode number) per minute of a semi-Markov chain with geometric durations."""
    states, episodes = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    share = np.asarray(mean_min, dtype=np.float64)
    state = int(rng.choice(len(mean_min), p=share / share.sum()))
    pos, episode = 0, 0
    while pos < n:
        length = int(rng.geometric(1.0 / mean_min[state]))
        states[pos : pos + length], episodes[pos : pos + length] = state, episode
        pos, episode = pos + length, episode + 1
        state = int(rng.choice(len(mean_min), p=nxt[state]))
    return states, episodes


def _fair_returns(seed: int, bases: tuple[str, ...], n: int, hours: np.ndarray) -> tuple[np.ndarray, ...]:
    """(1m log returns, their conditional sd) of each base's fair price, both shaped (bases, n)."""
    regime, _ = _regime_path(_rng(seed, "vol-regime"), n, VOL_REGIME_MEAN_MIN, ((0.0, 1.0), (1.0, 0.0)))
    vol_mult = np.sqrt(HOURLY_ACTIVITY[hours]) * np.asarray(VOL_REGIME_MULT)[regime]
    z = np.stack([_t_shocks(_rng(seed, "market"), n)] + [_t_shocks(_rng(seed, "fair", b), n) for b in bases])
    coef = np.empty_like(z)
    coef[:, 1:] = GARCH_ALPHA * z[:, :-1] ** 2 + GARCH_BETA
    drive = np.full_like(z, 1.0 - GARCH_ALPHA - GARCH_BETA)
    h = _linear_recursion(coef, drive, np.ones(len(z)))  # GARCH variance, unconditional mean 1
    beta = np.array([ASSETS[b].beta for b in bases])[:, None]
    idio = np.array([ASSETS[b].idio_sigma for b in bases])[:, None]
    market_part = beta * MARKET_SIGMA * np.sqrt(h[0]) * z[0]
    returns = vol_mult * (market_part + idio * np.sqrt(h[1:]) * z[1:])
    sigma = vol_mult * np.sqrt((beta * MARKET_SIGMA) ** 2 * h[0] + idio**2 * h[1:])
    return returns, sigma


def _ou(rng: np.random.Generator, n: int, half_life_min: float, sd: float, level: np.ndarray) -> np.ndarray:
    """OU path over n instants pulled towards ``level`` (per instant) with stationary sd ``sd``."""
    phi = 0.5 ** (1.0 / half_life_min)
    drive = (1.0 - phi) * level + rng.normal(0.0, sd * np.sqrt(1.0 - phi**2), n)
    x0 = np.array([level[0] + rng.normal(0.0, sd)])
    return _linear_recursion(np.array([[phi]]), drive[None, :], x0)[0]


def _basis_paths(seed: int, exchanges: tuple[str, ...], base: str, n: int) -> dict[str, np.ndarray]:
    """Perp basis (fraction of spot) per exchange at every instant, sharing the base's regime."""
    state, episode = _regime_path(_rng(seed, "basis-regime", base), n, BASIS_REGIME_MEAN_MIN, BASIS_NEXT)
    out = {}
    for ex in exchanges:
        rng = _rng(seed, "basis", ex, base)
        intensity = rng.lognormal(0.0, EXCHANGE_INTENSITY_SIGMA, int(episode[-1]) + 1)
        level = np.asarray(BASIS_LEVEL)[state] * intensity[episode]
        out[ex] = _ou(rng, n, BASIS_HALF_LIFE_MIN, BASIS_NOISE_SD, level)
    return out


def _round_to(x: np.ndarray, step: float) -> np.ndarray:
    return np.round(np.maximum(np.rint(x / step), 1.0) * step, decimals_of(step))


def _ohlcv(
    rng: np.random.Generator,
    ts_ms: np.ndarray,
    log_price: np.ndarray,
    sigma: np.ndarray,
    fair_returns: np.ndarray,
    nominal_sigma: float,
    activity: np.ndarray,
    volume_per_min: float,
    asset: AssetProfile,
) -> pd.DataFrame:
    """1m bars from a venue's log price at the n+1 instants; high/low from a Brownian bridge."""
    n = len(ts_ms)
    price = _round_to(np.exp(log_price), asset.tick)
    open_, close = price[:-1], price[1:]
    d = np.log(close / open_)
    # Extremes of a Brownian bridge from 0 to d with variance sigma^2: P(max > m) = exp(-2m(m-d)/sigma^2).
    up = 0.5 * (d + np.sqrt(d**2 - 2.0 * sigma**2 * np.log1p(-rng.random(n))))
    down = 0.5 * (d - np.sqrt(d**2 - 2.0 * sigma**2 * np.log1p(-rng.random(n))))
    high = np.maximum(np.maximum(open_, close), _round_to(open_ * np.exp(up), asset.tick))
    low = np.minimum(np.minimum(open_, close), _round_to(open_ * np.exp(down), asset.tick))
    load = VOLUME_RETURN_LOADING
    intensity = (1.0 - load) + load * np.abs(fair_returns) / (nominal_sigma * np.sqrt(2.0 / np.pi))
    noise = rng.lognormal(-0.5 * VOLUME_NOISE_SIGMA**2, VOLUME_NOISE_SIGMA, n)
    volume = _round_to(volume_per_min * activity * intensity * noise, asset.lot)
    return pd.DataFrame({"ts_ms": ts_ms, "open": open_, "high": high, "low": low, "close": close, "volume": volume})


def _aligned_instants(start_ms: int, n: int, every_ms: int) -> np.ndarray:
    """Indices i < n of the instants start + i min that are whole multiples of ``every_ms`` (UTC)."""
    first_ms = -(-start_ms // every_ms) * every_ms
    return (np.arange(first_ms, start_ms + n * MINUTE_MS, every_ms, dtype=np.int64) - start_ms) // MINUTE_MS


def _funding(
    rng: np.random.Generator, idx: np.ndarray, start_ms: int, basis: np.ndarray, mark: np.ndarray, every: int
) -> pd.DataFrame:
    """Funding stamped at instants ``idx``: follows the basis averaged over the preceding interval."""
    csum = np.concatenate([[0.0], np.cumsum(basis)])
    lo = np.maximum(idx - every, 0)
    mean_basis = np.where(idx > lo, (csum[idx] - csum[lo]) / np.maximum(idx - lo, 1), basis[idx])
    raw = FUNDING_BASE_RATE + FUNDING_BASIS_LOADING * mean_basis + rng.normal(0.0, FUNDING_NOISE_SD, len(idx))
    rate = np.round(np.clip(raw, -FUNDING_CAP, FUNDING_CAP), 8)
    ts_ms = start_ms + idx.astype(np.int64) * MINUTE_MS
    return pd.DataFrame({"ts_ms": ts_ms, "funding_rate": rate, "mark_price": mark[idx]})


def _check(params: SyntheticParams) -> int:
    """Validate what the generator needs beyond ``params.validate()``; returns start in UTC ms."""
    params.validate()
    unknown = [b for b in params.bases if b not in ASSETS]
    if unknown:
        raise ConfigError(f"synthetic.bases: no synthetic profile for {unknown}; known: {sorted(ASSETS)}")
    for name in ("bases", "exchanges"):
        values = getattr(params, name)
        if len(set(values)) != len(values):
            raise ConfigError(f"synthetic.{name} has duplicates: {list(values)}")
    if params.seed < 0:
        raise ConfigError(f"synthetic.seed must be >= 0, got {params.seed}")
    if not params.quote:
        raise ConfigError("synthetic.quote must not be empty")
    start_ms = parse_utc_ms(params.start, "synthetic.start")
    if start_ms % MINUTE_MS:
        raise ConfigError(f"synthetic.start ({params.start}) must fall on a whole UTC minute")
    return start_ms


def generate_market(params: SyntheticParams) -> list[SyntheticDataset]:
    """Every dataset of the synthetic market, in a deterministic order.

    Per exchange, then per base: spot 1m OHLCV, perp 1m OHLCV, perp funding, spot book, perp book.
    Raises :class:`ConfigError` for an unknown base, duplicates, a negative seed or an unaligned start.
    """
    start_ms = _check(params)
    seed, n = params.seed, params.days * DAY_MIN
    ts_ms = start_ms + np.arange(n, dtype=np.int64) * MINUTE_MS
    hours = (ts_ms // HOUR_MS) % 24
    activity = HOURLY_ACTIVITY[hours]
    returns, sigma = _fair_returns(seed, params.bases, n, hours)
    funding_idx = _aligned_instants(start_ms, n, params.funding_interval_hours * HOUR_MS)
    book_idx = _aligned_instants(start_ms, n, params.book_interval_minutes * MINUTE_MS)
    meta = {"source": "synthetic", "synthetic": "true", "seed": str(seed), "generator": GENERATOR}

    by_base = {}
    for b, base in enumerate(params.bases):
        asset = ASSETS[base]
        log_fair = np.log(asset.start_price) + np.concatenate([[0.0], np.cumsum(returns[b])])
        nominal = float(np.hypot(asset.beta * MARKET_SIGMA, asset.idio_sigma))
        # Realised vol of the bars before each book instant (the model's sigma where there are none yet).
        csum = np.concatenate([[0.0], np.cumsum(returns[b] ** 2)])
        count = np.minimum(book_idx, REALISED_VOL_WINDOW_MIN)
        window_var = (csum[book_idx] - csum[book_idx - count]) / np.maximum(count, 1)
        rv = np.where(count > 0, window_var, sigma[b, book_idx] ** 2)
        basis = _basis_paths(seed, params.exchanges, base, n + 1)
        by_base[base] = (asset, log_fair, nominal, np.sqrt(rv) / nominal, basis)

    out: list[SyntheticDataset] = []
    for ex in params.exchanges:
        liquidity = EXCHANGE_LIQUIDITY.get(ex, DEFAULT_LIQUIDITY)
        for b, base in enumerate(params.bases):
            asset, log_fair, nominal, vol_ratio, basis = by_base[base]
            dev = _ou(_rng(seed, "dev", ex, base), n + 1, DEV_HALF_LIFE_MIN, DEV_SD, np.zeros(n + 1))
            spot_log = log_fair + np.log1p(dev)
            venues = {
                f"{base}/{params.quote}": (spot_log, 1.0, SPOT_SPREAD_MULT),
                f"{base}/{params.quote}:{params.quote}": (spot_log + np.log1p(basis[ex]), PERP_VOLUME_MULT, 1.0),
            }
            books = []
            for symbol, (log_price, volume_mult, spread_mult) in venues.items():
                volume_per_min = asset.volume_per_min * liquidity * volume_mult
                bars = _ohlcv(
                    _rng(seed, "bars", ex, symbol), ts_ms, log_price, sigma[b], returns[b], nominal,
                    activity, volume_per_min, asset,
                )  # fmt: skip
                out.append(SyntheticDataset(DatasetKey(ex, symbol, "ohlcv", "1m"), bars, dict(meta)))
                if ":" in symbol:
                    mark = np.concatenate([bars["open"].to_numpy(), bars["close"].to_numpy()[-1:]])
                    rng = _rng(seed, "funding", ex, base)
                    every = params.funding_interval_hours * 60
                    fund = _funding(rng, funding_idx, start_ms, basis[ex], mark, every)
                    out.append(SyntheticDataset(DatasetKey(ex, symbol, "funding"), fund, dict(meta)))
                shape = BookShape(
                    tick=asset.tick,
                    lot=asset.lot,
                    spread_bps=asset.spread_bps * spread_mult * liquidity**-0.3,
                    level_gap_bps=asset.spread_bps * spread_mult * LEVEL_GAP_FRACTION,
                    top_size=TOP_SIZE_MINUTES * volume_per_min,
                )
                mid = np.exp(log_price[book_idx])
                rng = _rng(seed, "book", ex, symbol)
                frame = book_frame(ts_ms[book_idx], mid, vol_ratio, shape, params.book_levels, rng)
                books.append(SyntheticDataset(DatasetKey(ex, symbol, "book"), frame, dict(meta)))
            out.extend(books)
    return out


def write_market(params: SyntheticParams, store: ParquetStore) -> list[Path]:
    """Generate the synthetic market and write every dataset atomically; returns the file paths."""
    return [store.write(ds.key, ds.frame, ds.metadata) for ds in generate_market(params)]
