"""Oracles backed by a Hugging Face sequence classifier: ``P(satisfied) = P(positive_label | text)``.

:class:`SequenceClassifierRunner` is the shared inference loop (also used by the detoxify backend
of :class:`~steer.constraints.toxicity.NonToxic`): texts are tokenized once, sorted by length so
each batch pads to similar lengths, run under ``torch.inference_mode()`` and put back in the input
order. Texts longer than the model's limit are truncated (characters first, then tokens).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from .base import Constraint

logger = logging.getLogger(__name__)

# Families whose learned position table reserves ``padding_idx + 1`` slots before the first position.
_POSITION_OFFSET_FAMILIES = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"}


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; ``None`` picks CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def max_input_tokens(model, tokenizer, max_length: int | None = None) -> int:
    """The longest input the model can take: min of ``max_length``, the tokenizer and position limits."""
    limits = [512] if max_length is None else [max_length]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(config, "model_type", None) in _POSITION_OFFSET_FAMILIES:
            positions -= (getattr(config, "pad_token_id", None) or 1) + 1
        limits.append(positions)
    return min(limits)


class SequenceClassifierRunner:
    """Batched, length-sorted inference of a sequence classifier: ``texts -> scores [N, num_labels]``.

    ``activation`` is ``"sigmoid"`` (multi-label heads, e.g. detoxify), ``"softmax"`` (single-label
    heads) or ``"none"`` (raw logits). Scores do not depend on ``batch_size`` beyond float rounding.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        activation: str = "softmax",
        batch_size: int = 64,
        max_length: int | None = 512,
        max_chars: int = 20_000,
        device: str | torch.device | None = None,
    ) -> None:
        if activation not in ("sigmoid", "softmax", "none"):
            raise ValueError(f"activation must be 'sigmoid', 'softmax' or 'none', got {activation!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.activation = activation
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.max_length = max_input_tokens(model, tokenizer, max_length)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                "the classifier's tokenizer has neither a pad token nor an eos token to pad with"
            )
        self.pad_token_id = int(pad)
        fallback = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id, self.pad_token_id]
        self.empty_token_id = int(next(t for t in fallback if t is not None))
        if (
            getattr(model.config, "pad_token_id", None) is None
        ):  # decoder classifiers locate the last token by it
            model.config.pad_token_id = self.pad_token_id
        self.to(default_device(device))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """A digest of every weight, the activation and the truncation: what decides the scores."""
        import hashlib

        digest = hashlib.sha256(f"{self.activation}|{self.max_length}|{self.max_chars}".encode())
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:20]

    def to(self, device: str | torch.device) -> SequenceClassifierRunner:
        self.model.to(device)
        return self

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (special tokens included), truncated to :attr:`max_length`."""
        clipped = [text[: self.max_chars] for text in texts]
        encoded = self.tokenizer(clipped, truncation=True, max_length=self.max_length, padding=False)
        # A tokenizer that adds no special tokens maps "" to nothing: give the model one token to read.
        return [ids if ids else [self.empty_token_id] for ids in encoded["input_ids"]]

    def _pad(self, rows: list[list[int]], *, left: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to the batch's longest row on the tokenizer's padding side (or on the left when ``left``)."""
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        if left is None:
            left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for j, row in enumerate(rows):
            cols = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[j, cols] = torch.tensor(row, dtype=torch.long)
            attention_mask[j, cols] = 1
        return input_ids, attention_mask

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "softmax":
            return torch.softmax(logits, dim=-1)
        return logits

    @functools.cached_property
    def special_prefix(self) -> list[int] | None:
        """The special tokens the tokenizer puts before a text (``[]``, or e.g. ``[bos]``), or None when it also
        adds tokens after it (then a prefix's score is not the hidden state at its last token)."""
        with_special = self.tokenizer("a b", add_special_tokens=True)["input_ids"]
        plain = self.tokenizer("a b", add_special_tokens=False)["input_ids"]
        if with_special[len(with_special) - len(plain) :] != plain:
            return None
        return list(with_special[: len(with_special) - len(plain)])

    def scores_every_position(self) -> bool:
        """Whether one pass scores every prefix of a token row: a decoder classifier (causal body, a ``score``
        head read at the last token, as Llama, Qwen, Mistral and GPT-2 have) whose tokenizer adds nothing after
        a text."""
        model = self.model
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
        causal = body is not None and isinstance(getattr(model, "score", None), torch.nn.Linear)
        return (
            causal
            and not getattr(model.config, "is_encoder_decoder", False)
            and self.special_prefix is not None
        )

    def position_scores(self, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Scores ``[len(row), num_labels]`` of every prefix of each token row (``out[i][j]``: ``rows[i][: j + 1]``),
        one pass per batch of rows; needs :meth:`scores_every_position`. Rows longer than :attr:`max_length` (with
        the special prefix) are refused."""
        prefix = self.special_prefix
        if not self.scores_every_position():
            raise ValueError(f"{type(self.model).__name__} cannot score every prefix in one pass")
        ids = [prefix + [int(t) for t in row] for row in rows]
        too_long = [i for i, row in enumerate(ids) if len(row) > self.max_length]
        if too_long:
            raise ValueError(
                f"row {too_long[0]} has {len(ids[too_long[0]])} tokens, over the classifier's {self.max_length}"
            )
        body = getattr(self.model, self.model.base_model_prefix)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(ids), self.batch_size):
                chunk = [
                    row if row else [self.empty_token_id] for row in ids[start : start + self.batch_size]
                ]
                # right padding: a causal body's state at a real token never sees the padding after it
                input_ids, attention_mask = self._pad(chunk, left=False)
                hidden = body(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
                )
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden.last_hidden_state
                scores = self._activate(self.model.score(hidden).float()).cpu().double().numpy()
                for j, row in enumerate(ids[start : start + self.batch_size]):
                    out.append(scores[j, len(prefix) : len(row)])
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Scores ``[len(texts), num_labels]`` (float64) in the input order."""
        num_labels = int(getattr(self.model.config, "num_labels", 0) or 0)
        if not texts:
            return np.zeros((0, num_labels))
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out: list[np.ndarray | None] = [None] * len(ids)
        device = self.device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                input_ids, attention_mask = self._pad([ids[i] for i in chunk])
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
                logits = self._activate(logits.logits.float())
                for row, index in zip(logits.cpu().double().numpy(), chunk):
                    out[index] = row
        return np.stack(out)


def resolve_label(label: str | int, labels: Sequence[str], *, what: str) -> int:
    """Index of ``label`` (a name, or an integer index) in ``labels``; a clear error otherwise."""
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(labels):
            return label
    elif label in labels:
        return list(labels).index(label)
    raise ValueError(f"{what}: unknown label {label!r}; available labels: {', '.join(map(str, labels))}")


class ClassifierConstraint(Constraint):
    """``P(satisfied) = P(positive_label | text)`` from any Hugging Face sequence classifier.

    Args:
        model_name_or_path: hub id or local directory of an ``AutoModelForSequenceClassification``.
        positive_label: the label (name from ``config.id2label``, or index) whose probability is the
            satisfaction score.
        negate: score ``1 - P(positive_label)`` instead (e.g. "not toxic" from a toxicity classifier
            that has no "non-toxic" class).
        activation: ``"auto"`` (sigmoid when ``config.problem_type`` is multi-label, else softmax),
            ``"softmax"`` or ``"sigmoid"``.
        model, tokenizer: pass already-loaded objects instead of a path.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        *,
        positive_label: str | int,
        negate: bool = False,
        activation: str = "auto",
        batch_size: int = 64,
        max_length: int | None = 512,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        model=None,
        tokenizer=None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if model is None or tokenizer is None:
            if model_name_or_path is None:
                raise ValueError(
                    "ClassifierConstraint needs model_name_or_path, or both model= and tokenizer="
                )
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            model = model or AutoModelForSequenceClassification.from_pretrained(
                model_name_or_path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
            )
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(
                model_name_or_path, trust_remote_code=trust_remote_code
            )
        self.labels = self._label_names(model.config)
        source = model_name_or_path or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.label_index = resolve_label(positive_label, self.labels, what=f"ClassifierConstraint({source})")
        if activation == "auto":
            multi = getattr(model.config, "problem_type", None) == "multi_label_classification"
            activation = "sigmoid" if multi or len(self.labels) == 1 else "softmax"
        self.negate = negate
        self.runner = SequenceClassifierRunner(
            model,
            tokenizer,
            activation=activation,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
        )
        label_name = self.labels[self.label_index]
        self.name = name or f"{'not_' if negate else ''}{label_name}[{source}]"

    def fingerprint(self) -> str:
        return f"{super().fingerprint()}|{self.runner.fingerprint()}"

    @staticmethod
    def _label_names(config) -> list[str]:
        id2label = getattr(config, "id2label", None) or {}
        count = int(getattr(config, "num_labels", 0) or len(id2label))
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(count)]

    def to(self, device: str | torch.device) -> ClassifierConstraint:
        self.runner.to(device)
        return self

    def score(self, texts: list[str]) -> np.ndarray:
        probs = self.runner(texts)[:, self.label_index]
        return 1.0 - probs if self.negate else probs

    def prefix_probs(self, rows: Sequence[Sequence[int]], tokenizer) -> list[torch.Tensor]:
        """:meth:`Constraint.prefix_probs` in one pass per batch of rows when the classifier is a decoder that reads
        the same token ids as ``tokenizer`` (a causal body's state at token ``j`` is its score of the first ``j + 1``
        tokens); otherwise each prefix is decoded and scored on its own. The one-pass scores read the given ids, not
        the re-tokenised decoded text."""
        if not self._same_ids(tokenizer) or any(len(row) + 1 > self.runner.max_length for row in rows):
            return super().prefix_probs(rows, tokenizer)
        out = []
        for scores in self.runner.position_scores(rows):
            probs = torch.from_numpy(scores[:, self.label_index]).float()
            out.append(1.0 - probs if self.negate else probs)
        return out

    def _same_ids(self, tokenizer) -> bool:
        key = id(tokenizer)
        if getattr(self, "_ids_checked", (None, None))[0] != key:
            same = (
                self.runner.scores_every_position()
                and tokenizer.get_vocab() == self.runner.tokenizer.get_vocab()
            )
            self._ids_checked = (key, same)
        return self._ids_checked[1]
