"""`make bench`: every benchmark, each against PyTorch's own implementation, in one run.

Results are merged into book/benchmarks/results.json, which the book's Benchmarks page renders.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from .harness import RESULTS_PATH, save_results

BENCHMARKS = ["autograd", "zero", "pipeline", "serving", "speculative", "diffusion"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="course-bench", description=__doc__)
    parser.add_argument("names", nargs="*", default=BENCHMARKS, help=f"any of {BENCHMARKS}")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    records = []
    for name in args.names:
        module = importlib.import_module(f"course_reference.bench.{name}")
        start = time.perf_counter()
        found = module.run(rounds=args.rounds)
        for r in found:
            print(f"{r['workload']:<45} {r['ours']} vs {r['peer']}: ratio {r['ratio']:.2f} "
                  f"(spread {r['spread'][0]:.2f}-{r['spread'][1]:.2f})")
        print(f"  [{name}: {time.perf_counter() - start:.0f} s]")
        records += found
    save_results(records)
    print(f"wrote {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
