"""``PersonaCollator``: persona examples -> left-padded ``prompt + answer`` batches.

Examples are dicts ``{"question": str, "options": [str, ...], "answer": int | letter | option text, and either
"persona": [float, ...] or "user_index": int}`` (optionally ``"preamble": str``, ``"target": [float, ...]`` (a
whole answer distribution over the options), ``"question_id"`` and ``"scale"`` (the group-contrast term)).
"""

from __future__ import annotations

import torch

from steer.persona.steering import LETTERS, PromptFormat, answer_token_ids

__all__ = ["EXAMPLE_COLUMNS", "PersonaCollator"]

EXAMPLE_COLUMNS = [
    "question",
    "options",
    "answer",
    "persona",
    "user_index",
    "preamble",
    "target",
    "question_id",
    "scale",
]


def _answer_index(example: dict, n_options: int) -> int:
    answer = example.get("answer")
    options = list(example["options"])
    if isinstance(answer, bool) or answer is None:
        raise ValueError(
            f"example field 'answer' must be an option index, letter or option text, got {answer!r}"
        )
    if isinstance(answer, (int,)) or (hasattr(answer, "item") and not isinstance(answer, str)):
        index = int(answer)
    elif (
        isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:n_options]
    ):
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer in options:
        index = options.index(answer)
    else:
        raise ValueError(
            f"example field 'answer'={answer!r} is not an index, letter or text of options {options}"
        )
    if not 0 <= index < n_options:
        raise ValueError(f"example field 'answer'={answer!r} is out of range for {n_options} options")
    return index


class PersonaCollator:
    """Builds left-padded ``prompt + answer`` batches with labels on the answer tokens only.

    Output keys: ``input_ids``, ``attention_mask``, ``labels`` (-100 except the answer tokens),
    ``option_ids``/``option_mask`` [B, K] (first token of each option letter), ``answer_index`` [B],
    ``persona`` [B, d] or ``user_index`` [B], ``target_probs`` [B, K] when the examples carry ``target``
    (and ``question_id`` [B] when they also carry it), ``option_scale`` [B, K] when they carry ``scale``.
    """

    def __init__(
        self,
        tokenizer,
        prompt_format: PromptFormat | None = None,
        *,
        max_length: int = 512,
        answer_with_eos: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat()
        self.max_length = int(max_length)
        self.answer_with_eos = answer_with_eos
        self.truncated = 0

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        fmt, tok = self.prompt_format, self.tokenizer
        rows, labels, option_ids, answers = [], [], [], []
        for example in examples:
            for key in ("question", "options", "answer"):
                if key not in example or example[key] is None:
                    raise ValueError(f"persona example is missing field {key!r} (has {sorted(example)})")
            options = list(example["options"])
            index = _answer_index(example, len(options))
            prompt = fmt.build(tok, example["question"], options, example.get("preamble"))
            letters = [fmt.answer_text(x) for x in fmt.letters(len(options))]
            ids = answer_token_ids(tok, prompt, letters, fmt.add_special_tokens)
            prompt_ids = tok(prompt, add_special_tokens=fmt.add_special_tokens)["input_ids"]
            full = tok(prompt + letters[index], add_special_tokens=fmt.add_special_tokens)["input_ids"]
            answer_ids = full[len(prompt_ids) :]
            if self.answer_with_eos and tok.eos_token_id is not None:
                answer_ids = answer_ids + [tok.eos_token_id]
            budget = self.max_length - len(answer_ids)
            if budget < 1:
                raise ValueError(f"max_length={self.max_length} leaves no room for the prompt")
            if len(prompt_ids) > budget:
                prompt_ids = prompt_ids[-budget:]
                self.truncated += 1
            rows.append(prompt_ids + answer_ids)
            labels.append([-100] * len(prompt_ids) + answer_ids)
            option_ids.append(ids)
            answers.append(index)
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        k = max(len(o) for o in option_ids)
        batch = {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
            "labels": torch.tensor([[-100] * (width - len(r)) + lab for r, lab in zip(rows, labels)]),
            "option_ids": torch.tensor([o + [0] * (k - len(o)) for o in option_ids]),
            "option_mask": torch.tensor([[True] * len(o) + [False] * (k - len(o)) for o in option_ids]),
            "answer_index": torch.tensor(answers),
        }
        has_target = [e.get("target") is not None for e in examples]
        if any(has_target):
            if not all(has_target):
                raise ValueError("either every persona example has a 'target' distribution or none does")
            targets = []
            for example in examples:
                target = [float(x) for x in example["target"]]
                if len(target) != len(example["options"]):
                    raise ValueError(
                        f"example field 'target' has {len(target)} values for {len(example['options'])} options"
                    )
                total = sum(target)
                if any(x < 0 or x != x for x in target) or total <= 0:
                    raise ValueError(f"example field 'target' is not a distribution: {target}")
                targets.append([x / total for x in target] + [0.0] * (k - len(target)))
            batch["target_probs"] = torch.tensor(targets, dtype=torch.float32)
            if all(e.get("question_id") is not None for e in examples):
                batch["question_id"] = torch.tensor([int(e["question_id"]) for e in examples])
        if all(e.get("scale") is not None for e in examples):
            for example in examples:
                if len(example["scale"]) != len(example["options"]):
                    raise ValueError(
                        f"example field 'scale' has {len(example['scale'])} values for {len(example['options'])} "
                        "options"
                    )
            batch["option_scale"] = torch.tensor(
                [[float(x) for x in e["scale"]] + [0.0] * (k - len(e["scale"])) for e in examples],
                dtype=torch.float32,
            )
        has_persona = ["persona" in e and e["persona"] is not None for e in examples]
        has_user = ["user_index" in e and e["user_index"] is not None for e in examples]
        if all(has_persona):
            batch["persona"] = torch.tensor(
                [list(map(float, e["persona"])) for e in examples], dtype=torch.float32
            )
        elif all(has_user):
            batch["user_index"] = torch.tensor([int(e["user_index"]) for e in examples])
        else:
            raise ValueError("every persona example needs a 'persona' vector or a 'user_index' (not a mix)")
        return batch
