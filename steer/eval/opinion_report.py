"""The report of ``steer eval opinions``: ``opinions.json`` (the run result), ``opinions.md`` (every metric as
``mean [95% interval]`` with its count) and ``opinions.png`` (per-group representativeness and specificity)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from steer.eval.opinion_metrics import DIRECTION_MIN_GAP
from steer.eval.report import bar_chart, markdown_table, write_json
from steer.io import atomic_write_text

__all__ = ["opinion_chart", "opinion_markdown", "write_opinion_report"]

SPLIT_WORDS = {"eval": "evaluation waves", "within": "within-wave held out", "valid": "validation"}


def _fmt_interval(value: dict | None, digits: int = 3) -> str:
    if not value or value.get("n", 0) == 0 or value.get("mean") is None or not math.isfinite(value["mean"]):
        return "–"
    return f"{value['mean']:.{digits}f} [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"


def _scored_names(groups: dict) -> list[str]:
    return groups["groups"] + groups.get("fold_in_groups", [])


def opinion_chart(groups: dict, path: Path) -> Path:
    """Per-group representativeness of every method and the group specificity, each with its 95% interval."""
    names = _scored_names(groups)
    rows = []
    for method, values in groups["methods"].items():
        row = {"run": method}
        for g in names:
            row[f"rep:{g}"] = values["per_group"].get(g)
        rows.append(row)
    rows.append({"run": "specificity", **{f"spec:{g}": groups["specificity"].get(g) for g in names}})
    rows.append(
        {"run": "specificity (real data)", **{f"spec:{g}": groups["real_specificity"].get(g) for g in names}}
    )
    metrics = [f"rep:{g}" for g in names] + [f"spec:{g}" for g in names if groups["specificity"].get(g)]
    labels = {f"rep:{g}": f"representativeness\n{g}" for g in names}
    labels.update({f"spec:{g}": f"group specificity\n{g}" for g in names})
    split = groups.get("split")
    return bar_chart(
        rows,
        metrics,
        path,
        title=f"Persona steering on OpinionQA ({SPLIT_WORDS.get(split, split)}; 95% intervals)",
        labels=labels,
    )


# --------------------------------------------------------------------------------------------------
# The markdown report, one section at a time
# --------------------------------------------------------------------------------------------------


def _representativeness_section(groups: dict) -> list[str]:
    names = _scored_names(groups)
    questions = {
        "eval": "unseen questions (evaluation waves ",
        "within": "unseen questions of the training waves (within-wave held out; waves ",
        "valid": "validation questions (waves ",
    }.get(groups.get("split", "eval"), "TRAINING questions, a diagnostic of fit only (waves ")
    lines = [
        f"Representativeness 1 - WD/(max-min) toward each {groups['attribute']} group against the real Pew "
        f"distributions on {groups['num_questions']} "
        + questions
        + f"{groups.get('eval_waves')}); mean [95% bootstrap interval over questions]. "
        f"Folded-in groups: {groups.get('fold_in_groups') or 'none'}.\n"
    ]
    rows = []
    for method, values in groups["methods"].items():
        row = {"method": method}
        for g in names:
            row[g] = _fmt_interval(values["per_group"].get(g))
        row["n"] = max((v or {}).get("n", 0) for v in values["per_group"].values())
        row["mean (party groups)"] = _fmt_interval(values["mean"])
        rows.append(row)
    lines.append(markdown_table(rows, ["method", *names, "mean (party groups)", "n"]))
    return lines


def _contrasts_section(groups: dict) -> list[str]:
    names = _scored_names(groups)
    rows = [
        {"contrast": name, **{g: _fmt_interval(v.get(g)) for g in names}}
        for name, v in groups["contrasts"].items()
    ]
    return [
        "\nPaired differences (steered minus method), mean [95% paired bootstrap interval]:\n",
        markdown_table(rows, ["contrast", *names]),
    ]


def _specificity_section(groups: dict) -> list[str]:
    rows = [
        {
            "group": g,
            "steered": _fmt_interval(groups["specificity"].get(g)),
            "real": _fmt_interval(groups["real_specificity"].get(g)),
            "n": (groups["specificity"].get(g) or {}).get("n"),
        }
        for g in _scored_names(groups)
    ]
    return [
        "\nGroup specificity rep(steered_g, real_g) - mean_h rep(steered_h, real_g) over the other groups h of "
        "the same attribute (own persona minus the wrong personas, on g's real answers; 0 for a persona-blind "
        "model), and the real data's own value 1 - mean_h rep(real_h, real_g):\n",
        markdown_table(rows, ["group", "steered", "real", "n"]),
    ]


def _direction_section(groups: dict) -> list[str]:
    rows = []
    for pair, value in groups["direction"].items():
        for method, entry in value["methods"].items():
            rows.append(
                {
                    "pair": pair,
                    "method": method,
                    "sign right": _fmt_interval(entry["sign_right"]),
                    "n": entry["sign_right"]["n"],
                    "r": entry["pearson_r"],
                }
            )
    return [
        "\nDirection: on the questions where two groups' real expected scaled answers differ by at least "
        f"{DIRECTION_MIN_GAP}, the share where a method's difference has the real sign [95% bootstrap "
        "interval over those questions] (a persona-blind method scores 0), and Pearson's r of the two "
        "differences over all scored questions. `constant` gives every question the training questions' "
        "majority sign: it reads no question, so a share at its level is the base rate:\n",
        markdown_table(rows, ["pair", "method", "sign right", "n", "r"]),
    ]


def _cohorts_section(groups: dict) -> list[str]:
    blind = [m for m in ("raw", "zero") if any(m in v for v in groups["cohorts"].values())]
    rows = []
    for c, entry in groups["cohorts"].items():
        row = {
            "cohort": c,
            "members": len(entry["members"]),
            "steered": _fmt_interval(entry["steered"]),
        }
        for m in blind:
            row[f"steered - {m}"] = _fmt_interval(entry.get(f"steered - {m}"))
        row["specificity"] = _fmt_interval(entry["specificity"])
        row["n"] = entry["steered"]["n"]
        rows.append(row)
    return [
        "\nCohorts (k-means over the training groups' persona vectors; real distribution = the mean of the "
        "member groups'): representativeness of the steered centroid, paired differences, and the cohort "
        "specificity (own centroid minus the other cohorts' centroids):\n",
        markdown_table(
            rows,
            ["cohort", "members", "steered", *[f"steered - {m}" for m in blind], "specificity", "n"],
        ),
    ]


def _groups_sections(groups: dict) -> list[str]:
    lines = _representativeness_section(groups)
    if groups["contrasts"]:
        lines += _contrasts_section(groups)
    if groups["specificity"]:
        lines += _specificity_section(groups)
    if groups.get("direction"):
        lines += _direction_section(groups)
    if groups.get("cohorts"):
        lines += _cohorts_section(groups)
    if groups.get("text_baselines"):
        chosen = "; ".join(
            f"{name}: {record['chosen']} ({record['chosen_on']}, mean representativeness "
            f"{record['valid_score']:.3f})"
            for name, record in groups["text_baselines"].items()
        )
        lines.append(f"\nText baselines (no LLM), settings chosen on the validation questions: {chosen}.")
    if groups.get("separation"):
        rows = [{"pair": k, **v} for k, v in groups["separation"].items()]
        lines.append("\nMean total-variation distance between two groups' answer distributions:\n")
        lines.append(markdown_table(rows, ["pair", "model_tv", "real_tv"]))
    if groups.get("not_defined"):
        lines.append(
            "\nNot defined here: " + "; ".join(f"{k}: {v}" for k, v in groups["not_defined"].items())
        )
    return lines


def _individuals_section(individuals: dict) -> list[str]:
    rows = [
        {
            "method": m,
            "accuracy_macro": _fmt_interval(v["interval"]),
            "accuracy_micro": v["accuracy_micro"],
        }
        for m, v in individuals["methods"].items()
    ]
    return [
        f"\nPer-individual accuracy on held-out questions ({individuals['num_people']} people, "
        f"{individuals['num_answers']} answers, {individuals['num_questions']} questions), macro-averaged "
        "over people [95% bootstrap interval over people]:\n",
        markdown_table(rows, ["method", "accuracy_macro", "accuracy_micro"]),
    ]


def opinion_markdown(result: dict) -> str:
    """The markdown report: every metric as ``mean [95% interval]`` with its count."""
    lines = [f"# OpinionQA persona evaluation: {result['run_name']}", ""]
    if result.get("groups", {}).get("split") == "valid":
        lines += [
            "**Validation questions** (for choices only; the reported numbers use the evaluation waves).",
            "",
        ]
    if result.get("groups"):
        lines += _groups_sections(result["groups"])
    if result.get("individuals"):
        lines += _individuals_section(result["individuals"])
    return "\n".join(lines) + "\n"


def write_opinion_report(result: dict, output_dir: str | os.PathLike) -> dict[str, Path]:
    """``opinions.json`` (run result), ``opinions.md`` and ``opinions.png`` (per-group chart)."""
    output_dir = Path(output_dir)
    paths = {
        "json": write_json(output_dir / "opinions.json", result),
        "markdown": atomic_write_text(output_dir / "opinions.md", opinion_markdown(result)),
    }
    if result.get("groups"):
        paths["png"] = opinion_chart(result["groups"], output_dir / "opinions.png")
    return paths
