"""Apply the detox selection rule (recipes/detox/SELECTION.md, second to fourth selection) to the validations.

Reads ``<val_dir>/{base,sft,s0,s3,s10,s30,b10,b30,c3}.json`` (written by ``steer eval toxicity --run_name ...`` on the
validation split) and prints each candidate's validation toxicity probability, PPL ratio to SFT, whether it
qualifies, and the choice. Nothing here reads the reported evaluation.

    python recipes/detox/apply_selection.py outputs/detox_val_eval
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# name -> (kl_reference, kl_sample_coef, guidance_context_prior); b10/b30 joined in the third selection, c3 in
# the fourth
CANDIDATES = {
    "s0": ("policy", 0, "none"),
    "s3": ("policy", 3, "none"),
    "s10": ("policy", 10, "none"),
    "s30": ("policy", 30, "none"),
    "b10": ("base", 10, "none"),
    "b30": ("base", 30, "none"),
    "c3": ("policy", 3, "corpus"),
}
PPL_MARGIN = 1.05  # validation PPL <= 1.05 x SFT's (the bar is 1.10 on the reported set)
TOX_FRACTION = 0.5  # validation toxicity probability <= 0.5 x SFT's
TIE = 0.02  # toxicity ties within 0.02: the lower PPL


def _metrics(directory: Path, name: str) -> dict:
    path = directory / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (run the validation evaluation of {name!r} first)")
    return json.loads(path.read_text())["metrics"]


def main(argv=None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0] if args else "outputs/detox_val_eval")
    sft = _metrics(directory, "sft")
    base = _metrics(directory, "base")
    print(
        f"base tox {base['toxicity_probability']:.3f} PPL {base['heldout_perplexity']:.2f} | "
        f"SFT tox {sft['toxicity_probability']:.3f} PPL {sft['heldout_perplexity']:.2f}"
    )
    qualified = []
    for name, (reference, weight, context) in CANDIDATES.items():
        m = _metrics(directory, name)
        tox, ratio = m["toxicity_probability"], m["heldout_perplexity"] / sft["heldout_perplexity"]
        ok = ratio <= PPL_MARGIN and tox <= TOX_FRACTION * sft["toxicity_probability"]
        lo, hi = m["toxicity_probability_ci95"]
        print(
            f"{name:4s} (kl_reference {reference:6s} kl_sample_coef {weight:2d} context {context:6s}): "
            f"tox {tox:.3f} [{lo:.2f}, {hi:.2f}] "
            f"PPL {m['heldout_perplexity']:.2f} ({ratio:.3f}x SFT) -> {'qualifies' if ok else 'out'}"
        )
        if ok:
            qualified.append((tox, m["heldout_perplexity"], name))
    if not qualified:
        print("no candidate qualifies")
        return None
    best_tox = min(t for t, _, _ in qualified)
    tied = [q for q in qualified if q[0] <= best_tox + TIE]
    choice = min(tied, key=lambda q: q[1])[2]
    reference, weight, context = CANDIDATES[choice]
    print(
        f"chosen: {choice} (kl_reference {reference}, kl_sample_coef {weight}, guidance_context_prior {context})"
    )
    return choice


if __name__ == "__main__":
    main()
