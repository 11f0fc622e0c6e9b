"""SoftPromptNetwork: a persona vector -> virtual tokens for a frozen causal LM.

Two modes:

* ``prefix`` (the default, the best mode in Li et al. 2024): a key/value prefix of ``num_virtual_tokens``
  for every attention layer, shaped ``[B, num_kv_heads, n_virtual, head_dim]`` (grouped-query attention
  is handled by producing the *KV* heads only) and handed to the model as a transformers ``DynamicCache``.
* ``embedding`` (prompt tuning): ``num_virtual_tokens`` input embeddings prepended to the text.

Position convention (used identically by training, :func:`steered_forward`, option probabilities and
generation):

* ``prefix``: the prefix is position-free (its keys are learned directly, no rotary/absolute position);
  the text keeps the positions it has without a prefix, ``0..T-1`` counted over non-padding tokens.
  With the prefix masked out the steered model is therefore exactly the plain model.
* ``embedding``: the virtual tokens are ordinary leading tokens at positions ``0..n-1`` and the text
  continues at ``n..``, which is what a serving engine does with exported ``prompt_embeds``.

Saved format (``save_pretrained``): ``soft_prompt_config.json`` (:class:`SoftPromptConfig`) and
``soft_prompt.safetensors`` with ``mlp.0.weight`` [hidden, persona_dim], ``mlp.0.bias``, ``mlp.2.weight``
[output_dim, hidden], ``mlp.2.bias``. In plain torch: ``out = W2 @ tanh(W1 @ p + b1) + b2``; prefix mode
reshapes ``out`` to ``[num_layers, 2 (key, value), num_kv_heads, n_virtual, head_dim]``, embedding mode to
``[n_virtual, hidden_size]``. With ``ordinal_tilt`` (config) also ``tilt_head.weight`` [1, persona_dim] and
``tilt_head.bias`` [1]: the persona's ordinal tilt ``tau = tilt_head.weight @ p + tilt_head.bias``, added as
``tau * scale`` to the option letters' logits (:func:`apply_ordinal_tilt`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import DynamicCache

from steer.io import atomic_save_file, atomic_write_json, dataclass_from_dict

CONFIG_NAME = "soft_prompt_config.json"
WEIGHTS_NAME = "soft_prompt.safetensors"
MODES = ("prefix", "embedding")


@dataclass
class SoftPromptConfig:
    """Shape of a :class:`SoftPromptNetwork` (saved as ``soft_prompt_config.json``)."""

    persona_dim: int
    num_virtual_tokens: int = 10
    mode: str = "prefix"
    hidden: int = 32
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    init_std: float = 0.02
    ordinal_tilt: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SoftPromptConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("persona_dim", "num_virtual_tokens", "hidden"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(
                    f"SoftPromptConfig.{name} must be a positive integer, got {getattr(self, name)!r}"
                )
        needed = ("num_layers", "num_kv_heads", "head_dim") if self.mode == "prefix" else ("hidden_size",)
        for name in needed:
            if int(getattr(self, name)) <= 0:
                raise ValueError(
                    f"SoftPromptConfig.{name} must be positive for mode={self.mode!r}; pass model_config= "
                    "to SoftPromptNetwork so it is read from the model"
                )

    @property
    def output_dim(self) -> int:
        if self.mode == "prefix":
            return self.num_layers * 2 * self.num_kv_heads * self.num_virtual_tokens * self.head_dim
        return self.num_virtual_tokens * self.hidden_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SoftPromptConfig:
        return dataclass_from_dict(cls, data)


def attention_geometry(model_config, *, prefix: bool = True) -> dict[str, int]:
    """``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``hidden_size`` of a transformers config.

    With ``prefix=True`` (a key/value prefix will be used) models with sliding-window attention are refused,
    whether the config says so with ``layer_types`` or with ``sliding_window`` alone.
    """
    config = (
        model_config.get_text_config(decoder=True)
        if hasattr(model_config, "get_text_config")
        else model_config
    )
    layer_types = getattr(config, "layer_types", None)
    if prefix and layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"{type(config).__name__} has non-full attention layers {sorted(set(layer_types))}; a key/value "
            "prefix would be evicted by sliding-window caches. Use mode='embedding' for this model."
        )
    window = getattr(config, "sliding_window", None)
    if prefix and layer_types is None and window and getattr(config, "use_sliding_window", True):
        raise ValueError(
            f"{type(config).__name__} sets sliding_window={window}; a key/value prefix would be evicted by "
            "sliding-window caches. Use mode='embedding' for this model."
        )
    num_layers = int(config.num_hidden_layers)
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    hidden_size = int(config.hidden_size)
    head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
        )
    return {
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": int(head_dim),
        "hidden_size": hidden_size,
    }


class SoftPromptNetwork(nn.Module):
    """A 2-layer MLP (``persona_dim -> hidden -> tanh -> virtual tokens``).

    With ``ordinal_tilt`` a linear map of the persona gives its **ordinal tilt** ``tau = a . p + b``
    (:meth:`tilt`): a question's option letters get ``tau * scale`` added to their logits, ``scale`` being the
    options' scaled ordinal positions in [0, 1] (:func:`apply_ordinal_tilt`). ``tau > 0`` moves the answer up the
    scale, whatever the question. A persona's lean along a survey's ordinal scales is a property of the persona;
    a prefix in front of a frozen LM that does not know the question's politics can only express it through
    whatever each question's prompt makes of the prefix. The map starts at zero (no tilt at init).

    Args:
        persona_dim: size of the persona vectors (the embedder's ``dim``).
        num_virtual_tokens: length of the prefix / number of prepended embeddings.
        mode: ``"prefix"`` (per-layer key/values) or ``"embedding"`` (input embeddings).
        hidden: width of the MLP's hidden layer.
        model_config: the LM's transformers config; the layer count, KV heads, head size and hidden size are
            read from it (explicit ``num_layers``/``num_kv_heads``/``head_dim``/``hidden_size`` override it).
        init_std: std of the output layer's initial weights (bias starts at 0, so the prefix starts small).
    """

    def __init__(
        self,
        persona_dim: int,
        num_virtual_tokens: int = 10,
        mode: str = "prefix",
        hidden: int = 32,
        *,
        model_config=None,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        hidden_size: int | None = None,
        init_std: float = 0.02,
        ordinal_tilt: bool = False,
    ) -> None:
        super().__init__()
        geometry = (
            attention_geometry(model_config, prefix=mode == "prefix") if model_config is not None else {}
        )
        if model_config is not None and mode == "embedding":
            geometry.pop("num_layers"), geometry.pop("num_kv_heads"), geometry.pop("head_dim")
        explicit = {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        explicit["hidden_size"] = hidden_size
        for key, value in explicit.items():
            if value is not None:
                geometry[key] = value
        geometry.pop("num_heads", None)
        self.config = SoftPromptConfig(
            persona_dim=int(persona_dim),
            num_virtual_tokens=int(num_virtual_tokens),
            mode=mode,
            hidden=int(hidden),
            init_std=float(init_std),
            ordinal_tilt=bool(ordinal_tilt),
            **{k: int(v) for k, v in geometry.items()},
        )
        self.mlp = nn.Sequential(
            nn.Linear(self.config.persona_dim, self.config.hidden),
            nn.Tanh(),
            nn.Linear(self.config.hidden, self.config.output_dim),
        )
        nn.init.normal_(self.mlp[2].weight, std=self.config.init_std)
        nn.init.zeros_(self.mlp[2].bias)
        self.tilt_head = None
        if self.config.ordinal_tilt:  # linear in the persona, zero at init
            self.tilt_head = nn.Linear(self.config.persona_dim, 1)
            nn.init.zeros_(self.tilt_head.weight)
            nn.init.zeros_(self.tilt_head.bias)

    @classmethod
    def from_config(cls, config: SoftPromptConfig) -> SoftPromptNetwork:
        c = config
        return cls(
            c.persona_dim,
            c.num_virtual_tokens,
            c.mode,
            c.hidden,
            num_layers=c.num_layers or None,
            num_kv_heads=c.num_kv_heads or None,
            head_dim=c.head_dim or None,
            hidden_size=c.hidden_size or None,
            init_std=c.init_std,
            ordinal_tilt=c.ordinal_tilt,
        )

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    # ------------------------------------------------------------------------------------------
    def check_persona(self, persona: torch.Tensor | list | tuple) -> torch.Tensor:
        """Validate and batch a persona: ``[d]`` or ``[B, d]`` -> float ``[B, d]`` on the network's device."""
        param = self.mlp[0].weight
        persona = torch.as_tensor(persona, dtype=param.dtype, device=param.device)
        if persona.dim() == 1:
            persona = persona.unsqueeze(0)
        if persona.dim() != 2 or persona.shape[-1] != self.config.persona_dim:
            raise ValueError(
                f"persona vector has shape {tuple(persona.shape)}, but this SoftPromptNetwork expects "
                f"[persona_dim] or [batch, persona_dim] with persona_dim={self.config.persona_dim}"
            )
        if not torch.isfinite(persona).all():
            raise ValueError("persona vector contains NaN or inf values")
        return persona

    def check_model(self, model) -> None:
        """Raise a clear error when this network was built for a differently shaped model."""
        geometry = attention_geometry(model.config, prefix=self.config.mode == "prefix")
        c = self.config
        if c.mode == "prefix":
            keys = ("num_layers", "num_kv_heads", "head_dim")
        else:
            keys = ("hidden_size",)
        wrong = {k: (getattr(c, k), geometry[k]) for k in keys if getattr(c, k) != geometry[k]}
        if wrong:
            detail = ", ".join(f"{k}: network {a} vs model {b}" for k, (a, b) in wrong.items())
            raise ValueError(f"SoftPromptNetwork does not match the model ({detail})")

    def forward(self, persona: torch.Tensor, *, tilt: bool = False) -> torch.Tensor:
        """Raw MLP output ``[B, output_dim]`` (the virtual tokens), or with ``tilt=True`` the ordinal tilt ``[B]``.

        Both go through ``forward`` so that a sharded (FSDP2) network gathers its parameters for either."""
        persona = self.check_persona(persona)
        if tilt:
            if self.tilt_head is None:
                raise ValueError(
                    "this SoftPromptNetwork has no ordinal tilt (SoftPromptConfig.ordinal_tilt=False)"
                )
            return self.tilt_head(persona)[:, 0]
        return self.mlp(persona)

    def tilt(self, persona: torch.Tensor) -> torch.Tensor:
        """The personas' ordinal tilts ``[B]`` (see the class docstring)."""
        return self(persona, tilt=True)

    def key_values(self, persona: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefix mode: one ``(key, value)`` pair per layer, each ``[B, num_kv_heads, n_virtual, head_dim]``."""
        if self.mode != "prefix":
            raise ValueError("key_values() needs mode='prefix'; this network is in embedding mode")
        c = self.config
        out = self(persona)
        out = out.view(out.shape[0], c.num_layers, 2, c.num_kv_heads, c.num_virtual_tokens, c.head_dim)
        return [(out[:, layer, 0], out[:, layer, 1]) for layer in range(c.num_layers)]

    def prefix_cache(
        self, persona: torch.Tensor, model_config=None, *, dtype: torch.dtype | None = None
    ) -> DynamicCache:
        """Prefix mode: a ``DynamicCache`` pre-filled with the persona's key/value prefix for every layer."""
        pairs = self.key_values(persona)
        if dtype is not None:
            pairs = [(k.to(dtype), v.to(dtype)) for k, v in pairs]
        return DynamicCache(ddp_cache_data=pairs, config=model_config)

    def prompt_embeds(self, persona: torch.Tensor) -> torch.Tensor:
        """Embedding mode: virtual input embeddings ``[B, n_virtual, hidden_size]``."""
        if self.mode != "embedding":
            raise ValueError("prompt_embeds() needs mode='embedding'; this network is in prefix mode")
        out = self(persona)
        return out.view(out.shape[0], self.config.num_virtual_tokens, self.config.hidden_size)

    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``soft_prompt_config.json`` + ``soft_prompt.safetensors`` (atomically)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_file(self.state_dict(), directory / WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_json(directory / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device=None) -> SoftPromptNetwork:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"soft-prompt network file not found: {path}")
        try:
            config = SoftPromptConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"invalid soft-prompt config {config_path}: {err}") from err
        network = cls.from_config(config)
        state = load_file(str(weights_path))
        missing, unexpected = network.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unexpected}")
        return network.to(device) if device is not None else network


def apply_ordinal_tilt(option_logits: torch.Tensor, tilt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``option_logits [B, K] + tilt[:, None] * scale [B, K]``: the options' logits moved up (``tilt > 0``) or
    down the ordinal scale. ``scale`` holds each option's scaled ordinal position in [0, 1] (any value on padding
    options, whose logits are ``-inf``); NaN (a nominal question's options) means no tilt."""
    if scale.shape != option_logits.shape:
        raise ValueError(
            f"option scale has shape {tuple(scale.shape)}; expected {tuple(option_logits.shape)}"
        )
    scale = torch.nan_to_num(scale.to(option_logits.dtype), nan=0.0)
    return option_logits + tilt.to(option_logits.dtype)[:, None] * scale


# --------------------------------------------------------------------------------------------------
# The steered forward pass
# --------------------------------------------------------------------------------------------------


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions ``0..`` counted over non-padding tokens (left or right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _expand_persona(network: SoftPromptNetwork, persona, batch_size: int) -> torch.Tensor:
    persona = network.check_persona(persona)
    if persona.shape[0] == 1 and batch_size > 1:
        persona = persona.expand(batch_size, -1)
    elif persona.shape[0] != batch_size:
        raise ValueError(f"got {persona.shape[0]} persona vectors for a batch of {batch_size} sequences")
    return persona


def steered_inputs(
    model,
    network: SoftPromptNetwork,
    persona,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    prefix_attention_mask: torch.Tensor | None = None,
) -> dict:
    """The keyword arguments for ``model(...)`` that run ``input_ids`` with the persona's virtual tokens.

    Returns ``input_ids``/``inputs_embeds``, ``attention_mask`` (prefix ones + the text mask), ``position_ids``
    (see the module docstring) and, in prefix mode, ``cache`` (a fresh ``DynamicCache``).
    ``prefix_attention_mask`` ([B, n_virtual], default ones) can hide virtual tokens.
    """
    batch, _ = input_ids.shape
    device = input_ids.device
    n = network.num_virtual_tokens
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    persona = _expand_persona(network, persona, batch)
    if prefix_attention_mask is None:
        prefix_attention_mask = torch.ones(batch, n, dtype=attention_mask.dtype, device=device)
    full_mask = torch.cat([prefix_attention_mask.to(device, attention_mask.dtype), attention_mask], dim=1)
    positions = text_position_ids(attention_mask)
    dtype = model.get_input_embeddings().weight.dtype
    if network.mode == "prefix":
        cache = network.prefix_cache(persona, model.config, dtype=dtype)
        return {
            "input_ids": input_ids,
            "attention_mask": full_mask,
            "position_ids": positions,
            "cache": cache,
        }
    text_embeds = model.get_input_embeddings()(input_ids)
    virtual = network.prompt_embeds(persona).to(text_embeds.dtype)
    virtual_positions = torch.arange(n, device=device).unsqueeze(0).expand(batch, -1)
    return {
        "inputs_embeds": torch.cat([virtual, text_embeds], dim=1),
        "attention_mask": full_mask,
        "position_ids": torch.cat([virtual_positions, positions + n], dim=1),
    }


def steered_forward(
    model,
    network: SoftPromptNetwork,
    persona,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    use_cache: bool = False,
    prefix_attention_mask: torch.Tensor | None = None,
    logits_to_keep: int = 0,
):
    """Run the (frozen) LM on ``input_ids`` steered by ``persona``.

    ``logits`` cover the text positions only (``[B, T, V]``, aligned exactly like the plain model's), so
    callers shift labels as usual. With ``use_cache=True`` the returned ``cache`` holds the
    virtual tokens followed by the text, ready for decoding (see :func:`steer.persona.steering.decode`).
    """
    kwargs = steered_inputs(
        model, network, persona, input_ids, attention_mask, prefix_attention_mask=prefix_attention_mask
    )
    output = model(**kwargs, use_cache=use_cache, logits_to_keep=logits_to_keep)
    if network.mode == "embedding" and (logits_to_keep == 0 or logits_to_keep > input_ids.shape[1]):
        output.logits = output.logits[:, -input_ids.shape[1] :]
    return output
