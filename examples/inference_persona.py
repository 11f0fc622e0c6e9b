"""Generate as a persona with a soft prompt trained by ``steer train persona``, in plain transformers code.

``steer train persona`` writes ``output_dir/persona/``: ``soft_prompt_config.json`` +
``soft_prompt.safetensors`` (a 2-layer MLP: persona vector -> virtual tokens), ``personas.safetensors``
(named persona vectors: ``<ATTR>=<value>`` for every demographic group, including folded-in ones, on the
default group path; ``cohort:<k>`` and demographic centroids on the individual path),
``personas.json`` (their names + the base model), ``embedder/`` and, for a run trained with ``lm_adapter: lora``,
``lm_adapter/``: an ordinary PEFT LoRA adapter (``peft.PeftModel.from_pretrained``) and, with
``lm_adapter_gate``, ``persona_gate.json`` + ``persona_gate.safetensors`` (per adapted module, the persona's
gates ``1 + G p`` on the LoRA update ``B diag(gates) A x``). This script rebuilds the soft prompt (and the gate)
from those files with plain torch + peft and decodes with a transformers KV cache; it does not need steer
(with steer installed it locates steer's embedded base model and refuses a base model other than the one recorded
in ``base_model.json`` unless ``--allow_base_mismatch``)::

    python examples/inference_persona.py outputs/persona_opinionqa/persona --list
    python examples/inference_persona.py outputs/persona_opinionqa/persona --persona "POLPARTY=Democrat" \\
        --prompt "What do you think about gun laws?" --chat

Modes: ``prefix`` networks produce a key/value prefix for every layer, injected once at prefill (the text
keeps positions 0.., the prefix has none); ``embedding`` networks produce input embeddings prepended to
the text (positions 0.. over virtual + text tokens, as serving engines that take ``prompt_embeds`` do).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

ADAPTER_DIR = "lm_adapter"


def resolve_base(name: str) -> str:
    """A local directory or hub id as is; steer's embedded names (``smollm2-135m``) via steer's cache."""
    if Path(name).expanduser().is_dir():
        return name
    try:
        from steer.models import EMBEDDED_MODELS, resolve_model_path

        if name in EMBEDDED_MODELS:
            return resolve_model_path(name)
    except ImportError:
        pass
    return name


def check_base(persona_dir: Path, model, *, allow_mismatch: bool = False) -> None:
    """With steer installed: refuse a base model other than the one the persona was trained on."""
    try:
        from steer.models import check_artefact_base
    except ImportError:
        return
    record = persona_dir / "base_model.json"
    check_artefact_base(
        json.loads(record.read_text()) if record.is_file() else None,
        model,
        artefact=f"the persona in {persona_dir}",
        allow_mismatch=allow_mismatch,
        flag="--allow_base_mismatch",
    )


def load_adapter(model, persona_dir: Path):
    """The persona LM adapter (plain PEFT) and its gate hooks; ``(model, set_gate)``, where ``set_gate(persona)``
    sets the gates every LoRA layer multiplies its ``A x`` by (a no-op without a gate)."""
    directory = persona_dir / ADAPTER_DIR
    if not directory.is_dir():
        return model, lambda persona: None
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(directory)).eval()
    config_path = directory / "persona_gate.json"
    if not config_path.is_file():
        return model, lambda persona: None
    config = json.loads(config_path.read_text())
    weights = load_file(str(directory / "persona_gate.safetensors"))
    modules = dict(model.named_modules())
    state = {"gates": None}

    def hook(index):
        def apply(module, args, output):
            gates = state["gates"][index].to(output.dtype)  # [r]
            return output * gates

        return apply

    for index, name in enumerate(config["module_names"]):
        modules[name].lora_A["default"].register_forward_hook(hook(index))

    def set_gate(persona: torch.Tensor) -> None:
        gates = 1.0 + persona.float() @ weights["proj.weight"].T + weights["proj.bias"]
        state["gates"] = gates.view(len(config["module_names"]), config["r"]).to(model.device)

    return model, set_gate


class SoftPrompt:
    """The exported soft-prompt MLP: ``tanh(p W0^T + b0) W2^T + b2``, reshaped for its mode."""

    def __init__(self, persona_dir: str | Path):
        persona_dir = Path(persona_dir)
        self.config = json.loads((persona_dir / "soft_prompt_config.json").read_text())
        self.weights = load_file(str(persona_dir / "soft_prompt.safetensors"))
        names = persona_dir / "personas.safetensors"
        self.personas = load_file(str(names)) if names.is_file() else {}
        index = persona_dir / "personas.json"
        self.metadata = json.loads(index.read_text()) if index.is_file() else {}

    @property
    def mode(self) -> str:
        return self.config["mode"]

    def persona(self, spec: str | None) -> torch.Tensor:
        """A stored persona by name, or a comma-separated vector."""
        if spec is None:
            if not self.personas:
                raise ValueError("no stored personas: pass --persona as a comma-separated vector")
            spec = sorted(self.personas)[0]
        if spec in self.personas:
            return self.personas[spec].float().reshape(-1)
        try:
            vector = torch.tensor([float(x) for x in spec.split(",")])
        except ValueError:
            raise KeyError(f"unknown persona {spec!r}; stored: {sorted(self.personas)}") from None
        if vector.numel() != self.config["persona_dim"]:
            raise ValueError(
                f"persona vector has {vector.numel()} values, expected {self.config['persona_dim']}"
            )
        return vector

    def __call__(self, persona: torch.Tensor) -> torch.Tensor:
        w = self.weights
        hidden = torch.tanh(persona @ w["mlp.0.weight"].T + w["mlp.0.bias"])
        return hidden @ w["mlp.2.weight"].T + w["mlp.2.bias"]

    def tilt(self, persona: torch.Tensor) -> float:
        """The persona's ordinal tilt ``tau`` (networks trained with ``ordinal_tilt``; 0 otherwise). To score a survey
        question as steer does, add ``tau * scale[k]`` to option ``k``'s letter logit, ``scale`` being the options'
        scaled ordinal positions in [0, 1], before the softmax over the letters. Free text generation has no
        options and uses the virtual tokens only."""
        if "tilt_head.weight" not in self.weights:
            return 0.0
        return float(persona @ self.weights["tilt_head.weight"][0] + self.weights["tilt_head.bias"][0])

    def prefix_cache(self, persona: torch.Tensor, batch: int, model) -> DynamicCache:
        """Prefix mode: a cache holding the persona's keys/values ``[B, kv_heads, n_virtual, head_dim]`` per layer."""
        c = self.config
        out = self(persona).view(
            c["num_layers"], 2, c["num_kv_heads"], c["num_virtual_tokens"], c["head_dim"]
        )
        dtype = model.get_input_embeddings().weight.dtype
        cache = DynamicCache(config=model.config)
        for layer in range(c["num_layers"]):
            key, value = (out[layer, i].unsqueeze(0).expand(batch, -1, -1, -1).to(dtype) for i in (0, 1))
            cache.update(key.contiguous(), value.contiguous(), layer)
        return cache

    def embeddings(self, persona: torch.Tensor) -> torch.Tensor:
        """Embedding mode: ``[n_virtual, hidden_size]`` virtual input embeddings."""
        return self(persona).view(self.config["num_virtual_tokens"], self.config["hidden_size"])


@torch.no_grad()
def generate(model, tokenizer, soft_prompt: SoftPrompt, persona, prompts, *, max_new_tokens=32, chat=False):
    """Greedy continuations of ``prompts`` steered by ``persona`` (prefix injected at prefill only)."""
    if chat:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    device = model.device
    enc = tokenizer(
        list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not chat
    ).to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    batch, n = ids.shape[0], soft_prompt.config["num_virtual_tokens"]
    persona = persona.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # text positions 0.. over non-padding tokens
    full_mask = torch.cat([torch.ones(batch, n, dtype=mask.dtype, device=device), mask], dim=1)
    if soft_prompt.mode == "prefix":
        cache = soft_prompt.prefix_cache(persona, batch, model)
        out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=cache)
    else:
        virtual = soft_prompt.embeddings(persona).to(model.dtype).unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([virtual, model.get_input_embeddings()(ids)], dim=1)
        positions = torch.cat([torch.arange(n, device=device).expand(batch, -1), positions + n], dim=1)
        out = model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, use_cache=True)
    position = positions[:, -1]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].float().argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        tokens.append(token)
        done |= token == eos
        if bool(done.all()):
            break
        full_mask = torch.cat([full_mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=full_mask,
            position_ids=position[:, None],
            cache=out.cache,
        )
    return tokenizer.batch_decode(torch.stack(tokens, dim=1), skip_special_tokens=True)


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("persona_dir", help="output_dir/persona of `steer train persona`")
    parser.add_argument("--base_model", help="base model (default: base_model recorded in personas.json)")
    parser.add_argument("--persona", help="stored persona name (see --list) or a comma-separated vector")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a chat user message")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--list", action="store_true", help="print the stored persona names and exit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--allow_base_mismatch",
        action="store_true",
        help="load the persona onto a base model other than the one it was trained on",
    )
    args = parser.parse_args(argv)

    persona_dir = Path(args.persona_dir)
    if not (persona_dir / "soft_prompt_config.json").is_file():
        parser.error(
            f"{persona_dir}: no soft_prompt_config.json (not a persona directory of `steer train persona`)"
        )
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (use --device cpu)")
    soft_prompt = SoftPrompt(persona_dir)
    if args.list:
        for name in sorted(soft_prompt.personas):
            print(name)
        return sorted(soft_prompt.personas)
    base = args.base_model or soft_prompt.metadata.get("base_model")
    if not base:
        parser.error("no base model recorded in personas.json: pass --base_model")
    base = resolve_base(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        check_base(persona_dir, model, allow_mismatch=args.allow_base_mismatch)
        model, set_gate = load_adapter(model, persona_dir)
        persona = soft_prompt.persona(args.persona)
    except (OSError, ValueError, KeyError) as err:  # steer's UserInputError is a ValueError
        parser.error(" ".join(str(err).strip("'\"").split()) or type(err).__name__)
    set_gate(persona)
    prompts = args.prompt or ["What matters most to you in an election?"]
    texts = generate(
        model, tokenizer, soft_prompt, persona, prompts, max_new_tokens=args.max_new_tokens, chat=args.chat
    )
    for prompt, text in zip(prompts, texts):
        print(
            json.dumps({"persona": args.persona, "prompt": prompt, "continuation": text}, ensure_ascii=False)
        )
    return texts


if __name__ == "__main__":
    main()
