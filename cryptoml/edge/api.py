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

Fast path (``create_app(..., fast_path=True)``, the default): the three POST routes are answered by a lean
ASGI layer in front of FastAPI. It validates the raw body with the very same pydantic models
(``model_validate_json``), scores, and writes the JSON answer itself (orjson when installed). Opportunities
of ``/predict`` and ``/predict/batch`` requests that arrive in the same event-loop turn are scored in one
vectorised :meth:`ModelSet.score_opportunities` call (each row's answer is the one it gets alone: the models
are row-wise and run single-threaded). Anything the fast path does not accept -- a validation error, another
content type, a model error, a non-finite answer -- goes on to FastAPI unchanged, so every error body and
status code is FastAPI's, and so are ``/health``, ``/openapi.json`` and ``/docs``.

Imports only fastapi / pydantic / starlette, numpy, onnxruntime and the numpy-only project modules (orjson
when installed); uvicorn only inside :func:`serve`.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations at runtime, and the
# request models built inside create_app (their limits are arguments) are not module globals.
import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cryptoml.edge.models import ModelSet
from cryptoml.errors import ConfigError, CryptoMLError, DataValidationError, ModelContractError
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
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send) -> None:
        body = MessageOut(
            detail=f"request body exceeds the limit of {self.max_bytes} bytes (max_body_bytes)"
        ).model_dump_json()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read ``body`` once, then defers to the real one (disconnects)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _pick_dumps() -> Callable[[Any], bytes]:
    try:  # about 10x faster than json.dumps on the answers; optional: the stdlib writes the same JSON values
        import orjson
    except ImportError:
        return _json_dumps
    return orjson.dumps


_dumps = _pick_dumps()


def _finite_row(row: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in row.values() if type(v) is float)


def _finite(obj: Any) -> bool:
    """No NaN / inf anywhere in a JSON-able answer (FastAPI would refuse to write one: a 500)."""
    if type(obj) is float:
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return True


def _json_content(headers: list[tuple[bytes, bytes]]) -> bool:
    """The first Content-Type header is ``application/json`` (any parameters): what FastAPI parses as JSON
    and the fast path takes; other types (``+json`` subtypes, forms, none) go to FastAPI."""
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


_Handler = Callable[[bytes], Awaitable[Any]]


class _FastPath:
    """ASGI middleware answering the hot POST routes without FastAPI's per-request machinery.

    ``routes`` maps a path to a handler taking the raw JSON body and returning the answer (JSON-able), or
    None when it will not answer (a non-finite value), or raising (ValidationError, CryptoMLError): the
    request then goes on to the app behind with its body replayed, and FastAPI answers it -- and words its
    error -- exactly as it would without this layer. Sits behind :class:`_BodyLimit` (bodies are bounded).
    """

    def __init__(self, app: ASGIApp, routes: dict[str, _Handler]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            handler = self.routes.get(scope["path"])
        if handler is None or not _json_content(scope["headers"]):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone: nothing to answer
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        payload = None
        try:
            answer = await handler(body)
            if answer is not None:
                payload = _dumps(answer)
        except (ValidationError, CryptoMLError):
            pass  # FastAPI words the error
        except Exception:  # a fault of this layer must not cost the request: FastAPI still answers it
            log.exception("fast path failed on %s; FastAPI answers", scope["path"])
        if payload is None:
            await self.app(scope, _replay(body, receive), send)
            return
        headers = [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class _Coalescer:
    """Scores the opportunities of all requests waiting in the same event-loop turn in one vectorised call.

    :meth:`ModelSet.score_opportunities` costs about the same for 1 row as for dozens (its time is numpy
    and onnxruntime call overhead), so under concurrent load this multiplies throughput; a lone request is
    scored on the next loop turn, without waiting for company. A row's answer does not depend on the rows
    beside it (features and trees are row-wise; sessions run single-threaded, so the per-row sum order of
    the trees is fixed). When the joint call raises (a bad row), each request is scored alone so that only
    its own error reaches it. One event loop per instance (uvicorn runs one).
    """

    MAX_ROWS = 1024  # rows per joint call: bounds the time one turn of the loop spends scoring

    def __init__(self, models: ModelSet) -> None:
        self.models = models
        self._pending: list[tuple[list[dict[str, Any]], asyncio.Future[list[dict[str, Any]]]]] = []

    async def score(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after the requests already ready in this turn have queued up
        self._pending.append((rows, future))
        return await future

    def _flush(self) -> None:
        pending = [(rows, f) for rows, f in self._pending if not f.done()]  # done: cancelled (client gone)
        self._pending = []
        while pending:
            group = [pending.pop(0)]
            n_rows = len(group[0][0])
            while pending and n_rows + len(pending[0][0]) <= self.MAX_ROWS:
                n_rows += len(pending[0][0])
                group.append(pending.pop(0))
            self._score(group)

    def _score(self, group: list[tuple[list[dict[str, Any]], asyncio.Future[list[dict[str, Any]]]]]) -> None:
        try:
            answers = self.models.score_opportunities([row for rows, _ in group for row in rows])
        except CryptoMLError as e:
            if len(group) > 1:
                for one in group:
                    self._score([one])
            else:
                group[0][1].set_exception(e)
            return
        except Exception as e:  # never escape a loop callback: the awaiting requests get it
            for _, future in group:
                future.set_exception(e)
            return
        start = 0
        for rows, future in group:
            future.set_result(answers[start : start + len(rows)])
            start += len(rows)


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
    fast_path: bool = True,
    **model_options: Any,
) -> FastAPI:
    """The FastAPI app serving every bundle under ``models_dir`` (see the module doc).

    ``max_batch``: most opportunities per ``/predict/batch`` request; ``max_bars``: most bars (and
    sentiment readings) per ``/predict/price`` request; ``max_body_bytes``: largest request body;
    ``fast_path``: answer valid POST requests through the lean layer (False: FastAPI answers everything,
    same bodies -- for comparisons). ``model_options`` go to :meth:`ModelSet.load` (composite weights,
    Kelly fraction and cap, hold grid).
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
    coalescer = _Coalescer(models)

    def price_answer(request: PriceIn) -> dict[str, Any]:
        bars = {c: [getattr(b, c) for b in request.bars] for c in ("ts_ms", "open", "high", "low", "close", "volume")}
        sentiment = None
        if request.sentiment is not None:
            sentiment = {c: [getattr(r, c) for r in request.sentiment] for c in ("ts_ms", *SENTIMENT_COLUMNS)}
        return models.predict_price(bars, sentiment)

    async def predict_fast(body: bytes) -> Any:
        (answer,) = await coalescer.score([OpportunityIn.model_validate_json(body).model_dump()])
        return answer if _finite_row(answer) else None

    async def batch_fast(body: bytes) -> Any:
        rows = [o.model_dump() for o in BatchIn.model_validate_json(body).opportunities]
        predictions = await coalescer.score(rows)
        if not all(_finite_row(p) for p in predictions):
            return None
        return {"predictions": predictions, "count": len(predictions)}

    async def price_fast(body: bytes) -> Any:
        # validation inline (fast); the bar walk in the thread pool, as FastAPI runs the endpoint
        answer = await run_in_threadpool(price_answer, PriceIn.model_validate_json(body))
        return answer if _finite(answer) else None

    if fast_path:  # added first: the body limit (added next) sits in front of it
        app.add_middleware(
            _FastPath, routes={"/predict": predict_fast, "/predict/batch": batch_fast, "/predict/price": price_fast}
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
        return price_answer(request)

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
    fast_path: bool = True,
    **model_options: Any,
) -> None:
    """Run the API with uvicorn (one worker) until interrupted; binds 127.0.0.1 unless ``host`` says
    otherwise. ``fast_path`` and ``model_options``: see :func:`create_app`."""
    import importlib.util

    import uvicorn

    app = create_app(models_dir, max_batch=max_batch, fast_path=fast_path, **model_options)
    # uvloop + httptools (the edge extra) parse and schedule in C; the pure-Python pair is the fallback
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    log.info(
        "serving %d models from %s on http://%s:%d (%s, %s)",
        len(app.state.models.bundles), models_dir, host, port, loop, http,
    )  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log, loop=loop, http=http)
