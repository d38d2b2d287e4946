"""The files source: real CSV / Parquet / Feather layouts import into the store schema; bad input fails clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryptoml.errors import ConfigError, DataValidationError
from cryptoml.market.files import (
    detect_layout,
    import_funding,
    import_ohlcv,
    read_table_file,
    symbol_key,
    to_epoch_ms,
)
from cryptoml.market.store import SCHEMAS

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
BTC_1M = "binance_spot_btcusdt_1m_20230417-20230517.parquet"
BTC_5M = "binance_spot_btcusdt_5m_20230417-20230517.parquet"
H4_CSV = "binance_spot_4h_bnb-btc-eth-sol-usdt_20231230-20240322.csv"
ALTS = "altcoin-btc_5m_20180110-20180130.parquet"
FUNDING = "funding_rates_binance_8h.csv"
XRP_FEATHERS = {
    "binance_usdm_xrpusdt_5m_20211115-20211121.feather": ("5m", 1999),
    "binance_usdm_xrpusdt_1h_20211117-20211121.feather": ("1h", 100),
    "binance_usdm_xrpusdt_markprice_1h_20211115-20211119.feather": ("1h", 100),
    "binance_usdm_xrpusdt_markprice_8h_20211118-20211218.feather": ("8h", 91),
}


def real(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"real market data {name} not found in {DATA.resolve()} (shared/data absent)")
    return path


def assert_store_schema(df: pd.DataFrame, kind: str) -> None:
    assert list(df.columns) == SCHEMAS[kind].names
    assert df["ts_ms"].dtype == np.int64
    for col in SCHEMAS[kind].names[1:]:
        assert df[col].dtype == np.float64, col
    assert df["ts_ms"].is_monotonic_increasing


def ohlcv_frame(n: int = 6, start_ms: int = 1_700_000_000_000 - 1_700_000_000_000 % 60_000) -> pd.DataFrame:
    close = 100.0 + np.arange(n, dtype=float)
    return pd.DataFrame(
        {
            "ts_ms": start_ms + 60_000 * np.arange(n, dtype=np.int64),
            "open": close - 0.5,
            "high": close + 1.0,
            "low": close - 1.0,
            "close": close,
            "volume": np.full(n, 2.5),
        }
    )


# --- reading by suffix ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet", ".feather"])
def test_read_table_file_by_suffix(tmp_path: Path, suffix: str) -> None:
    df = ohlcv_frame()
    path = tmp_path / f"bars{suffix}"
    if suffix.startswith(".csv"):
        df.to_csv(path, index=False)
    elif suffix == ".parquet":
        df.to_parquet(path)
    else:
        df.to_feather(path)
    pd.testing.assert_frame_equal(read_table_file(path), df, check_dtype=False)


def test_unknown_suffix_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "bars.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"unsupported file type.*\.csv"):
        read_table_file(tmp_path / "bars.json")
    with pytest.raises(ConfigError, match="no such file"):
        read_table_file(tmp_path / "absent.parquet")


# --- the time rule -------------------------------------------------------------------------------

T_MS = 1_637_193_600_017  # 2021-11-18T00:00:00.017Z, a real Binance fundingTime


@pytest.mark.parametrize(
    "values",
    [
        pd.Series(pd.to_datetime([T_MS], unit="ms", utc=True)),  # tz-aware UTC
        pd.Series(pd.to_datetime([T_MS], unit="ms", utc=True).tz_convert("Asia/Tokyo")),  # other zone
        pd.Series(pd.to_datetime([T_MS], unit="ms")),  # naive = UTC
        pd.Series(["2021-11-18T00:00:00.017Z"]),
        pd.Series(["2021-11-18T09:00:00.017+09:00"]),
        pd.Series(["2021-11-18 00:00:00.017"]),  # naive ISO string = UTC
        pd.Series([T_MS]),  # epoch ms
        pd.Series([T_MS / 1000]),  # epoch seconds (float)
        pd.Series([T_MS * 1000]),  # epoch µs (Tardis)
        pd.Series([T_MS * 1_000_000]),  # epoch ns
        pd.Series([str(T_MS)]),  # numeric string
    ],
    ids=["aware", "tokyo", "naive", "iso-z", "iso-offset", "iso-naive", "ms", "s", "us", "ns", "ms-str"],
)
def test_time_columns_become_utc_epoch_ms(values: pd.Series) -> None:
    out = to_epoch_ms(values, "t")
    assert out.dtype == np.int64
    assert out.tolist() == [T_MS]


def test_epoch_seconds_detected_by_magnitude() -> None:
    assert to_epoch_ms(pd.Series([1_600_000_000, 1_600_000_060]), "t").tolist() == [
        1_600_000_000_000,
        1_600_000_060_000,
    ]


def test_bad_time_values_name_the_column() -> None:
    with pytest.raises(DataValidationError, match=r"'when'.*'yesterday'"):
        to_epoch_ms(pd.Series(["2021-11-18T00:00:00Z", "yesterday"]), "when")
    with pytest.raises(DataValidationError, match=r"'when' has 1 null"):
        to_epoch_ms(pd.Series([1.0, None]), "when")


def test_symbol_key_matches_exchange_and_unified_names() -> None:
    assert symbol_key("XRP/USDT:USDT") == symbol_key("XRPUSDT") == "XRPUSDT"
    assert symbol_key("BTC/USD:BTC") == symbol_key("BTCUSD_PERP")
    assert symbol_key("eth-btc") == symbol_key("ETH/BTC")


# --- real files, no mapping ----------------------------------------------------------------------


def test_btc_1m_month_imports_in_store_schema() -> None:
    df = import_ohlcv(real(BTC_1M), timeframe="1m")
    assert_store_schema(df, "ohlcv")
    assert len(df) == 43_199
    assert df["ts_ms"].iloc[0] == pd.Timestamp("2023-04-17 18:13", tz="UTC").value // 1_000_000
    assert (df["ts_ms"].diff().dropna() == 60_000).all()
    assert detect_layout(read_table_file(real(BTC_1M))).startswith("freqtrade")


def test_wrong_timeframe_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'1m'.*5m apart"):
        import_ohlcv(real(BTC_5M), timeframe="1m")
    with pytest.raises(ConfigError, match=r"'5m'.*1m apart"):
        import_ohlcv(real(BTC_1M), timeframe="5m")


def test_multi_symbol_csv_needs_a_symbol() -> None:
    path = real(H4_CSV)
    with pytest.raises(ConfigError, match=r"4 symbols.*BNB/USDT, BTC/USDT, ETH/USDT, SOL/USDT"):
        import_ohlcv(path)
    sol = import_ohlcv(path, symbol="SOL/USDT", timeframe="4h")
    assert_store_schema(sol, "ohlcv")
    assert len(sol) == 500
    assert sol["ts_ms"].iloc[0] == pd.Timestamp("2023-12-30 08:00", tz="UTC").value // 1_000_000
    pd.testing.assert_frame_equal(import_ohlcv(path, symbol="SOLUSDT"), sol)
    with pytest.raises(ConfigError, match=r"no rows for symbol 'DOGE/USDT'.*SOL/USDT"):
        import_ohlcv(path, symbol="DOGE/USDT")
    assert "open_time" in detect_layout(read_table_file(path))


def test_altcoin_parquet_filters_by_symbol() -> None:
    path = real(ALTS)
    with pytest.raises(ConfigError, match="10 symbols"):
        import_ohlcv(path)
    eth = import_ohlcv(path, symbol="ETH/BTC", timeframe="5m")
    assert_store_schema(eth, "ohlcv")
    assert len(eth) == 5_760
    assert eth["close"].between(0.05, 0.2).all()  # ETH priced in BTC in January 2018


@pytest.mark.parametrize("name", sorted(XRP_FEATHERS))
def test_xrp_feathers_import(name: str) -> None:
    timeframe, rows = XRP_FEATHERS[name]
    df = import_ohlcv(real(name), timeframe=timeframe)
    assert_store_schema(df, "ohlcv")
    assert len(df) == rows
    if "markprice_1h" in name:
        assert df["volume"].isna().all()  # freqtrade's mark-price candles carry no volume


def test_funding_csv_by_exchange_or_unified_symbol() -> None:
    path = real(FUNDING)
    with pytest.raises(ConfigError, match=r"3 symbols.*BTCUSD_PERP, BTSUSDT, XRPUSDT"):
        import_funding(path)
    xrp = import_funding(path, symbol="XRPUSDT")
    assert_store_schema(xrp, "funding")
    assert len(xrp) == 91
    assert xrp["ts_ms"].iloc[0] == 1_637_193_600_017  # Binance's real fundingTime, ms jitter kept
    assert xrp["mark_price"].isna().all()
    pd.testing.assert_frame_equal(import_funding(path, symbol="XRP/USDT:USDT"), xrp)
    assert len(import_funding(path, symbol="BTSUSDT")) == 111
    assert len(import_funding(path, symbol="BTC/USD:BTC")) == 182  # COIN-M BTCUSD_PERP
    with pytest.raises(ConfigError, match="no rows for symbol 'ETHUSDT'"):
        import_funding(path, symbol="ETHUSDT")


def test_freqtrade_funding_feather_needs_the_open_mapping(tmp_path: Path) -> None:
    # Rebuild freqtrade's XRP 8h funding feather (rate stored in `open`) from the real rows.
    rows = pd.read_csv(real(FUNDING)).query("symbol == 'XRPUSDT'")
    rate = rows["funding_rate"].to_numpy()
    ft = pd.DataFrame(
        {
            "date": pd.to_datetime(rows["funding_time_ms"].to_numpy(), unit="ms", utc=True),
            "open": rate,
            "high": rate,
            "low": rate,
            "close": rate,
            "volume": 0.0,
        }
    )
    path = tmp_path / "XRP_USDT_USDT-8h-funding_rate.feather"
    ft.to_feather(path)
    with pytest.raises(DataValidationError, match=r'funding rate column.*"funding_rate": "open"'):
        import_funding(path)
    df = import_funding(path, mapping={"funding_rate": "open"})
    assert_store_schema(df, "funding")
    np.testing.assert_array_equal(df["funding_rate"].to_numpy(), rate)
    assert df["ts_ms"].tolist() == rows["funding_time_ms"].tolist()


# --- generic files with a mapping -----------------------------------------------------------------


def test_generic_csv_with_mapping_and_epoch_seconds(tmp_path: Path) -> None:
    bars = ohlcv_frame()
    raw = pd.DataFrame(
        {
            "timestamp": bars["ts_ms"] // 1000,  # epoch seconds
            "o": bars["open"],
            "h": bars["high"],
            "l": bars["low"],
            "c": bars["close"],
            "vol": bars["volume"],
        }
    ).iloc[::-1]  # unsorted on disk
    path = tmp_path / "bars.csv.gz"
    raw.to_csv(path, index=False)
    mapping = {"ts_ms": "timestamp", "open": "o", "high": "h", "low": "l", "close": "c", "volume": "vol"}
    out = import_ohlcv(path, mapping=mapping, timeframe="1m")
    pd.testing.assert_frame_equal(out, bars)


def test_missing_columns_are_named_with_the_columns_present(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    ohlcv_frame().rename(columns={"volume": "vol"}).to_csv(path, index=False)
    with pytest.raises(DataValidationError, match=r"cannot find volume.*columns present: \['ts_ms'.*'vol'\]"):
        import_ohlcv(path)
    out = import_ohlcv(path, mapping={"volume": "vol"})
    assert out["volume"].tolist() == [2.5] * 6
    with pytest.raises(ConfigError, match=r"no column 'qty'; columns present"):
        import_ohlcv(path, mapping={"volume": "qty"})
    with pytest.raises(ConfigError, match=r"mapping key 'vol' is not a ohlcv store column"):
        import_ohlcv(path, mapping={"vol": "volume"})


def test_non_numeric_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    df = ohlcv_frame().astype({"close": object})
    df.loc[2, "close"] = "n/a?"
    df.to_csv(path, index=False)
    with pytest.raises(DataValidationError, match="column 'close' is not numeric"):
        import_ohlcv(path)


def test_ccxt_funding_layout_keeps_mark_price(tmp_path: Path) -> None:
    path = tmp_path / "funding.parquet"
    pd.DataFrame(
        {
            "symbol": ["BTC/USDT:USDT"] * 2,
            "timestamp": [1_704_067_200_000, 1_704_096_000_000],
            "fundingRate": [0.0001, -0.0002],
            "markPrice": [42_000.5, 42_100.0],
        }
    ).to_parquet(path)
    df = import_funding(path, symbol="BTCUSDT")
    assert_store_schema(df, "funding")
    assert df["mark_price"].tolist() == [42_000.5, 42_100.0]
    assert detect_layout(read_table_file(path)).startswith("ccxt funding")
