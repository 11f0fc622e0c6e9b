"""PersonaSteeredModel: a frozen LM + a trained SoftPromptNetwork (+ embedder and named personas).

Inference for persona steering: option probabilities for multiple-choice questions, free-text
generation with the persona prefix injected at prefill only, and export of the soft prompt as
``prompt_embeds`` for serving engines (embedding mode). The prompt format and the decoding loop here
are the ones the trainer and the evaluation use, so positions and prompts match everywhere.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from steer.errors import ArtefactMismatchError, InputFileNotFoundError, InputKeyError, UserInputError
from steer.io import atomic_save_file, atomic_write_text, dataclass_from_dict
from steer.persona.adapter import (
    ADAPTER_DIR,
    adapter_disabled,
    has_lm_adapter,
    load_lm_adapter,
    persona_active,
    save_lm_adapter,
)
from steer.persona.soft_prompt import SoftPromptNetwork, apply_ordinal_tilt, steered_inputs, text_position_ids
from steer.progress import progress_bar

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FORMAT_NAME = "prompt_format.json"
PERSONAS_NAME = "personas.safetensors"
PERSONAS_INDEX = "personas.json"
EMBEDDER_DIR = "embedder"
BASE_MODEL_NAME = "base_model.json"  # steer.models.base_model_record of the model the network was trained on


# --------------------------------------------------------------------------------------------------
# Prompt format (shared by training, option_probs and the evaluation)
# --------------------------------------------------------------------------------------------------


@dataclass
class PromptFormat:
    """How a multiple-choice question becomes a prompt whose answer is one option letter.

    With ``use_chat_template`` the question is a user message and the answer is the first assistant
    token (the letter, no leading space); otherwise the prompt ends with ``answer_prefix`` and the answer
    is ``" " + letter``.
    """

    use_chat_template: bool = True
    system_prompt: str | None = None
    template: str = "Question: {question}\n{options}\nAnswer with the letter of one option."
    answer_prefix: str = "Answer:"

    def letters(self, n_options: int) -> list[str]:
        if not 1 <= n_options <= len(LETTERS):
            raise ValueError(f"a question needs 1..{len(LETTERS)} options, got {n_options}")
        return list(LETTERS[:n_options])

    def user_text(self, question: str, options: Sequence[str], preamble: str | None = None) -> str:
        lines = "\n".join(
            f"{letter}. {option}" for letter, option in zip(self.letters(len(options)), options)
        )
        text = self.template.format(question=question.strip(), options=lines)
        return f"{preamble.strip()}\n\n{text}" if preamble else text

    def build(self, tokenizer, question: str, options: Sequence[str], preamble: str | None = None) -> str:
        """The prompt text (the answer letter follows it directly)."""
        text = self.user_text(question, options, preamble)
        if self.use_chat_template:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("PromptFormat.use_chat_template=True but the tokenizer has no chat template")
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": text})
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{text}\n{self.answer_prefix}"

    def answer_text(self, letter: str) -> str:
        return letter if self.use_chat_template else f" {letter}"

    @property
    def add_special_tokens(self) -> bool:
        """Chat templates already contain their special tokens; raw prompts get the tokenizer's defaults."""
        return not self.use_chat_template

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromptFormat:
        return dataclass_from_dict(cls, data)


def answer_token_ids(
    tokenizer, prompt: str, answers: Sequence[str], add_special_tokens: bool = False
) -> list[int]:
    """First token of each answer when it follows ``prompt`` (checked to tokenize as a clean continuation)."""
    base = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    ids = []
    for answer in answers:
        full = tokenizer(prompt + answer, add_special_tokens=add_special_tokens)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            raise ValueError(f"answer {answer!r} does not tokenize as a continuation of the prompt")
        ids.append(full[len(base)])
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"answers {list(answers)} share a first token; option letters must be distinct tokens"
        )
    return ids


# --------------------------------------------------------------------------------------------------
# Decoding with an optional persona prefix (prefill once, then a KV-cached loop)
# --------------------------------------------------------------------------------------------------


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> torch.Tensor:
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    network: SoftPromptNetwork | None = None,
    persona=None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generate up to ``max_new_tokens`` after left-padded ``input_ids``; returns the new tokens ``[B, N]``
    (and, with ``return_scores``, the fp32 next-token logits ``[B, N, V]`` each token was chosen from).

    With a ``network`` the persona's virtual tokens are injected once at prefill (a prefix cache or
    prepended embeddings) and the following steps reuse the KV cache with the mask and positions
    continued; without one this is plain KV-cached decoding. Finished rows are filled with ``pad_token_id``.
    """
    if network is not None:
        kwargs = steered_inputs(model, network, persona, input_ids, attention_mask)
    else:
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": text_position_ids(attention_mask),
        }
    full_mask = kwargs["attention_mask"]
    position = kwargs["position_ids"][:, -1]
    out = model(**kwargs, use_cache=True, logits_to_keep=1)
    cache = out.cache
    eos = torch.tensor(
        []
        if eos_token_id is None
        else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
        device=input_ids.device,
        dtype=torch.long,
    )
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens, scores = [], []
    ones = torch.ones(input_ids.shape[0], 1, dtype=full_mask.dtype, device=full_mask.device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if return_scores:
            scores.append(logits)
        if do_sample:
            token = _sample(logits, temperature, top_p, top_k, generator)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        new_tokens.append(token)
        if eos.numel():
            done = done | torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        full_mask = torch.cat([full_mask, ones], dim=1)
        position = position + 1
        out = model(
            input_ids=token.unsqueeze(1),
            attention_mask=full_mask,
            position_ids=position.unsqueeze(1),
            cache=cache,
            use_cache=True,
        )
    if not new_tokens:
        tokens = input_ids.new_zeros(input_ids.shape[0], 0)
        return (tokens, torch.zeros(input_ids.shape[0], 0, 0)) if return_scores else tokens
    tokens = torch.stack(new_tokens, dim=1)
    return (tokens, torch.stack(scores, dim=1)) if return_scores else tokens


# --------------------------------------------------------------------------------------------------
# The steered model
# --------------------------------------------------------------------------------------------------


def _load_embedder(directory: Path):
    from steer.persona.embedder import PersonaEmbedder

    return PersonaEmbedder.from_pretrained(directory)


class PersonaSteeredModel:
    """A frozen causal LM steered by a :class:`SoftPromptNetwork`.

    Args:
        model, tokenizer: the base LM (kept frozen, in eval mode) and its tokenizer.
        network: the trained soft-prompt network.
        embedder: optional ``PersonaEmbedder`` (user vectors by id, fold-in of new users).
        personas: optional named persona vectors (cohort centroids ``"cohort:<k>"``, demographic centroids
            ``"<ATTR>=<value>"``, ...).
        prompt_format: the :class:`PromptFormat` used in training.
        gate: the :class:`~steer.persona.adapter.PersonaGate` of an LM adapter trained with ``lm_adapter_gate``
            (attached to ``model``, a ``PeftModel``).

    With an LM adapter (``lm_adapter: lora`` in training; ``model`` is then a ``PeftModel``) the steered outputs
    run through it, and ``persona=None`` (the unsteered baselines) runs the base LM without it.
    """

    def __init__(
        self,
        model,
        tokenizer,
        network: SoftPromptNetwork,
        *,
        embedder=None,
        personas: Mapping[str, torch.Tensor] | None = None,
        prompt_format: PromptFormat | None = None,
        metadata: dict | None = None,
        gate=None,
    ) -> None:
        network.check_model(model)
        self.model = model.eval().requires_grad_(False)
        self.gate = None if gate is None else gate.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.network = network.to(self.device).eval()
        self.embedder = embedder
        self.personas = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in (personas or {}).items()}
        self.prompt_format = prompt_format or PromptFormat()
        self.metadata = dict(metadata or {})
        self._user_rows: dict[str, int] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base,
        persona_dir: str | os.PathLike,
        *,
        tokenizer=None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
    ) -> PersonaSteeredModel:
        """Load ``persona_dir`` (written by :meth:`save_pretrained`) on top of ``base``.

        ``base`` is a model name/path for :func:`steer.models.load_causal_lm` or an already loaded
        ``PreTrainedModel`` (then pass ``tokenizer``).
        """
        from steer.models import check_base_model

        directory = Path(persona_dir)
        if not directory.is_dir():
            raise InputFileNotFoundError(f"persona directory not found: {directory}")
        recorded = (
            _read_json(directory / BASE_MODEL_NAME) if (directory / BASE_MODEL_NAME).is_file() else None
        )
        network = SoftPromptNetwork.from_pretrained(directory)  # before the (slow) base model
        if isinstance(base, (str, os.PathLike)):
            from steer.models import load_causal_lm

            model, loaded_tokenizer = load_causal_lm(base, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
        else:
            model = base
            if tokenizer is None:
                raise ValueError("pass tokenizer= when base is an already loaded model")
            if device is not None:
                model.to(device)
        try:  # shapes first (the clearer message), then the recorded base model
            network.check_model(model)
        except ValueError as err:
            raise ArtefactMismatchError(f"the persona network in {directory}: {err}") from err
        check_base_model(recorded, model, artefact=f"the persona network in {directory}")
        gate = None
        if (directory / ADAPTER_DIR).is_dir():
            model, gate = load_lm_adapter(model, directory / ADAPTER_DIR)
        fmt_path = directory / FORMAT_NAME
        prompt_format = PromptFormat.from_dict(_read_json(fmt_path)) if fmt_path.is_file() else None
        personas, metadata = {}, {}
        if (directory / PERSONAS_NAME).is_file():
            from safetensors.torch import load_file

            personas = load_file(str(directory / PERSONAS_NAME))
        if (directory / PERSONAS_INDEX).is_file():
            metadata = _read_json(directory / PERSONAS_INDEX)
        embedder = _load_embedder(directory / EMBEDDER_DIR) if (directory / EMBEDDER_DIR).is_dir() else None
        return cls(
            model,
            tokenizer,
            network,
            embedder=embedder,
            personas=personas,
            prompt_format=prompt_format,
            metadata=metadata,
            gate=gate,
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the network (safetensors + config), prompt format, named personas, the embedder and a record
        of the base model (``base_model.json``: loading onto another base model is refused)."""
        from steer.models import base_model_record

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.network.save_pretrained(directory)
        atomic_write_text(directory / FORMAT_NAME, json.dumps(self.prompt_format.to_dict(), indent=2) + "\n")
        record = base_model_record(self.model)
        if self.metadata.get("base_model"):  # the name the run was given (the config may hold a cache path)
            record["name_or_path"] = str(self.metadata["base_model"])
        atomic_write_text(directory / BASE_MODEL_NAME, json.dumps(record, indent=2) + "\n")
        if self.personas:
            personas = {k: v.detach().float().contiguous().cpu() for k, v in self.personas.items()}
            atomic_save_file(personas, directory / PERSONAS_NAME)
        index = {**self.metadata, "names": sorted(self.personas)}
        atomic_write_text(directory / PERSONAS_INDEX, json.dumps(index, indent=2, default=str) + "\n")
        if self.embedder is not None:
            self.embedder.save_pretrained(directory / EMBEDDER_DIR)
        if has_lm_adapter(self.model):
            save_lm_adapter(self.model, self.gate, directory / ADAPTER_DIR)

    # ------------------------------------------------------------------------------------------
    def resolve_persona(self, persona) -> torch.Tensor:
        """Persona spec -> ``[B, persona_dim]`` float tensor.

        Accepted: a vector or a batch of vectors (tensor/array/list of floats); the name of a stored
        persona (``"cohort:3"``, ``"POLPARTY=Democrat"``); a user id known to the embedder; a mapping
        ``{question_key: answer}`` of a new user's answers (folded in through the embedder); or a list of
        names/ids/mappings (one persona per row).
        """
        if isinstance(persona, (str, Mapping)):
            return self._resolve_one(persona).unsqueeze(0)
        if isinstance(persona, (list, tuple)) and persona and isinstance(persona[0], (str, Mapping)):
            return torch.stack([self._resolve_one(p) for p in persona])
        return self.network.check_persona(persona).float().cpu()

    def _resolve_one(self, spec) -> torch.Tensor:
        if isinstance(spec, Mapping):
            return self.fold_in(spec)[0]
        if spec in self.personas:
            return self.personas[spec].reshape(-1)
        if self.embedder is not None and getattr(self.embedder, "embeddings", None) is not None:
            if self._user_rows is None:
                self._user_rows = {str(u): i for i, u in enumerate(self.embedder.user_ids)}
            row = self._user_rows.get(str(spec))
            if row is not None:
                return self.embedder.embeddings[row].detach().float().cpu()
        known = sorted(self.personas)
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise InputKeyError(
            f"unknown persona {spec!r}: neither a stored persona ({shown}) nor a user id of the embedder"
        )

    def fold_in(self, answers, k_answers: int | None = None, *, seed: int = 0) -> torch.Tensor:
        """Persona vectors ``[U, d]`` of new people from their answers, with the question side frozen.

        ``answers`` is a ``steer.persona.opinionqa.Responses`` (``k_answers`` random answers per person are
        used when given) or one person's ``{question_key: scaled answer in [0, 1]}``.
        """
        if self.embedder is None:
            raise ValueError("folding in a new user's answers needs an embedder; this persona model has none")
        if isinstance(answers, Mapping):
            if not answers:
                raise UserInputError(
                    "fold_in: no answers given (pass {question_key: scaled answer in [0, 1]} for at least one "
                    "training question; an empty fold-in would be the average persona)"
                )
            answers = _single_user_responses(answers, self.embedder.question_keys)
        return self.embedder.fold_in(answers, k_answers, seed=seed).detach().float().cpu()

    # ------------------------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str], add_special_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=add_special_tokens,
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def option_probs(
        self,
        question,
        options: Sequence[str] | None = None,
        persona=None,
        *,
        preamble: str | None = None,
        scale: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Distribution over ``options``: first-token probabilities of the option letters, renormalised.

        ``question`` is a string (then pass ``options``) or an object with ``text`` and ``options``
        (``steer.persona.opinionqa.Question``). ``persona=None`` gives the unsteered base model. ``scale``: the
        options' scaled ordinal positions, for a network with an ordinal tilt (a ``Question`` brings its own).
        """
        if isinstance(question, str):
            question = (question, options, scale)
        elif options is not None or scale is not None:
            text, opts = _question_parts(question, options)
            question = (text, opts, scale if scale is not None else _question_scale(question))
        return self.option_probs_batch([question], persona, preambles=[preamble], disable_tqdm=True)[0]

    @torch.no_grad()
    def option_probs_batch(
        self,
        questions: Sequence,
        persona=None,
        *,
        preambles: Sequence[str | None] | None = None,
        batch_size: int = 16,
        desc: str = "option probabilities",
        disable_tqdm: bool | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`option_probs` for many questions; ``persona`` is one spec for all rows or one per row.

        A question is an object with ``text`` and ``options`` (a ``Question``: its ``scaled`` ordinal positions
        come with it), a ``(text, options)`` tuple or a ``(text, options, scale)`` tuple. A network with an
        ordinal tilt applies it to the questions with a scale (a nominal question, or a tuple without one, gets
        none).

        A progress bar (``desc``) runs over the batches unless ``disable_tqdm`` (default:
        :func:`steer.progress.progress_disabled`).
        """
        parts, scales = [], []
        for q in questions:
            if isinstance(q, tuple):
                parts.append(_question_parts(*q[:2]))
                scales.append(q[2] if len(q) > 2 else None)
            else:
                parts.append(_question_parts(q, None))
                scales.append(_question_scale(q))
        for (_, options), scale in zip(parts, scales):
            if scale is not None and len(scale) != len(options):
                raise ValueError(f"a question's scale has {len(scale)} values for {len(options)} options")
        tilts = None
        preambles = list(preambles) if preambles is not None else [None] * len(parts)
        if len(preambles) != len(parts):
            raise ValueError(f"got {len(preambles)} preambles for {len(parts)} questions")
        vectors = None
        if persona is not None:
            vectors = self.resolve_persona(persona)
            if vectors.shape[0] not in (1, len(parts)):
                raise ValueError(f"got {vectors.shape[0]} personas for {len(parts)} questions")
            if self.network.config.ordinal_tilt:
                tilts = self.network.tilt(vectors.to(self.device)).float().cpu()
        fmt = self.prompt_format
        results: list[torch.Tensor] = []
        for start in progress_bar(
            range(0, len(parts), batch_size), desc=desc, unit="batch", disable=disable_tqdm
        ):
            chunk = parts[start : start + batch_size]
            prompts = [fmt.build(self.tokenizer, q, o, p) for (q, o), p in zip(chunk, preambles[start:])]
            ids, mask = self._encode(prompts, fmt.add_special_tokens)
            if vectors is None:
                with adapter_disabled(self.model):
                    logits = self.model(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=text_position_ids(mask),
                        logits_to_keep=1,
                    ).logits[:, -1]
            else:
                rows = vectors if vectors.shape[0] == 1 else vectors[start : start + len(chunk)]
                rows = rows.to(self.device).expand(len(chunk), -1)
                kwargs = steered_inputs(self.model, self.network, rows, ids, mask)
                with persona_active(self.gate, rows):
                    logits = self.model(**kwargs, logits_to_keep=1).logits[:, -1]
            log_probs = logits.float().log_softmax(-1)
            for row, (prompt, (_, options)) in enumerate(zip(prompts, chunk)):
                letters = [fmt.answer_text(x) for x in fmt.letters(len(options))]
                token_ids = answer_token_ids(self.tokenizer, prompt, letters, fmt.add_special_tokens)
                option_logits = log_probs[row, token_ids].cpu()
                scale = scales[start + row]
                if tilts is not None and scale is not None:
                    tilt = tilts[0] if tilts.shape[0] == 1 else tilts[start + row]
                    option_logits = apply_ordinal_tilt(
                        option_logits[None],
                        tilt.reshape(1),
                        torch.as_tensor(scale, dtype=torch.float32)[None],
                    )[0]
                results.append(option_logits.softmax(-1))
        return results

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        persona=None,
        *,
        chat: bool = False,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        batch_size: int = 16,
    ) -> list[str]:
        """Free text after each prompt, with the persona prefix injected at prefill (KV cache reused after).

        ``chat=True`` wraps each prompt as a user message with the tokenizer's chat template.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if chat:
            prompts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
        vectors = self.resolve_persona(persona) if persona is not None else None
        if vectors is not None and vectors.shape[0] not in (1, len(prompts)):
            raise ValueError(f"got {vectors.shape[0]} personas for {len(prompts)} prompts")
        generator = None
        if do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, mask = self._encode(chunk, add_special_tokens=not chat)
            rows = None
            context = adapter_disabled(self.model)
            if vectors is not None:
                rows = vectors if vectors.shape[0] == 1 else vectors[start : start + len(chunk)]
                rows = rows.to(self.device).expand(len(chunk), -1)
                context = persona_active(self.gate, rows)
            with context:
                new = decode(
                    self.model,
                    ids,
                    mask,
                    network=self.network if rows is not None else None,
                    persona=rows,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    generator=generator,
                )
            texts.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return texts

    @torch.no_grad()
    def export_prompt_embeds(self, persona, prompt: str | None = None, *, chat: bool = False) -> torch.Tensor:
        """Embedding mode: the persona's virtual embeddings ``[n_virtual, hidden]`` for a serving engine.

        With ``prompt`` the prompt's token embeddings are appended (``[n_virtual + T, hidden]``), which is
        the full ``prompt_embeds`` input of engines that accept them; the engine numbers positions
        ``0..`` over the whole sequence, exactly as in training.
        """
        if self.network.mode != "embedding":
            raise ValueError(
                "export_prompt_embeds needs a soft-prompt network trained with mode='embedding'; a prefix-mode "
                "network produces per-layer key/values, which serving engines cannot take as prompt embeddings"
            )
        vector = self.resolve_persona(persona)
        if vector.shape[0] != 1:
            raise ValueError("export_prompt_embeds takes one persona")
        embeds = self.network.prompt_embeds(vector.to(self.device))[0]
        if prompt is not None:
            if chat:
                prompt = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
            ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)["input_ids"]
            text = self.model.get_input_embeddings()(ids.to(self.device))[0]
            embeds = torch.cat([embeds.to(text.dtype), text], dim=0)
        return embeds.detach().cpu()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(f"{path}: not valid JSON ({err})") from err


def _question_parts(question, options) -> tuple[str, list[str]]:
    if isinstance(question, str):
        if options is None:
            raise ValueError("pass options= with a question string")
        return question, list(options)
    text = getattr(question, "text", None)
    opts = options if options is not None else getattr(question, "options", None)
    if text is None or opts is None:
        raise TypeError(
            f"expected a question string + options or an object with .text/.options, got {question!r}"
        )
    return text, list(opts)


def _question_scale(question) -> list[float] | None:
    """A question object's scaled ordinal positions (``Question.scaled``), ``None`` for a nominal one."""
    scaled = getattr(question, "scaled", None)
    return None if scaled is None else [float(x) for x in scaled]


def _single_user_responses(answers: Mapping[str, float], known_keys: Sequence[str]):
    """A one-person ``Responses`` from ``{question_key: scaled value}`` (for fold-in)."""
    import numpy as np
    import pandas as pd

    from steer.persona.opinionqa import Question, Responses

    known = set(known_keys)
    unknown = [k for k in answers if k not in known]
    if unknown:
        raise KeyError(f"questions unknown to the embedder: {unknown[:5]}")
    keys = list(answers)
    values = np.asarray([[float(answers[k]) for k in keys]], dtype=np.float32)
    if np.isnan(values).any() or (values < 0).any() or (values > 1).any():
        raise ValueError("fold-in answers must be scaled ordinal values in [0, 1] (see Question.scaled)")
    questions = {k: Question.from_lists(k, k, ["low", "high"], [0.0, 1.0]) for k in keys}
    return Responses(
        user_ids=np.asarray(["new"]),
        demographics=pd.DataFrame(index=range(1)),
        question_keys=keys,
        questions=questions,
        option_index=np.zeros((1, len(keys)), dtype=np.int16),
        values=values,
        weights=np.ones(1),
    )
