"""The edge runner's opportunity scorer: live funding-arbitrage opportunities judged by the ML and the rule scorer.

On the snapshot grid (every ``snapshots.interval_minutes``) :class:`OpportunityScorer` keeps a
:class:`~cryptoml.edge.opportunities.LiveMarket` of one exchange fed through ccxt, detects the
opportunities there (:func:`~cryptoml.edge.opportunities.detect_live`, the batch detector's numbers),
scores each twice, turns each verdict into a decision row, and follows each scorer's pick on paper until its
hold ends, with the simulator's cost model, so the two scorers can be compared on realised outcomes
(:meth:`cryptoml.edge.state.StateStore.scorer_comparison`). Numpy, the standard library and ccxt clients
given in; the ONNX models arrive as a :class:`~cryptoml.edge.models.ModelSet`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptoml.config import OpportunityParams, SimulateParams, SnapshotParams
from cryptoml.edge.models import OPPORTUNITY_MODELS, PROFIT_MODEL, ModelSet
from cryptoml.edge.opportunities import (
    LiveMarket,
    advance_paper_position,
    detect_live,
    fetch_into,
    open_paper_position,
    rule_rank,
    rule_score,
)
from cryptoml.edge.state import ArbitrageEntry, ArbitrageOutcome, Decision
from cryptoml.errors import ConfigError, DataValidationError, SourceError
from cryptoml.simulate.slippage import fee_frac

log = logging.getLogger("cryptoml.live")

ML_SOURCE, RULE_SOURCE = "opportunity_ml", "opportunity_rule"  # trade_decisions.source of each scorer
# ccxt id of the spot venue beside a derivatives-only ccxt id (the others list spot and perps in one client),
# and the ccxt options that make its client load the spot markets only.
SPOT_EXCHANGES = {"binanceusdm": "binance", "binancecoinm": "binance"}
SPOT_CLIENT_OPTIONS = {
    "binance": {"fetchMarkets": {"types": ["spot"]}},
    "bybit": {"fetchMarkets": {"types": ["spot", "linear"]}},
}
_FACTS = ("strategy", "direction", "fund_apr", "break_even_hours", "funding_spread", "long_price", "short_price",
          "volume_24h", "orderbook_depth_usd", "bid_ask_spread_pct", "regime")  # fmt: skip


@dataclass(frozen=True)
class GridResult:
    """What one snapshot-grid time produced: decision rows, paper picks opened and ended, metrics."""

    decisions: list[Decision]
    opened: list[ArbitrageEntry]
    closed: list[ArbitrageOutcome]
    metrics: dict[str, float]


@dataclass(frozen=True)
class _Verdict:
    """One scorer's view of one opportunity (``score``: higher is better; ``hold_hours`` if it would open)."""

    opportunity: dict[str, Any]
    open: bool
    reason: str
    hold_hours: float | None
    score: float | None
    predicted_bps: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    extra: Mapping[str, Any] | None = None


class OpportunityScorer:
    """Funding-arbitrage opportunities of one exchange on the snapshot grid, judged by two scorers.

    At each grid time ``now_ms`` (a bar close that is a multiple of ``snapshots.interval_minutes``):

    - :meth:`refresh` feeds the market through ccxt: the perps ``<base>/<quote>:<quote>`` from
      ``perp_client`` (the runner's exchange) under ``exchange``, and the spots ``<base>/<quote>`` from
      ``spot_client`` under ``spot_exchange``, the spot venue's own name (default
      :func:`spot_exchange_id`: ``binance`` beside ``binanceusdm``). Detection pairs each perp with the
      spot of its venue, and each leg pays its own venue's taker fee (``simulate.taker_fee_bps``) in the
      break-even and on paper, as the batch simulator prices each leg by its exchange. Symbols a client
      does not list are left out (logged once). Books are fetched only when the grid time is fresh: a book
      read now must not stand for a moment long past;
    - :meth:`on_grid`: :func:`~cryptoml.edge.opportunities.detect_live` (spot-perp; cross-exchange pairs
      need a second perp venue), then per opportunity **two decisions**: ``opportunity_ml`` (the ONNX
      profit / success / hold models: composite score, best hold, Kelly size, model version) and
      ``opportunity_rule`` (:func:`~cryptoml.edge.opportunities.rule_score`), each ``open_arbitrage`` or
      ``skip_arbitrage`` with its reason. A decision's ``symbol`` is the opportunity id (a decision is
      unique per bar, symbol, source and slot); ``predicted_return_bps`` the ML predicted profit (bps of
      one leg's notional over the hold);
    - **both scorers are followed on paper**: each opens at most one new pick per grid time, its best
      candidate it does not already hold (ml: the highest composite score among those with a positive
      predicted profit and Kelly size; rule: the first by ``fund_apr`` then break-even among its ``open``
      verdicts), for that scorer's hold (ml: the best-composite hold; rule: the shortest grid hold past
      break-even). Picks advance at every grid time and close when the hold ends
      (:func:`~cryptoml.edge.opportunities.advance_paper_position`). A stale grid time (``stale=True``)
      opens nothing (reason ``stale_data``); open picks still advance.

    Its state (open picks, the last grid time done) is JSON in the runner's snapshot (:meth:`to_dict` /
    :meth:`load`); the market is not: it is fetched again after a restart (74 h of bars, 4 days of funding).
    """

    def __init__(
        self,
        *,
        exchange: str,
        perp_client: Any,
        spot_client: Any | None,
        bases: Sequence[str],
        quote: str,
        snapshot_params: SnapshotParams,
        opportunity_params: OpportunityParams,
        simulate_params: SimulateParams,
        spot_exchange: str | None = None,
    ) -> None:
        if isinstance(bases, str) or not bases or not quote:
            raise ConfigError(f"OpportunityScorer: bases and quote are required, got {bases!r}, {quote!r}")
        if spot_exchange is not None and (not isinstance(spot_exchange, str) or not spot_exchange):
            raise ConfigError(f"OpportunityScorer: spot_exchange must be an exchange id, got {spot_exchange!r}")
        self.exchange = exchange
        self.spot_exchange = spot_exchange or spot_exchange_id(exchange)
        self.perp_client = perp_client
        self.spot_client = spot_client
        self.bases = tuple(dict.fromkeys(bases))
        self.quote = quote
        self.snapshot = snapshot_params
        self.opportunity_params = opportunity_params
        self.simulate = simulate_params
        self.grid_ms = snapshot_params.interval_minutes * 60_000
        self.market = LiveMarket(exchange)
        self.positions: dict[str, dict[str, Any]] = {}  # position id -> open paper position
        self.last_grid_ms: int | None = None
        self._refreshed_ms: int | None = None
        self._symbols: list[tuple[Any, str, list[str]]] | None = None

    # -- state --

    def to_dict(self) -> dict[str, Any]:
        return {"positions": self.positions, "last_grid_ms": self.last_grid_ms}

    def load(self, data: Mapping[str, Any]) -> None:
        self.positions = {str(k): self._relabel(dict(v)) for k, v in data.get("positions", {}).items()}
        self.last_grid_ms = data.get("last_grid_ms")

    def _relabel(self, position: dict[str, Any]) -> dict[str, Any]:
        """A pick saved before the spot legs carried their own venue (spot leg labelled with the perp
        exchange, paying its fee): the spot leg moved to the spot venue, whose series the market holds now,
        with that venue's fee; the opportunity id renamed alike so the pick is still recognised as held."""
        old, new = f"{self.exchange}-spot", f"{self.spot_exchange}-spot"
        if old == new or old not in str(position.get("opportunity_id", "")).split(":"):
            return position
        legs = [
            {**leg, "exchange": self.spot_exchange, "fee": fee_frac(self.spot_exchange, self.simulate)}
            if not leg["perp"] and leg["exchange"] == self.exchange
            else leg
            for leg in position["legs"]
        ]
        parts = [new if p == old else p for p in str(position["opportunity_id"]).split(":")]
        return {**position, "legs": legs, "opportunity_id": ":".join(parts)}

    def on_grid_time(self, close_ms: int) -> bool:
        return close_ms % self.grid_ms == 0

    def add_bar(self, symbol: str, ts_ms: int, o: float, h: float, low: float, c: float, v: float) -> None:
        """A closed bar the runner already fetched for ``symbol``: kept when it extends the series held (so
        :meth:`refresh` need not ask for it again); ignored before the first refresh filled the history."""
        last = self.market.last_bar_ts_ms(symbol, exchange=self.exchange)
        if last is not None and ts_ms == last + self.market.bar_ms:
            self.market.add_bar(symbol, ts_ms, o, h, low, c, v, exchange=self.exchange)

    # -- data --

    def _listed(self) -> list[tuple[Any, str, list[str]]]:
        """(client, the exchange label its data is held under, the symbols it lists) for the perp and the
        spot client; loads their markets once."""
        if self._symbols is None:
            from cryptoml.edge.runner import retryable  # local: the runner imports this module

            out = []
            for client, label, suffix in (
                (self.perp_client, self.exchange, f":{self.quote}"),
                (self.spot_client, self.spot_exchange, ""),
            ):
                if client is None:
                    continue
                wanted = [f"{b}/{self.quote}{suffix}" for b in self.bases]
                try:
                    client.load_markets()
                except Exception as e:  # network trouble is the caller's retry; the rest is a source error
                    if retryable(e):
                        raise
                    raise SourceError(f"{client.id} load_markets: {type(e).__name__}: {e}") from e
                missing = [s for s in wanted if s not in client.markets]
                if missing:
                    log.warning("opportunity scorer: %s does not list %s; left out", client.id, missing)
                out.append((client, label, [s for s in wanted if s in client.markets]))
            self._symbols = out
        return self._symbols

    def refresh(self, now_ms: int, fresh: bool) -> None:
        """Fetch what the market lacks at ``now_ms`` (books only when ``fresh``), once per grid time.
        ccxt's NetworkError propagates for the runner's retry with backoff."""
        if self._refreshed_ms == now_ms:
            return
        for client, label, symbols in self._listed():
            for symbol in symbols:
                try:
                    fetch_into(self.market, client, [symbol], now_ms, exchange=label, books=fresh)
                except SourceError as e:  # one series the exchange refuses must not stop the others
                    log.warning("opportunity scorer: %s", e)
        self._refreshed_ms = now_ms

    # -- the grid --

    def on_grid(self, now_ms: int, models: ModelSet | None, *, stale: bool) -> GridResult:
        """Advance the open picks, detect and score the opportunities at ``now_ms``, open each scorer's pick."""
        closed = []
        for pid in sorted(self.positions):
            position, outcome = advance_paper_position(
                self.market, self.positions[pid], now_ms, self.snapshot, self.simulate
            )
            self.positions[pid] = position
            if outcome is not None:
                del self.positions[pid]
                closed.append(_outcome_row(pid, outcome))
        try:
            opportunities = detect_live(
                self.market, now_ms, self.exchange, self.bases, self.quote, self.snapshot, self.opportunity_params,
                self.simulate, spot_exchanges={self.exchange: self.spot_exchange},
            )  # fmt: skip
        except DataValidationError as e:  # e.g. no BTC series for the regime yet
            log.warning("opportunity scorer at %d: %s", now_ms, e)
            opportunities = []
        decisions: list[Decision] = []
        opened: list[ArbitrageEntry] = []
        for scorer, source, verdicts in (
            ("ml", ML_SOURCE, self._score_ml(opportunities, models)),
            ("rule", RULE_SOURCE, self._score_rule(opportunities)),
        ):
            held = {p["opportunity_id"] for p in self.positions.values() if p["scorer"] == scorer}
            pick = None if stale else next((v for v in verdicts if v.open and _oid(v) not in held), None)
            for v in verdicts:
                action, reason = "skip_arbitrage", v.reason
                if v.open and stale:
                    reason = "stale_data"
                elif v.open and _oid(v) in held:
                    reason = f"already holding it ({reason})"
                elif v.open and v is not pick:
                    reason = f"not this round's pick ({_oid(pick) if pick else 'none'}); {reason}"
                elif v.open:
                    assert v.hold_hours is not None
                    paper = open_paper_position(self.market, v.opportunity, v.hold_hours, self.snapshot, self.simulate)
                    if paper is None:
                        reason = f"no fresh price for a leg at entry; {reason}"
                    else:
                        action, pid = "open_arbitrage", f"{scorer}:{_oid(v)}:{now_ms}"
                        self.positions[pid] = {**paper, "scorer": scorer}
                        opened.append(_entry_row(pid, scorer, paper, v))
                decisions.append(
                    Decision(
                        _oid(v), action, reason, source=source, predicted_return_bps=v.predicted_bps,
                        model_name=v.model_name, model_version=v.model_version, extra=dict(v.extra or {}),
                    )
                )  # fmt: skip
        self.last_grid_ms = now_ms
        counts = {s: sum(1 for p in self.positions.values() if p["scorer"] == s) for s in ("ml", "rule")}
        metrics = {
            "opportunities_detected": float(len(opportunities)),
            "arbitrage_open_ml": float(counts["ml"]),
            "arbitrage_open_rule": float(counts["rule"]),
        }
        return GridResult(decisions, opened, closed, metrics)

    def _score_ml(self, opportunities: list[dict[str, Any]], models: ModelSet | None) -> list[_Verdict]:
        """ML verdicts, best composite first (a candidate: predicted profit > 0 and Kelly size > 0)."""
        missing = [n for n in OPPORTUNITY_MODELS[:2] if models is None or n not in models.bundles]
        if missing:
            why = f"opportunity models not loaded: {missing}"
            return [_Verdict(o, False, why, None, None, extra=_facts(o)) for o in opportunities]
        assert models is not None
        out = []
        for o, s in zip(opportunities, models.score_opportunities(opportunities), strict=True):
            ok = s["predicted_profit_pct"] > 0 and s["kelly_fraction"] > 0
            why = (
                f"composite {s['composite_score']:.4g} at {s['predicted_hold_hours']:g} h, profit "
                f"{s['predicted_profit_pct']:.4g} %, P {s['success_probability']:.3f}, Kelly {s['kelly_fraction']:.4g}"
            )
            extra = {**{k: v for k, v in s.items() if k != "model_version"}, **_facts(o)}
            out.append(
                _Verdict(
                    o, ok, why if ok else f"no edge: {why}", s["predicted_hold_hours"], s["composite_score"],
                    s["predicted_profit_pct"] * 100.0, PROFIT_MODEL, s["model_version"], extra,
                )
            )  # fmt: skip
        return sorted(out, key=lambda v: -(v.score or 0.0))  # stable: ties keep the detection order

    def _score_rule(self, opportunities: list[dict[str, Any]]) -> list[_Verdict]:
        """Rule verdicts in the rule's rank order (``fund_apr`` desc, break-even asc)."""
        out = []
        for i in rule_rank(opportunities):
            o = opportunities[i]
            r = rule_score(o, self.opportunity_params, hold_grid_hours=self.simulate.hold_hours)
            extra = {"score": r["score"], "hold_hours": r["hold_hours"], **_facts(o)}
            out.append(_Verdict(o, r["decision"] == "open", r["reason"], r["hold_hours"], r["score"], extra=extra))
        return out


def spot_exchange_id(exchange_id: str) -> str:
    """The ccxt id whose client serves the spot legs next to ``exchange_id``'s perps."""
    return SPOT_EXCHANGES.get(exchange_id, exchange_id)


def scorer_bases(symbols: Sequence[str], symbol: str, btc_base: str = "BTC") -> tuple[list[str], str]:
    """(bases, quote) the scorer scans: the runner's own base, ``btc_base`` (the regime needs it) and the
    bases of ``symbols`` (``market.symbols``) quoted like ``symbol`` (the runner's perp). Raises ConfigError
    for a symbol that is no ``BASE/QUOTE[:SETTLE]``."""

    def split(s: str) -> tuple[str, str]:
        pair = s.split(":", 1)[0]
        if pair.count("/") != 1 or not all(pair.split("/")):
            raise ConfigError(f"opportunity scorer: {s!r} is not a unified symbol like 'BTC/USDT:USDT'")
        base, quote = pair.split("/")
        return base, quote

    base, quote = split(symbol)
    bases = [base, btc_base] + [b for b, q in map(split, symbols) if q == quote]
    return list(dict.fromkeys(bases)), quote


def _oid(v: _Verdict) -> str:
    return str(v.opportunity["opportunity_id"])


def _facts(o: Mapping[str, Any]) -> dict[str, Any]:
    return {k: o[k] for k in _FACTS}


def _entry_row(pid: str, scorer: str, position: Mapping[str, Any], v: _Verdict) -> ArbitrageEntry:
    extra = v.extra or {}
    legs = [{k: leg[k] for k in ("side", "exchange", "symbol", "p0", "s0", "qty")} for leg in position["legs"]]
    return ArbitrageEntry(
        pid, scorer, str(position["opportunity_id"]), int(position["entry_ts_ms"]), int(position["exit_ts_ms"]),
        float(position["hold_hours"]), float(position["position_usd"]), score=v.score,
        predicted_profit_pct=extra.get("predicted_profit_pct"), success_probability=extra.get("success_probability"),
        kelly_fraction=extra.get("kelly_fraction"), model_version=v.model_version, details={"legs": legs},
    )  # fmt: skip


def _outcome_row(pid: str, outcome: Mapping[str, Any]) -> ArbitrageOutcome:
    if outcome["status"] != "closed":
        return ArbitrageOutcome(pid, "dropped", details={"reason": outcome["reason"]})
    details = {"exit": outcome["exit"], "funding_payments_count": outcome["funding_payments_count"]}
    return ArbitrageOutcome(
        pid, "closed", outcome["realised_profit_pct"], outcome["realised_profit_usd"], outcome["funding_usd"],
        outcome["fees_usd"], outcome["slippage_pct"], details,
    )  # fmt: skip
