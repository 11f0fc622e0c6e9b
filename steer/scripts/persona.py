"""``steer train persona``: the recipe runner (model, survey data, split, load → train → save).

The trainer and its config live in :mod:`steer.trainers.persona`, the collator and model in :mod:`steer.persona`
(``collator``, ``modeling``, ``adapter``); the data preparation in
:mod:`steer.persona.data`. This module holds :class:`PersonaScriptArguments` and :func:`train_persona`, which
trains on demographic groups (real Pew distributions, split by wave) or individual respondents.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from steer.errors import InputFileNotFoundError, UserInputError
from steer.io import atomic_write_text
from steer.persona.data import (
    GroupDataSettings,
    IndividualDataSettings,
    PersonaData,
    answer_examples,
    cohort_summary,
    persona_table,
    prepare_group_data,
    prepare_persona_data,
)
from steer.persona.groups import GROUP_ATTRIBUTES
from steer.scripts.output import check_output_dir, resolve_resume
from steer.trainers.persona import (
    PersonaConfig,
    PersonaTrainer,
)

logger = logging.getLogger(__name__)

__all__ = ["PersonaConfig", "PersonaScriptArguments", "check_persona_run", "train_persona"]


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
    within_wave_holdout: float = field(
        default=0.0,
        metadata={
            "help": "groups: share of each training wave's questions held out of all training and scored by "
            "`steer eval opinions --split within` (Li et al.'s protocol: unseen questions of surveys the personas "
            "answered). A question battery (same stem, different item letter, or the same question text) stays on one "
            "side; seeded by dataset_seed. 0: none."
        },
    )
    group_attributes: list[str] = field(
        default_factory=lambda: list(GROUP_ATTRIBUTES),
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

    num_cohorts: int | None = field(
        default=None, metadata={"help": "k-means cohorts (elbow selection when omitted)."}
    )
    cohort_k_max: int = field(default=10, metadata={"help": "Largest k tried by the elbow selection."})
    demographic_attributes: list[str] = field(
        default_factory=lambda: ["POLPARTY"],
        metadata={"help": "Attributes with stored demographic centroids."},
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the simulation, splits and subsets."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a previous run in output_dir. Without it a run refuses an output_dir that holds "
            "another run's persona/, data/ or checkpoints (resuming from a checkpoint inside it is allowed)."
        },
    )

    def __post_init__(self) -> None:
        name = "PersonaScriptArguments"
        if self.persona_source not in ("groups", "individuals"):
            raise ValueError(
                f"{name}.persona_source must be 'groups' or 'individuals', got {self.persona_source!r}"
            )
        if self.embedder_method not in ("als", "adam"):
            raise ValueError(f"{name}.embedder_method must be 'als' or 'adam', got {self.embedder_method!r}")
        for key in ("fold_in_answers", "embedding_dim", "n_respondents", "eval_users"):
            if getattr(self, key) < 1:
                raise ValueError(f"{name}.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_questions", "max_train_examples", "max_eval_examples", "num_cohorts"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{name}.{key} must be >= 1 (or unset), got {getattr(self, key)}")
        if self.question_block is not None and self.question_block < 2:
            raise ValueError(
                f"{name}.question_block must be >= 2 (groups side by side), got {self.question_block}"
            )
        if self.cohort_k_max < 2:
            raise ValueError(f"{name}.cohort_k_max must be >= 2, got {self.cohort_k_max}")
        if not 0.0 < self.observed_frac <= 1.0:
            raise ValueError(f"{name}.observed_frac must be in (0, 1], got {self.observed_frac}")
        if not 0.0 < self.holdout_fraction < 0.5:
            raise ValueError(f"{name}.holdout_fraction must be in (0, 0.5), got {self.holdout_fraction}")
        if not 0.0 <= self.within_wave_holdout < 0.5:
            raise ValueError(
                f"{name}.within_wave_holdout must be in [0, 0.5), got {self.within_wave_holdout}"
            )
        if self.embedder_l2 < 0:
            raise ValueError(f"{name}.embedder_l2 must be >= 0, got {self.embedder_l2}")
        if not 1 <= len(self.group_by) <= 2:
            raise ValueError(f"{name}.group_by takes 1 or 2 attributes, got {self.group_by}")
        if self.persona_source == "groups" and not self.group_attributes:
            raise ValueError(f"{name}.group_attributes must name at least one attribute")
        if self.persona_source == "individuals" and not self.waves:
            raise ValueError(f"{name}.waves must name at least one wave")

    def _settings(self, cls):
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})

    def group_data_settings(self) -> GroupDataSettings:
        """The settings of the group data preparation (:func:`steer.persona.data.prepare_group_data`)."""
        return self._settings(GroupDataSettings)

    def individual_data_settings(self) -> IndividualDataSettings:
        """The settings of the individual data preparation (:func:`steer.persona.data.prepare_persona_data`)."""
        return self._settings(IndividualDataSettings)


def _trainer_datasets(examples, valid_examples, training_args):
    from datasets import Dataset

    train = Dataset.from_list(examples)
    valid = (
        Dataset.from_list(valid_examples) if valid_examples and training_args.eval_strategy != "no" else None
    )
    return train, valid


def check_persona_run(script_args: PersonaScriptArguments, training_args: PersonaConfig) -> str | None:
    """Everything a persona run can check before its data and model load; returns the resume path.

    The resume path, the output directory (no previous run unless ``overwrite_output_dir`` or resuming
    inside it), the model path, the wave split and the OpinionQA wave directories, ``responses_csv``, and
    ``contrast_weight`` (which needs ``question_block``).
    """
    from steer.models import check_model_dir
    from steer.persona.data import WaveSplit
    from steer.persona.opinionqa import wave_dirs

    name = "PersonaScriptArguments"
    resume = resolve_resume(
        training_args.resume_from_checkpoint,
        training_args.output_dir,
        owner="PersonaConfig",
        state_files=("soft_prompt_config.json",),
    )
    check_output_dir(
        training_args.output_dir, overwrite=script_args.overwrite_output_dir, resume=resume, owner=name
    )
    check_model_dir(script_args.model_name_or_path, what=f"{name}.model_name_or_path")
    if (
        training_args.contrast_weight > 0
        and script_args.question_block is None
        and script_args.persona_source == "groups"
    ):
        raise UserInputError(
            f"PersonaConfig.contrast_weight={training_args.contrast_weight} needs {name}.question_block "
            "(examples of one question side by side in a batch; set it to per_device_train_batch_size)"
        )
    if script_args.opinionqa_dir is not None and not Path(script_args.opinionqa_dir).expanduser().is_dir():
        raise InputFileNotFoundError(
            f"{name}.opinionqa_dir: directory not found: {script_args.opinionqa_dir}"
        )
    if script_args.persona_source == "groups":
        import dataclasses

        individual = ("waves", "group_by")  # options of the individual path
        defaults = {
            f.name: f.default_factory() for f in dataclasses.fields(script_args) if f.name in individual
        }
        for key, default in defaults.items():
            if list(getattr(script_args, key)) != list(default):
                raise UserInputError(
                    f"{name}.{key}={getattr(script_args, key)} applies to persona_source='individuals' only; under "
                    "persona_source='groups' the waves are train_waves / valid_waves / eval_waves and the groups "
                    "group_attributes (remove it, or set persona_source individuals)"
                )
        split = WaveSplit(script_args.train_waves, script_args.valid_waves, script_args.eval_waves)
        waves, field_names = split.all, "train_waves / valid_waves / eval_waves"
    else:
        waves, field_names = list(script_args.waves), "waves"
        for path in script_args.responses_csv or []:
            if not Path(path).expanduser().is_file():
                raise InputFileNotFoundError(f"{name}.responses_csv: file not found: {path}")
    try:
        wave_dirs(script_args.opinionqa_dir, waves)
    except FileNotFoundError as err:
        raise InputFileNotFoundError(
            f"{name}.{field_names}: {err} (opinionqa_dir: {script_args.opinionqa_dir or 'STEER_DATA_DIR/opinionqa'})"
        ) from err
    return resume


def _publish(output: Path, run_id: str, write_data, write_persona) -> None:
    """Write the run's ``data/`` and ``persona/`` into a staging directory, then swap both in together.

    A run that fails before this point leaves the previous run's pair untouched; both carry the same
    ``run_id``, which ``steer eval opinions`` checks.
    """
    stage = output / f".run-{run_id}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        (stage / "data").mkdir(parents=True)
        write_data(stage / "data")
        write_persona(stage / "persona")
        for name in ("data", "persona"):
            target = output / name
            if target.exists():
                os.replace(target, stage / f"previous-{name}")
            os.replace(stage / name, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_split(directory: Path, metadata: dict) -> None:
    atomic_write_text(directory / "split.json", json.dumps(metadata, indent=2) + "\n")


def _train_groups(script_args: PersonaScriptArguments, training_args: PersonaConfig, resume: str | None):
    from steer.models import load_causal_lm
    from steer.persona.steering import PersonaSteeredModel

    data = prepare_group_data(script_args.group_data_settings())
    data.metadata["run_id"] = uuid.uuid4().hex[:12]
    output = Path(training_args.output_dir)
    model, tokenizer = load_causal_lm(script_args.model_name_or_path, dtype=script_args.dtype)
    strip = ("group", "key")
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
    trainer.train(resume_from_checkpoint=resume)
    if training_args.should_save:
        steered = PersonaSteeredModel(
            trainer.lm,
            tokenizer,
            trainer.network,
            gate=trainer.gate,
            embedder=data.embedder,
            personas=data.personas,
            prompt_format=trainer.prompt_format,
            metadata={"base_model": script_args.model_name_or_path, **data.metadata},
        )
        _publish(
            output,
            data.metadata["run_id"],
            lambda directory: _write_split(directory, data.metadata),
            steered.save_pretrained,
        )
    return trainer


def _train_individuals(script_args: PersonaScriptArguments, training_args: PersonaConfig, resume: str | None):
    from steer.models import load_causal_lm
    from steer.persona.steering import PersonaSteeredModel

    data: PersonaData = prepare_persona_data(script_args.individual_data_settings())
    data.metadata["run_id"] = uuid.uuid4().hex[:12]
    output = Path(training_args.output_dir)
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
    trainer.train(resume_from_checkpoint=resume)
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
            trainer.lm,
            tokenizer,
            trainer.network,
            gate=trainer.gate,
            embedder=data.embedder,
            personas=data.personas,
            prompt_format=trainer.prompt_format,
            metadata={
                "base_model": script_args.model_name_or_path,
                **data.metadata,
                "cohort_of_user": cohort_of,
            },
        )

        def write_data(directory: Path) -> None:
            data.train.to_csv(directory / "train.csv")
            data.heldout.to_csv(directory / "heldout.csv")
            if data.valid is not None:
                data.valid.to_csv(directory / "valid.csv")
            _write_split(directory, data.metadata)

        _publish(output, data.metadata["run_id"], write_data, steered.save_pretrained)
    return trainer


def train_persona(script_args: PersonaScriptArguments, training_args: PersonaConfig):
    """The persona recipe: checks (:func:`check_persona_run`) -> data (:mod:`steer.persona.data`) ->
    soft-prompt training -> ``output_dir/persona`` + ``output_dir/data``.

    ``output_dir/data/split.json`` is the split ``steer eval opinions`` scores (the individual path also
    writes ``train.csv``, ``valid.csv`` and ``heldout.csv`` in the real responses.csv format). Both
    directories are written together once training has finished and record the same ``run_id``: a failed
    run leaves a previous run's pair as it was. Returns the trainer.
    """
    from steer.scripts.output import training_run

    resume = check_persona_run(script_args, training_args)
    train = _train_groups if script_args.persona_source == "groups" else _train_individuals
    with training_run(
        training_args.output_dir,
        overwrite=script_args.overwrite_output_dir,
        resume=resume,
        is_main=training_args.should_save,
    ):
        return train(script_args, training_args, resume)
