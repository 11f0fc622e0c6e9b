"""Run every benchmark (``make bench``), each in its own process, and print where results went.

Usage: ``python -m benchmarks.run_all [--gpu] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from .common import RESULTS_DIR

BENCHMARKS = (
    "kl_memory",
    "constrained_step",
    "schedule",
    "sampling",
    "oracles",
    "embedder",
    "persona_inference",
    "whole_run",  # the detox recipe shortened to 30 steps vs its plain-SFT twin (--full: 150 steps, by hand)
)
# Further runs of a benchmark with other arguments (each its own JSON).
EXTRA_RUNS = {"constrained_step": (["--recipe"],)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", action="store_true", help="GPU-sized configurations")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only or BENCHMARKS:
        for extra in ([], *EXTRA_RUNS.get(name, ())):
            label = " ".join([name, *extra])
            print(f"\n=== benchmarks.{label} ===", flush=True)
            start = time.perf_counter()
            cmd = [sys.executable, "-m", f"benchmarks.{name}", *extra] + (["--gpu"] if args.gpu else [])
            rc = subprocess.call(cmd)
            print(f"--- {label}: exit {rc} in {time.perf_counter() - start:.0f} s", flush=True)
            if rc:
                failed.append(label)
    print(f"\nresults in {RESULTS_DIR}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
