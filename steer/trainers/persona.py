"""PersonaTrainer: train a SoftPromptNetwork so that a frozen LM answers survey questions like a persona.

Examples are dicts ``{"question": str, "options": [str, ...], "answer": int | letter, and either
"persona": [float, ...] or "user_index": int}`` (optionally ``"preamble": str`` and ``"target": [float, ...]``,
a whole answer distribution over the options). With ``target`` (the group path) the loss is the
cross-entropy between that real distribution and the model's option distribution (the option letters'
first-token probabilities, renormalised: what ``option_probs`` and the evaluation read); without it,
the cross-entropy of the answer letter's tokens only; only the soft-prompt network is trained (and,
with ``train_persona_vectors``, a table of user vectors initialised from the embedder). Checkpoints
hold just those weights (safetensors) next to the Trainer's optimizer / scheduler / RNG state, so
``resume_from_checkpoint`` continues exactly.

:func:`steer.scripts.persona.train_persona` runs the whole recipe; the data preparation lives in
:mod:`steer.persona.data` (``persona_source: groups``: the real per-group Pew distributions split by
wave; ``individuals``: ``responses.csv`` or simulated respondents, whole questions held out).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import ModelOutput

from steer.io import atomic_save_file, atomic_write_json
from steer.persona.data import (
    PersonaData,
    answer_examples,
    persona_table,
    prepare_persona_data,
)
from steer.persona.soft_prompt import SoftPromptNetwork, steered_inputs
from steer.persona.steering import FORMAT_NAME, LETTERS, PromptFormat, answer_token_ids
from steer.trainers import sharding

logger = logging.getLogger(__name__)

__all__ = [
    "PersonaCollator",
    "PersonaConfig",
    "PersonaData",
    "PersonaOutput",
    "PersonaSoftPromptModel",
    "PersonaTrainer",
    "answer_examples",
    "load_user_vectors",
    "persona_table",
    "prepare_persona_data",
]

USER_VECTORS_NAME = "user_vectors.safetensors"
EXAMPLE_COLUMNS = [
    "question",
    "options",
    "answer",
    "persona",
    "user_index",
    "preamble",
    "target",
    "question_id",
    "scale",
]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


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

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(use_chat_template=self.use_chat_template, system_prompt=self.system_prompt)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _answer_index(example: dict, n_options: int) -> int:
    answer = example.get("answer")
    options = list(example["options"])
    if isinstance(answer, bool) or answer is None:
        raise ValueError(
            f"example field 'answer' must be an option index, letter or option text, got {answer!r}"
        )
    if isinstance(answer, (int,)) or (hasattr(answer, "item") and not isinstance(answer, str)):
        index = int(answer)
    elif (
        isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:n_options]
    ):
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer in options:
        index = options.index(answer)
    else:
        raise ValueError(
            f"example field 'answer'={answer!r} is not an index, letter or text of options {options}"
        )
    if not 0 <= index < n_options:
        raise ValueError(f"example field 'answer'={answer!r} is out of range for {n_options} options")
    return index


class PersonaCollator:
    """Builds left-padded ``prompt + answer`` batches with labels on the answer tokens only.

    Output keys: ``input_ids``, ``attention_mask``, ``labels`` (-100 except the answer tokens),
    ``option_ids``/``option_mask`` [B, K] (first token of each option letter), ``answer_index`` [B],
    ``persona`` [B, d] or ``user_index`` [B], and ``target_probs`` [B, K] when the examples carry ``target``.
    """

    def __init__(
        self,
        tokenizer,
        prompt_format: PromptFormat | None = None,
        *,
        max_length: int = 512,
        answer_with_eos: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat()
        self.max_length = int(max_length)
        self.answer_with_eos = answer_with_eos
        self.truncated = 0

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        fmt, tok = self.prompt_format, self.tokenizer
        rows, labels, option_ids, answers = [], [], [], []
        for example in examples:
            for key in ("question", "options", "answer"):
                if key not in example or example[key] is None:
                    raise ValueError(f"persona example is missing field {key!r} (has {sorted(example)})")
            options = list(example["options"])
            index = _answer_index(example, len(options))
            prompt = fmt.build(tok, example["question"], options, example.get("preamble"))
            letters = [fmt.answer_text(x) for x in fmt.letters(len(options))]
            ids = answer_token_ids(tok, prompt, letters, fmt.add_special_tokens)
            prompt_ids = tok(prompt, add_special_tokens=fmt.add_special_tokens)["input_ids"]
            full = tok(prompt + letters[index], add_special_tokens=fmt.add_special_tokens)["input_ids"]
            answer_ids = full[len(prompt_ids) :]
            if self.answer_with_eos and tok.eos_token_id is not None:
                answer_ids = answer_ids + [tok.eos_token_id]
            budget = self.max_length - len(answer_ids)
            if budget < 1:
                raise ValueError(f"max_length={self.max_length} leaves no room for the prompt")
            if len(prompt_ids) > budget:
                prompt_ids = prompt_ids[-budget:]
                self.truncated += 1
            rows.append(prompt_ids + answer_ids)
            labels.append([-100] * len(prompt_ids) + answer_ids)
            option_ids.append(ids)
            answers.append(index)
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        k = max(len(o) for o in option_ids)
        batch = {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
            "labels": torch.tensor([[-100] * (width - len(r)) + lab for r, lab in zip(rows, labels)]),
            "option_ids": torch.tensor([o + [0] * (k - len(o)) for o in option_ids]),
            "option_mask": torch.tensor([[True] * len(o) + [False] * (k - len(o)) for o in option_ids]),
            "answer_index": torch.tensor(answers),
        }
        has_target = [e.get("target") is not None for e in examples]
        if any(has_target):
            if not all(has_target):
                raise ValueError("either every persona example has a 'target' distribution or none does")
            targets = []
            for example in examples:
                target = [float(x) for x in example["target"]]
                if len(target) != len(example["options"]):
                    raise ValueError(
                        f"example field 'target' has {len(target)} values for {len(example['options'])} options"
                    )
                total = sum(target)
                if any(x < 0 or x != x for x in target) or total <= 0:
                    raise ValueError(f"example field 'target' is not a distribution: {target}")
                targets.append([x / total for x in target] + [0.0] * (k - len(target)))
            batch["target_probs"] = torch.tensor(targets, dtype=torch.float32)
            if all(e.get("question_id") is not None and e.get("scale") is not None for e in examples):
                batch["question_id"] = torch.tensor([int(e["question_id"]) for e in examples])
                batch["option_scale"] = torch.tensor(
                    [[float(x) for x in e["scale"]] + [0.0] * (k - len(e["scale"])) for e in examples],
                    dtype=torch.float32,
                )
        has_persona = ["persona" in e and e["persona"] is not None for e in examples]
        has_user = ["user_index" in e and e["user_index"] is not None for e in examples]
        if all(has_persona):
            batch["persona"] = torch.tensor(
                [list(map(float, e["persona"])) for e in examples], dtype=torch.float32
            )
        elif all(has_user):
            batch["user_index"] = torch.tensor([int(e["user_index"]) for e in examples])
        else:
            raise ValueError("every persona example needs a 'persona' vector or a 'user_index' (not a mix)")
        return batch


# --------------------------------------------------------------------------------------------------
# The trainable module: frozen LM + soft-prompt network (+ optional user-vector table)
# --------------------------------------------------------------------------------------------------


@dataclass
class PersonaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    option_logits: torch.Tensor | None = None


def group_contrast(
    probs: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    question_id: torch.Tensor,
    scale_sq: float | None = None,
) -> torch.Tensor | None:
    """Squared error of the between-group differences of the expected ordinal answer.

    For rows sharing a question, ``dm = m_i - mean(m)`` (model) is compared with ``dt = t_i - mean(t)`` (real).
    With ``scale_sq`` (the data's mean ``dt^2``, a constant): ``mean (dm - dt)^2 / scale_sq``; without it, the
    batch's own ``sum (dm - dt)^2 / sum dt^2``. Either is about 1 for a persona-blind model and 0 when every
    group difference is right. ``None`` when no question has two rows in the batch.
    """
    m = (probs * scale).sum(-1)
    t = (target * scale).sum(-1)
    same = (question_id[:, None] == question_id[None, :]).to(m.dtype)  # [B, B]
    counts = same.sum(1)
    keep = counts > 1
    if not bool(keep.any()):
        return None
    dm = m - (same @ m) / counts
    dt = t - (same @ t) / counts
    error = (dm - dt)[keep] ** 2
    if scale_sq is not None:
        return error.mean() / scale_sq
    return error.sum() / ((dt[keep] ** 2).sum() + 1e-6)


class PersonaSoftPromptModel(nn.Module):
    """Frozen causal LM + :class:`SoftPromptNetwork` (+ optional ``nn.Embedding`` of user vectors).

    ``forward`` returns the mean answer-token cross-entropy and the first-answer-token logits of the
    option letters (``option_logits`` [B, K], ``-inf`` beyond each question's options).
    """

    accepts_loss_kwargs = False

    def __init__(
        self,
        model,
        network: SoftPromptNetwork,
        user_vectors: torch.Tensor | None = None,
        *,
        train_user_vectors: bool = False,
        contrast_weight: float = 0.0,
        contrast_scale: float | None = None,
    ) -> None:
        super().__init__()
        network.check_model(model)
        self.contrast_weight = float(contrast_weight)
        self.contrast_scale = None if contrast_scale is None else float(contrast_scale)
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.network = network
        self.user_vectors = None
        if user_vectors is not None:
            user_vectors = torch.as_tensor(user_vectors, dtype=torch.float32)
            if user_vectors.dim() != 2 or user_vectors.shape[1] != network.config.persona_dim:
                raise ValueError(
                    f"user_vectors has shape {tuple(user_vectors.shape)}; expected [num_users, "
                    f"persona_dim={network.config.persona_dim}]"
                )
            self.user_vectors = nn.Embedding.from_pretrained(
                user_vectors.clone(), freeze=not train_user_vectors
            )
        elif train_user_vectors:
            raise ValueError("train_persona_vectors=True needs user_vectors (one row per user_index)")

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the LM stays frozen: no dropout, ever
        if mode and self._checkpointing:
            # transformers checkpoints a decoder layer only while that layer is in training mode: flip the flag on
            # the checkpointed layers themselves (their dropout children stay in eval mode)
            for module in self.model.modules():
                if getattr(module, "gradient_checkpointing", False) is True:
                    module.training = True
        return self

    _checkpointing = False

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        """Recompute the frozen LM's layers in the backward pass (embedding mode only).

        In prefix mode every layer writes the text's keys/values into the persona cache, which a replayed
        layer would write twice, so checkpointing is refused there (a clear error, not a silent no-op).
        """
        if self.network.mode == "prefix":
            raise ValueError(
                "activation_checkpointing (gradient_checkpointing) is not supported with soft_prompt_mode='prefix' "
                "(the layers write into the persona's key/value cache); use soft_prompt_mode='embedding' or turn "
                "activation_checkpointing off"
            )
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )
        self._checkpointing = True
        self.train(self.training)

    def activation_checkpointing_disable(self):
        self.model.activation_checkpointing_disable()
        self._checkpointing = False
        self.train(self.training)

    @property
    def is_activation_checkpointing(self) -> bool:
        return self._checkpointing

    def personas(self, persona=None, user_index=None) -> torch.Tensor:
        if persona is not None:
            return persona
        if user_index is None:
            raise ValueError("PersonaSoftPromptModel needs a 'persona' vector or a 'user_index' per example")
        if self.user_vectors is None:
            raise ValueError("examples carry 'user_index' but the trainer has no user_vectors table")
        return self.user_vectors(user_index)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        persona=None,
        user_index=None,
        option_ids=None,
        option_mask=None,
        answer_index=None,
        target_probs=None,
        question_id=None,
        option_scale=None,
    ) -> PersonaOutput:
        vectors = self.personas(persona, user_index)
        if labels is None:
            raise ValueError("PersonaSoftPromptModel.forward needs labels (answer tokens, -100 elsewhere)")
        is_label = labels != -100
        if not bool(is_label.any(1).all()):
            raise ValueError("every example needs at least one answer token in labels")
        width = labels.shape[1]
        first = is_label.float().argmax(1)  # first answer column per row
        keep = int(width - first.min()) + 1  # logits from the position before the earliest answer token
        kwargs = steered_inputs(self.model, self.network, vectors, input_ids, attention_mask)
        logits = self.model(**kwargs, use_cache=False, logits_to_keep=keep).logits
        logits = logits[:, -keep:].float()
        window = labels[:, -keep:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), ignore_index=-100
        )
        option_logits = None
        if option_ids is not None:
            offset = width - keep
            rows = torch.arange(labels.shape[0], device=labels.device)
            at = logits[rows, first - 1 - offset]  # [B, V] next-token logits for the first answer token
            option_logits = at.gather(1, option_ids)
            if option_mask is not None:
                option_logits = option_logits.masked_fill(~option_mask, float("-inf"))
        if target_probs is not None:
            if option_logits is None:
                raise ValueError("a target distribution needs option_ids (the option letters' token ids)")
            log_q = option_logits.log_softmax(-1)
            target = target_probs.to(log_q.dtype)
            # cross-entropy H(target, q) over the options (padding options: target 0, log q = -inf)
            loss = -(target * log_q.masked_fill(target == 0, 0.0)).sum(-1).mean()
            if self.contrast_weight > 0 and question_id is not None and option_scale is not None:
                contrast = group_contrast(log_q.exp(), target, option_scale, question_id, self.contrast_scale)
                if contrast is not None:
                    loss = loss + self.contrast_weight * contrast
        return PersonaOutput(loss=loss, option_logits=option_logits)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


class PersonaTrainer(Trainer):
    """Trains only the soft-prompt network (+ optionally the user vectors) of a frozen LM.

    Args:
        model: the base causal LM (frozen here) or a name for :func:`steer.models.load_causal_lm`.
        args: a :class:`PersonaConfig`.
        train_dataset / eval_dataset: persona examples (see the module docstring).
        processing_class: the tokenizer (loaded with the model when ``model`` is a name).
        network: an existing :class:`SoftPromptNetwork` (default: a new one shaped from ``args``).
        persona_dim: size of the persona vectors (inferred from ``user_vectors`` or the data when omitted).
        user_vectors: ``[num_users, persona_dim]`` table for examples that carry ``user_index``.
        contrast_scale: the data's mean squared between-group deviation, normalising the group-contrast term
            (``contrast_weight > 0``); default: each batch's own.
    """

    _tag_names = ["steer", "persona"]
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model,
        args: PersonaConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        network: SoftPromptNetwork | None = None,
        persona_dim: int | None = None,
        user_vectors: torch.Tensor | None = None,
        contrast_scale: float | None = None,
        data_collator=None,
        callbacks=None,
        **kwargs,
    ) -> None:
        args = args or PersonaConfig(output_dir="persona-output")
        if not isinstance(args, PersonaConfig):
            raise TypeError(f"PersonaTrainer needs a PersonaConfig, got {type(args).__name__}")
        if isinstance(model, (str, os.PathLike)):
            from steer.models import load_causal_lm

            model, tokenizer = load_causal_lm(model)
            processing_class = processing_class or tokenizer
        if processing_class is None:
            raise ValueError("PersonaTrainer needs processing_class= (the tokenizer)")
        if network is None:
            persona_dim = persona_dim or _infer_persona_dim(user_vectors, train_dataset)
            # initialised from args.seed alone, not from whatever the data preparation and model loading left in
            # the global RNG: a 1-process, DDP or FSDP2 launch of the same run starts from the same network
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                network = SoftPromptNetwork(
                    persona_dim,
                    args.num_virtual_tokens,
                    args.soft_prompt_mode,
                    args.soft_prompt_hidden,
                    model_config=model.config,
                    init_std=args.soft_prompt_init_std,
                )
        self.prompt_format = args.prompt_format
        wrapped = PersonaSoftPromptModel(
            model,
            network,
            user_vectors,
            train_user_vectors=args.train_persona_vectors,
            contrast_weight=args.contrast_weight,
            contrast_scale=contrast_scale,
        )
        collator = data_collator or PersonaCollator(
            processing_class,
            self.prompt_format,
            max_length=args.max_length,
            answer_with_eos=args.answer_with_eos,
        )
        super().__init__(
            model=wrapped,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            **kwargs,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    @property
    def network(self) -> SoftPromptNetwork:
        """The soft-prompt network; under FSDP2, after ``train()``, a plain gathered copy (see ``_gather_trained``)."""
        gathered = getattr(self, "_gathered", None)
        if gathered is not None:
            return gathered[0]
        return self.model.network

    # -------------------------------------------------------------- FSDP2 (see steer.trainers.sharding)
    # The frozen LM is REPLICATED on every rank (FSDP2 ``ignored_params``): it has no gradients or optimizer
    # state, and a replicated LM keeps export, evaluation and ``PersonaSteeredModel`` plain, rank-local code.
    # FSDP2 shards the trained parts only (soft-prompt network, user vectors) and reduce-scatters their
    # gradients. Outside the wrapped forward they are read through explicit gathers: checkpoints get the
    # full state dict from ``save_model``; ``train()`` ends with ``_gather_trained`` (all ranks), after
    # which ``network`` / ``user_vectors`` are plain full copies on every rank.
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        sharding.refuse_cpu_deepspeed(self.accelerator)
        if sharding.promote_cpu_fsdp(self.accelerator):
            self.is_fsdp_enabled = True
        if not sharding.is_fsdp(self.accelerator):
            return
        sharding.require_fsdp2(self.accelerator, "PersonaTrainer")
        plugin = self.accelerator.state.fsdp_plugin
        plugin.ignored_modules = [self.model.model]  # the frozen LM stays whole on every rank
        # accelerate's rank-0-loads path (meta device + broadcast into shards) cannot hold an unsharded LM
        plugin.cpu_ram_efficient_loading = False
        # FSDP2 (unlike DDP) does not sync the initial weights: every rank starts from rank 0's network and LM
        # (with FSDP_CPU_RAM_EFFICIENT_LOADING, ranks > 0 even loaded the LM without its weights)
        sharding.broadcast_module(self.model)
        self.model.model.to(self.args.device)  # FSDP2 places what it shards, not the ignored LM

    def _gather_trained(self) -> None:
        """All ranks: full copies of the sharded network (+ trained user vectors) for code outside training."""
        module = self.accelerator.unwrap_model(self.model)
        network = SoftPromptNetwork.from_config(module.network.config)
        network.load_state_dict(sharding.full_state_dict(module.network))
        vectors = None
        if module.user_vectors is not None:
            vectors = sharding.full_tensor(module.user_vectors.weight.detach()).cpu().clone()
        self._gathered = (network.to(self.args.device).train(module.network.training), vectors)

    def train(self, *args, **kwargs):
        self._gathered = None
        result = super().train(*args, **kwargs)
        if self.is_fsdp_enabled:
            self._gather_trained()
        return result

    def _get_train_sampler(self, train_dataset=None):
        if self.args.contrast_weight > 0:
            # question blocks prepared (and shuffled, seeded) by the data step must stay together in a batch
            from torch.utils.data import SequentialSampler

            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(EXAMPLE_COLUMNS)

    def create_optimizer(self, model=None):
        module = self.model
        if (
            self.optimizer is None
            and self.args.persona_learning_rate is not None
            and module.user_vectors is not None
        ):
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, module)
            network_params = [p for p in module.network.parameters() if p.requires_grad]
            groups = [
                {"params": network_params, "weight_decay": self.args.weight_decay},
                {
                    "params": [module.user_vectors.weight],
                    "weight_decay": 0.0,
                    "lr": self.args.persona_learning_rate,
                },
            ]
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        outputs = model(**inputs)
        loss = outputs.loss
        if outputs.option_logits is not None:
            correct = (outputs.option_logits.argmax(-1) == inputs["answer_index"]).float()
            correct = self.accelerator.gather_for_metrics(correct.detach())
            self._metrics[mode]["accuracy"].append(correct.mean().item())
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Adds the averaged eval metrics (``eval_accuracy``) to the returned metrics, so that
        ``evaluate()`` returns them and ``metric_for_best_model="eval_accuracy"`` works."""
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        prefix = metric_key_prefix
        for key, values in self._metrics["eval"].items():
            if values:
                output.metrics[f"{prefix}_{key}"] = sum(values) / len(values)
        self._metrics["eval"].clear()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        super().log({**logs, **metrics}, start_time)
        self._metrics[mode].clear()

    # -------------------------------------------------------------- checkpoints: only the trained weights
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        # FSDP2: every rank gathers the trained parts (not the frozen LM); rank 0 writes them in _save
        module = self.accelerator.unwrap_model(self.model)
        state = {f"network.{k}": v for k, v in sharding.full_state_dict(module.network).items()}
        if module.user_vectors is not None:
            state["user_vectors.weight"] = sharding.full_state_dict(module.user_vectors)["weight"]
        self._save(output_dir, state_dict=state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model)
        network, vectors = module.network, module.user_vectors
        if self.is_fsdp_enabled:  # FSDP2: sharded parameters; save_model gathered their full values
            if state_dict is None:
                raise ValueError(
                    "PersonaTrainer._save under FSDP needs the gathered state_dict (use save_model)"
                )
            network = SoftPromptNetwork.from_config(module.network.config)
            prefix = "network."
            network.load_state_dict(
                {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            )
            if vectors is not None:
                vectors = nn.Embedding.from_pretrained(
                    state_dict["user_vectors.weight"].detach().cpu().clone()
                )
                vectors.weight.requires_grad_(module.user_vectors.weight.requires_grad)
        network.save_pretrained(directory)
        atomic_write_json(directory / FORMAT_NAME, self.prompt_format.to_dict())
        if vectors is not None and vectors.weight.requires_grad:
            atomic_save_file({"user_vectors": vectors.weight}, directory / USER_VECTORS_NAME)
        torch.save(self.args, directory / "training_args.bin")

    def _load_trained_weights(self, checkpoint: str | os.PathLike) -> None:
        directory = Path(checkpoint)
        module = self.accelerator.unwrap_model(self.model)
        loaded = SoftPromptNetwork.from_pretrained(directory)
        if loaded.config != module.network.config:
            raise ValueError(
                f"checkpoint {directory} holds a soft-prompt network {loaded.config} that does not match the "
                f"trainer's {module.network.config}"
            )
        # load_full_state_dict: plain parameters take the values, FSDP2-sharded ones their own slice
        sharding.load_full_state_dict(module.network, loaded.state_dict())
        vectors = directory / USER_VECTORS_NAME
        if vectors.is_file() and module.user_vectors is not None:
            weight = load_file(str(vectors))["user_vectors"]
            if weight.shape != module.user_vectors.weight.shape:
                raise ValueError(
                    f"{vectors}: shape {tuple(weight.shape)} != {tuple(module.user_vectors.weight.shape)}"
                )
            sharding.load_full_state_dict(module.user_vectors, {"weight": weight})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_trained_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("Loading best soft-prompt network from %s", self.state.best_model_checkpoint)
        self._load_trained_weights(self.state.best_model_checkpoint)

    @property
    def user_vectors(self) -> torch.Tensor | None:
        gathered = getattr(self, "_gathered", None)
        if gathered is not None:  # FSDP2, after train(): the gathered full table
            return gathered[1]
        module = self.accelerator.unwrap_model(self.model)
        return None if module.user_vectors is None else module.user_vectors.weight.detach().cpu()


def _infer_persona_dim(user_vectors, dataset) -> int:
    if user_vectors is not None:
        return int(torch.as_tensor(user_vectors).shape[1])
    if dataset is not None and len(dataset) > 0:
        first = dataset[0]
        if first.get("persona") is not None:
            return len(first["persona"])
    raise ValueError("cannot infer persona_dim: pass persona_dim=, user_vectors= or examples with 'persona'")


def load_user_vectors(checkpoint: str | os.PathLike) -> torch.Tensor | None:
    """The fine-tuned user vectors of a checkpoint (``None`` when they were not trained)."""
    path = Path(checkpoint) / USER_VECTORS_NAME
    return load_file(str(path))["user_vectors"] if path.is_file() else None
