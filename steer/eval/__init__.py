"""Evaluations: the RealToxicityPrompts protocol, oracle agreement, opinion steering, report helpers.

Names are imported lazily (``from steer.eval import X`` loads only X's module).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "agreement": ("OracleAgreementArguments", "oracle_agreement", "run_oracle_agreement"),
    "generation": ("hf_generate_fn", "load_eval_model"),
    "metrics": ("compute_toxicity_metrics", "distinct_n", "perplexity", "text_nll"),
    "opinion_metrics": ("macro_accuracy", "ordinal_wasserstein", "representativeness"),
    "opinion_report": ("write_opinion_report",),
    "opinions": ("OpinionEvalArguments", "run_opinion_eval"),
    "oracle": ("OracleArguments",),
    "report": ("compare_runs", "load_results", "markdown_table", "write_json", "write_report"),
    "rtp": ("load_prompts",),
    "toxicity": ("ToxicityEvalArguments", "run_toxicity_eval"),
    "toxicity_report": ("write_toxicity_report",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
