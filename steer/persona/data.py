"""Data preparation of the persona recipe: splits, personas and training examples (no trainer here).

Two sources of personas, both split so that nothing scored reaches training:

* **groups** (the default): every demographic group of the real Pew tables is a respondent whose
  answers are its real answer distributions (:mod:`steer.persona.groups`). Waves are split into
  training waves (embedder and soft-prompt network), validation waves (checkpoint choice only) and
  evaluation waves (scored by ``steer eval opinions``). Groups listed in ``fold_in_groups`` are kept out
  of everything and folded in afterwards from ``fold_in_answers`` of their training-wave answers.
* **individuals**: respondents from real ``responses.csv`` files or simulated from the real group
  tables (:mod:`steer.persona.simulate`). Whole questions are held out (the evaluation waves when the
  responses contain them, else a seeded share of the questions), plus validation questions.

Public API: ``WaveSplit``, ``GroupDataSettings`` / ``GroupData`` / ``prepare_group_data(settings)``,
``group_examples``, ``IndividualDataSettings`` / ``PersonaData`` / ``prepare_persona_data(settings)``,
``split_questions``, ``persona_table``, ``answer_examples``. The settings carry the options of
``steer train persona`` of the same names (its messages name them as options of that command).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from steer.errors import InputKeyError, UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "DataSettings",
    "GroupData",
    "GroupDataSettings",
    "IndividualDataSettings",
    "PersonaData",
    "WaveSplit",
    "answer_examples",
    "cluster_groups",
    "fit_embedder",
    "group_examples",
    "persona_table",
    "prepare_group_data",
    "prepare_persona_data",
    "question_batteries",
    "split_questions",
    "wave_label",
    "within_wave_split",
]

_WAVE = re.compile(r"(\d+)$")


def wave_label(wave: int | str) -> str:
    """``26``, ``"W26"``, ``"American_Trends_Panel_W26"`` -> ``"W26"``."""
    match = _WAVE.search(str(wave))
    if match is None:
        raise UserInputError(f"not a wave number: {wave!r} (use 26, 'W26' or 'American_Trends_Panel_W26')")
    return f"W{int(match.group(1))}"


@dataclass
class WaveSplit:
    """Disjoint training / validation / evaluation waves."""

    train: list[str]
    valid: list[str]
    eval: list[str]

    def __post_init__(self) -> None:
        self.train = [wave_label(w) for w in self.train]
        self.valid = [wave_label(w) for w in self.valid]
        self.eval = [wave_label(w) for w in self.eval]
        if not self.train or not self.eval:
            raise UserInputError("WaveSplit: train_waves and eval_waves must not be empty")
        for a, b in (("train", "valid"), ("train", "eval"), ("valid", "eval")):
            shared = set(getattr(self, a)) & set(getattr(self, b))
            if shared:
                raise UserInputError(f"WaveSplit: waves {sorted(shared)} are in both {a}_waves and {b}_waves")

    @property
    def all(self) -> list[str]:
        return self.train + self.valid + self.eval

    def part_of(self, wave: str | None) -> str | None:
        for name in ("train", "valid", "eval"):
            if wave in getattr(self, name):
                return name
        return None

    def to_dict(self) -> dict:
        return {"train_waves": self.train, "valid_waves": self.valid, "eval_waves": self.eval}


@dataclass
class DataSettings:
    """What both kinds of personas read: the data root, the question subset, the embedder and the cohorts."""

    opinionqa_dir: str | None  # OpinionQA root (None: STEER_DATA_DIR)
    max_questions: int | None  # random subset of (groups: training) questions; None: all
    embedding_dim: int
    embedder_method: str  # 'als' or 'adam'
    embedder_l2: float
    standardize_personas: bool  # persona vectors with mean 0, std 1 per dimension
    num_cohorts: int | None  # k-means cohorts; None: the elbow of the MF loss
    cohort_k_max: int
    dataset_seed: int  # seed of the simulation, splits and subsets


@dataclass
class GroupDataSettings(DataSettings):
    """What :func:`prepare_group_data` reads."""

    train_waves: list[int | str]
    valid_waves: list[int | str]
    eval_waves: list[int | str]
    within_wave_holdout: float  # share of each training wave's questions held out of training
    group_attributes: list[str]
    fold_in_groups: list[str]  # kept out of training, then folded in from fold_in_answers answers
    fold_in_answers: int
    question_block: int | None  # groups per block of one question; None: independent pairs
    max_train_examples: int | None
    max_eval_examples: int | None


@dataclass
class IndividualDataSettings(DataSettings):
    """What :func:`prepare_persona_data` reads."""

    waves: list[int | str]
    responses_csv: list[str] | None  # real responses.csv files; None: simulated respondents
    n_respondents: int
    group_by: list[str]  # the simulated respondents' groups (1 or 2 attributes)
    observed_frac: float
    tilt: float
    separation: float
    valid_waves: list[int | str]
    eval_waves: list[int | str]
    holdout_fraction: float  # without evaluation waves: share of whole questions held out (each part)
    demographic_attributes: list[str]  # attributes with stored demographic centroids


def fit_embedder(settings: DataSettings, responses):
    """The persona embedder (matrix factorisation) fitted on ``responses``, standardised if the settings ask."""
    from steer.persona.embedder import PersonaEmbedder

    embedder = PersonaEmbedder(
        settings.embedding_dim,
        method=settings.embedder_method,
        l2=settings.embedder_l2,
        seed=settings.dataset_seed,
    ).fit(responses)
    if settings.standardize_personas:
        embedder.standardize_()
    return embedder


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------


@dataclass
class GroupData:
    """What :func:`prepare_group_data` returns."""

    table: Any  # steer.persona.groups.GroupTable over all waves of the split
    split: WaveSplit
    train_keys: list[str]
    valid_keys: list[str]
    eval_keys: list[str]
    train_groups: list[str]
    embedder: Any
    personas: dict[str, torch.Tensor]
    train_examples: list[dict]
    valid_examples: list[dict]
    metadata: dict = field(default_factory=dict)


def group_examples(
    table,
    names,
    keys,
    personas: dict[str, torch.Tensor],
    *,
    limit: int | None = None,
    seed: int = 0,
    block: int | None = None,
) -> list[dict]:
    """One example per (group, question) with a real distribution: the distribution is the target.

    Fields: ``question``, ``options``, ``answer`` (the modal option), ``target`` (the real answer
    distribution over the options), ``scale`` (the options' scaled ordinals), ``question_id`` (position of
    the question in ``keys``), ``persona`` (the group's vector), ``group``, ``key``. With ``block``, the
    examples come in blocks of up to ``block`` random groups answering the same question (questions in a
    seeded random order, each once per pass); otherwise all pairs in a seeded random order.
    """
    rng = np.random.default_rng(seed)
    by_key = {k: [n for n in names if table.distribution(n, k) is not None] for k in keys}
    if block is None:
        pairs = [(n, k) for k in keys for n in by_key[k]]
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    else:
        if block < 2:
            raise ValueError(f"question blocks need at least 2 groups, got block={block}")
        pairs = []
        total = sum(len(v) for v in by_key.values())
        target = total if limit is None else min(limit, total)
        used = {k: set() for k in keys}
        while len(pairs) < target:
            added = 0
            for j in rng.permutation(len(keys)):
                key = keys[j]
                fresh = [n for n in by_key[key] if n not in used[key]]
                if len(fresh) < 2:
                    continue
                chosen = [fresh[i] for i in rng.permutation(len(fresh))[:block]]
                used[key].update(chosen)
                pairs.extend((n, key) for n in chosen)
                added += len(chosen)
                if len(pairs) >= target:
                    break
            if added == 0:
                break
    if limit is not None:
        pairs = pairs[:limit]
    position = {k: j for j, k in enumerate(keys)}
    examples = []
    for name, key in pairs:
        target_probs = table.distribution(name, key)
        question = table.questions[key]
        examples.append(
            {
                "question": question.text,
                "options": list(question.options),
                "answer": int(np.argmax(target_probs)),
                "target": [float(x) for x in target_probs],
                "scale": [float(x) for x in question.scaled_array()],
                "question_id": position[key],
                "persona": [float(x) for x in personas[name]],
                "group": name,
                "key": key,
            }
        )
    return examples


def question_batteries(table, keys) -> list[list[str]]:
    """``keys`` grouped into batteries: the items of one question stem (``GUNACTIVITYA_W26`` ... ``E``: a stem
    that differs only in its last letter from another key of the same wave) and questions with the same text.
    Order: first appearance."""
    parent = {k: k for k in keys}

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a, b):
        parent[find(b)] = find(a)

    stems = {k: re.sub(r"_W\d+$", "", k) for k in keys}
    by_prefix: dict[tuple, list[str]] = {}
    by_text: dict[tuple, list[str]] = {}
    for k in keys:
        stem, wave = stems[k], table.wave_of(k)
        if len(stem) > 1 and stem[-1].isalpha() and stem[-1].isupper():
            by_prefix.setdefault((wave, stem[:-1]), []).append(k)
        by_text.setdefault((wave, table.questions[k].text.strip()), []).append(k)
    for members in [*by_prefix.values(), *by_text.values()]:
        if len(members) > 1:
            for other in members[1:]:
                union(members[0], other)
    batteries: dict[str, list[str]] = {}
    for k in keys:
        batteries.setdefault(find(k), []).append(k)
    return list(batteries.values())


def within_wave_split(table, keys, share: float, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(kept, held_out)``: about ``share`` of each wave's questions held out, whole batteries at a time
    (:func:`question_batteries`), seeded. Keys keep their order."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"within_wave_holdout must be in (0, 1), got {share}")
    rng = np.random.default_rng([seed, 7])
    held: set[str] = set()
    by_wave: dict[str, list[list[str]]] = {}
    for battery in question_batteries(table, keys):
        by_wave.setdefault(table.wave_of(battery[0]), []).append(battery)
    for wave in sorted(by_wave):
        batteries = by_wave[wave]
        total = sum(len(b) for b in batteries)
        target, taken = share * total, 0
        for j in rng.permutation(len(batteries)):
            if taken >= target:
                break
            if taken + len(batteries[j]) > target + 0.5 * len(batteries[j]) and taken > 0:
                continue  # a large battery that would overshoot; a smaller one may fit
            held.update(batteries[j])
            taken += len(batteries[j])
    return [k for k in keys if k not in held], [k for k in keys if k in held]


def cluster_groups(
    embedder, responses, groups: list[str], *, k: int | None = None, k_max: int = 10, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The paper's cluster personas for groups: k-means over the groups' persona vectors (``embedder``'s rows,
    in ``groups`` order; k by the elbow of the MF loss on ``responses`` unless given). Returns the centroids as
    named personas ``{"cohort:<c>": vector}`` and each cohort's member groups ``{"<c>": [group, ...]}``; nothing
    for fewer than 3 groups."""
    if len(groups) < 3:
        return {}, {}
    from steer.persona.cohorts import find_cohorts

    cohorts = find_cohorts(
        embedder.embeddings,
        k=k,
        k_range=range(2, min(k_max, len(groups) - 1) + 1),
        embedder=embedder,
        responses=responses,
        seed=seed,
    )
    centroids, members = {}, {}
    for c in range(cohorts.k):
        centroids[f"cohort:{c}"] = cohorts.centroids[c].detach().float().cpu()
        members[str(c)] = [n for n, label in zip(groups, cohorts.labels) if int(label) == c]
    return centroids, members


def prepare_group_data(settings: GroupDataSettings) -> GroupData:
    """Real group table -> wave split -> MF over groups x training questions -> personas -> examples."""
    from steer.persona.groups import load_group_table

    split = WaveSplit(settings.train_waves, settings.valid_waves, settings.eval_waves)
    table = load_group_table(settings.opinionqa_dir, split.all, attributes=settings.group_attributes)
    keys = {"train": [], "valid": [], "eval": []}
    for key in table.question_keys:
        part = split.part_of(table.wave_of(key))
        if part is None:
            raise ValueError(f"question {key} belongs to no wave of the split")
        keys[part].append(key)
    rng = np.random.default_rng(settings.dataset_seed)
    holdout = float(settings.within_wave_holdout)
    keys["within"] = []
    if holdout > 0:
        keys["train"], keys["within"] = within_wave_split(
            table, keys["train"], holdout, seed=settings.dataset_seed
        )
    if settings.max_questions is not None and settings.max_questions < len(keys["train"]):
        chosen = rng.choice(len(keys["train"]), size=settings.max_questions, replace=False)
        keys["train"] = [keys["train"][i] for i in sorted(chosen)]
    unknown = [g for g in settings.fold_in_groups if g not in table.names]
    if unknown:
        raise UserInputError(
            f"PersonaScriptArguments.fold_in_groups: unknown groups {unknown} (known: {table.names})"
        )
    train_groups = [n for n in table.names if n not in set(settings.fold_in_groups)]
    responses = table.to_responses(train_groups, keys["train"])
    embedder = fit_embedder(settings, responses)
    personas = {n: embedder.embeddings[i].detach().float().cpu() for i, n in enumerate(train_groups)}
    centroids, group_cohorts = cluster_groups(
        embedder,
        responses,
        train_groups,
        k=settings.num_cohorts,
        k_max=settings.cohort_k_max,
        seed=settings.dataset_seed,
    )
    personas.update(centroids)
    folded = {}
    for name in settings.fold_in_groups:
        new = table.to_responses([name], keys["train"])
        vector = embedder.fold_in(new, settings.fold_in_answers, seed=settings.dataset_seed)[0]
        answered = new.split_per_user(settings.fold_in_answers, seed=settings.dataset_seed)[0]
        used = [k for j, k in enumerate(answered.question_keys) if answered.observed[0, j]]
        personas[name] = vector.detach().float().cpu()
        folded[name] = {"answers": len(used), "question_keys": used}
    block = settings.question_block
    train_examples = group_examples(
        table,
        train_groups,
        keys["train"],
        personas,
        limit=settings.max_train_examples,
        seed=settings.dataset_seed,
        block=block,
    )
    valid_examples = group_examples(
        table,
        train_groups,
        keys["valid"],
        personas,
        limit=settings.max_eval_examples,
        seed=settings.dataset_seed,
        block=block,
    )
    norms = {n: float(v.norm()) for n, v in personas.items()}
    means = responses.values  # [groups, training questions] expected scaled answers
    with np.errstate(all="ignore"):
        deviation = means - np.nanmean(means, 0, keepdims=True)
    contrast_scale = float(np.nanmean(deviation**2))
    metadata = {
        "protocol": "groups",
        **split.to_dict(),
        "waves": split.all,
        "opinionqa_dir": str(settings.opinionqa_dir) if settings.opinionqa_dir else None,
        "question_keys": list(table.question_keys),
        "train_question_keys": keys["train"],
        "valid_question_keys": keys["valid"],
        "eval_question_keys": keys["eval"],
        "within_question_keys": keys["within"],
        "within_wave_holdout": holdout,
        "group_attributes": list(settings.group_attributes),
        "train_groups": train_groups,
        "fold_in": folded,
        "group_cohorts": group_cohorts,
        "persona_norms": norms,
        "contrast_scale": contrast_scale,
        "standardized": bool(settings.standardize_personas),
        "source": {"groups": "real Pew group distributions"},
        "num_users": len(train_groups),
        "train_examples": len(train_examples),
        "valid_examples": len(valid_examples),
    }
    logger.info(
        "group data: %d groups, questions train %d / valid %d / eval %d / within-wave held out %d, examples train "
        "%d / valid %d",
        len(train_groups),
        len(keys["train"]),
        len(keys["valid"]),
        len(keys["eval"]),
        len(keys["within"]),
        len(train_examples),
        len(valid_examples),
    )
    return GroupData(
        table,
        split,
        keys["train"],
        keys["valid"],
        keys["eval"],
        train_groups,
        embedder,
        personas,
        train_examples,
        valid_examples,
        metadata,
    )


# --------------------------------------------------------------------------------------------------
# Individuals
# --------------------------------------------------------------------------------------------------


@dataclass
class PersonaData:
    """What ``prepare_persona_data`` returns: the split answers, the fitted embedder and the personas.

    ``train`` holds the training questions, ``valid`` the validation questions (checkpoint choice),
    ``heldout`` the evaluation questions; the three share the users and never a question.
    """

    questions: dict
    train: Any
    heldout: Any
    embedder: Any
    personas: dict[str, torch.Tensor]
    cohorts: Any  # steer.persona.cohorts.CohortResult
    metadata: dict
    valid: Any = None


def split_questions(responses, settings: IndividualDataSettings) -> tuple[list[str], list[str], list[str]]:
    """(train, valid, eval) question keys: by wave when the responses hold evaluation waves, else a
    seeded share (``holdout_fraction`` each for validation and evaluation) of the questions."""
    keys = list(responses.question_keys)
    eval_waves = {wave_label(w) for w in (settings.eval_waves or [])}
    valid_waves = {wave_label(w) for w in (settings.valid_waves or [])}
    waves = {k: responses.questions[k].wave for k in keys}
    if eval_waves & set(waves.values()):
        eval_keys = [k for k in keys if waves[k] in eval_waves]
        valid_keys = [k for k in keys if waves[k] in valid_waves]
        train_keys = [k for k in keys if k not in set(eval_keys) | set(valid_keys)]
    else:
        if len(keys) < 3:
            raise UserInputError(f"need at least 3 questions to hold out whole questions, got {len(keys)}")
        order = np.random.default_rng(settings.dataset_seed).permutation(len(keys))
        n_hold = max(1, int(round(settings.holdout_fraction * len(keys))))
        eval_keys = [keys[i] for i in sorted(order[:n_hold])]
        valid_keys = [keys[i] for i in sorted(order[n_hold : 2 * n_hold])]
        train_keys = [keys[i] for i in sorted(order[2 * n_hold :])]
    if not train_keys or not eval_keys:
        raise UserInputError(
            "the question split leaves no training or no evaluation question (check waves, eval_waves, max_questions)"
        )
    return train_keys, valid_keys, eval_keys


def _choose_questions(responses, max_questions: int | None, seed: int):
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
            raise InputKeyError(
                f"PersonaScriptArguments.demographic_attributes: no column {attribute!r} in the responses"
            )
        values = responses.demographics[attribute].to_numpy(dtype=object)
        for value, centroid in group_centroids(embeddings, values, exclude=("nan", "", "Refused")).items():
            personas[f"{attribute}={value}"] = centroid.float()
    return personas, result


def cohort_summary(cohorts) -> dict:
    return {
        "k": cohorts.k,
        "k_values": cohorts.k_values,
        "losses": cohorts.losses,
        "criterion": cohorts.criterion,
        "sizes": cohorts.sizes.tolist(),
    }


def _respondents(settings: IndividualDataSettings):
    from steer.persona.opinionqa import load_responses, load_waves

    root = settings.opinionqa_dir
    questions = load_waves(root, settings.waves)
    if settings.responses_csv:
        return (
            questions,
            load_responses(settings.responses_csv, questions),
            {"responses_csv": list(settings.responses_csv)},
        )
    from steer.persona.simulate import simulate_respondents

    responses = simulate_respondents(
        settings.waves,
        root=root,
        group_by=tuple(settings.group_by),
        n_respondents=settings.n_respondents,
        seed=settings.dataset_seed,
        observed_frac=settings.observed_frac,
        tilt=settings.tilt,
        separation=settings.separation,
    )
    source = {
        "simulated": {
            "n_respondents": settings.n_respondents,
            "group_by": list(settings.group_by),
            "observed_frac": settings.observed_frac,
            "tilt": settings.tilt,
            "separation": settings.separation,
            "seed": settings.dataset_seed,
        }
    }
    return questions, responses, source


def prepare_persona_data(settings: IndividualDataSettings) -> PersonaData:
    """Respondents -> whole-question split -> embedder on the training questions -> cohorts and personas."""
    questions, responses, source = _respondents(settings)
    responses = _choose_questions(responses, settings.max_questions, settings.dataset_seed)
    train_keys, valid_keys, eval_keys = split_questions(responses, settings)
    keep = responses.select_questions(train_keys).observed.sum(1) >= 2
    responses = responses.select_users(keep)
    if responses.num_users == 0:
        raise UserInputError("no respondent has two or more ordinal answers on the training questions")
    train = responses.select_questions(train_keys)
    valid = responses.select_questions(valid_keys) if valid_keys else None
    heldout = responses.select_questions(eval_keys)
    embedder = fit_embedder(settings, train)
    personas, cohorts = persona_table(
        embedder,
        train,
        settings.demographic_attributes,
        num_cohorts=settings.num_cohorts,
        k_max=settings.cohort_k_max,
        seed=settings.dataset_seed,
    )
    metadata = {
        "protocol": "individuals",
        "waves": list(settings.waves),
        "opinionqa_dir": str(settings.opinionqa_dir) if settings.opinionqa_dir else None,
        "question_keys": list(responses.question_keys),
        "train_question_keys": train_keys,
        "valid_question_keys": valid_keys,
        "eval_question_keys": eval_keys,
        "source": source,
        "num_users": int(responses.num_users),
        "train_answers": int(train.observed.sum()),
        "heldout_answers": int(heldout.observed.sum()),
        "cohorts": cohort_summary(cohorts),
    }
    return PersonaData(questions, train, heldout, embedder, personas, cohorts, metadata, valid)


def answer_examples(responses, *, users=None, limit: int | None = None, seed: int = 0) -> list[dict]:
    """One example per observed ordinal answer: question text, options (ordinal order), answer index, user."""
    observed = responses.observed
    rows, cols = np.nonzero(observed)
    if users is not None:
        allowed = np.zeros(responses.num_users, dtype=bool)
        allowed[np.asarray(users, dtype=np.int64)] = True
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
                "scale": [float(x) for x in question.scaled_array()],
                "user_index": int(rows[i]),
            }
        )
    return examples
