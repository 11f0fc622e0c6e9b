"""GuidanceModel: a token-level NADO model ``z[B, T, V]`` with ``R = sigmoid(z)``.

``R(x<t, v)`` estimates P(the finished sequence satisfies the constraint | prefix x<t, next token v).
The default ``lora`` backbone is a second LoRA adapter on the policy's own (frozen) base weights, so the
guidance model costs adapter + head memory rather than a second model copy. The vocabulary head
(:class:`~steer.guidance.head.GuidanceHead`, optionally with a context logit shared by every token) is
zero-initialised: R = 0.5 everywhere and q* = p before training.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import ArtefactMismatchError, InputFileNotFoundError, UserInputError
from ..io import atomic_save_file, atomic_write_text, dataclass_from_dict
from ..models import base_model_record, check_artefact_base, model_device, only_adapter, tuner_layers
from .context_prior import ContextPrior
from .head import GuidanceHead, add_context_terms_

__all__ = ["GuidanceConfig", "GuidanceModel"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONTEXT_PRIOR_NAME = "context_prior.safetensors"
FORMAT_VERSION = 1


@dataclass
class GuidanceConfig:
    """How the guidance model is built (saved as ``config.json`` next to its weights)."""

    backbone: str = field(
        default="lora",
        metadata={
            "help": "'lora': a second LoRA adapter on the policy's base weights; 'separate': own backbone."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the guidance adapter."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the guidance adapter."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout of the guidance adapter."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules the guidance LoRA adapts; None means all linear layers."}
    )
    adapter_name: str = field(
        default="guidance", metadata={"help": "PEFT adapter name of the guidance LoRA."}
    )
    separate_num_layers: int | None = field(
        default=None,
        metadata={"help": "'separate' backbone: copy the first k decoder layers of the base (None: all)."},
    )
    shared_logit: bool = field(
        default=False,
        metadata={
            "help": "Add one context logit u.h to every token's logit (steer.guidance.head): what the prefix says "
            "about the constraint, whatever the next token, is learned from every sampled position."
        },
    )
    token_rows: bool = field(
        default=True,
        metadata={
            "help": "Train the head's per-token rows and bias. False (needs shared_logit) keeps them at their start "
            "(zero rows, the prior bias): R(x<t, v) = sigmoid(prior_v + u.h(x<t)), so tokens differ only by their "
            "prior and the context (through u and the backbone) sets how strongly the prior acts."
        },
    )

    token_rank: int = field(
        default=0,
        metadata={
            "help": "Rank r of a token term tied to the base model's output embeddings E (steer.guidance.head): "
            "z[v] += e_v.(B A h), one low-rank map learned from every sampled token, so what the rounds learn about "
            "a token reaches tokens with nearby embeddings. 0 = off."
        },
    )

    def __post_init__(self) -> None:
        if self.backbone not in ("lora", "separate"):
            raise ValueError(f"GuidanceConfig.backbone must be 'lora' or 'separate', got {self.backbone!r}")
        if self.lora_r < 1:
            raise ValueError(f"GuidanceConfig.lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"GuidanceConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.separate_num_layers is not None and self.separate_num_layers < 1:
            raise ValueError(
                f"GuidanceConfig.separate_num_layers must be >= 1, got {self.separate_num_layers}"
            )
        if not self.adapter_name or self.adapter_name == "default":
            raise ValueError("GuidanceConfig.adapter_name must be non-empty and not 'default' (the policy's)")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.token_rank < 0:
            raise ValueError(f"GuidanceConfig.token_rank must be >= 0, got {self.token_rank}")
        if not self.token_rows and not self.shared_logit and not self.token_rank:
            raise ValueError(
                "GuidanceConfig.token_rows=False needs shared_logit=True or token_rank > 0 (otherwise no head "
                "parameter learns)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuidanceConfig:
        return dataclass_from_dict(cls, data)


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _decoder_of(causal_lm: nn.Module) -> nn.Module:
    """The transformer body (``model.model`` / ``model.transformer``) that returns hidden states."""
    decoder = getattr(causal_lm, "base_model", causal_lm)
    if decoder is causal_lm:
        raise ValueError(f"cannot find the decoder body of {type(causal_lm).__name__} (no base_model_prefix)")
    return decoder


def _hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot read the hidden size from {type(config).__name__}")


def _output_embeddings(causal_lm: nn.Module, vocab_size: int, hidden_size: int) -> Tensor:
    """The base model's ``[V, H]`` output embeddings (gathered in full when sharded), for the head's token term."""
    module = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    weight = getattr(module, "weight", None)
    if weight is None:
        raise ValueError(
            "GuidanceConfig.token_rank needs a base model with output embeddings (get_output_embeddings)"
        )
    if hasattr(weight, "full_tensor"):  # a DTensor (FSDP2): every rank keeps the whole basis
        weight = weight.full_tensor()
    if tuple(weight.shape) != (vocab_size, hidden_size):
        raise ValueError(
            f"GuidanceConfig.token_rank: the output embeddings are {list(weight.shape)}, not [vocab_size, hidden_size] "
            f"= {[vocab_size, hidden_size]}"
        )
    return weight


def _position_ids(attention_mask: Tensor, new_tokens: int) -> Tensor:
    """Positions that skip left padding: cumulative count of attended tokens, minus one."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -new_tokens:]


class GuidanceModel(nn.Module):
    """Backbone + zero-initialised vocabulary head; ``forward`` returns ``z`` [B, T, V] in float32.

    With the ``lora`` backbone the base model is *not* registered as a submodule: the guidance adapter
    lives inside ``base_model`` (the policy), and :meth:`trainable_parameters` lists what this model trains.
    Keep those parameters out of the policy's optimizer.
    """

    _fast_adapter_switch = True  # switch PEFT tuner layers directly (False: via set_adapter + flag restore)

    def __init__(self, base_model: nn.Module, config: GuidanceConfig | None = None) -> None:
        super().__init__()
        self.config = config or GuidanceConfig()
        causal_lm = base_model.get_base_model() if _is_peft_model(base_model) else base_model
        model_config = causal_lm.config
        self.vocab_size = int(model_config.vocab_size)
        self.hidden_size = _hidden_size(model_config)
        self.base_model_record = base_model_record(causal_lm)  # saved: loading onto another base is refused
        device = model_device(causal_lm)
        self._trainable = True
        if self.config.backbone == "lora":
            peft_model = self._attach_adapter(base_model)
            object.__setattr__(self, "peft_model", peft_model)  # shared with the policy: not a submodule
            self.backbone = None
            # Every tuner layer (also those without a guidance adapter, which must run without the policy's).
            self._tuner_layers = tuner_layers(peft_model)
            self._checkpoint_modules = [
                m for m in peft_model.modules() if hasattr(m, "gradient_checkpointing")
            ]
            name = self.config.adapter_name
            self._adapter_params = [
                p for n, p in peft_model.named_parameters() if name in n.split(".") and "lora_" in n
            ]
            if not self._adapter_params:
                raise RuntimeError(
                    f"adding the LoRA adapter {name!r} created no parameters; check target_modules"
                )
            self._all_adapter_params = [
                p for layer in self._tuner_layers for n, p in layer.named_parameters() if "lora_" in n
            ]
        else:
            object.__setattr__(self, "peft_model", None)
            self.backbone = self._build_separate_backbone(causal_lm).to(device)
            self._tuner_layers = []
            self._checkpoint_modules = []
            self._adapter_params = []
            self._all_adapter_params = []
        self.head = GuidanceHead(
            self.hidden_size,
            self.vocab_size,
            shared=self.config.shared_logit,
            token_rank=self.config.token_rank,
            device=device,
        )
        if self.config.token_rank:
            self.head.set_token_basis(_output_embeddings(causal_lm, self.vocab_size, self.hidden_size))
        self.context_prior: ContextPrior | None = None  # fixed offsets of z for split words (not trained)
        self.set_trainable(True)

    # ------------------------------------------------------------------ construction
    def _lora_config(self):
        from peft import LoraConfig

        cfg = self.config
        targets = list(cfg.target_modules) if cfg.target_modules else ["all-linear"]
        targets = "all-linear" if targets == ["all-linear"] else targets
        return LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def _attach_adapter(self, base_model: nn.Module):
        from peft import get_peft_model

        name = self.config.adapter_name
        lora_config = self._lora_config()
        if _is_peft_model(base_model):
            if name in base_model.peft_config:
                raise ValueError(
                    f"the policy model already has an adapter named {name!r}; choose another "
                    "GuidanceConfig.adapter_name or delete it first"
                )
            flags = {p: p.requires_grad for p in base_model.parameters()}
            try:
                base_model.add_adapter(name, lora_config)
            except ValueError as err:
                raise ValueError(
                    f"cannot add the guidance LoRA to this PEFT model ({err}); use GuidanceConfig(backbone='separate')"
                ) from err
            for param, flag in flags.items():  # add_adapter re-applies set_adapter: keep the policy as it was
                param.requires_grad_(flag)
            return base_model
        # A plain model: inject LoRA layers (in place, no weight copy), then switch them off so that the
        # model itself keeps computing the base distribution.
        flags = {p: p.requires_grad for p in base_model.parameters()}
        peft_model = get_peft_model(base_model, lora_config, adapter_name=name)
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for layer in tuner_layers(peft_model):
            layer.enable_adapters(False)
        return peft_model

    def _build_separate_backbone(self, causal_lm: nn.Module) -> nn.Module:
        from transformers import AutoModel

        source = _decoder_of(causal_lm)
        config = copy.deepcopy(causal_lm.config)
        total = int(config.num_hidden_layers)
        k = self.config.separate_num_layers or total
        if k > total:
            raise ValueError(
                f"GuidanceConfig.separate_num_layers={k} but the base model has only {total} layers"
            )
        config.num_hidden_layers = k
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:k]
        backbone = AutoModel.from_config(config, dtype=torch.float32)
        # Copy the base weights (LoRA-wrapped modules keep theirs under ``base_layer``).
        state = {}
        for key, value in source.state_dict().items():
            if "lora_" in key or "lora_magnitude" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value
        target = backbone.state_dict()
        missing = [key for key in target if key not in state]
        if missing:
            raise RuntimeError(f"separate guidance backbone: base weights missing for {missing[:5]}")
        backbone.load_state_dict({key: state[key].float() for key in target}, strict=True)
        return backbone

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters this model trains: guidance LoRA + head, or separate backbone + head."""
        if self.backbone is not None:
            return [*self.backbone.parameters(), *self.head.parameters()]
        return [*self._adapter_params, *self.head.parameters()]

    def set_trainable(self, flag: bool) -> None:
        """Freeze (``False``) or unfreeze the guidance parameters, e.g. during policy steps. Without
        ``token_rows`` the head's rows and bias stay frozen (they keep their start: zero rows, the prior)."""
        self._trainable = bool(flag)
        for param in self.trainable_parameters():
            param.requires_grad_(self._trainable)
        if not self.config.token_rows:
            self.head.weight.requires_grad_(False)
            self.head.bias.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def init_head(self, bias: Tensor) -> None:
        """Start the head from a per-token prior: ``z = bias`` for every context (weights, shared vector zeroed).

        ``bias`` is ``[V]`` (e.g. :func:`steer.guidance.prior.prior_logits` of the oracle's token prior), so
        R starts at the oracle's judgement of each token, also for tokens the policy never samples.
        """
        if bias.shape != (self.vocab_size,):
            raise ValueError(f"head bias must be [{self.vocab_size}], got {tuple(bias.shape)}")
        with torch.no_grad():
            self.head.weight.zero_()
            if self.head.shared is not None:
                self.head.shared.zero_()
            if self.head.token_up is not None:
                self.head.token_up.zero_()
            self.head.bias.copy_(bias.to(device=self.device, dtype=self.head.bias.dtype))

    def set_context_prior(self, prior: ContextPrior | None) -> None:
        """Add ``prior``'s fixed offsets to ``z`` wherever a context completes a flagged word (see
        :mod:`steer.guidance.context_prior`); ``None`` removes it. Saved and loaded with the model."""
        if prior is not None and not isinstance(prior, ContextPrior):
            raise TypeError(f"context prior must be a ContextPrior or None, got {type(prior).__name__}")
        if prior is not None and len(prior) and int(prior.tokens.max()) >= self.vocab_size:
            raise ValueError(f"context prior has token ids >= the vocabulary size {self.vocab_size}")
        self.context_prior = prior

    def contexts(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor | None:
        """``[B, T, L]`` the context prior's view of each position (``None`` without a context prior)."""
        if self.context_prior is None:
            return None
        return self.context_prior.contexts(input_ids, attention_mask)

    def logits(self, hidden: Tensor, contexts: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
        """``z [..., V]`` (float32) from backbone hidden states ``[..., H]``: the head, plus the context prior's
        offsets where ``contexts [..., L]`` (:meth:`contexts` at the same positions) complete a flagged word.

        The one computation of ``z``: :meth:`forward`, the objective, the constraint KL and the rounds' metrics
        all call it. ``out``: a ``[N, V]`` float32 buffer to write a 2-D result into (no allocation).
        """
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if out is None:
                z = F.linear(hidden.float(), self.head.weight, self.head.bias)
            else:
                z = torch.addmm(self.head.bias, hidden.float(), self.head.weight.t(), out=out)
            add_context_terms_(self.head, z, hidden)
        if self.context_prior is not None and contexts is not None:
            self.context_prior.add_(z.view(-1, z.shape[-1]), contexts.reshape(-1, contexts.shape[-1]))
        return z

    def token_offsets(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, contexts: Tensor | None = None
    ) -> Tensor | None:
        """``[B, T-1]`` the context prior's offset of ``z[b, t, x_{t+1}]`` for every next token (or ``None``);
        ``contexts``: :meth:`contexts` of the same batch when the caller already has them."""
        if contexts is None:
            contexts = self.contexts(input_ids, attention_mask)
        if contexts is None:
            return None
        batch, length = input_ids.shape
        flat = self.context_prior.offsets_at(
            contexts[:, :-1].reshape(-1, contexts.shape[-1]), input_ids[:, 1:].reshape(-1)
        )
        return flat.view(batch, length - 1)

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _guidance_adapter(self):
        """Activate only the guidance adapter; afterwards restore the active adapters and requires_grad flags.

        The tuner layers are switched directly where PEFT exposes their state (:func:`steer.models.only_adapter`,
        no flag churn), otherwise through :meth:`_set_adapter_keeping_flags`. Gradient checkpointing is switched
        off for the guidance pass: its recomputation would run after the policy adapter is active again.
        """
        checkpointed = [
            m for m in self._checkpoint_modules if getattr(m, "gradient_checkpointing", False) is True
        ]
        fast = self._fast_adapter_switch and all(
            hasattr(layer, "_active_adapter") and hasattr(layer, "_disable_adapters")
            for layer in self._tuner_layers
        )
        name = self.config.adapter_name
        with only_adapter(self._tuner_layers, name) if fast else self._set_adapter_keeping_flags(name):
            for module in checkpointed:
                module.gradient_checkpointing = False
            try:
                yield
            finally:
                for module in checkpointed:
                    module.gradient_checkpointing = True

    @contextlib.contextmanager
    def _set_adapter_keeping_flags(self, name: str):
        """The public-API path of :meth:`_guidance_adapter`: PEFT's ``set_adapter`` on every tuner layer, which
        flips ``requires_grad`` of every adapter, so all adapter flags are saved and put back."""
        flags = [p.requires_grad for p in self._all_adapter_params]
        states = [(layer, layer.active_adapter, layer.disable_adapters) for layer in self._tuner_layers]
        try:
            for layer, _, disabled in states:
                if disabled:
                    layer.enable_adapters(True)
                layer.set_adapter([name])
            for param, flag in zip(self._all_adapter_params, flags):
                param.requires_grad_(flag)
            yield
        finally:
            for layer, active, disabled in states:
                layer.set_adapter(active)
                if disabled:
                    layer.enable_adapters(False)
            for param, flag in zip(self._all_adapter_params, flags):
                param.requires_grad_(flag)

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache=None,
    ) -> Tensor:
        """Last-layer hidden states ``[B, T, H]`` of the guidance backbone (``cache``: see :meth:`forward`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = _position_ids(attention_mask, input_ids.shape[1])
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": cache is not None,
        }
        if cache is not None:
            kwargs["cache"] = cache
        if self.backbone is not None:
            return self.backbone(**kwargs).last_hidden_state
        decoder = _decoder_of(self.peft_model.get_base_model())
        with self._guidance_adapter():
            return decoder(**kwargs).last_hidden_state

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache=None,
        full_input_ids: Tensor | None = None,
    ) -> Tensor:
        """Guidance logits ``z`` [B, T, V] (float32); ``R = sigmoid(z)``.

        ``z[:, t, v]`` scores appending token ``v`` after ``input_ids[:, :t+1]``. ``attention_mask`` marks
        real tokens (left or right padding); positions skip padding. ``cache`` (a transformers ``Cache``,
        e.g. ``DynamicCache()``, updated in place) lets decoding feed only the new tokens, with the full
        attention mask; with a context prior, ``full_input_ids`` (every token so far) must come along too.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        contexts = None
        if self.context_prior is not None:
            if cache is not None and full_input_ids is None:
                raise ValueError(
                    "with a context prior, a cached forward needs full_input_ids (all tokens so far)"
                )
            ids = input_ids if full_input_ids is None else full_input_ids
            contexts = self.contexts(ids, attention_mask)[:, -input_ids.shape[1] :]
        return self.logits(self.hidden_states(input_ids, attention_mask, cache=cache), contexts)

    # ------------------------------------------------------------------ persistence
    def _weights(self) -> dict[str, Tensor]:
        weights = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.backbone is not None:
            weights.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        else:
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(self.peft_model, adapter_name=self.config.adapter_name)
            weights.update({f"adapter.{k}": v for k, v in adapter.items()})
        return {k: v.detach().contiguous().cpu() for k, v in weights.items()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (guidance weights only, never the base model)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "guidance_config": self.config.to_dict(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "base_model": self.base_model_record,
        }
        weights = self._weights()
        atomic_save_file(weights, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        context_path = directory / CONTEXT_PRIOR_NAME
        if self.context_prior is not None:
            atomic_save_file(self.context_prior.state(), context_path, metadata={"format": "pt"})
        elif context_path.exists():
            context_path.unlink()  # a stale prior from an earlier save must not come back on load
        atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(
        cls, save_directory: str | os.PathLike, base_model: nn.Module, *, allow_base_mismatch: bool = False
    ) -> GuidanceModel:
        """Rebuild a saved guidance model on ``base_model`` (the same base architecture it was trained on).

        A base model of the same shapes but other weights than the recorded one is refused unless
        ``allow_base_mismatch`` (then a warning)."""
        directory = Path(save_directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise InputFileNotFoundError(f"guidance model file not found: {path}")
        try:
            meta = json.loads(config_path.read_text())
            config = GuidanceConfig.from_dict(meta["guidance_config"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserInputError(f"{config_path}: not a valid guidance config ({err})") from err
        causal_lm = base_model.get_base_model() if _is_peft_model(base_model) else base_model
        for key, value in (
            ("vocab_size", causal_lm.config.vocab_size),
            ("hidden_size", _hidden_size(causal_lm.config)),
        ):
            if key in meta and int(meta[key]) != int(value):
                raise ArtefactMismatchError(
                    f"{config_path}: {key}={meta[key]} but the base model has {key}={value}; load the guidance "
                    "model on the base model it was trained on"
                )
        check_artefact_base(
            meta.get("base_model"),
            causal_lm,
            artefact=f"the guidance model in {directory}",
            allow_mismatch=allow_base_mismatch,
        )
        model = cls(base_model, config)
        weights = load_file(str(weights_path), device=str(model.device))
        model._load_weights(weights, weights_path)
        context_path = directory / CONTEXT_PRIOR_NAME
        if context_path.is_file():
            model.set_context_prior(
                ContextPrior.from_state(load_file(str(context_path)), source=str(context_path))
            )
        return model

    def _load_weights(self, weights: dict[str, Tensor], source: Path) -> None:
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}

        unknown = [k for k in weights if not k.startswith(("head.", "backbone.", "adapter."))]
        if unknown:
            raise ValueError(f"{source}: unexpected keys {unknown[:5]}")
        head = part("head.")
        expected = {name: tuple(p.shape) for name, p in self.head.named_parameters()}
        shapes = {k: tuple(v.shape) for k, v in head.items()}
        if shapes != expected:
            raise ValueError(
                f"{source}: head weights {shapes} do not fit head {expected} (config.json shared_logit: "
                f"{self.config.shared_logit}, token_rank: {self.config.token_rank})"
            )
        with torch.no_grad():
            for name, param in self.head.named_parameters():
                param.copy_(head[name])
        if self.backbone is not None:
            self.backbone.load_state_dict({k: v for k, v in part("backbone.").items()}, strict=True)
            return
        from peft import set_peft_model_state_dict

        adapter = part("adapter.")
        if not adapter:
            raise ValueError(f"{source}: no guidance adapter weights (keys 'adapter.*')")
        flags = [p.requires_grad for p in self._all_adapter_params]
        result = set_peft_model_state_dict(self.peft_model, adapter, adapter_name=self.config.adapter_name)
        for param, flag in zip(self._all_adapter_params, flags):
            param.requires_grad_(flag)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{source}: adapter keys do not match the base model: {unexpected[:5]}")
        missing = [k for k in getattr(result, "missing_keys", []) if f".{self.config.adapter_name}." in k]
        if missing:
            raise ValueError(f"{source}: guidance adapter weights missing for {missing[:5]}")
