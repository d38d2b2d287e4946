"""ccxt exchange classes loaded one exchange at a time, for the edge's memory budget (150 MiB RSS).

ccxt's package ``__init__`` files import every exchange: ``ccxt`` ~100 sync modules (+35 MiB RSS measured
here), ``ccxt.pro`` and ``ccxt.async_support`` ~190 websocket and async modules (+31 MiB more). The edge
runner needs two sync clients (the perp venue and its spot venue) and at most one ccxt.pro class.

How: a package that is not imported yet is registered in ``sys.modules`` as a :class:`_LazyPackage`, a
module with the package's spec and ``__path__`` whose ``__init__`` has not run. Importing ``pkg.<id>``
then loads only that exchange's modules, and the attribute ``pkg.<id>`` becomes the class of that name,
as the real ``__init__`` makes it (``from ccxt.binance import binance``). The sync package is given what
the project reads from it up front: ``exchanges``, ``__version__``, ``errors``, the error classes and
``Exchange``. **Fallback:** any other attribute that is no submodule (``ccxt.decimal_to_precision``,
``ccxt.pro.exchanges``...) runs the real ``__init__`` in place on first use, so code needing the whole
package still gets it (only the memory saving is lost); a package already imported the ordinary way is
used as it is; and a ccxt whose ``__init__`` this module cannot read is imported the ordinary way.

The trick works only when it comes first: :func:`prepare` must run before anything imports ``ccxt``
(``cryptoml live`` calls it first thing). :func:`exchange_class` and :func:`pro_exchange_class` call it
themselves, so they never load more than their own exchange when ccxt is not imported yet.
Standard library only; ccxt is imported on first use.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import re
import sys
import threading
import types
from pathlib import Path
from typing import Any

from cryptoml.errors import ConfigError

__all__ = ["exchange_class", "exchange_ids", "is_lean", "prepare", "pro_exchange_class"]

SYNC, ASYNC, PRO = "ccxt", "ccxt.async_support", "ccxt.pro"
_FULL = "_cryptoml_full"  # set in a lazy package's namespace once its real __init__ has run
_ID = re.compile(r"[a-z][a-z0-9]*")
_LOCK = threading.RLock()  # registration: the stream may be started from another thread


class _LazyPackage(types.ModuleType):
    """A package registered without running its ``__init__``: submodules are imported one at a time.

    Importing ``pkg.name`` sets ``pkg.name`` to the submodule; that becomes the class of the same name when
    the submodule defines one (the exchanges). An attribute that is no submodule runs the real ``__init__``
    first (see the module doc).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        # Read the submodule's own namespace, never getattr: on a lazy package (ccxt.pro set on ccxt) that
        # would run its __getattr__, i.e. its whole __init__.
        if type(value) is types.ModuleType and isinstance(value.__dict__.get(name), type):
            value = value.__dict__[name]
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            importlib.import_module(f"{self.__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{self.__name__}.{name}":
                raise  # the submodule exists but needs something missing: say so, do not hide it
            self._run_init()
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None

    def _run_init(self) -> None:
        with _LOCK:
            if self.__dict__.get(_FULL):
                return
            self.__dict__[_FULL] = True  # first: the __init__'s own imports come back here
            self.__spec__.loader.exec_module(self)  # type: ignore[union-attr]


def _register(name: str, preset: dict[str, Any] | None = None) -> _LazyPackage | None:
    """``name`` as a lazy package in sys.modules (and on its parent); None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return None
    module = _LazyPackage(name)
    module.__dict__.update(
        __spec__=spec, __loader__=spec.loader, __file__=spec.origin, __package__=name,
        __path__=list(spec.submodule_search_locations), **(preset or {}),
    )  # fmt: skip
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def prepare() -> bool:
    """Register ``ccxt`` lean in this process (see the module doc) unless it is imported already.

    Returns True when this call registered it; False when ccxt was imported before (fully or lean: it is
    used as it is) or when its ``__init__`` has a layout this module does not know (the next ``import
    ccxt`` is then the ordinary one).
    """
    with _LOCK:
        if SYNC in sys.modules:
            return False
        spec = importlib.util.find_spec(SYNC)
        if spec is None or spec.origin is None:
            return False
        source = Path(spec.origin).read_text(encoding="utf-8")
        listed = re.search(r"^exchanges = (\[.*?\])", source, re.S | re.M)
        version = re.search(r"^__version__ = '([^']+)'", source, re.M)
        if listed is None or version is None:
            return False
        module = _register(SYNC, {"exchanges": ast.literal_eval(listed.group(1)), "__version__": version.group(1)})
        if module is None:
            return False
        try:
            errors = importlib.import_module("ccxt.base.errors")
            exchange = importlib.import_module("ccxt.base.exchange")
        except BaseException:
            del sys.modules[SYNC]
            raise
        module.__dict__.update({name: getattr(errors, name) for name in errors.__all__})
        module.__dict__.update(errors=errors, Exchange=exchange.Exchange)
        return True


def is_lean(package: str = SYNC) -> bool:
    """Whether ``package`` (``ccxt``, ``ccxt.async_support`` or ``ccxt.pro``) is imported lean and its real
    ``__init__`` has not run (yet)."""
    module = sys.modules.get(package)
    return isinstance(module, _LazyPackage) and not module.__dict__.get(_FULL)


def exchange_ids() -> list[str]:
    """ccxt's exchange ids (``ccxt.exchanges``), without importing any exchange when ccxt is not imported."""
    prepare()
    import ccxt

    return list(ccxt.exchanges)


def exchange_class(exchange_id: str) -> type:
    """ccxt's synchronous exchange class for ``exchange_id`` (``ccxt.binanceusdm``).

    When ccxt is not imported yet it is registered lean first, so only this exchange's modules load;
    otherwise the class is read from the package as imported. Raises ConfigError for an id ccxt does not
    know, naming the closest one.
    """
    ids = exchange_ids()
    if exchange_id not in ids:
        close = difflib.get_close_matches(str(exchange_id), ids, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown ccxt exchange id {exchange_id!r}{hint}")
    import ccxt

    cls = getattr(ccxt, exchange_id)
    if not isinstance(cls, type):  # a package layout this module does not know
        raise ConfigError(f"ccxt.{exchange_id} is not an exchange class in ccxt {ccxt.__version__}")
    return cls


def pro_exchange_class(exchange_id: str) -> type | None:
    """ccxt.pro's (websocket) exchange class for ``exchange_id``, None when ccxt.pro has no such exchange.

    ``ccxt.pro`` and ``ccxt.async_support`` are registered lean when not imported yet, so this loads that
    one exchange's websocket and async REST modules (~14 modules) instead of all of them.
    """
    if not isinstance(exchange_id, str) or not _ID.fullmatch(exchange_id):
        return None
    with _LOCK:
        prepare()
        import ccxt  # noqa: F401  (the parent of the two packages below)

        for name in (ASYNC, PRO):
            if name not in sys.modules and _register(name) is None:
                return None  # a ccxt without ccxt.pro
    if importlib.util.find_spec(f"{PRO}.{exchange_id}") is None:
        return None
    cls = importlib.import_module(f"{PRO}.{exchange_id}").__dict__.get(exchange_id)
    return cls if isinstance(cls, type) else None
