"""Peak memory and time of the constraint KL: chunked vs naive on logits, and fused vs chunked from hidden states.

Logits section (``rows``): forward + backward of ``constraint_kl`` (chunked, custom backward) and
``constraint_kl_naive`` (plain autograd) on fp32 ``[B, T, V]`` logits. Peak *extra* memory is reported in units
of one ``[B, T, V]`` fp32 tensor; it includes the policy-logit gradient (one such tensor, needed by any
logit-level implementation). Targets: chunked extra peak <= 1.2x, chunked/naive time <= 1.3x.

Head section (``head_rows``): the whole KL term from the policy's and the guidance model's hidden states at
N = B * T counted positions, as the constrained trainer computes it: ``chunked`` = the head matmul to ``[N, V]``
policy logits (autograd), ``z`` = the guidance head to ``[N, V]`` (no grad), then ``constraint_kl``; ``fused`` =
:func:`steer.guidance.fused_constraint_kl` (head, z, q*, KL and gradients chunk by chunk, never ``[N, V]``).
Peak extra memory in units of one ``[N, V]`` fp32 tensor, time per forward + backward. Targets: fused extra
peak <= 0.25x, fused/chunked time <= 1.1x.

    .venv/bin/python -m benchmarks.kl_memory            # CPU: logits V=49152; head T in {1024, 2048}, V in {49152, 151936}
    .venv/bin/python -m benchmarks.kl_memory --gpu      # CUDA: larger batches, bf16 hidden states and heads
    .venv/bin/python -m benchmarks.kl_memory --smoke --output-dir /tmp/bench   # tiny shapes, proves the script runs
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import torch
import torch.nn.functional as F

from benchmarks.common import (
    PeakMemory,
    base_parser,
    interleaved,
    median_ratio,
    print_table,
    summarize,
    write_result,
)
from steer.guidance import constraint_kl, constraint_kl_naive, fused_chunk_size, fused_constraint_kl

MEMORY_TARGET = 1.2
TIME_TARGET = 1.3
FUSED_MEMORY_TARGET = 0.25
FUSED_TIME_TARGET = 1.1
HIDDEN = {49152: 576, 151936: 896}  # SmolLM2-135M and Qwen2.5-0.5B hidden sizes for their vocabularies


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


# --------------------------------------------------------------------------------------------- head section
def _head_inputs(
    rows: int, hidden: int, vocab: int, dtype: torch.dtype, device, train_head: bool, seed: int = 0
):
    gen = torch.Generator(device=device).manual_seed(seed)
    policy_hidden = torch.randn(rows, hidden, device=device, generator=gen)
    weight = torch.randn(vocab, hidden, device=device, generator=gen) * hidden**-0.5 * 2
    guidance_hidden = torch.randn(rows, hidden, device=device, generator=gen)
    guidance_weight = torch.randn(vocab, hidden, device=device, generator=gen) * hidden**-0.5
    guidance_bias = torch.randn(vocab, device=device, generator=gen)
    return (
        policy_hidden.to(dtype).requires_grad_(True),
        weight.to(dtype).requires_grad_(train_head),
        guidance_hidden,  # the guidance model and its head run in fp32 (GuidanceModel)
        guidance_weight,
        guidance_bias,
    )


def _chunked_head_step(inputs, chunk_size: int) -> torch.Tensor:
    """Today's trainer path: [N, V] policy logits with autograd, [N, V] z, then the chunked KL."""
    policy_hidden, weight, guidance_hidden, guidance_weight, guidance_bias = inputs
    logits = F.linear(policy_hidden, weight)
    with torch.no_grad():
        z = F.linear(guidance_hidden, guidance_weight, guidance_bias)
    loss = constraint_kl(
        logits[None], logits.detach()[None], z[None], None, chunk_size=chunk_size, reduction="sum"
    )
    del logits, z
    loss.backward()
    return loss.detach()


def _fused_head_step(inputs, chunk_size: int | None) -> torch.Tensor:
    policy_hidden, weight, guidance_hidden, guidance_weight, guidance_bias = inputs
    out = fused_constraint_kl(
        policy_hidden, weight, None, guidance_hidden, guidance_weight, guidance_bias, chunk_size=chunk_size
    )
    out.loss.backward()
    return out.loss.detach()


def _clear_grads(inputs) -> None:
    for tensor in inputs[:2]:
        tensor.grad = None


def _measure_head_memory(step, inputs, device) -> int:
    _clear_grads(inputs)
    gc.collect()
    with PeakMemory(device) as peak:
        step()
    _clear_grads(inputs)
    gc.collect()
    return peak.peak_bytes


def run_head_size(
    batch, length, vocab, hidden, dtype, device, repeats, chunk_size, fused_chunk, train_head
) -> dict:
    rows = batch * length
    inputs = _head_inputs(rows, hidden, vocab, dtype, device, train_head)
    unit = rows * vocab * 4
    fused_chunk_used = fused_chunk or fused_chunk_size(rows)
    variants = {
        "chunked": lambda: _chunked_head_step(inputs, chunk_size),
        "fused": lambda: _fused_head_step(inputs, fused_chunk),
    }
    # Correctness on the benchmark inputs.
    _clear_grads(inputs)
    loss_c = float(variants["chunked"]())
    grad_c = inputs[0].grad.float().clone()
    _clear_grads(inputs)
    loss_f = float(variants["fused"]())
    grad_err = (inputs[0].grad.float() - grad_c).abs().max().item()
    grad_scale = grad_c.abs().max().item()
    del grad_c
    _clear_grads(inputs)
    # Memory: fused first and last, chunked in between, to catch allocator drift.
    mem_fused = _measure_head_memory(variants["fused"], inputs, device)
    mem_chunked = _measure_head_memory(variants["chunked"], inputs, device)
    mem_fused = max(mem_fused, _measure_head_memory(variants["fused"], inputs, device))
    timings = interleaved(variants, repeats=repeats, warmup=1)
    _clear_grads(inputs)
    medians = summarize(timings)
    row = {
        "B": batch,
        "T": length,
        "N": rows,
        "V": vocab,
        "H": hidden,
        "dtype": str(dtype).replace("torch.", ""),
        "head_trains": train_head,
        "chunk_size": chunk_size,
        "fused_chunk_size": fused_chunk_used,
        "unit_MiB": unit / 2**20,
        "chunked_extra_x": mem_chunked / unit,
        "fused_extra_x": mem_fused / unit,
        "chunked_s": medians["chunked"],
        "fused_s": medians["fused"],
        "time_ratio": median_ratio(timings["fused"], timings["chunked"]),
        "rel_loss_diff": abs(loss_f - loss_c) / max(abs(loss_c), 1e-12),
        "max_grad_diff": grad_err,
        "max_grad": grad_scale,
    }
    row["memory_ok"] = row["fused_extra_x"] <= FUSED_MEMORY_TARGET
    row["time_ok"] = row["time_ratio"] <= FUSED_TIME_TARGET
    variants.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk for constraint_kl")
    parser.add_argument(
        "--fused-chunk-size",
        type=int,
        default=None,
        help="positions per chunk for the fused op (default: auto)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument(
        "--sections", nargs="+", choices=("logits", "head"), default=["logits", "head"], help="what to run"
    )
    parser.add_argument(
        "--train-head", action="store_true", help="head section: the output head is trained too"
    )
    parser.add_argument(
        "--head-dtype", choices=("float32", "bfloat16"), default=None, help="head section: hidden/head dtype"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes and one repeat (checks the script runs)"
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="write the JSON here instead of benchmarks/results/ (e.g. for smokes)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        device = torch.device("cuda")
        sizes = [(8, 256, 49152), (8, 1024, 49152), (8, 256, 128256), (8, 1024, 128256)]
        head_sizes = [
            (1, 1024, 49152),
            (1, 2048, 49152),
            (8, 1024, 49152),
            (1, 1024, 151936),
            (1, 2048, 151936),
        ]
        head_sizes += [(8, 1024, 151936)]
        head_dtype = args.head_dtype or "bfloat16"
        repeats = args.repeats or 10
    else:
        device = torch.device("cpu")
        exact_rss = _exact_rss_accounting()
        sizes = [(8, 256, 49152), (2, 1024, 49152)]  # B reduced at T=1024 to stay within shared RAM
        head_sizes = [(1, 1024, 49152), (1, 2048, 49152), (1, 1024, 151936), (1, 2048, 151936)]
        head_dtype = args.head_dtype or "float32"
        repeats = args.repeats or 3
    head_sizes = [(b, t, v, HIDDEN.get(v, 576)) for b, t, v in head_sizes]
    if args.smoke:
        sizes, head_sizes, repeats = (
            [(2, 64, 1024)],
            [(1, 128, 2048, 64), (2, 96, 3001, 48)],
            args.repeats or 1,
        )
    exact_rss = args.gpu or exact_rss
    rows, head_rows = [], []
    if "logits" in args.sections:
        for batch, length, vocab in sizes:
            rows.append(run_size(batch, length, vocab, device, repeats, args.chunk_size))
            print_table(rows[-1:])
        print()
        print_table(rows)
    if "head" in args.sections:
        dtype = getattr(torch, head_dtype)
        for batch, length, vocab, hidden in head_sizes:
            head_rows.append(
                run_head_size(
                    batch,
                    length,
                    vocab,
                    hidden,
                    dtype,
                    device,
                    repeats,
                    args.chunk_size,
                    args.fused_chunk_size,
                    args.train_head,
                )
            )
            print_table(head_rows[-1:])
        print()
        print_table(head_rows)
    payload = {
        "device": str(device),
        "targets": {"chunked_extra_x": MEMORY_TARGET, "time_ratio": TIME_TARGET},
        "note": "extra peak includes the [B,T,V] gradient of the policy logits; inputs are excluded",
        "exact_rss_accounting": exact_rss,
        "rows": rows,
        "head_targets": {"fused_extra_x": FUSED_MEMORY_TARGET, "time_ratio": FUSED_TIME_TARGET},
        "head_note": (
            "KL term from hidden states at N = B*T positions; extra peak in units of one [N, V] fp32 tensor, "
            "inputs (hidden states, heads) excluded; time_ratio = fused / chunked per forward + backward"
        ),
        "head_rows": head_rows,
        "smoke": args.smoke,
    }
    name = "kl_memory_gpu" if args.gpu else "kl_memory"
    path = write_result(name + ("_smoke" if args.smoke else ""), payload, args.output_dir)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
