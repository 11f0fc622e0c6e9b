"""The persona LM adapter: a LoRA adapter on the LM trained jointly with the soft-prompt network.

Li et al. keep the LM frozen because their base models already know how groups answer; a small base model
does not, and a frozen one cannot learn it (its hidden state of an unseen question carries no partisan
direction: ``recipes/persona_opinionqa/probe.py``). With ``lm_adapter: lora`` the LM adapts with the persona:
one LoRA adapter serves every persona, and the persona still enters only through the soft prompt, unless

* ``lm_adapter_gate`` is on: a persona-conditioned gate on the LoRA update. For every adapted module ``m``,
  ``delta_m(x) = B_m diag(1 + G_m p) A_m x`` with ``G_m`` a linear map of the persona vector ``p`` (zero at
  init, so training starts from the plain adapter). Each persona then mixes the ``r`` update directions of
  each module its own way.

Artefacts (``<persona_dir>/lm_adapter/``): the PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained``) and, with the gate,
``persona_gate.safetensors`` + ``persona_gate.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from steer.errors import ArtefactMismatchError, InputFileNotFoundError, UserInputError
from steer.io import atomic_save_file, atomic_write_text

__all__ = [
    "ADAPTER_DIR",
    "PersonaAdapterConfig",
    "PersonaGate",
    "adapter_disabled",
    "add_lm_adapter",
    "has_lm_adapter",
    "load_lm_adapter",
    "lora_modules",
    "persona_active",
    "save_lm_adapter",
]

ADAPTER_DIR = "lm_adapter"
GATE_WEIGHTS = "persona_gate.safetensors"
GATE_CONFIG = "persona_gate.json"
ADAPTER_NAME = "default"


@dataclass
class PersonaAdapterConfig:
    """Shape of the persona LM adapter (the ``lm_*`` fields of :class:`steer.trainers.persona.PersonaConfig`)."""

    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    gate: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserInputError(f"PersonaConfig.lm_lora_r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise UserInputError(f"PersonaConfig.lm_lora_alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            raise UserInputError("PersonaConfig.lm_lora_target_modules must name at least one module")

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=0.0,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


def lora_modules(model) -> list[tuple[str, nn.Module]]:
    """``(name, lora_A linear)`` of every LoRA layer of ``model``, in module order."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            found.append((name, module.lora_A[ADAPTER_NAME]))
    return found


def has_lm_adapter(model) -> bool:
    return callable(getattr(model, "get_base_model", None)) and bool(lora_modules(model))


def add_lm_adapter(model, config: PersonaAdapterConfig):
    """``model`` wrapped as a ``PeftModel`` with a fresh LoRA adapter (weights of the base stay frozen).

    A target module the model does not have is refused in one line before anything is wrapped.
    """
    from peft import get_peft_model

    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in config.target_modules if m not in leaves]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserInputError(
            f"PersonaConfig.lm_lora_target_modules: the model has no module named {missing} (its linear layers: "
            f"{linear})"
        )
    return get_peft_model(model, config.lora_config())


class PersonaGate(nn.Module):
    """Persona -> per-module, per-rank gates ``1 + G p`` on a LoRA update (see the module docstring).

    ``attach(model)`` hooks every ``lora_A`` of the model; inside ``with gate.active(persona):`` the hooks
    multiply each row's LoRA activations by its persona's gates. Outside that block the gate is 1 (the
    plain adapter).
    """

    def __init__(self, persona_dim: int, module_names: Sequence[str], r: int) -> None:
        super().__init__()
        self.persona_dim = int(persona_dim)
        self.module_names = list(module_names)
        self.r = int(r)
        self.proj = nn.Linear(self.persona_dim, len(self.module_names) * self.r)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self._gates: torch.Tensor | None = None
        self._handles: list = []

    def config(self) -> dict:
        return {"persona_dim": self.persona_dim, "module_names": self.module_names, "r": self.r}

    def forward(self, persona: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` -> gates ``[B, modules, r]``."""
        gates = 1.0 + self.proj(persona.to(self.proj.weight.dtype))
        return gates.view(persona.shape[0], len(self.module_names), self.r)

    def attach(self, model) -> PersonaGate:
        self.detach()
        modules = dict(lora_modules(model))
        missing = [n for n in self.module_names if n not in modules]
        if missing:
            raise ArtefactMismatchError(
                f"the persona gate names LoRA modules the model does not have: {missing[:3]}"
            )
        for index, name in enumerate(self.module_names):
            self._handles.append(modules[name].register_forward_hook(self._hook(index)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        def hook(module, args, output):
            gates = self._gates
            if gates is None:
                return output
            gate = gates[:, index].to(output.dtype)  # [B, r]
            if output.shape[0] != gate.shape[0]:
                raise ValueError(
                    f"the persona gate holds {gate.shape[0]} rows but the LoRA layer got a batch of {output.shape[0]}"
                )
            return output * gate.view(gate.shape[0], *([1] * (output.dim() - 2)), gate.shape[1])

        return hook

    @contextlib.contextmanager
    def active(self, persona: torch.Tensor) -> Iterator[None]:
        previous = self._gates
        self._gates = self(persona)
        try:
            yield
        finally:
            self._gates = previous


@contextlib.contextmanager
def persona_active(gate: PersonaGate | None, persona: torch.Tensor | None) -> Iterator[None]:
    """The gate of ``persona`` while the block runs (nothing without a gate or a persona)."""
    if gate is None or persona is None:
        yield
        return
    with gate.active(persona):
        yield


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """The base LM without its persona adapter (the unsteered baselines); nothing for a plain model."""
    if has_lm_adapter(model):
        with model.disable_adapter():
            yield
    else:
        yield


def save_lm_adapter(model, gate: PersonaGate | None, directory: str | os.PathLike) -> Path:
    """Write ``model``'s LoRA adapter (PEFT format) and the gate into ``directory``."""
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[ADAPTER_NAME]
    config.save_pretrained(str(directory))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    atomic_save_file(state, directory / "adapter_model.safetensors")
    if gate is not None:
        atomic_save_file(
            {k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()}, directory / GATE_WEIGHTS
        )
        atomic_write_text(directory / GATE_CONFIG, json.dumps(gate.config(), indent=2) + "\n")
    else:
        for name in (GATE_WEIGHTS, GATE_CONFIG):
            (directory / name).unlink(missing_ok=True)
    return directory


def load_gate(directory: str | os.PathLike) -> PersonaGate | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / GATE_CONFIG).is_file():
        return None
    try:
        config = json.loads((directory / GATE_CONFIG).read_text())
        gate = PersonaGate(config["persona_dim"], config["module_names"], config["r"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UserInputError(f"{directory / GATE_CONFIG}: not a persona gate config ({err})") from err
    if not (directory / GATE_WEIGHTS).is_file():
        raise InputFileNotFoundError(f"{directory}: {GATE_CONFIG} without {GATE_WEIGHTS}")
    try:
        state = load_file(str(directory / GATE_WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise UserInputError(f"{directory / GATE_WEIGHTS}: not a readable safetensors file ({err})") from err
    try:
        gate.load_state_dict(state)
    except RuntimeError as err:
        raise ArtefactMismatchError(
            f"{directory / GATE_WEIGHTS}: does not match {GATE_CONFIG} ({err})"
        ) from err
    return gate


def load_lm_adapter(model, directory: str | os.PathLike, *, trainable: bool = False):
    """``(PeftModel, gate or None)``: the adapter in ``directory`` on ``model`` (gate attached)."""
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise InputFileNotFoundError(f"{directory}: no adapter_config.json (not a persona LM adapter)")
    try:
        wrapped = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ArtefactMismatchError(
            f"the persona LM adapter in {directory} does not fit the model: {err}"
        ) from err
    gate = load_gate(directory)
    if gate is not None:
        gate.to(next(wrapped.parameters()).device).attach(wrapped)
    return wrapped, gate


def load_adapter_weights(model, gate: PersonaGate | None, directory: str | os.PathLike) -> None:
    """Resume: the adapter (and gate) weights of a checkpoint's ``lm_adapter/`` into the trainer's own."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise InputFileNotFoundError(
            f"{directory}: no adapter_model.safetensors (checkpoint without the LM adapter)"
        )
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ArtefactMismatchError(f"{path}: keys the adapter does not have: {unexpected[:3]}")
    if gate is not None:
        loaded = load_gate(directory)
        if loaded is None or loaded.config() != gate.config():
            raise ArtefactMismatchError(f"{directory}: its persona gate does not match the trainer's")
        gate.load_state_dict(loaded.state_dict())
