"""Evaluations: the RealToxicityPrompts protocol, oracle agreement, opinion steering, report helpers.

Names are imported lazily so that ``python -m steer.eval.toxicity`` runs the module only once.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "opinions": (
        "OpinionEvalArguments",
        "macro_accuracy",
        "ordinal_wasserstein",
        "representativeness",
        "run_opinion_eval",
        "write_opinion_report",
    ),
    "report": ("compare_runs", "load_results", "markdown_table", "write_json", "write_report"),
    "toxicity": (
        "OracleAgreementArguments",
        "OracleArguments",
        "ToxicityEvalArguments",
        "compute_toxicity_metrics",
        "distinct_n",
        "hf_generate_fn",
        "load_eval_model",
        "load_prompts",
        "oracle_agreement",
        "perplexity",
        "run_oracle_agreement",
        "run_toxicity_eval",
        "write_toxicity_report",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
