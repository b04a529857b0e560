"""`make bench`: every benchmark in turn, each writing its JSON and Markdown into out/bench/."""

from __future__ import annotations

import importlib
import sys
import time

# module -> its arguments under `make bench` (the inversion sweep is left to a manual run: it adds
# about 3 minutes on 2 cores; without it the picture goes to out/bench/, so that the committed
# docs/ picture, which shows the sweep, is not replaced by one that lacks it)
BENCHMARKS = {
    "research.bench_inversion": ["--no-sweep", "--plot", "out/bench/inversion_rmse_vs_nfe.png"],
    "research.bench_seeds": [],
    "research.bench_pipeline": [],
}


def main(argv: list[str] | None = None) -> int:
    names = (
        [n if n.startswith("research.") else f"research.bench_{n}" for n in argv]
        if argv
        else list(BENCHMARKS)
    )
    for name in names:
        module = importlib.import_module(name)
        t0 = time.perf_counter()
        print(f"[bench] {module.__name__} ...", flush=True)
        module.main(BENCHMARKS.get(name, []))
        print(f"[bench] {module.__name__} done in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
