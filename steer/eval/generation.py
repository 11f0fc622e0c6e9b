"""Models and samplers of the toxicity evaluation: :func:`load_eval_model` (a model, or a PEFT adapter on its
base), its guidance model (:func:`load_guidance`) and the ``generate_fn`` builders.

Any generator plugs in through ``generate_fn(prompts, n, max_new_tokens, top_p, seed) -> list[list[str]]``
(n continuations per prompt, continuation text only); :func:`hf_generate_fn` builds one from a causal LM (a
base model, an SFT/constrained adapter) and :func:`guided_generate_fn` one from a NADO guidance model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..constraints.classifier import default_device
from ..errors import UserInputError, first_line
from ..progress import progress_bar

GenerateFn = Callable[[list[str], int, int, float, int], list[list[str]]]


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def load_eval_model(
    name_or_path: str,
    *,
    base_model: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    allow_base_mismatch: bool = False,
):
    """``(model, tokenizer, info)``; a PEFT adapter dir is loaded (unmerged) on its base model.

    The base model (``base_model``, default: the adapter's ``base_model_name_or_path``) must be the one the
    adapter was trained on, as recorded in its ``base_model.json`` (or its run's ``guidance/config.json``):
    another base is refused unless ``allow_base_mismatch``. ``info`` = ``{"model": ..., "base_model": ...,
    "adapter": bool}``.
    """
    from ..models import (
        check_artefact_base,
        load_causal_lm,
        load_tokenizer,
        quiet_adapter_load,
        recorded_base_model,
    )

    device = default_device(device)
    dtype = _resolve_dtype(dtype, device)
    path = Path(str(name_or_path)).expanduser()
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        from ..models import check_model_dir

        check_model_dir(path)
        try:
            base = base_model or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        except json.JSONDecodeError as err:
            raise ValueError(f"{adapter_config}: invalid JSON ({err})") from err
        if not base:
            raise ValueError(f"{adapter_config} has no base_model_name_or_path; pass base_model")
        from peft import PeftModel

        recorded = recorded_base_model(path)
        model, tokenizer = load_causal_lm(base, dtype=dtype, device=device)
        check_artefact_base(
            recorded,
            model,
            artefact=f"the adapter in {path}",
            allow_mismatch=allow_base_mismatch,
            flag="--allow_base_mismatch",
        )
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(str(path))
        with quiet_adapter_load():
            model = PeftModel.from_pretrained(model, str(path)).to(device)
        info = {"model": str(path), "base_model": str(base), "adapter": True}
    else:
        model, tokenizer = load_causal_lm(str(name_or_path), dtype=dtype, device=device)
        info = {"model": str(name_or_path), "base_model": str(name_or_path), "adapter": False}
    return model.eval(), tokenizer, info


def hf_generate_fn(model, tokenizer, *, batch_size: int = 64, temperature: float = 1.0) -> GenerateFn:
    """A ``generate_fn`` sampling from a causal LM with ``model.generate`` (left padding, KV cache)."""
    from transformers import GenerationConfig

    from ..models import model_device

    def generate(prompts: list[str], n: int, max_new_tokens: int, top_p: float, seed: int) -> list[list[str]]:
        device = model_device(model)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        config = GenerationConfig(
            do_sample=True,
            top_p=top_p,
            top_k=0,  # pure nucleus sampling: transformers would otherwise fill in top_k=50
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        )
        per_batch = max(1, batch_size // n)
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        out: list[list[str]] = []
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(seed)
                model.eval()
                starts = range(0, len(prompts), per_batch)
                for start in progress_bar(starts, desc=f"generating {n} per prompt", unit="batch"):
                    chunk = prompts[start : start + per_batch]
                    enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
                    ids = model.generate(**enc, generation_config=config)
                    texts = tokenizer.batch_decode(
                        ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                    )
                    out.extend(texts[i * n : (i + 1) * n] for i in range(len(chunk)))
        finally:
            tokenizer.padding_side = side
        return out

    return generate


def guided_generate_fn(
    model, guidance, tokenizer, *, batch_size: int = 16, temperature: float = 1.0, stop_constraint=None
) -> GenerateFn:
    """A ``generate_fn`` sampling from NADO's guided distribution q* (``steer.guidance.guided_generate``).

    ``guided_generate`` returns a flat list, ``n_per_prompt`` consecutive continuations per prompt. With a
    monotone ``stop_constraint`` a continuation that satisfies it goes on unguided (``steer.guidance.settled_by``).
    """
    from ..guidance import guided_generate, settled_by

    settled = settled_by(stop_constraint, tokenizer) if stop_constraint is not None else None

    def generate(prompts: list[str], n: int, max_new_tokens: int, top_p: float, seed: int) -> list[list[str]]:
        flat = guided_generate(
            model,
            guidance,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            n_per_prompt=n,
            batch_size=batch_size,
            seed=seed,
            settled=settled,
        )
        if len(flat) != len(prompts) * n:
            raise RuntimeError(f"guided_generate returned {len(flat)} texts for {len(prompts)} prompts x {n}")
        return [list(flat[i * n : (i + 1) * n]) for i in range(len(prompts))]

    return generate


def load_guidance(directory: str, model, *, allow_base_mismatch: bool = False):
    """The guidance model of ``directory`` on ``model``; unreadable weight files are one line naming the file."""
    from ..guidance import GuidanceModel
    from ..models import model_device

    try:
        guidance = GuidanceModel.from_pretrained(directory, model, allow_base_mismatch=allow_base_mismatch)
    except UserInputError:
        raise
    except Exception as err:
        if type(err).__name__ != "SafetensorError" and not isinstance(err, (OSError, EOFError)):
            raise
        names = ("model.safetensors", "context_prior.safetensors")
        bad = next((n for n in names if n in str(err)), None) or _unreadable(Path(directory), names)
        where = Path(directory) / bad if bad else Path(directory)
        raise UserInputError(
            f"ToxicityEvalArguments.guidance_dir: {where} cannot be read ({first_line(err, typed=True)}); was the "
            "run saved completely?"
        ) from err
    return guidance.to(model_device(model))


def _unreadable(directory: Path, names: Sequence[str]) -> str | None:
    """The first of ``names`` in ``directory`` that safetensors cannot open."""
    from safetensors import safe_open

    for name in names:
        if not (directory / name).is_file():
            continue
        try:
            with safe_open(str(directory / name), framework="pt") as handle:
                list(handle.keys())
        except Exception:  # noqa: BLE001 - whatever the reader raises, this is the broken file
            return name
    return None


def load_generations(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Prompts and continuations from a ``<run_name>.generations.jsonl`` that ``steer eval toxicity`` wrote
    (one ``{"prompt": ..., "continuations": [...]}`` a line, every line with the same number of continuations),
    so that another oracle can judge the same text. A bad line is a one-line error naming file and line."""
    path = Path(path).expanduser()
    prompts: list[str] = []
    generations: list[list[str]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"generations_file {path}: cannot be read ({first_line(err)})") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, continuations = row["prompt"], row["continuations"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserInputError(
                f"generations_file {path}: line {number} is not a generations record with 'prompt' and "
                f"'continuations' ({first_line(err, typed=True)})"
            ) from err
        if not isinstance(prompt, str) or not (
            isinstance(continuations, list)
            and continuations
            and all(isinstance(t, str) for t in continuations)
        ):
            raise UserInputError(
                f"generations_file {path}: line {number}: 'prompt' must be a string and 'continuations' a "
                "non-empty list of strings"
            )
        if generations and len(continuations) != len(generations[0]):
            raise UserInputError(
                f"generations_file {path}: line {number} has {len(continuations)} continuations, line 1 has "
                f"{len(generations[0])}"
            )
        prompts.append(prompt)
        generations.append(list(continuations))
    if not prompts:
        raise UserInputError(f"generations_file {path}: holds no generations")
    return prompts, generations


def saved_generate_fn(prompts: list[str], stored: list[list[str]], *, what: str) -> GenerateFn:
    """A generate_fn that returns ``stored`` (read by :func:`load_generations`) for the prompts it was read
    with; ``what`` names the source in the error for a prompt the file does not hold."""
    table = dict(zip(prompts, stored))

    def saved_generations(asked, n, max_new_tokens, top_p, seed):
        if list(asked) == list(prompts):  # the file's own prompts, in its order (repeated prompts kept apart)
            return [list(row) for row in stored]
        missing = [p for p in asked if p not in table]
        if missing:  # a prompt cut to the model's context differs from the one the file holds
            raise UserInputError(
                f"{what}: {len(missing)} prompts are not in the file (first: {missing[0][:60]!r})"
            )
        return [table[p] for p in asked]

    return saved_generations
