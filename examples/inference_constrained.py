"""Generate with a policy trained by ``steer train constrained``, using plain transformers + peft.

``steer train constrained`` writes ``output_dir/`` = a PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors`` + the tokenizer), or a full model when trained without PEFT, and
``output_dir/guidance/`` (the NADO guidance model). Nothing below needs steer, except ``--guided``, which
samples from the guided distribution q* with steer's guidance model::

    python examples/inference_constrained.py outputs/detox --prompt "So I told him that"
    python examples/inference_constrained.py outputs/detox --prompt "So I told him that" --do_sample --seed 0
    python examples/inference_constrained.py outputs/detox --prompt "So I told him that" --guided --seed 0
    python examples/inference_constrained.py outputs/detox --merge --save_merged merged/   # one plain model

With steer installed, the adapter is only loaded on the base model recorded in ``output_dir/base_model.json``
(or ``guidance/config.json``): another base of the same shapes is refused unless ``--allow_base_mismatch``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def resolve_base(name: str) -> str:
    """A local directory or hub id as is; steer's embedded names (``smollm2-135m``) via steer's cache."""
    if Path(name).expanduser().is_dir():
        return name
    try:  # only for steer's embedded GGUF models; hub ids pass through unchanged
        from steer.models import EMBEDDED_MODELS, resolve_model_path

        if name in EMBEDDED_MODELS:
            return resolve_model_path(name)
    except ImportError:
        pass
    return name


def check_base(output_dir: Path, model, *, allow_mismatch: bool = False) -> None:
    """With steer installed: refuse a base model other than the one the adapter was trained on."""
    try:
        from steer.models import check_artefact_base, recorded_base_model
    except ImportError:
        return
    check_artefact_base(
        recorded_base_model(output_dir),
        model,
        artefact=f"the adapter in {output_dir}",
        allow_mismatch=allow_mismatch,
        flag="--allow_base_mismatch",
    )


def _quiet_adapter_load():
    try:  # PEFT's is_gradient_checkpointing FutureWarning on every adapter load
        from steer.models import quiet_adapter_load

        return quiet_adapter_load()
    except ImportError:
        return contextlib.nullcontext()


def load_policy(
    output_dir: str | Path,
    base_model: str | None = None,
    *,
    dtype=torch.float32,
    merge=False,
    allow_base_mismatch=False,
):
    """``(model, tokenizer)`` from a ``steer train constrained`` output directory."""
    output_dir = Path(output_dir)
    base = base_model or str(output_dir)
    adapter_config = output_dir / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base = base_model or json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(resolve_base(base), dtype=dtype)
        check_base(output_dir, model, allow_mismatch=allow_base_mismatch)
        with _quiet_adapter_load():
            model = PeftModel.from_pretrained(model, output_dir)
        if merge:
            model = model.merge_and_unload()
    elif (output_dir / "config.json").is_file():  # trained without PEFT: a full model
        model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=dtype)
    else:
        raise FileNotFoundError(f"{output_dir}: neither adapter_config.json nor config.json found")
    has_tokenizer = (output_dir / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(output_dir if has_tokenizer else resolve_base(base))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@torch.no_grad()
def generate(
    model, tokenizer, prompts, *, max_new_tokens=20, do_sample=False, temperature=1.0, top_p=1.0, seed=None
):
    """Continuations of ``prompts`` (left padding, KV cache), decoded without special tokens."""
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    )
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=do_sample,
        **sampling,
    )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def guided(
    model, tokenizer, output_dir, prompts, *, max_new_tokens=20, temperature=1.0, top_p=1.0, seed=None
):
    """Samples from q* ∝ p(x) · R(x) with the exported guidance model (needs steer installed)."""
    from steer.guidance import GuidanceModel, guided_generate

    guidance = GuidanceModel.from_pretrained(Path(output_dir) / "guidance", model)
    return guided_generate(
        model, guidance, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed,
    )  # fmt: skip


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", help="output_dir of `steer train constrained`")
    parser.add_argument("--base_model", help="base model (default: base_model_name_or_path of the adapter)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--guided", action="store_true", help="sample from q* with output_dir/guidance (steer)"
    )
    parser.add_argument("--merge", action="store_true", help="merge the LoRA weights into the base model")
    parser.add_argument("--save_merged", help="with --merge: write the merged model + tokenizer here")
    parser.add_argument(
        "--allow_base_mismatch",
        action="store_true",
        help="load the adapter on --base_model even if it is not the base it was trained on",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.save_merged and not args.merge:
        parser.error("--save_merged needs --merge")
    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        parser.error(f"output_dir not found: {output_dir}")
    if not (output_dir / "adapter_config.json").is_file() and not (output_dir / "config.json").is_file():
        parser.error(f"{output_dir} holds neither an adapter (adapter_config.json) nor a model (config.json)")
    if args.guided and not (output_dir / "guidance" / "config.json").is_file():
        parser.error(f"--guided needs {output_dir / 'guidance'} (written by `steer train constrained`)")
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
    try:
        model, tokenizer = load_policy(
            args.output_dir, args.base_model, merge=args.merge, allow_base_mismatch=args.allow_base_mismatch
        )
    except (OSError, ValueError, KeyError) as err:  # steer's UserInputError is a ValueError
        parser.error(" ".join(str(err).split()) or type(err).__name__)
    model.to(args.device)
    if args.save_merged:
        model.save_pretrained(args.save_merged)
        tokenizer.save_pretrained(args.save_merged)
    prompts = args.prompt or ["The weather today is"]
    if args.guided:
        try:
            texts = guided(
                model, tokenizer, args.output_dir, prompts, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            )  # fmt: skip
        except ValueError as err:  # steer's one-line errors (another base model, an unreadable guidance/)
            parser.error(" ".join(str(err).split()))
    else:
        texts = generate(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        )  # fmt: skip
    for prompt, text in zip(prompts, texts):
        print(json.dumps({"prompt": prompt, "continuation": text}, ensure_ascii=False))
    return texts


if __name__ == "__main__":
    main()
