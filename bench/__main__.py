"""Run every benchmark (or those named on the command line) and write ``bench/results.json``.

python -m bench                 # all
python -m bench market simulate # only bench_market.py and bench_simulate.py
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    modules = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if names:
        modules = [m for m in modules if m.removeprefix("bench_") in names]
    results_path = HERE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in modules:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        figures = importlib.import_module(f"bench.{name}").run()
        figures["_elapsed_s"] = round(time.perf_counter() - started, 2)
        results[name.removeprefix("bench_")] = figures
    results["_machine"] = {"python": platform.python_version(), "cpus": __import__("os").cpu_count()}
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
