"""PersonaTrainer: train a SoftPromptNetwork so that a frozen LM answers survey questions like a persona.

Examples are dicts ``{"question": str, "options": [str, ...], "answer": int | letter, and either
"persona": [float, ...] or "user_index": int}`` (optionally ``"preamble": str``). The loss is the
cross-entropy of the answer letter's tokens only; only the soft-prompt network is trained (and,
with ``train_persona_vectors``, a table of user vectors initialised from the embedder). Checkpoints
hold just those weights (safetensors) next to the Trainer's optimizer / scheduler / RNG state, so
``resume_from_checkpoint`` continues exactly.

``train_persona(script_args, training_args)`` runs the whole recipe: respondents (a real-format
``responses.csv`` or simulated from the real Pew group distributions) -> held-out split -> persona
embedder -> cohorts and demographic centroids -> soft-prompt training -> ``output_dir/persona``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import ModelOutput

from steer.persona.soft_prompt import SoftPromptNetwork, _atomic_write_text, atomic_save_file, steered_inputs
from steer.persona.steering import FORMAT_NAME, LETTERS, PromptFormat, answer_token_ids

logger = logging.getLogger(__name__)

__all__ = [
    "PersonaCollator",
    "PersonaConfig",
    "PersonaData",
    "PersonaOutput",
    "PersonaScriptArguments",
    "PersonaSoftPromptModel",
    "PersonaTrainer",
    "answer_examples",
    "load_user_vectors",
    "persona_table",
    "prepare_persona_data",
    "train_persona",
]

USER_VECTORS_NAME = "user_vectors.safetensors"
EXAMPLE_COLUMNS = ["question", "options", "answer", "persona", "user_index", "preamble"]


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
    and ``persona`` [B, d] or ``user_index`` [B].
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
    ) -> None:
        super().__init__()
        network.check_model(model)
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
        return self

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

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
            model, network, user_vectors, train_user_vectors=args.train_persona_vectors
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
        return self.model.network

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
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model)
        module.network.save_pretrained(directory)
        _atomic_write_text(directory / FORMAT_NAME, json.dumps(self.prompt_format.to_dict(), indent=2) + "\n")
        if module.user_vectors is not None and module.user_vectors.weight.requires_grad:
            atomic_save_file({"user_vectors": module.user_vectors.weight}, directory / USER_VECTORS_NAME)
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
        module.network.load_state_dict(loaded.state_dict())
        vectors = directory / USER_VECTORS_NAME
        if vectors.is_file() and module.user_vectors is not None:
            weight = load_file(str(vectors))["user_vectors"]
            if weight.shape != module.user_vectors.weight.shape:
                raise ValueError(
                    f"{vectors}: shape {tuple(weight.shape)} != {tuple(module.user_vectors.weight.shape)}"
                )
            with torch.no_grad():
                module.user_vectors.weight.copy_(weight)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_trained_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("Loading best soft-prompt network from %s", self.state.best_model_checkpoint)
        self._load_trained_weights(self.state.best_model_checkpoint)

    @property
    def user_vectors(self) -> torch.Tensor | None:
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


# --------------------------------------------------------------------------------------------------
# The recipe entry point
# --------------------------------------------------------------------------------------------------


@dataclass
class PersonaScriptArguments:
    """Model and data settings of ``steer train persona`` (the trainer settings are in :class:`PersonaConfig`)."""

    model_name_or_path: str = field(
        default="smollm2-135m", metadata={"help": "Base LM: embedded name, local path, .gguf or hub id."}
    )
    dtype: str | None = field(
        default=None, metadata={"help": "Model dtype (float32 default; bfloat16 on GPUs)."}
    )
    opinionqa_dir: str | None = field(
        default=None,
        metadata={"help": "OpinionQA root with American_Trends_Panel_W*/ (default: STEER_DATA_DIR)."},
    )
    waves: list[int] = field(default_factory=lambda: [26, 27], metadata={"help": "Pew ATP waves to use."})
    responses_csv: list[str] | None = field(
        default=None,
        metadata={
            "help": "Individual-level responses.csv files (real format); simulated from the real group "
            "distributions when omitted."
        },
    )
    n_respondents: int = field(
        default=400, metadata={"help": "Simulated respondents (without responses_csv)."}
    )
    group_by: list[str] = field(
        default_factory=lambda: ["POLPARTY", "RACE"],
        metadata={"help": "Simulated respondents' groups (1 or 2)."},
    )
    observed_frac: float = field(
        default=0.3, metadata={"help": "Share of questions each simulated person answers."}
    )
    tilt: float = field(
        default=0.5, metadata={"help": "Simulator: individual latent tilt (people in a group differ)."}
    )
    separation: float = field(default=0.0, metadata={"help": "Simulator: extra planted group separation."})
    max_questions: int | None = field(
        default=None, metadata={"help": "Random subset of ordinal questions to keep (all when omitted)."}
    )
    holdout_fraction: float = field(
        default=0.2, metadata={"help": "Share of each person's answers held out for evaluation."}
    )
    eval_users: int = field(
        default=32, metadata={"help": "People whose held-out answers form the eval split."}
    )
    max_eval_examples: int = field(default=128, metadata={"help": "Cap on eval examples during training."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Cap on training examples."})
    embedding_dim: int = field(
        default=16, metadata={"help": "Persona embedding size (matrix factorisation)."}
    )
    embedder_method: str = field(default="als", metadata={"help": "Embedder solver: 'als' or 'adam'."})
    embedder_l2: float = field(default=1.0, metadata={"help": "Embedder ridge penalty."})
    num_cohorts: int | None = field(
        default=None, metadata={"help": "k-means cohorts (elbow selection when omitted)."}
    )
    cohort_k_max: int = field(default=10, metadata={"help": "Largest k tried by the elbow selection."})
    demographic_attributes: list[str] = field(
        default_factory=lambda: ["POLPARTY"],
        metadata={"help": "Attributes with stored demographic centroids."},
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the simulation, splits and subsets."})


@dataclass
class PersonaData:
    """What ``prepare_persona_data`` returns: the split answers, the fitted embedder and the personas."""

    questions: dict
    train: Any
    heldout: Any
    embedder: Any
    personas: dict[str, torch.Tensor]
    cohorts: Any  # steer.persona.cohorts.CohortResult
    metadata: dict


def _choose_questions(responses, max_questions: int | None, seed: int):
    import numpy as np

    keys = [k for k in responses.question_keys if not responses.questions[k].is_nominal]
    if max_questions is not None and max_questions < len(keys):
        rng = np.random.default_rng(seed)
        keys = [keys[i] for i in sorted(rng.choice(len(keys), size=max_questions, replace=False))]
    return responses.select_questions(keys)


def persona_table(embedder, responses, attributes, *, num_cohorts=None, k_max=10, seed=0):
    """Named personas: ``cohort:<k>`` centroids (k by the MF-loss elbow when not given) and ``<ATTR>=<value>``
    demographic centroids of the training users. Returns ``(personas, cohort labels per user)``."""
    from steer.persona.cohorts import find_cohorts, group_centroids

    embeddings = embedder.embeddings.detach().cpu()
    k_range = range(2, max(3, min(k_max, len(embeddings)) + 1))
    result = find_cohorts(
        embeddings, k=num_cohorts, k_range=k_range, embedder=embedder, responses=responses, seed=seed
    )
    personas = {f"cohort:{i}": c.float() for i, c in enumerate(result.centroids)}
    for attribute in attributes:
        if attribute not in responses.demographics.columns:
            raise KeyError(f"demographic_attributes: no column {attribute!r} in the responses")
        values = responses.demographics[attribute].to_numpy(dtype=object)
        for value, centroid in group_centroids(embeddings, values, exclude=("nan", "", "Refused")).items():
            personas[f"{attribute}={value}"] = centroid.float()
    return personas, result


def _cohort_summary(cohorts) -> dict:
    return {
        "k": cohorts.k,
        "k_values": cohorts.k_values,
        "losses": cohorts.losses,
        "criterion": cohorts.criterion,
        "sizes": cohorts.sizes.tolist(),
    }


def prepare_persona_data(args: PersonaScriptArguments) -> PersonaData:
    """Respondents -> (train, held-out) answers -> fitted embedder -> cohort and demographic personas."""
    from steer.persona.embedder import PersonaEmbedder
    from steer.persona.opinionqa import load_responses, load_waves

    root = args.opinionqa_dir
    questions = load_waves(root, args.waves)
    if args.responses_csv:
        responses = load_responses(args.responses_csv, questions)
        source = {"responses_csv": list(args.responses_csv)}
    else:
        from steer.persona.simulate import simulate_respondents

        responses = simulate_respondents(
            args.waves,
            root=root,
            group_by=tuple(args.group_by),
            n_respondents=args.n_respondents,
            seed=args.dataset_seed,
            observed_frac=args.observed_frac,
            tilt=args.tilt,
            separation=args.separation,
        )
        source = {
            "simulated": {
                "n_respondents": args.n_respondents,
                "group_by": list(args.group_by),
                "observed_frac": args.observed_frac,
                "tilt": args.tilt,
                "separation": args.separation,
                "seed": args.dataset_seed,
            }
        }
    responses = _choose_questions(responses, args.max_questions, args.dataset_seed)
    keep = responses.observed.sum(1) >= 2
    responses = responses.select_users(keep)
    if responses.num_users == 0:
        raise ValueError("no respondent has two or more ordinal answers on the chosen questions")
    train, heldout = responses.split(args.holdout_fraction, seed=args.dataset_seed, min_train=1)
    embedder = PersonaEmbedder(
        args.embedding_dim, method=args.embedder_method, l2=args.embedder_l2, seed=args.dataset_seed
    ).fit(train)
    personas, cohorts = persona_table(
        embedder,
        train,
        args.demographic_attributes,
        num_cohorts=args.num_cohorts,
        k_max=args.cohort_k_max,
        seed=args.dataset_seed,
    )
    metadata = {
        "waves": list(args.waves),
        "opinionqa_dir": str(root) if root else None,
        "question_keys": list(responses.question_keys),
        "source": source,
        "num_users": int(responses.num_users),
        "train_answers": int(train.observed.sum()),
        "heldout_answers": int(heldout.observed.sum()),
    }
    metadata["cohorts"] = _cohort_summary(cohorts)
    return PersonaData(questions, train, heldout, embedder, personas, cohorts, metadata)


def answer_examples(responses, *, users=None, limit: int | None = None, seed: int = 0) -> list[dict]:
    """One example per observed ordinal answer: question text, options (ordinal order), answer index, user."""
    import numpy as np

    observed = responses.observed
    rows, cols = np.nonzero(observed)
    if users is not None:
        allowed = np.zeros(responses.num_users, dtype=bool)
        allowed[np.asarray(users)] = True
        keep = allowed[rows]
        rows, cols = rows[keep], cols[keep]
    order = np.random.default_rng(seed).permutation(len(rows))
    if limit is not None:
        order = order[:limit]
    examples = []
    for i in order:
        question = responses.questions[responses.question_keys[cols[i]]]
        examples.append(
            {
                "question": question.text,
                "options": list(question.options),
                "answer": int(responses.option_index[rows[i], cols[i]]),
                "user_index": int(rows[i]),
            }
        )
    return examples


def train_persona(script_args: PersonaScriptArguments, training_args: PersonaConfig):
    """The persona recipe: data -> embedder -> cohorts -> soft-prompt training -> ``output_dir/persona``.

    Also writes ``output_dir/data/{train,heldout}.csv`` (the real responses.csv format) and
    ``split.json`` for ``steer eval opinions``. Returns the trainer.
    """
    from datasets import Dataset

    from steer.models import load_causal_lm
    from steer.persona.steering import PersonaSteeredModel

    data = prepare_persona_data(script_args)
    output = Path(training_args.output_dir)
    if training_args.should_save:
        (output / "data").mkdir(parents=True, exist_ok=True)
        data.train.to_csv(output / "data" / "train.csv")
        data.heldout.to_csv(output / "data" / "heldout.csv")
        _atomic_write_text(output / "data" / "split.json", json.dumps(data.metadata, indent=2) + "\n")
    model, tokenizer = load_causal_lm(script_args.model_name_or_path, dtype=script_args.dtype)
    train_examples = answer_examples(
        data.train, limit=script_args.max_train_examples, seed=script_args.dataset_seed
    )
    eval_users = list(range(min(script_args.eval_users, data.heldout.num_users)))
    eval_examples = answer_examples(
        data.heldout, users=eval_users, limit=script_args.max_eval_examples, seed=script_args.dataset_seed
    )
    logger.info(
        "persona data: %d users, %d train / %d eval examples, %d personas",
        data.train.num_users,
        len(train_examples),
        len(eval_examples),
        len(data.personas),
    )
    trainer = PersonaTrainer(
        model,
        training_args,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(eval_examples)
        if eval_examples and training_args.eval_strategy != "no"
        else None,
        processing_class=tokenizer,
        user_vectors=data.embedder.embeddings.detach().cpu(),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.train_persona_vectors:
        data.embedder.embeddings = trainer.user_vectors.to(data.embedder.embeddings.device)
        data.personas, data.cohorts = persona_table(
            data.embedder,
            data.train,
            script_args.demographic_attributes,
            num_cohorts=script_args.num_cohorts,
            k_max=script_args.cohort_k_max,
            seed=script_args.dataset_seed,
        )
        data.metadata["cohorts"] = _cohort_summary(data.cohorts)
    if training_args.should_save:
        cohort_of = {str(u): int(c) for u, c in zip(data.train.user_ids, data.cohorts.labels)}
        steered = PersonaSteeredModel(
            model,
            tokenizer,
            trainer.network,
            embedder=data.embedder,
            personas=data.personas,
            prompt_format=trainer.prompt_format,
            metadata={
                "base_model": script_args.model_name_or_path,
                **data.metadata,
                "cohort_of_user": cohort_of,
            },
        )
        steered.save_pretrained(output / "persona")
    return trainer
