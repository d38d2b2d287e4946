"""The HTTP prediction API (``cryptoml serve``): opportunity scores and price forecasts from the ONNX bundles.

Endpoints (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

- ``GET /health``: loaded models (name, kind, version, sha256, registry version), skipped bundle folders
  with their reasons, uptime, limits.
- ``POST /predict``: one opportunity's entry-time fields -> ``predicted_profit_pct``,
  ``success_probability``, ``predicted_hold_hours``, ``composite_score``, ``kelly_fraction``,
  ``model_version`` (see :class:`cryptoml.edge.models.ModelSet` for how the hold is chosen).
- ``POST /predict/batch``: ``{"opportunities": [...]}`` with at most ``max_batch`` items.
- ``POST /predict/price``: recent closed 1-minute bars (and optional sentiment readings) -> forward log
  return, its horizon, and which model answered and why.

Validation happens before any model runs: every number must be finite (the ``NaN`` / ``Infinity``
literals Python's JSON parser accepts are refused) and within documented bounds, numbers are numbers (no
``"1.5"`` strings, no booleans), ``ts_ms`` values are integers (``1.7e12`` is, ``1.5`` is not), enums are
enums, no field may be missing or unknown. Every refusal
is a 4xx whose body names the field: 422 ``{"detail": [{"loc", "field", "msg", "type"}], "message"}``
for bad values and malformed JSON, 413 for a body over ``max_body_bytes``, 400 for a body that cannot
be parsed at all (e.g. nested too deep). 503 means a model the endpoint needs is not loaded.

Imports only fastapi / pydantic / starlette, numpy, onnxruntime and the numpy-only project modules;
uvicorn only inside :func:`serve`.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations at runtime, and the
# request models built inside create_app (their limits are arguments) are not module globals.
import logging
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cryptoml.edge.models import ModelSet
from cryptoml.errors import ConfigError, DataValidationError, ModelContractError
from cryptoml.features.opportunity import REGIMES, STRATEGIES
from cryptoml.features.technical import BAR_MS
from cryptoml.models.sentiment import SENTIMENT_COLUMNS

__all__ = ["MAX_BARS", "MAX_BODY_BYTES", "create_app", "serve"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full batch of 256 opportunities is ~150 KiB, 1440 bars + readings ~600 KiB
MAX_BARS = 1440  # one day of 1-minute bars per price request (the features need 61, the Keras models 120)
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01: a larger epoch-ms value is a unit mistake (us, ns)
MAX_HOLD_HOURS = 8760.0  # one year
MAX_PRICE = 1e9
MAX_AMOUNT = 1e15  # USD amounts and base-currency volumes


class Strategy(StrEnum):
    """Funding-arbitrage strategy of an opportunity (``STRATEGIES`` of the feature code)."""

    spot_perp = "spot_perp"
    cross_exchange = "cross_exchange"


class Regime(StrEnum):
    """BTC market regime at the entry snapshot (``REGIMES`` of the feature code)."""

    Bull = "Bull"
    Bear = "Bear"
    Ranging = "Ranging"


if tuple(Strategy) != STRATEGIES or tuple(Regime) != REGIMES:  # the enums must follow the feature code
    raise ImportError("cryptoml.edge.api: Strategy / Regime enums differ from cryptoml.features.opportunity")

# strict: no "1.5" strings for numbers, no 0/1 for booleans, no fractions for integers; finite numbers only.
_INPUT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_enum_values=True)


def _json_integer(value: Any) -> Any:
    """JSON numbers with no fraction (``1704067200000.0``) are integers, as JSON Schema says; strings,
    booleans and fractional numbers are not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer, got a number with a fraction (or NaN / inf)")
        return int(value)
    return value


_EpochMs = Annotated[Annotated[int, Field(ge=0, le=MAX_TS_MS)], BeforeValidator(_json_integer)]


def _bounded(lo: float, hi: float, doc: str, *, exclusive_low: bool = False) -> Any:
    if exclusive_low:
        return Field(gt=lo, le=hi, description=doc)
    return Field(ge=lo, le=hi, description=doc)


class OpportunityIn(BaseModel):
    """Entry-time fields of one funding-arbitrage opportunity (the feature code's ``INPUT_COLUMNS``).

    Nullable fields must still be sent: ``null`` means unknown and gets the feature code's documented
    substitute (e.g. no depth -> liquidity 0). Units as in :mod:`cryptoml.features.opportunity`.
    """

    model_config = _INPUT

    ts_ms: Annotated[_EpochMs, Field(description="entry snapshot time, epoch ms UTC")]
    strategy: Annotated[Strategy, Field(strict=False)]
    regime: Annotated[Regime, Field(strict=False)]
    fund_apr: Annotated[float, _bounded(-1e6, 1e6, "funding APR of the position, % per year")]
    fund_profit_8h: Annotated[float, _bounded(-1e4, 1e4, "funding profit per 8 h, % of notional")]
    funding_spread: Annotated[float, _bounded(-10.0, 10.0, "funding-rate spread, fraction per 8 h")]
    break_even_hours: Annotated[float, _bounded(-1e9, 1e9, "hours until funding repays the costs")] | None
    funding_spread_avg_24h: Annotated[float, _bounded(-10.0, 10.0, "24 h mean spread, fraction per 8 h")] | None
    funding_spread_avg_3d: Annotated[float, _bounded(-10.0, 10.0, "3-day mean spread, fraction per 8 h")] | None
    spread_volatility_cv: Annotated[float, _bounded(0.0, 1e9, "coefficient of variation of the spread")] | None
    ret_vol_24h: Annotated[float, _bounded(0.0, 10.0, "std of 1-minute log returns over 24 h")] | None
    volume_24h: Annotated[float, _bounded(0.0, MAX_AMOUNT, "24 h volume, USD")] | None
    orderbook_depth_usd: Annotated[float, _bounded(0.0, MAX_AMOUNT, "book depth near the touch, USD")] | None
    bid_ask_spread_pct: Annotated[float, _bounded(0.0, 100.0, "bid-ask spread, % of mid")] | None
    depth_is_proxy: Annotated[bool | None, Field(description="depth estimated from volume, not a book")]
    next_funding_ts_ms: Annotated[_EpochMs | None, Field(description="next funding time, epoch ms UTC")]
    btc_ret_trailing: Annotated[float, _bounded(-10.0, 10.0, "trailing BTC log return")] | None
    hold_hours: Annotated[
        Annotated[float, _bounded(0.0, MAX_HOLD_HOURS, "candidate hold, hours", exclusive_low=True)] | None,
        Field(description="hold to score; omitted or null: the best hold of the grid is chosen"),
    ] = None


class OpportunityOut(BaseModel):
    predicted_profit_pct: float = Field(description="predicted profit over the hold, % of one leg's notional")
    success_probability: float = Field(description="P(the position ends profitable)")
    predicted_hold_hours: float = Field(description="the hold the other fields are for, hours")
    composite_score: float = Field(description="% per sqrt(day), cryptoml.models.scoring.composite_score")
    kelly_fraction: float = Field(description="fractional-Kelly size, fraction of capital")
    hold_choice: Literal["given", "best_composite"]
    hold_model_hours: float | None = Field(description="the hold model's own pick, hours (null without it)")
    hold_model_probability: float | None
    model_version: str = Field(description="name=version of each opportunity model used")


class BatchOut(BaseModel):
    predictions: list[OpportunityOut]
    count: int


class BarIn(BaseModel):
    """One closed 1-minute bar; ``ts_ms`` is its open time."""

    model_config = _INPUT

    ts_ms: _EpochMs
    open: Annotated[float, _bounded(0.0, MAX_PRICE, "price", exclusive_low=True)]
    high: Annotated[float, _bounded(0.0, MAX_PRICE, "price", exclusive_low=True)]
    low: Annotated[float, _bounded(0.0, MAX_PRICE, "price", exclusive_low=True)]
    close: Annotated[float, _bounded(0.0, MAX_PRICE, "price", exclusive_low=True)]
    volume: Annotated[float, _bounded(0.0, MAX_AMOUNT, "volume, base currency")]

    @model_validator(mode="after")
    def _high_not_below_low(self) -> Self:
        if self.high < self.low:
            raise ValueError(f"high {self.high} is below low {self.low}")
        return self


_Reading = Annotated[float, _bounded(-1e9, 1e9, "sentiment value (scale of the producer)")]


class SentimentIn(BaseModel):
    """One sentiment reading; ``ts_ms`` is when it became available (see cryptoml.models.sentiment)."""

    model_config = _INPUT

    ts_ms: _EpochMs
    sentiment_score: _Reading
    sentiment_volume: _Reading
    sentiment_momentum: _Reading
    sentiment_freshness: _Reading
    sentiment_consensus: _Reading
    sentiment_extremes: _Reading
    sentiment_trend: _Reading
    sentiment_volatility: _Reading


def _increasing(ts: list[int], what: str, *, minute_steps: bool) -> None:
    for i in range(1, len(ts)):
        step = ts[i] - ts[i - 1]
        if step <= 0 or (minute_steps and step % BAR_MS):
            need = f"a positive multiple of {BAR_MS} ms" if minute_steps else "strictly"
            raise ValueError(f"{what}[{i}].ts_ms {ts[i]} must follow {what}[{i - 1}].ts_ms {ts[i - 1]} by {need}")


class PriceAnswer(BaseModel):
    model: str
    forward_return: float = Field(description="log return over horizon_minutes after the last bar's close")
    horizon_minutes: int | None
    model_version: str


class PriceOut(BaseModel):
    forward_return: float | None = Field(description="main answer, log return; null when no model could answer")
    horizon_minutes: int | None
    model: str | None = Field(description="which model gave the main answer")
    model_version: str | None
    reason: str = Field(description="why this model answered and why the others did not")
    predictions: list[PriceAnswer]


class ModelInfo(BaseModel):
    name: str
    kind: str
    version: str
    onnx_sha256: str
    registry_version: str | None
    n_features: int
    horizon_minutes: int | None
    path: str


class SkippedInfo(BaseModel):
    path: str
    reason: str


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"] = Field(description="degraded: no model loaded, or a bundle was skipped")
    uptime_s: float
    models: list[ModelInfo]
    skipped: list[SkippedInfo]
    max_batch: int
    max_bars: int


class ErrorItem(BaseModel):
    loc: list[str | int]
    field: str = Field(description="dotted path of the offending field in the body")
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    detail: list[ErrorItem]
    message: str


class MessageOut(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": MessageOut, "description": "the body could not be parsed"},
    413: {"model": MessageOut, "description": "the body exceeds max_body_bytes"},
    422: {"model": ValidationErrorOut, "description": "invalid field values or malformed JSON"},
    503: {"model": MessageOut, "description": "a model this endpoint needs is not loaded"},
}


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before the app parses any of it.

    The body is read here and replayed to the app (FastAPI would otherwise read any size into memory).
    An oversized body is read to its end and dropped, chunk by chunk, before the 413 goes out: a client
    still sending when the server closes gets a broken pipe instead of the answer. Beyond
    ``DRAIN_FACTOR x max_bytes`` (declared or received) the 413 goes out at once and the connection closes.
    """

    DRAIN_FACTOR = 16

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        declared_bytes = int(declared) if declared is not None and declared.isdigit() else 0
        if declared_bytes > self.DRAIN_FACTOR * self.max_bytes:
            await self._refuse(send)  # answered at once; uvicorn then drops the connection
            return
        too_big = declared_bytes > self.max_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone: nothing to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            too_big = too_big or size > self.max_bytes
            if too_big:
                chunks.clear()  # keep nothing of an oversized body
                if size > self.DRAIN_FACTOR * self.max_bytes:
                    break  # not worth reading further: answer now, uvicorn then drops the connection
            else:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if too_big:
            await self._refuse(send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = MessageOut(
            detail=f"request body exceeds the limit of {self.max_bytes} bytes (max_body_bytes)"
        ).model_dump_json()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


def _error_item(error: dict[str, Any]) -> ErrorItem:
    loc = [x if isinstance(x, int) else str(x) for x in error.get("loc", ())]
    msg = str(error.get("msg", "invalid value"))
    ctx = error.get("ctx") or {}
    if error.get("type") == "json_invalid" and "error" in ctx:
        msg = f"{msg}: {ctx['error']}"  # e.g. "JSON decode error: Expecting ',' delimiter"
    path = loc[1:] if loc[:1] == ["body"] else loc
    field = ".".join(str(x) for x in path) or "body"
    return ErrorItem(loc=loc, field=field, msg=msg, type=str(error.get("type", "value_error")))


def _validation_response(items: list[ErrorItem]) -> JSONResponse:
    # The offending input is not echoed back: it may be NaN / inf, which strict JSON cannot carry.
    message = "; ".join(f"{i.field}: {i.msg}" for i in items[:10])
    if len(items) > 10:
        message += f"; ... {len(items) - 10} more"
    body = ValidationErrorOut(detail=items, message=message)
    return JSONResponse(status_code=422, content=body.model_dump())


def create_app(
    models_dir: Path,
    *,
    max_batch: int = 256,
    max_bars: int = MAX_BARS,
    max_body_bytes: int = MAX_BODY_BYTES,
    **model_options: Any,
) -> FastAPI:
    """The FastAPI app serving every bundle under ``models_dir`` (see the module doc).

    ``max_batch``: most opportunities per ``/predict/batch`` request; ``max_bars``: most bars (and
    sentiment readings) per ``/predict/price`` request; ``max_body_bytes``: largest request body.
    ``model_options`` go to :meth:`ModelSet.load` (composite weights, Kelly fraction and cap, hold grid).
    """
    for name, value in (("max_batch", max_batch), ("max_bars", max_bars), ("max_body_bytes", max_body_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"serve: {name} must be a positive integer, got {value!r}")
    models = ModelSet.load(models_dir, **model_options)
    started = time.monotonic()

    class BatchIn(BaseModel):
        model_config = _INPUT

        opportunities: Annotated[
            list[OpportunityIn],
            Field(min_length=1, max_length=max_batch, description=f"1 to {max_batch} opportunities"),
        ]

    class PriceIn(BaseModel):
        """Recent closed 1-minute bars of one symbol, oldest first, and optional sentiment readings."""

        model_config = _INPUT

        bars: Annotated[list[BarIn], Field(min_length=1, max_length=max_bars)]
        sentiment: Annotated[list[SentimentIn], Field(max_length=max_bars)] | None = None

        @field_validator("bars")
        @classmethod
        def _bars_in_order(cls, bars: list[BarIn]) -> list[BarIn]:
            _increasing([b.ts_ms for b in bars], "bars", minute_steps=True)
            return bars

        @field_validator("sentiment")
        @classmethod
        def _readings_in_order(cls, readings: list[SentimentIn] | None) -> list[SentimentIn] | None:
            if readings:
                _increasing([r.ts_ms for r in readings], "sentiment", minute_steps=False)
            return readings

    app = FastAPI(
        title="cryptoml prediction API",
        version="1",
        description=(__doc__ or "").split("\n\n", 1)[0],
    )
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response([_error_item(e) for e in exc.errors()])

    @app.exception_handler(DataValidationError)
    async def _invalid_data(request: Request, exc: DataValidationError) -> JSONResponse:
        return _validation_response([ErrorItem(loc=["body"], field="body", msg=str(exc), type="value_error")])

    @app.exception_handler(ModelContractError)
    async def _model_unavailable(request: Request, exc: ModelContractError) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.get("/health", response_model=HealthOut)
    async def health() -> dict[str, Any]:
        described = models.describe()
        ok = bool(described["models"]) and not described["skipped"]
        return {
            "status": "ok" if ok else "degraded",
            "uptime_s": round(time.monotonic() - started, 3),
            **described,
            "max_batch": max_batch,
            "max_bars": max_bars,
        }

    # The opportunity endpoints run inline (well under a millisecond of numpy + onnxruntime per request:
    # a thread hand-off would cost more); the price endpoint may walk 1440 bars, so it runs in the pool.
    @app.post("/predict", response_model=OpportunityOut, responses=_ERRORS)
    async def predict(opportunity: OpportunityIn) -> dict[str, Any]:
        return models.score_opportunity(opportunity.model_dump())

    @app.post("/predict/batch", response_model=BatchOut, responses=_ERRORS)
    async def predict_batch(batch: BatchIn) -> dict[str, Any]:
        predictions = models.score_opportunities([o.model_dump() for o in batch.opportunities])
        return {"predictions": predictions, "count": len(predictions)}

    @app.post("/predict/price", response_model=PriceOut, responses=_ERRORS)
    def predict_price(request: PriceIn) -> dict[str, Any]:
        bars = {c: [getattr(b, c) for b in request.bars] for c in ("ts_ms", "open", "high", "low", "close", "volume")}
        sentiment = None
        if request.sentiment is not None:
            sentiment = {c: [getattr(r, c) for r in request.sentiment] for c in ("ts_ms", *SENTIMENT_COLUMNS)}
        return models.predict_price(bars, sentiment)

    app.state.models = models
    return app


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    models_dir: Path = Path("models"),
    *,
    max_batch: int = 256,
    log_level: str = "info",
    access_log: bool = False,
    **model_options: Any,
) -> None:
    """Run the API with uvicorn until interrupted; binds 127.0.0.1 unless ``host`` says otherwise."""
    import uvicorn

    app = create_app(models_dir, max_batch=max_batch, **model_options)
    log.info("serving %d models from %s on http://%s:%d", len(app.state.models.bundles), models_dir, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
