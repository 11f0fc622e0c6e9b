"""Peak memory and time of the chunked closed-form constraint KL versus the naive full-tensor version.

For each size, forward + backward of ``constraint_kl`` (chunked, custom backward) and ``constraint_kl_naive``
(plain autograd) on fp32 inputs. Peak *extra* memory is reported in units of one ``[B, T, V]`` fp32 tensor;
it includes the policy-logit gradient (one such tensor, needed by any implementation). Targets: chunked
extra peak <= 1.2x, chunked/naive time <= 1.3x.

    .venv/bin/python -m benchmarks.kl_memory            # CPU: V=49152, (B, T) = (8, 256), (2, 1024)
    .venv/bin/python -m benchmarks.kl_memory --gpu      # CUDA: V in {49152, 128256}, B=8, T in {256, 1024}
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch

from benchmarks.common import (
    PeakMemory,
    base_parser,
    interleaved,
    median_ratio,
    print_table,
    summarize,
    write_result,
)
from steer.guidance import constraint_kl, constraint_kl_naive

MEMORY_TARGET = 1.2
TIME_TARGET = 1.3


def _exact_rss_accounting() -> bool:
    """Make glibc return every freed block above 64 KiB to the OS, so sampled RSS sees work buffers.

    Otherwise freed blocks below the (dynamic, up to 32 MiB) mmap threshold are reused from the heap and
    a chunked algorithm's work tensors would be invisible to an RSS sampler.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 16))
    except (OSError, AttributeError):
        return False


def _inputs(batch: int, length: int, vocab: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    policy = torch.randn(batch, length, vocab, device=device, generator=gen) * 2
    ref = policy + torch.randn(batch, length, vocab, device=device, generator=gen) * 0.5
    z = torch.randn(batch, length, vocab, device=device, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask[:, : length // 8] = False  # a prompt that does not count
    return policy.requires_grad_(True), ref, z, mask


def _step(fn, policy, ref, z, mask, chunk_size):
    policy.grad = None
    loss = fn(policy, ref, z, mask, chunk_size=chunk_size)
    loss.backward()
    return loss


def _measure_memory(fn, policy, ref, z, mask, chunk_size, device) -> int:
    policy.grad = None
    gc.collect()
    with PeakMemory(device) as peak:
        _step(fn, policy, ref, z, mask, chunk_size)
    policy.grad = None
    gc.collect()
    return peak.peak_bytes


def run_size(batch, length, vocab, device, repeats, chunk_size) -> dict:
    policy, ref, z, mask = _inputs(batch, length, vocab, device)
    unit = batch * length * vocab * 4
    variants = {
        "chunked": lambda: _step(constraint_kl, policy, ref, z, mask, chunk_size),
        "naive": lambda: _step(constraint_kl_naive, policy, ref, z, mask, chunk_size),
    }
    # Correctness on the benchmark inputs.
    loss_c = _step(constraint_kl, policy, ref, z, mask, chunk_size).item()
    grad_c = policy.grad.clone()
    loss_n = _step(constraint_kl_naive, policy, ref, z, mask, chunk_size).item()
    grad_err = (policy.grad - grad_c).abs().max().item()
    del grad_c
    policy.grad = None
    # Memory: chunked first and last, naive in between, to catch allocator drift.
    mem_chunked = _measure_memory(constraint_kl, policy, ref, z, mask, chunk_size, device)
    mem_naive = _measure_memory(constraint_kl_naive, policy, ref, z, mask, chunk_size, device)
    mem_chunked = max(mem_chunked, _measure_memory(constraint_kl, policy, ref, z, mask, chunk_size, device))
    timings = interleaved(variants, repeats=repeats, warmup=1)
    medians = summarize(timings)
    row = {
        "B": batch,
        "T": length,
        "V": vocab,
        "chunk_size": chunk_size,
        "unit_MiB": unit / 2**20,
        "chunked_extra_x": mem_chunked / unit,
        "naive_extra_x": mem_naive / unit,
        "chunked_s": medians["chunked"],
        "naive_s": medians["naive"],
        "time_ratio": median_ratio(timings["chunked"], timings["naive"]),
        "abs_loss_diff": abs(loss_c - loss_n),
        "max_grad_diff": grad_err,
    }
    row["memory_ok"] = row["chunked_extra_x"] <= MEMORY_TARGET
    row["time_ok"] = row["time_ratio"] <= TIME_TARGET
    variants.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk for constraint_kl")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        device = torch.device("cuda")
        sizes = [(8, 256, 49152), (8, 1024, 49152), (8, 256, 128256), (8, 1024, 128256)]
        repeats = args.repeats or 10
    else:
        device = torch.device("cpu")
        exact_rss = _exact_rss_accounting()
        sizes = [(8, 256, 49152), (2, 1024, 49152)]  # B reduced at T=1024 to stay within shared RAM
        repeats = args.repeats or 3
    exact_rss = args.gpu or exact_rss
    rows = []
    for batch, length, vocab in sizes:
        rows.append(run_size(batch, length, vocab, device, repeats, args.chunk_size))
        print_table(rows[-1:])
    print()
    print_table(rows)
    payload = {
        "device": str(device),
        "targets": {"chunked_extra_x": MEMORY_TARGET, "time_ratio": TIME_TARGET},
        "note": "extra peak includes the [B,T,V] gradient of the policy logits; inputs are excluded",
        "exact_rss_accounting": exact_rss,
        "rows": rows,
    }
    path = write_result("kl_memory_gpu" if args.gpu else "kl_memory", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
