"""Does the frozen LM know how the groups differ on a question it never trained on? A linear probe.

Persona steering with a frozen LM can only move a group's answers in the right direction on an unseen
question if the LM's representation of that question carries the direction. This script measures that
directly, with no soft prompt: ridge regression from the LM's hidden state at the answer position (the
recipe's prompt format, the position whose next token is the option letter) to a per-question target,
fitted on the training waves, its layer and ridge strength chosen on the validation wave, and scored once
on the evaluation waves (the recipe's split).

Targets (expected scaled ordinal answers from the real Pew tables, ``GroupTable.means``):

* ``population``: the whole population's expected answer (a positive control: how much the probe reads);
* ``A - B`` for each pair of ``--pairs`` (default Democrat - Republican, very liberal - very conservative):
  the group difference that persona steering has to reproduce.

Reported: Pearson r between the probe's prediction and the real value on the evaluation questions, with a
95% percentile bootstrap interval over questions (2,000 resamples) and the count; and the share of
evaluation questions on which the sign of a pair difference is right (questions with ``|difference| >=
0.05``), with its interval. Writes ``probe.json`` to ``--output_dir``.

    STEER_DATA_DIR=../shared/data python recipes/persona_opinionqa/probe.py --output_dir outputs/persona_probe
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from steer.eval.stats import bootstrap_ci

DEFAULT_PAIRS = [
    "POLPARTY=Democrat:POLPARTY=Republican",
    "POLIDEOLOGY=Very liberal:POLIDEOLOGY=Very conservative",
]


def _features(
    model, tokenizer, prompts: list[str], layers: list[int], batch: int, pool: str = "last"
) -> dict[int, np.ndarray]:
    """Hidden states per layer, ``{layer: [n, H]}`` (left padding): at the last prompt token (``pool="last"``)
    or averaged over the prompt's tokens (``pool="mean"``, a dense bag of words at layer 0)."""
    tokenizer.padding_side = "left"
    out = {layer: [] for layer in layers}
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            enc = tokenizer(
                prompts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False
            )
            states = model(**enc, output_hidden_states=True, use_cache=False).hidden_states
            mask = enc["attention_mask"].unsqueeze(-1).float()
            for layer in layers:
                if pool == "mean":
                    pooled = (states[layer].float() * mask).sum(1) / mask.sum(1)
                else:
                    pooled = states[layer][:, -1].float()
                out[layer].append(pooled.numpy())
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge weights on standardised-by-caller features (intercept unpenalised)."""
    mean = y.mean()
    w = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ (y - mean))
    return w, float(mean)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _pearson_ci(pred: np.ndarray, real: np.ndarray) -> list[float]:
    """95% percentile bootstrap interval of Pearson r over questions (steer's bootstrap_ci on question indices)."""

    def r_of(index: np.ndarray) -> float:
        index = index.astype(int)
        return _pearson(pred[index], real[index])

    return list(bootstrap_ci(np.arange(len(real)), r_of))


def main(argv=None) -> dict:
    from steer.models import load_causal_lm
    from steer.persona.data import WaveSplit
    from steer.persona.groups import load_group_table
    from steer.persona.steering import PromptFormat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--opinionqa_dir", default=None, help="default: STEER_DATA_DIR/opinionqa")
    parser.add_argument("--train_waves", type=int, nargs="+", default=[26, 27, 29, 32, 34, 36, 41, 42])
    parser.add_argument("--valid_waves", type=int, nargs="+", default=[43])
    parser.add_argument("--eval_waves", type=int, nargs="+", default=[49, 50, 82])
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="'GROUP_A:GROUP_B' differences")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: every 5th and the last")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 10.0, 100.0, 1000.0, 10000.0])
    parser.add_argument("--system_prompt", default="Answer the survey question with one letter.")
    parser.add_argument(
        "--pool", choices=["last", "mean"], default="last", help="last token or mean over tokens"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    started = time.time()

    split = WaveSplit(args.train_waves, args.valid_waves, args.eval_waves)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs]
    attributes = sorted({name.split("=", 1)[0] for pair in pairs for name in pair})
    table = load_group_table(args.opinionqa_dir, split.all, attributes=attributes)
    for name in (n for pair in pairs for n in pair):
        table.index(name)  # a clear KeyError for an unknown group
    keys = {"train": [], "valid": [], "eval": []}
    for key in table.question_keys:
        keys[split.part_of(table.wave_of(key))].append(key)
    means = table.means()  # [G, Q]
    column = {key: j for j, key in enumerate(table.question_keys)}
    population = {
        key: float(table.population[key] / table.population[key].sum() @ table.questions[key].scaled_array())
        for key in table.question_keys
    }
    targets = {"population": {key: population[key] for key in table.question_keys}}
    for a, b in pairs:
        ia, ib = table.index(a), table.index(b)
        targets[f"{a} - {b}"] = {
            key: float(means[ia, column[key]] - means[ib, column[key]]) for key in table.question_keys
        }

    model, tokenizer = load_causal_lm(args.model)
    model.eval()
    fmt = PromptFormat(use_chat_template=True, system_prompt=args.system_prompt)
    layers = args.layers or sorted(
        {*range(5, model.config.num_hidden_layers + 1, 5), model.config.num_hidden_layers}
    )
    prompts = {
        part: [fmt.build(tokenizer, table.questions[k].text, table.questions[k].options) for k in part_keys]
        for part, part_keys in keys.items()
    }
    feats = {part: _features(model, tokenizer, prompts[part], layers, args.batch, args.pool) for part in keys}

    results = {}
    for name, target in targets.items():
        y = {part: np.array([target[k] for k in keys[part]]) for part in keys}
        best = None
        for layer in layers:
            mu, sd = feats["train"][layer].mean(0), feats["train"][layer].std(0) + 1e-6
            x = {part: (feats[part][layer] - mu) / sd for part in keys}
            for alpha in args.alphas:
                w, b = _ridge(x["train"], y["train"], alpha)
                r_valid = _pearson(x["valid"] @ w + b, y["valid"])
                if best is None or r_valid > best["valid_r"]:
                    best = {"layer": layer, "alpha": alpha, "valid_r": r_valid, "pred": x["eval"] @ w + b}
        pred, real = best.pop("pred"), y["eval"]
        n = len(real)
        entry = {
            **best,
            "eval_r": _pearson(pred, real),
            "eval_r_ci95": _pearson_ci(pred, real),
            "n_eval_questions": n,
        }
        if name != "population":
            big = np.abs(real) >= 0.05
            agree = (np.sign(pred[big]) == np.sign(real[big])).astype(float)
            entry["sign_agreement"] = float(agree.mean()) if big.any() else None
            entry["sign_agreement_ci95"] = list(bootstrap_ci(agree)) if big.any() else None
            entry["n_sign_questions"] = int(big.sum())
            entry["mean_abs_real_difference"] = float(np.abs(real).mean())
        results[name] = entry
        print(
            f"{name:60s} layer {best['layer']:2d} alpha {best['alpha']:g}: valid r {best['valid_r']:+.3f}  "
            f"eval r {entry['eval_r']:+.3f} [{entry['eval_r_ci95'][0]:+.3f}, {entry['eval_r_ci95'][1]:+.3f}] (n={n})"
            + (
                f"  sign right {entry['sign_agreement']:.3f} [{entry['sign_agreement_ci95'][0]:.3f}, "
                f"{entry['sign_agreement_ci95'][1]:.3f}] (n={entry['n_sign_questions']})"
                if entry.get("sign_agreement") is not None
                else ""
            )
        )
    report = {
        "model": args.model,
        "split": split.to_dict(),
        "n_questions": {part: len(k) for part, k in keys.items()},
        "layers": layers,
        "pool": args.pool,
        "alphas": args.alphas,
        "results": results,
        "seconds": round(time.time() - started, 1),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "probe.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "probe.json")
    print(f"wrote {out / 'probe.json'} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main()
