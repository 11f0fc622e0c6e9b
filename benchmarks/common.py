"""Shared benchmark plumbing: machine info, interleaved timing, peak memory, JSON results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """Hardware and package versions, stored with every result."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for package in ("torch", "transformers", "trl", "accelerate", "peft", "detoxify", "scikit-learn"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def base_parser(description: str) -> argparse.ArgumentParser:
    """Every benchmark takes ``--gpu`` (the large size, for lent GPU machines) and ``--repeats``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--gpu", action="store_true", help="use the GPU-sized configuration")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant")
    return parser


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times, interleaved A B A B ..., after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            timings[name].append(time.perf_counter() - start)
    return timings


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios (robust to drifts that hit both variants of a round)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def summarize(timings: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in timings.items()}


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator stats on GPU, sampled process RSS on CPU.

    On CPU, large tensors are mmap-backed and returned to the OS on free, so a 0.5 ms RSS sampler
    sees their peak; small allocations are noise at the sizes benchmarked here.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.0005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._rss()
        self._peak = self._start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, self._rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._peak = max(self._peak, self._rss())
        self._stop.set()
        self._thread.join()
        self.peak_bytes = self._peak - self._start


def write_result(name: str, payload: dict, directory: str | os.PathLike | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json`` (or ``<directory>/<name>.json``) atomically, with machine info."""
    directory = RESULTS_DIR if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps({"benchmark": name, "machine": machine_info(), **payload}, indent=2, default=str)
    )
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """A plain fixed-width table on stdout."""
    if not rows:
        return
    columns = columns or list(rows[0])

    def fmt(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(fmt(row.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def random_text_corpus(n: int, words: int):
    """A seeded ``Dataset`` of ``n`` texts of ``words`` random common words (column ``text``)."""
    from datasets import Dataset

    vocab = "the a cat dog bird is was good bad nice rude calm warm cold runs sees likes and but very".split()
    gen = torch.Generator().manual_seed(0)
    texts = [
        " ".join(vocab[i] for i in torch.randint(0, len(vocab), (words,), generator=gen).tolist())
        for _ in range(n)
    ]
    return Dataset.from_dict({"text": texts})
