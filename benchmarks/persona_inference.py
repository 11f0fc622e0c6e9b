"""Generation latency with vs without the persona prefix (target: <= 1.05x).

The persona's virtual tokens are injected once at prefill (a key/value prefix of ``num_virtual_tokens``
per layer); decoding then attends over ``n_virtual`` more cached positions. Variants run the same
KV-cached loop (``steer.persona.steering.decode``) with a fixed number of new tokens, interleaved
A B A B; ``hf_generate`` (plain ``model.generate``) is timed as a reference for the loop itself.

    .venv/bin/python -m benchmarks.persona_inference            # CPU: SmolLM2-135M, batch 4 x 24 tokens
    .venv/bin/python -m benchmarks.persona_inference --gpu      # GPU: batch 32 x 128 tokens, bf16
"""

from __future__ import annotations

import torch

from benchmarks.common import base_parser, interleaved, median_ratio, print_table, summarize, write_result
from steer.models import load_causal_lm
from steer.persona.soft_prompt import SoftPromptNetwork
from steer.persona.steering import decode

PROMPTS = [
    "Question: How safe do you feel walking alone at night in your neighborhood?\nAnswer:",
    "Write one sentence about what you think of the economy.",
    "Do you think the government should do more to solve problems? Explain briefly.",
    "Describe your ideal weekend in a few words.",
]


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--virtual-tokens", type=int, default=10)
    args = parser.parse_args(argv)
    device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    batch_size = args.batch_size or (32 if args.gpu else 4)
    new_tokens = args.new_tokens or (128 if args.gpu else 24)
    repeats = args.repeats or (10 if args.gpu else 5)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    model, tokenizer = load_causal_lm(args.model, dtype=dtype, device=device)
    model.eval()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    torch.manual_seed(0)
    networks = {
        mode: SoftPromptNetwork(16, args.virtual_tokens, mode, model_config=model.config).to(device).eval()
        for mode in ("prefix", "embedding")
    }
    personas = torch.randn(batch_size, 16, device=device)

    def plain():
        decode(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=None)

    def with_prefix():
        decode(
            model,
            ids,
            mask,
            network=networks["prefix"],
            persona=personas,
            max_new_tokens=new_tokens,
            eos_token_id=None,
        )

    def with_embedding():
        decode(
            model,
            ids,
            mask,
            network=networks["embedding"],
            persona=personas,
            max_new_tokens=new_tokens,
            eos_token_id=None,
        )

    def hf_generate():
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    timings = interleaved(
        {
            "plain": plain,
            "persona_prefix": with_prefix,
            "persona_embedding": with_embedding,
            "hf_generate": hf_generate,
        },
        repeats=repeats,
        warmup=1,
    )
    medians = summarize(timings)
    ratio_prefix = median_ratio(timings["persona_prefix"], timings["plain"])
    ratio_embedding = median_ratio(timings["persona_embedding"], timings["plain"])
    ratio_hf = median_ratio(timings["plain"], timings["hf_generate"])
    rows = [
        {"variant": name, "median_s": medians[name], "tokens_per_s": batch_size * new_tokens / medians[name]}
        for name in timings
    ]
    print_table(rows)
    print(f"persona prefix / plain: {ratio_prefix:.3f}x (target <= 1.05x)")
    print(f"persona embedding / plain: {ratio_embedding:.3f}x; steer loop / hf generate: {ratio_hf:.3f}x")
    payload = {
        "config": {
            "model": args.model,
            "device": device,
            "dtype": str(dtype),
            "batch_size": batch_size,
            "new_tokens": new_tokens,
            "prompt_tokens": int(ids.shape[1]),
            "virtual_tokens": args.virtual_tokens,
            "repeats": repeats,
            "gpu": bool(args.gpu),
        },
        "timings_s": timings,
        "median_s": medians,
        "ratio_prefix_vs_plain": ratio_prefix,
        "ratio_embedding_vs_plain": ratio_embedding,
        "ratio_steer_loop_vs_hf_generate": ratio_hf,
        "target_ratio": 1.05,
        "meets_target": ratio_prefix <= 1.05,
    }
    name = "persona_inference_gpu" if args.gpu else "persona_inference"
    path = write_result(name, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
