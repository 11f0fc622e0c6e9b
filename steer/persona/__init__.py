"""Persona embeddings: OpinionQA loaders, a respondent simulator, matrix factorisation, cohorts.

See each module's docstring for its API: :mod:`steer.persona.opinionqa` (``Question``, ``Responses``,
loaders, group distributions), :mod:`steer.persona.groups` (``GroupTable``: demographic groups as
respondents with their real answer distributions), :mod:`steer.persona.data` (the recipe's data
preparation: wave split, personas, training examples), :mod:`steer.persona.simulate`
(``simulate_respondents``, ``synthetic_responses``), :mod:`steer.persona.embedder` (``PersonaEmbedder``)
and :mod:`steer.persona.cohorts` (``find_cohorts``, ``group_centroids``); the steering half:
:mod:`steer.persona.soft_prompt` (``SoftPromptNetwork``) and :mod:`steer.persona.steering`
(``PersonaSteeredModel``).
"""

from steer.persona.cohorts import CohortResult, find_cohorts, group_centroids
from steer.persona.embedder import EmbedderConfig, PersonaEmbedder, option_accuracy, per_question_mean_rmse
from steer.persona.groups import GROUP_ATTRIBUTES, GroupTable, load_group_table
from steer.persona.opinionqa import (
    DEMOGRAPHIC_COLUMNS,
    GroupDistribution,
    Question,
    Responses,
    group_distributions,
    group_shares,
    load_metadata,
    load_responses,
    load_wave,
    load_waves,
    wave_dirs,
)
from steer.persona.simulate import simulate_respondents, synthetic_responses
from steer.persona.soft_prompt import (
    SoftPromptConfig,
    SoftPromptNetwork,
    apply_ordinal_tilt,
    steered_forward,
    steered_inputs,
)
from steer.persona.steering import PersonaSteeredModel, PromptFormat, decode

__all__ = [
    "DEMOGRAPHIC_COLUMNS",
    "GROUP_ATTRIBUTES",
    "GroupTable",
    "load_group_table",
    "CohortResult",
    "EmbedderConfig",
    "GroupDistribution",
    "PersonaEmbedder",
    "PersonaSteeredModel",
    "PromptFormat",
    "Question",
    "Responses",
    "SoftPromptConfig",
    "SoftPromptNetwork",
    "apply_ordinal_tilt",
    "decode",
    "find_cohorts",
    "group_centroids",
    "group_distributions",
    "group_shares",
    "load_metadata",
    "load_responses",
    "load_wave",
    "load_waves",
    "option_accuracy",
    "per_question_mean_rmse",
    "simulate_respondents",
    "steered_forward",
    "steered_inputs",
    "synthetic_responses",
    "wave_dirs",
]
