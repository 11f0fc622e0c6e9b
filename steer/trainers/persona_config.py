"""``PersonaConfig``: ``TrainingArguments`` + the soft-prompt network, LM adapter and prompt settings of
:class:`steer.trainers.persona.PersonaTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from steer.errors import UserInputError
from steer.persona.adapter import PersonaAdapterConfig
from steer.persona.steering import PromptFormat

__all__ = ["LM_ADAPTERS", "PersonaConfig"]

LM_ADAPTERS = ("none", "lora")
_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PersonaConfig(TrainingArguments):
    """``TrainingArguments`` + the soft-prompt network and prompt settings of :class:`PersonaTrainer`."""

    num_virtual_tokens: int = field(
        default=10, metadata={"help": "Virtual tokens per persona (prefix length)."}
    )
    soft_prompt_mode: str = field(
        default="prefix",
        metadata={"help": "'prefix' (per-layer key/values) or 'embedding' (input embeddings)."},
    )
    soft_prompt_hidden: int = field(
        default=32, metadata={"help": "Hidden width of the persona -> prompt MLP."}
    )
    soft_prompt_init_std: float = field(
        default=0.02, metadata={"help": "Std of the MLP output layer at init."}
    )
    train_persona_vectors: bool = field(
        default=False,
        metadata={"help": "Also fine-tune the per-user persona vectors (examples must carry 'user_index')."},
    )
    persona_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the persona vectors (default: learning_rate)."}
    )
    max_length: int = field(
        default=512, metadata={"help": "Max tokens of prompt + answer; longer prompts are cut from the left."}
    )
    use_chat_template: bool = field(
        default=True, metadata={"help": "Ask the question as a chat user message (the answer is the reply)."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "Optional system message of the prompt."}
    )
    answer_with_eos: bool = field(
        default=False, metadata={"help": "Also train the end-of-sequence token after the answer letter."}
    )
    contrast_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the group-contrast term (examples with 'target', 'question_id' and 'scale'): within a "
            "batch, each group's expected ordinal answer minus the question's batch mean must match the real one "
            "(relative squared error; 1 for a persona-blind model). > 0 keeps the prepared example order (question "
            "blocks, shuffled by the data step) instead of reshuffling."
        },
    )
    ordinal_tilt: bool = field(
        default=False,
        metadata={
            "help": "The soft-prompt network also outputs the persona's ordinal tilt tau: the option letters' logits "
            "get tau * scale (each option's scaled ordinal position), so a persona can lean up or down a survey's "
            "ordinal scales on any question. Needs examples with 'scale'; the loss is then over the options."
        },
    )
    lm_adapter: str = field(
        default="none",
        metadata={
            "help": "'none': the LM stays frozen and only the soft-prompt network learns (Li et al.'s setting); "
            "'lora': a LoRA adapter on the LM trains jointly with the network (one adapter for every persona; the "
            "persona enters through the soft prompt, and through the gate with lm_adapter_gate)."
        },
    )
    lm_lora_r: int = field(default=8, metadata={"help": "Rank of the LM adapter (lm_adapter: lora)."})
    lm_lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha of the LM adapter."})
    lm_lora_target_modules: list[str] = field(
        default_factory=lambda: list(_LORA_TARGETS),
        metadata={"help": "Module names the LM adapter adapts (every layer's modules of these names)."},
    )
    lm_adapter_gate: bool = field(
        default=False,
        metadata={
            "help": "Persona-conditioned gate on the LM adapter: each adapted module's LoRA update is "
            "B diag(1 + G p) A x with G a linear map of the persona vector p (zero at init)."
        },
    )
    lm_learning_rate: float = field(
        default=2e-4,
        metadata={
            "help": "Learning rate of the LM adapter (the gate's map and the soft-prompt network use learning_rate)."
        },
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the soft-prompt network."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the example columns (the collator builds the prompts)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.soft_prompt_mode not in ("prefix", "embedding"):
            raise ValueError(
                f"PersonaConfig.soft_prompt_mode must be 'prefix' or 'embedding', got {self.soft_prompt_mode!r}"
            )
        if self.contrast_weight < 0:
            raise ValueError(f"PersonaConfig.contrast_weight must be >= 0, got {self.contrast_weight}")
        if self.num_virtual_tokens < 1:
            raise ValueError(f"PersonaConfig.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.lm_adapter not in LM_ADAPTERS:
            raise UserInputError(
                f"PersonaConfig.lm_adapter must be one of {list(LM_ADAPTERS)}, got {self.lm_adapter!r}"
            )
        if self.lm_adapter == "none":
            changed = [
                name
                for name, default in (
                    ("lm_adapter_gate", False),
                    ("lm_lora_r", 8),
                    ("lm_lora_alpha", 16.0),
                    ("lm_learning_rate", 2e-4),
                )
                if getattr(self, name) != default
            ]
            if list(self.lm_lora_target_modules) != _LORA_TARGETS:
                changed.append("lm_lora_target_modules")
            if changed:
                raise UserInputError(
                    f"PersonaConfig.{changed[0]} applies only with lm_adapter: lora (lm_adapter is 'none': the LM is "
                    "frozen)"
                )
        else:
            _ = self.adapter_config  # validates the adapter fields
        if self.lm_learning_rate <= 0:
            raise UserInputError(f"PersonaConfig.lm_learning_rate must be > 0, got {self.lm_learning_rate}")

    @property
    def adapter_config(self) -> PersonaAdapterConfig | None:
        """The LM adapter's shape (``None`` with ``lm_adapter: none``)."""
        if self.lm_adapter == "none":
            return None
        return PersonaAdapterConfig(
            r=self.lm_lora_r,
            alpha=self.lm_lora_alpha,
            target_modules=list(self.lm_lora_target_modules),
            gate=self.lm_adapter_gate,
        )

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(use_chat_template=self.use_chat_template, system_prompt=self.system_prompt)
