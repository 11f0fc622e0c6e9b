"""Toxicity oracles: ``NonToxic`` = P(text is not toxic) = 1 - toxicity.

Backends:
- ``"profanity"`` (default, offline, no model download): ``alt-profanity-check``'s linear SVM.
- ``"detoxify"``: a detoxify checkpoint (``original``, ``unbiased``, ``multilingual``, ``original-small``,
  ``unbiased-small``, or your own). Online (``checkpoint=None``) the published checkpoint of
  ``model_type`` is fetched from detoxify's release URL into the torch hub cache (the same file
  ``detoxify.Detoxify`` uses) and the model config/tokenizer come from the hub id recorded in the
  checkpoint. Offline, pass ``checkpoint=`` (a detoxify ``.ckpt``) and ``config_dir=`` (a local
  Hugging Face config + tokenizer directory, e.g. ``bert-base-uncased`` saved with
  ``save_pretrained``).

**How the detoxify checkpoint is loaded.** steer does not call ``detoxify.Detoxify``: its loader
unpickles with ``weights_only=False`` and always resolves ``AutoConfig.from_pretrained(model_type)``
from the hub, even when ``huggingface_config_path`` is given. steer instead *re-implements the
loader* for detoxify's checkpoint format (``{"config": {"arch": {"args": {model_type, model_name,
tokenizer_name, num_classes}}, "dataset": {"args": {"classes": [...]}}}, "state_dict": {...}}``):
the file is read with ``torch.load(weights_only=True)`` (the format holds only tensors and plain
containers), the config and tokenizer come from ``config_dir`` when given (else the checkpoint's
``model_type`` hub id), and the weights are loaded with ``from_pretrained(None, config=...,
state_dict=...)`` exactly as detoxify does. Class names are standardised like detoxify's
(``toxic`` -> ``toxicity``, ``severe_toxic`` -> ``severe_toxicity``, ``identity_hate`` ->
``identity_attack``), so scores equal ``Detoxify(...).predict(texts)[label]``.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InputFileNotFoundError, UserInputError, first_line
from ..io import atomic_torch_save
from .base import Constraint
from .classifier import SequenceClassifierRunner, default_device, resolve_label

logger = logging.getLogger(__name__)

BACKENDS = ("profanity", "detoxify")
PROFANITY_LABELS = ("toxicity",)
DETOXIFY_CLASS_RENAMES = {
    "toxic": "toxicity",
    "identity_hate": "identity_attack",
    "severe_toxic": "severe_toxicity",
}
DEFAULT_BATCH_SIZE = {"profanity": 4096, "detoxify": 64}


class NonToxic(Constraint):
    """C(x) = P(x is not toxic) = 1 - toxicity(x), batched.

    Args:
        backend: ``"profanity"`` or ``"detoxify"``.
        model_type: detoxify model (``"original"``, ``"unbiased"``, ``"multilingual"``, ...); online only.
        checkpoint: a local detoxify checkpoint file (offline use; needs ``config_dir`` unless the
            checkpoint's ``model_type`` is itself a local directory or a cached hub id).
        config_dir: local Hugging Face config + tokenizer directory for ``checkpoint``.
        label: which score counts as toxicity (detoxify: ``toxicity``, ``severe_toxicity``, ``obscene``,
            ``threat``, ``insult``, ``identity_attack``, ...; profanity: ``toxicity`` only).
        threshold: toxicity at or above which a text counts as toxic (:meth:`is_toxic`).
        device: where the detoxify model runs (default: CUDA if available); move it with :meth:`to`.
        batch_size: texts per forward pass (default 4096 for profanity, 64 for detoxify).
        max_length: token limit for detoxify (longer texts are truncated; capped by the model).
        max_chars: texts are clipped to this many characters before scoring.
    """

    def __init__(
        self,
        backend: str = "profanity",
        *,
        model_type: str = "original",
        checkpoint: str | os.PathLike | None = None,
        config_dir: str | os.PathLike | None = None,
        label: str = "toxicity",
        threshold: float = 0.5,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        max_length: int | None = 512,
        max_chars: int = 20_000,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown NonToxic backend {backend!r}; available: {', '.join(BACKENDS)}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.backend = backend
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE[backend]
        self.max_chars = max_chars
        self.threshold = threshold
        self.label = label
        self.runner: SequenceClassifierRunner | None = None
        if backend == "profanity":
            if checkpoint is not None or config_dir is not None:
                raise ValueError("checkpoint/config_dir only apply to backend='detoxify'")
            self.labels = list(PROFANITY_LABELS)
            self.label_index = resolve_label(label, self.labels, what="NonToxic(backend='profanity')")
            self.name = "non_toxic[profanity]"
            return
        model, tokenizer, self.labels = load_detoxify(
            model_type, checkpoint=checkpoint, config_dir=config_dir, device="cpu"
        )
        source = Path(checkpoint).name if checkpoint is not None else model_type
        self.label_index = resolve_label(label, self.labels, what=f"NonToxic(backend='detoxify', {source})")
        self.runner = SequenceClassifierRunner(
            model,
            tokenizer,
            activation="sigmoid",
            batch_size=self.batch_size,
            max_length=max_length,
            max_chars=max_chars,
            device=default_device(device),
        )
        self.name = (
            f"non_toxic[detoxify:{source}]" if label == "toxicity" else f"non_{label}[detoxify:{source}]"
        )

    @property
    def device(self) -> torch.device:
        return self.runner.device if self.runner is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> NonToxic:
        """Move the classifier (detoxify backend) to ``device``; the profanity backend runs on CPU."""
        if self.runner is not None:
            self.runner.to(device)
        return self

    def all_scores(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Every label's score per text (``{label: array [N]}``), like ``Detoxify.predict``."""
        if self.runner is None:
            return {"toxicity": self._profanity(texts)}
        scores = self.runner(texts)
        return {name: scores[:, i] for i, name in enumerate(self.labels)}

    def toxicity(self, texts: list[str]) -> np.ndarray:
        """Raw toxicity probability per text (the complement of the satisfaction score)."""
        if self.runner is None:
            return self._profanity(texts)
        if not texts:
            return np.zeros(0)
        return self.runner(texts)[:, self.label_index]

    def is_toxic(self, texts: list[str]) -> torch.Tensor:
        """Bool per text: toxicity >= ``threshold``."""
        return torch.from_numpy(self.toxicity(texts) >= self.threshold)

    def _profanity(self, texts: list[str]) -> np.ndarray:
        from profanity_check import predict_prob

        texts = [t[: self.max_chars] for t in texts]
        out = [predict_prob(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def score(self, texts: list[str]) -> np.ndarray:
        return 1.0 - self.toxicity(texts)

    def fingerprint(self) -> str:
        if self.runner is None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                backend = f"alt-profanity-check=={version('alt-profanity-check')}"
            except PackageNotFoundError:
                backend = "profanity-check"
        else:
            backend = f"detoxify:{self.runner.fingerprint()}"
        return f"{super().fingerprint()}|{backend}"

    def __repr__(self) -> str:
        return f"NonToxic(backend={self.backend!r}, label={self.label!r}, name={self.name!r})"


# --------------------------------------------------------------------------------------------------
# detoxify checkpoints
# --------------------------------------------------------------------------------------------------


class UnreadableCheckpointError(UserInputError, pickle.UnpicklingError):
    """A checkpoint file ``torch.load(weights_only=True)`` refuses (still an ``UnpicklingError``)."""


def read_detoxify_checkpoint(
    model_type: str = "original", checkpoint: str | os.PathLike | None = None
) -> dict:
    """Read a detoxify checkpoint with ``weights_only=True``: the local file, else the published one."""
    if checkpoint is None:
        from detoxify.detoxify import MODEL_URLS

        if model_type not in MODEL_URLS:
            raise ValueError(
                f"unknown detoxify model_type {model_type!r}; available: {', '.join(MODEL_URLS)}"
            )
        loaded = torch.hub.load_state_dict_from_url(
            MODEL_URLS[model_type], map_location="cpu", weights_only=True
        )
        where = MODEL_URLS[model_type]
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise InputFileNotFoundError(f"detoxify checkpoint not found: {path}")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # not a checkpoint, or one holding more than tensors
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            why = next(
                (line for line in lines if line.startswith("WeightsUnpickler error")),
                lines[0] if lines else "",
            )
            raise UnreadableCheckpointError(f"{path}: not a readable detoxify checkpoint ({why})") from err
        except (EOFError, RuntimeError, ValueError) as err:  # truncated, or not a torch file at all
            raise UserInputError(
                f"{path}: not a readable detoxify checkpoint ({type(err).__name__}: {first_line(err)})"
            ) from err
        where = str(path)
    if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
        keys = sorted(loaded) if isinstance(loaded, dict) else type(loaded).__name__
        raise UserInputError(
            f"{where}: not a detoxify checkpoint (needs keys 'config' and 'state_dict'; found {keys})"
        )
    try:
        loaded["config"]["arch"]["args"]["model_name"]
        loaded["config"]["dataset"]["args"]["classes"]
    except (KeyError, TypeError) as err:
        raise UserInputError(
            f"{where}: detoxify checkpoint config lacks {err}; expected config.arch.args.{{model_type, model_name, "
            "tokenizer_name, num_classes}} and config.dataset.args.classes"
        ) from err
    return loaded


def load_detoxify(
    model_type: str = "original",
    *,
    checkpoint: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
):
    """``(model, tokenizer, class_names)`` from a detoxify checkpoint (see the module docstring)."""
    import transformers

    loaded = read_detoxify_checkpoint(model_type, checkpoint)
    args = loaded["config"]["arch"]["args"]
    classes = [DETOXIFY_CLASS_RENAMES.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
    source = str(Path(config_dir).expanduser()) if config_dir is not None else args["model_type"]
    if config_dir is not None and not Path(source).is_dir():
        raise FileNotFoundError(f"config_dir {source!r} is not a directory")
    local = config_dir is not None or Path(str(source)).is_dir()
    model_class = getattr(transformers, args["model_name"], None)
    if model_class is None:
        raise ValueError(
            f"detoxify checkpoint names model class {args['model_name']!r}, unknown to transformers"
        )
    config = model_class.config_class.from_pretrained(
        source, num_labels=int(args["num_classes"]), local_files_only=local
    )
    model, loading_info = model_class.from_pretrained(
        None,
        config=config,
        state_dict=loaded["state_dict"],
        dtype=torch.float32,
        local_files_only=local,
        output_loading_info=True,
    )
    missing = sorted(loading_info.get("missing_keys") or [])
    if missing:  # random weights would give meaningless scores silently
        where = checkpoint if checkpoint is not None else model_type
        raise ValueError(f"{where}: the detoxify state_dict lacks {len(missing)} weights, e.g. {missing[:3]}")
    tokenizer_class = getattr(transformers, args.get("tokenizer_name") or "AutoTokenizer", None)
    tokenizer_class = tokenizer_class or transformers.AutoTokenizer
    tokenizer = tokenizer_class.from_pretrained(source, local_files_only=local)
    if len(classes) > config.num_labels:
        raise ValueError(
            f"detoxify checkpoint lists {len(classes)} classes but the head has {config.num_labels}"
        )
    return model.to(device).eval(), tokenizer, classes


DETOXIFY_ORIGINAL_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def write_random_detoxify_checkpoint(
    path: str | os.PathLike,
    config_dir: str | os.PathLike,
    *,
    size: str = "tiny",
    seed: int = 0,
    model_type: str | None = None,
    classes: list[str] | None = None,
    words: Sequence[str] = (),
) -> Path:
    """Write a random-weight BERT detoxify checkpoint + its config/tokenizer dir (tests, benchmarks).

    ``size``: ``"tiny"`` (2 layers x 32), ``"mini"`` (4 x 256) or ``"base"`` (bert-base-uncased's
    12 x 768). The checkpoint records ``model_type`` (default ``"bert-base-uncased"``, like the
    published ``original`` model); pass the config dir itself to make it loadable by
    ``detoxify.Detoxify`` offline. The tokenizer is a WordPiece vocabulary of ASCII characters, common
    English words and ``words`` (give a realistic vocabulary for realistic sequence lengths).
    """
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    classes = classes or DETOXIFY_ORIGINAL_CLASSES
    base_words = (
        "the a an and or but of to in on for with is are was were be you your i we they he she it this that "
        "not no yes good bad nice kind hate love idiot stupid fool day night people world have do say go "
        "get make know think see come want look use find give tell work call try ask need feel"
    ).split()
    chars = [chr(c) for c in range(33, 127)]
    extra = [w.lower() for w in words if w and not any(ch.isspace() for ch in w)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [
        t for t in dict.fromkeys(chars + [c.lower() for c in chars] + base_words + extra) if t not in vocab
    ]
    vocab += ["##" + c for c in dict.fromkeys(c.lower() for c in chars)]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    shape = {"tiny": (32, 2, 2, 64, 128), "mini": (256, 4, 4, 1024, 512), "base": (768, 12, 12, 3072, 512)}
    if size not in shape:
        raise ValueError(f"size must be one of {', '.join(shape)}, got {size!r}")
    hidden, layers, heads, ffn, positions = shape[size]
    tokenizer.model_max_length = positions
    tokenizer.save_pretrained(config_dir)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=positions,
        num_labels=len(classes),
        # Wider than BERT's 0.02 so random scores differ visibly between texts at the tiny size.
        initializer_range=0.2 if size == "tiny" else 0.02,
    )
    config.save_pretrained(config_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    ckpt = {
        "config": {
            "arch": {
                "type": "BERT",
                "args": {
                    "num_classes": len(classes),
                    "model_type": model_type or "bert-base-uncased",
                    "model_name": "BertForSequenceClassification",
                    "tokenizer_name": "BertTokenizer",
                },
            },
            "dataset": {"type": "JigsawDataOriginal", "args": {"classes": list(classes)}},
        },
        "state_dict": OrderedDict((k, v.clone()) for k, v in model.state_dict().items()),
    }
    return atomic_torch_save(ckpt, path)
