"""How good the learned guidance R of the topic recipe gets on its own, per lever, on validation samples.

The recipe's guidance rounds (warm-up of 384 samples, then 96 a round, 16 guidance steps each, the token prior)
run on a fixed sampling policy, with one lever changed: the *untrained* policy (the base model: its fresh LoRA
adapter is zero), or with ``--policy_dir`` a trained one (then the importance weights toward the base are active,
as in the recipe's later rounds). R is scored on two fixed sets of held-out samples of the *training* prompts
(never the reported held-out records):

- ``val_base``: continuations of the base model (satisfaction ~4%: the rounds' first distribution);
- ``val_policy``: continuations of a trained constrained policy (``--policy_dir``, e.g. the recipe's run of
  record: satisfaction ~30%, the distribution the late rounds see).

A sample's score is R at its last token (``guidance/auc``'s sequence score for a satisfaction constraint); per set
the ROC AUC with a 95% bootstrap interval over samples and the log loss of that R as P(C | continuation).

    # once: the validation sets
    python recipes/topic/guidance_levers.py prepare --policy_dir outputs/topic --out outputs/topic_levers
    # one lever per process (any `steer train constrained` flag after --)
    python recipes/topic/guidance_levers.py run --name shared --out outputs/topic_levers -- \
        --guidance_shared_logit true
    python recipes/topic/guidance_levers.py run --name policy_suffix --policy_dir outputs/topic \
        --out outputs/topic_levers -- --importance_weighting suffix
    python recipes/topic/guidance_levers.py table recipes/topic/levers   # the lever_*.json of record
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONFIG = Path(__file__).with_name("config.yaml")
SETS = ("val_base", "val_policy")


def _with_trainer(extra: list[str], body):
    """Build the recipe's trainer (model, constraint, priors, guidance rounds) and call ``body(trainer)`` instead
    of training."""
    from steer.cli.dispatch import run
    from steer.trainers.constrained import ConstrainedTrainer

    result = {}

    def patched_train(self, *args, **kwargs):
        result["value"] = body(self)

    ConstrainedTrainer.train = patched_train
    with tempfile.TemporaryDirectory() as tmp:
        run(
            ["train", "constrained", "--config", str(CONFIG), "--output_dir", tmp, "--save_strategy", "no"]
            + extra
        )
    return result["value"]


def _sample(policy, trainer, count: int, seed: int, desc: str) -> list:
    from steer.guidance import label_samples
    from steer.trainers.buffer import SampleBuffer
    from steer.trainers.schedule import sample_with_generator

    learner = trainer.schedule.learner
    s = learner.settings
    generator = torch.Generator().manual_seed(seed)
    prompts = learner._round_prompts(generator, count)
    batch = sample_with_generator(
        policy,
        trainer.processing_class,
        prompts,
        max_new_tokens=s.sample_max_new_tokens,
        temperature=s.sample_temperature,
        top_p=s.sample_top_p,
        batch_size=s.sample_batch_size,
        seed=seed,
        desc=desc,
    )
    labelled = label_samples(batch, learner.constraint, label_mode=s.label_mode, threshold=s.label_threshold)
    return SampleBuffer.rows(labelled)


def prepare(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def body(trainer):
        from peft import PeftModel

        from steer.models import load_causal_lm

        items = _sample(trainer.model, trainer, args.count, 1_000_003, "val_base")
        torch.save(items, out / "val_base.pt")
        base, _ = load_causal_lm("smollm2-135m", dtype="float32")
        policy = PeftModel.from_pretrained(base, args.policy_dir)
        items = _sample(policy, trainer, args.policy_count, 1_000_033, "val_policy")
        torch.save(items, out / "val_policy.pt")

    _with_trainer([], body)


def _score(learner, items: list) -> dict:
    from sklearn.metrics import roc_auc_score

    from steer.guidance.objective import sampled_token_logits
    from steer.trainers.buffer import SampleBuffer
    from steer.trainers.schedule import _sequence_scores

    guidance = learner.guidance
    evidence = getattr(learner.constraint, "token_evidence", "violation")
    scores, labels = [], []
    guidance.eval()
    with torch.no_grad():
        for start in range(0, len(items), 32):
            hb = learner._to(SampleBuffer.collate(items[start : start + 32], learner.pad_token_id))
            hidden = learner._guidance_hidden(hb).float()
            offsets = guidance.token_offsets(hb["input_ids"], hb["attention_mask"])
            token = sampled_token_logits(hidden, guidance.head, hb["input_ids"], offsets)
            scores.extend(_sequence_scores(token, hb["continuation_mask"][:, 1:], evidence).tolist())
            labels.extend(hb["labels"].tolist())
    y = (np.asarray(labels) >= learner.settings.label_threshold).astype(int)
    z = np.asarray(scores)
    p = 1.0 / (1.0 + np.exp(-z))
    log_loss = float(-np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1))))
    if not 0 < y.sum() < len(y):
        return {
            "n": len(y),
            "positives": int(y.sum()),
            "auc": math.nan,
            "auc_ci": [math.nan, math.nan],
            "log_loss": log_loss,
            "mean_r": float(p.mean()),
        }
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(2000):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            boots.append(roc_auc_score(y[idx], z[idx]))
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "auc": float(roc_auc_score(y, z)),
        "auc_ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "log_loss": log_loss,
        "mean_r": float(p.mean()),
    }


def run_lever(args, extra: list[str]) -> None:
    out = Path(args.out)
    sets = {name: torch.load(out / f"{name}.pt", weights_only=True) for name in SETS}

    def body(trainer):
        learner = trainer.schedule.learner
        if (
            args.policy_dir
        ):  # sample from a trained policy (importance weights toward the base are then active)
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            state = load_file(str(Path(args.policy_dir) / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(trainer.model, state, adapter_name="default")
            if getattr(result, "unexpected_keys", None):
                raise SystemExit(f"{args.policy_dir}: adapter keys do not fit: {result.unexpected_keys[:3]}")
        rounds, start = [], time.perf_counter()
        for index in range(args.rounds):
            metrics = learner.run_round(index)
            rounds.append({k: v for k, v in metrics.items() if k.startswith(("guidance/", "constraint/"))})
        trained = time.perf_counter() - start
        return {
            "name": args.name,
            "flags": extra,
            "sampling_policy": args.policy_dir or "the base model",
            "rounds": rounds,
            "train_rounds_s": trained,
            **{name: _score(learner, items) for name, items in sets.items()},
        }

    result = _with_trainer(extra, body)
    (out / f"lever_{args.name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in (*SETS, "train_rounds_s")}, indent=2))


def table(args) -> None:
    rows = []
    for path in sorted(Path(args.out).glob("lever_*.json")):
        r = json.loads(path.read_text())
        sampler = r.get("sampling_policy", "the base model")
        cells = [r["name"], " ".join(r["flags"]) or "(the recipe)", sampler]
        for name in SETS:
            s = r[name]
            cells.append(
                f"{s['auc']:.3f} [{s['auc_ci'][0]:.3f}, {s['auc_ci'][1]:.3f}] ({s['positives']}/{s['n']}), "
                f"log loss {s['log_loss']:.3f}"
            )
        cells.append(f"{r['rounds'][-1].get('guidance/auc', math.nan):.3f}")
        cells.append(f"{r['train_rounds_s']:.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    print(
        "| lever | flags | rounds sample from | AUC val_base (pos/n), log loss | AUC val_policy (pos/n), log loss "
        "| pool auc | rounds s |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--policy_dir", required=True)
    p.add_argument("--count", type=int, default=800)
    p.add_argument("--policy_count", type=int, default=400)
    p = sub.add_parser("run")
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument(
        "--policy_dir", default=None, help="sample from this trained policy adapter (default: the base)"
    )
    p = sub.add_parser("table")
    p.add_argument("out")
    args = parser.parse_args(argv)
    {"prepare": lambda: prepare(args), "run": lambda: run_lever(args, extra), "table": lambda: table(args)}[
        args.command
    ]()


if __name__ == "__main__":
    main()
