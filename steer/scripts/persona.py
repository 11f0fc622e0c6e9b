"""``steer train persona``: the recipe runner (model, survey data, split, load → train → save).

The trainer, its config, collator and model live in :mod:`steer.trainers.persona`; the data preparation in
:mod:`steer.persona.data`. This module holds :class:`PersonaScriptArguments` and :func:`train_persona`, which
trains on demographic groups (real Pew distributions, split by wave) or individual respondents.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from steer.persona.data import (
    PersonaData,
    answer_examples,
    cohort_summary,
    persona_table,
    prepare_group_data,
    prepare_persona_data,
)
from steer.persona.soft_prompt import _atomic_write_text
from steer.trainers.persona import (
    PersonaConfig,
    PersonaTrainer,
)

logger = logging.getLogger(__name__)

__all__ = ["PersonaConfig", "PersonaScriptArguments", "train_persona"]


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
    persona_source: str = field(
        default="groups",
        metadata={
            "help": "'groups': demographic groups with their real Pew answer distributions are the respondents "
            "(split by wave: train_waves / valid_waves / eval_waves); 'individuals': responses_csv or "
            "simulated respondents over `waves` (whole questions held out)."
        },
    )
    train_waves: list[int] = field(
        default_factory=lambda: [26, 27, 29, 32, 34, 36, 41, 42],
        metadata={"help": "groups: waves the embedder and the soft-prompt network learn from."},
    )
    valid_waves: list[int] = field(
        default_factory=lambda: [43],
        metadata={"help": "Waves whose questions pick checkpoints (never scored)."},
    )
    eval_waves: list[int] = field(
        default_factory=lambda: [49, 50, 82],
        metadata={"help": "Waves scored by `steer eval opinions` (never seen in training)."},
    )
    group_attributes: list[str] = field(
        default_factory=lambda: [
            "AGE",
            "CREGION",
            "EDUCATION",
            "INCOME",
            "POLIDEOLOGY",
            "POLPARTY",
            "RACE",
            "SEX",
        ],
        metadata={"help": "groups: attributes whose groups are the respondents."},
    )
    fold_in_groups: list[str] = field(
        default_factory=lambda: ["POLIDEOLOGY=Very liberal"],
        metadata={"help": "groups: kept out of all training, then folded in from fold_in_answers answers."},
    )
    question_block: int | None = field(
        default=None,
        metadata={
            "help": "groups: training examples come in blocks of this many groups answering the same question "
            "(set it to per_device_train_batch_size with contrast_weight > 0); default: independent pairs."
        },
    )
    fold_in_answers: int = field(
        default=20, metadata={"help": "Training-wave answers a folded-in group is embedded from."}
    )
    standardize_personas: bool = field(
        default=True,
        metadata={"help": "Re-parametrise the embedder so persona vectors have mean 0, std 1 per dimension."},
    )
    waves: list[int] = field(
        default_factory=lambda: [26, 27], metadata={"help": "individuals: Pew ATP waves to use."}
    )
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
        default=None,
        metadata={
            "help": "Random subset of ordinal (groups: training) questions to keep (all when omitted)."
        },
    )
    holdout_fraction: float = field(
        default=0.2,
        metadata={
            "help": "individuals without evaluation waves: share of whole questions held out for evaluation "
            "(and the same share for validation)."
        },
    )
    eval_users: int = field(
        default=32, metadata={"help": "People whose held-out answers form the eval split."}
    )
    max_eval_examples: int = field(
        default=128, metadata={"help": "Cap on validation examples (checkpoint choice) during training."}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Cap on training examples."})
    embedding_dim: int = field(
        default=16, metadata={"help": "Persona embedding size (matrix factorisation)."}
    )
    embedder_method: str = field(default="als", metadata={"help": "Embedder solver: 'als' or 'adam'."})
    embedder_l2: float = field(default=1.0, metadata={"help": "Embedder ridge penalty."})

    def __post_init__(self) -> None:
        if self.persona_source not in ("groups", "individuals"):
            raise ValueError(
                f"PersonaScriptArguments.persona_source must be 'groups' or 'individuals', got {self.persona_source!r}"
            )
        if self.fold_in_answers < 1:
            raise ValueError(
                f"PersonaScriptArguments.fold_in_answers must be >= 1, got {self.fold_in_answers}"
            )

    num_cohorts: int | None = field(
        default=None, metadata={"help": "k-means cohorts (elbow selection when omitted)."}
    )
    cohort_k_max: int = field(default=10, metadata={"help": "Largest k tried by the elbow selection."})
    demographic_attributes: list[str] = field(
        default_factory=lambda: ["POLPARTY"],
        metadata={"help": "Attributes with stored demographic centroids."},
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the simulation, splits and subsets."})


def _trainer_datasets(examples, valid_examples, training_args):
    from datasets import Dataset

    train = Dataset.from_list(examples)
    valid = (
        Dataset.from_list(valid_examples) if valid_examples and training_args.eval_strategy != "no" else None
    )
    return train, valid


def _train_groups(script_args: PersonaScriptArguments, training_args: PersonaConfig):
    from steer.models import load_causal_lm
    from steer.persona.steering import PersonaSteeredModel

    data = prepare_group_data(script_args)
    output = Path(training_args.output_dir)
    if training_args.should_save:
        (output / "data").mkdir(parents=True, exist_ok=True)
        _atomic_write_text(output / "data" / "split.json", json.dumps(data.metadata, indent=2) + "\n")
    model, tokenizer = load_causal_lm(script_args.model_name_or_path, dtype=script_args.dtype)
    strip = ("group", "key")
    if training_args.contrast_weight > 0 and script_args.question_block is None:
        raise ValueError(
            "contrast_weight > 0 needs question_block (examples of one question side by side in a batch)"
        )
    train_examples = [{k: v for k, v in e.items() if k not in strip} for e in data.train_examples]
    valid_examples = [{k: v for k, v in e.items() if k not in strip} for e in data.valid_examples]
    train, valid = _trainer_datasets(train_examples, valid_examples, training_args)
    trainer = PersonaTrainer(
        model,
        training_args,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
        persona_dim=data.embedder.config.embedding_dim,
        contrast_scale=data.metadata["contrast_scale"],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.should_save:
        steered = PersonaSteeredModel(
            model,
            tokenizer,
            trainer.network,
            embedder=data.embedder,
            personas=data.personas,
            prompt_format=trainer.prompt_format,
            metadata={"base_model": script_args.model_name_or_path, **data.metadata},
        )
        steered.save_pretrained(output / "persona")
    return trainer


def _train_individuals(script_args: PersonaScriptArguments, training_args: PersonaConfig):
    from steer.models import load_causal_lm
    from steer.persona.steering import PersonaSteeredModel

    data: PersonaData = prepare_persona_data(script_args)
    output = Path(training_args.output_dir)
    if training_args.should_save:
        (output / "data").mkdir(parents=True, exist_ok=True)
        data.train.to_csv(output / "data" / "train.csv")
        data.heldout.to_csv(output / "data" / "heldout.csv")
        if data.valid is not None:
            data.valid.to_csv(output / "data" / "valid.csv")
        _atomic_write_text(output / "data" / "split.json", json.dumps(data.metadata, indent=2) + "\n")
    model, tokenizer = load_causal_lm(script_args.model_name_or_path, dtype=script_args.dtype)
    train_examples = answer_examples(
        data.train, limit=script_args.max_train_examples, seed=script_args.dataset_seed
    )
    valid_examples = []
    if data.valid is not None:
        eval_users = list(range(min(script_args.eval_users, data.valid.num_users)))
        valid_examples = answer_examples(
            data.valid, users=eval_users, limit=script_args.max_eval_examples, seed=script_args.dataset_seed
        )
    logger.info(
        "persona data: %d users, %d train / %d validation examples, %d personas",
        data.train.num_users,
        len(train_examples),
        len(valid_examples),
        len(data.personas),
    )
    train, valid = _trainer_datasets(train_examples, valid_examples, training_args)
    trainer = PersonaTrainer(
        model,
        training_args,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=tokenizer,
        user_vectors=data.embedder.embeddings.detach().cpu(),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.train_persona_vectors:
        # the user vectors moved: re-solve the question side for them, so that fold-in, cohorts and the
        # MF predictions live in the same space as the vectors the network was trained on
        data.embedder.refit_questions(data.train, trainer.user_vectors)
        data.personas, data.cohorts = persona_table(
            data.embedder,
            data.train,
            script_args.demographic_attributes,
            num_cohorts=script_args.num_cohorts,
            k_max=script_args.cohort_k_max,
            seed=script_args.dataset_seed,
        )
        data.metadata["cohorts"] = cohort_summary(data.cohorts)
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


def train_persona(script_args: PersonaScriptArguments, training_args: PersonaConfig):
    """The persona recipe: data (:mod:`steer.persona.data`) -> soft-prompt training -> ``output_dir/persona``.

    Writes ``output_dir/data/split.json`` (the split ``steer eval opinions`` scores; the individual path
    also writes ``train.csv``, ``valid.csv`` and ``heldout.csv`` in the real responses.csv format).
    Returns the trainer.
    """
    if script_args.persona_source == "groups":
        return _train_groups(script_args, training_args)
    return _train_individuals(script_args, training_args)
