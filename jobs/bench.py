"""`make bench`: every benchmark in turn, each writing its JSON and Markdown into out/bench/."""

from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = ("jobs.bench_inversion", "jobs.bench_seeds")


def main(argv: list[str] | None = None) -> int:
    names = argv if argv else list(BENCHMARKS)
    for name in names:
        module = importlib.import_module(name if name.startswith("jobs.") else f"jobs.bench_{name}")
        t0 = time.perf_counter()
        print(f"[bench] {module.__name__} ...", flush=True)
        module.main([])
        print(f"[bench] {module.__name__} done in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
