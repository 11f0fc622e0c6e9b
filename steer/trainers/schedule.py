"""Guidance rounds and when they run: ``sequential`` (in place) or ``parallel`` (a background worker).

A *round* samples continuations from the policy on training prompts, labels them with the constraint,
pushes them into a bounded :class:`~steer.trainers.buffer.SampleBuffer` and trains the guidance model
for a few steps on buffer minibatches (:class:`GuidanceLearner`).

Rounds start at policy optimizer steps ``0, I, 2I, ...`` (``I = guidance_interval``); round ``k`` samples
from the policy as it is at step ``kI``. Guidance versions are numbered by the round that produced them.

- :class:`SequentialSchedule` runs round ``k`` in place, on the trainer's own model, before step ``kI``:
  steps ``[kI, (k+1)I)`` use guidance version ``k`` (staleness 0).
- :class:`ParallelSchedule` runs rounds in a background thread on a *separate model instance* (a copy
  of the base and of the policy adapters, refreshed from the policy's trainable weights at each round
  start, plus its own guidance model). Round 0 (the warm-up) is waited for; round ``k >= 1`` overlaps
  steps ``[kI, (k+1)I)``, which use version ``k-1`` (staleness 1), and its weights are swapped into
  the trainer's guidance model at step ``(k+1)I``. With ``synchronised=True`` every round is waited for
  at once, which reproduces the sequential schedule exactly (a test checks this).

Why a copy: PEFT's active adapter is model-global state, and sampling/guidance training flip it, so
the worker must never touch the model the main thread trains. The copy costs one more set of base
weights (fp32 SmolLM2-135M: ~0.54 GB; a 7B model in bf16: ~14 GB): on GPUs, prefer the sequential
schedule or give the worker its own device/rank.

Randomness: rounds never touch the process-global RNG (the trainer's thread uses it): sampling draws
with a per-round ``torch.Generator`` (:func:`sample_with_generator`) and minibatch order comes from the
same seed, so a round depends only on ``(seed, round, rank)`` and the weights. (The parallel schedule is
deterministic as long as the guidance model has no dropout; steer's guidance LoRA has none.)

CPU threads: ``torch.set_num_threads`` called in a thread sets that thread's OpenMP team size (the
other thread's ``torch.get_num_threads()`` is unchanged; a test checks this), but MKL's thread count
is process-wide. :func:`set_thread_share` therefore also pins MKL's thread-local count, and the two
threads split the cores (``parallel_worker_threads``, default half) instead of oversubscribing them.
Oversubscription is costly: on a 2-core machine already busy with other work, a SmolLM2-135M forward
took 19 s with 2 OpenMP threads and 2.1 s with 1 (spinning OpenMP workers); on shared machines use one
thread per Python thread (or ``OMP_WAIT_POLICY=PASSIVE``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import math
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass

import torch

from ..errors import UserInputError
from ..models import model_device, reference_model
from ..progress import progress_bar
from .buffer import SampleBuffer

logger = logging.getLogger(__name__)

__all__ = [
    "GuidanceLearner",
    "GuidanceRoundError",
    "ParallelSchedule",
    "RoundSettings",
    "SequentialSchedule",
    "copy_tensors",
    "isolated_rng",
    "round_seed",
    "set_thread_share",
]


@dataclass
class RoundSettings:
    """The knobs of one guidance round (a subset of ``ConstrainedConfig``)."""

    samples_per_round: int = 32
    sample_max_new_tokens: int = 20
    sample_temperature: float = 1.0
    sample_top_p: float = 1.0
    sample_batch_size: int = 16
    label_mode: str = "hard"
    label_threshold: float = 0.5
    guidance_steps_per_round: int = 8
    guidance_batch_size: int = 16
    consistency_coef: float = 0.0
    holdout_fraction: float = 0.25
    max_grad_norm: float = 1.0
    warmup_samples: int | None = None  # samples of round 0 (None: samples_per_round)
    auc_pool_size: int = 256  # held-back samples (never trained on) that guidance/auc is measured on
    prior: str = "token"  # 'token' (set by the trainer before round 0), 'label_mean' or 'none'
    importance_max_weight: float | None = (
        None  # set: weight samples by p_base / p_policy (kl_reference='base')
    )
    importance: str = (
        "sequence"  # 'sequence' (whole-sample weights) or 'suffix' (the tokens after each scored one)
    )


def round_seed(seed: int, round_index: int, process_index: int = 0) -> int:
    """A deterministic per-round, per-process seed (sampling and minibatch order depend only on it)."""
    return (seed * 1_000_003 + round_index * 9_973 + process_index * 101) % (2**31 - 1)


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Run a block with its own seeded RNG, leaving the global RNG streams exactly as they were."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


_MKL_LOCAL = None


def _mkl_set_local(threads: int) -> bool:
    """``mkl_set_num_threads_local`` from the MKL linked into torch, if there is one."""
    global _MKL_LOCAL
    if _MKL_LOCAL is None:
        _MKL_LOCAL = False
        lib_path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        with contextlib.suppress(OSError, AttributeError):
            fn = ctypes.CDLL(lib_path).MKL_Set_Num_Threads_Local  # the C interface (by value)
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            _MKL_LOCAL = fn
    if _MKL_LOCAL:
        _MKL_LOCAL(int(threads))
        return True
    return False


def set_thread_share(threads: int) -> None:
    """Use ``threads`` intra-op CPU threads in the *calling* thread (OpenMP and, where linked, MKL)."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    _mkl_set_local(threads)


def _roc_auc(labels, scores) -> float:
    """ROC AUC, or NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = [int(x) for x in labels]
    if len(set(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


def _sequence_scores(token: torch.Tensor, mask: torch.Tensor, evidence: str) -> torch.Tensor:
    """A continuation's score for ``guidance/auc`` from its token-level guidance logits ``[B, T]`` (``mask``: the
    continuation's positions). For a ``violation`` constraint the lowest R (one violating token decides the label);
    otherwise R at the last token, NADO's R(x<=T) = P(C | the whole continuation): a satisfaction constraint
    (a topic) is met once a topic word is written, and only a guidance model that reads the prefix can know it at
    the end, so a context-free prior cannot score well here."""
    if evidence == "violation":
        return token.masked_fill(~mask, math.inf).min(1).values
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = positions.masked_fill(~mask, -1).max(1).values.clamp(min=0)
    return token.gather(1, last.unsqueeze(1)).squeeze(1)


class GuidanceRoundError(UserInputError, RuntimeError):
    """A guidance round produced nothing to learn from (e.g. the oracle could not score any sample).

    A user error (the constraint returned no usable label: NaN, out of [0, 1], not a number), so the command
    line reports it in one line; still a ``RuntimeError`` for code that catches it as one.
    """


class GuidanceLearner:
    """Everything a round touches: the sampling policy, the guidance model, its optimizer and the buffer.

    ``policy`` is the model to sample from (the trainer's model for the sequential schedule, the worker's
    copy for the parallel one); ``guidance`` is a :class:`~steer.guidance.GuidanceModel` on it.
    ``grad_sync(params)`` averages guidance gradients across processes (``None`` on one process).
    ``flagged``: optional ``[V]`` bool tensor of tokens the oracle flags on their own (from the token
    prior), for the ``guidance/r_separation`` metric. ``label_rows``: optional ``[V]`` bool tensor of the head
    rows that the warm-up round starts at the base satisfaction rate (tokens whose own text is no evidence,
    :class:`~steer.guidance.oracle_priors.OraclePriors`).

    Each round holds back ``holdout_fraction`` of its fresh samples in an AUC pool (at most
    ``auc_pool_size``, newest kept) that the guidance never trains on; ``guidance/auc`` is measured on
    the whole pool with the current guidance model, so it rests on hundreds of samples, not one round's few.

    Progress: each phase of a round (sampling, labelling, guidance steps) shows a transient tqdm bar unless
    ``disable_tqdm`` (pass ``TrainingArguments.disable_tqdm``; ``None``: :func:`steer.progress.progress_disabled`),
    and the round ends with one summary line in the log (INFO).
    """

    def __init__(
        self,
        policy,
        guidance,
        tokenizer,
        constraint,
        prompts: list[str],
        settings: RoundSettings,
        *,
        lr: float,
        seed: int,
        buffer_size: int = 512,
        process_index: int = 0,
        grad_sync=None,
        flagged: torch.Tensor | None = None,
        label_rows: torch.Tensor | None = None,
        disable_tqdm: bool | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("the prompt dataset is empty: guidance rounds need prompts to sample from")
        self.policy = policy
        self.guidance = guidance
        self.tokenizer = tokenizer
        self.constraint = constraint
        self.prompts = list(prompts)
        self.settings = settings
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.grad_sync = grad_sync
        self.flagged = flagged
        self.label_rows = label_rows
        self.disable_tqdm = disable_tqdm
        self.buffer = SampleBuffer(buffer_size)
        self.auc_pool: deque = deque(maxlen=max(1, settings.auc_pool_size))
        self.latest: list = []  # the newest round's training samples (the trainer's KL-on-samples pool)
        self.optimizer = torch.optim.AdamW(guidance.trainable_parameters(), lr=lr, weight_decay=0.0)
        self.rounds_done = 0
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    # ------------------------------------------------------------------ a round
    def _round_prompts(self, generator: torch.Generator, n: int) -> list[str]:
        reps = -(-n // len(self.prompts))
        order = torch.cat([torch.randperm(len(self.prompts), generator=generator) for _ in range(reps)])
        return [self.prompts[i] for i in order[:n].tolist()]

    def _device(self) -> torch.device:
        return model_device(self.policy)

    def _to(self, batch: dict) -> dict:
        device = self._device()
        return {k: v.to(device) for k, v in batch.items()}

    def _policy_logits(self, batch: dict, *, base: bool = False) -> torch.Tensor:
        context = reference_model(self.policy) if base else contextlib.nullcontext()
        with torch.no_grad(), context:
            out = self.policy(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            )
        return out.logits

    def _importance(self, batch: dict) -> torch.Tensor:
        """``p_base / p_policy`` weights of a minibatch of policy samples: per sample (``importance: sequence``,
        ``[B]``, capped, mean 1) or per scored token, of the tokens after it (``suffix``, ``[B, T-1]``, capped)."""
        from steer.guidance import importance_weights, suffix_importance_weights

        mask = batch["continuation_mask"][:, 1:]

        def token_log_probs(logits):
            log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            return log_p.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1) * mask.float()

        was_training = self.policy.training
        self.policy.eval()  # no dropout: both log-probabilities must be the models' own
        try:
            policy = token_log_probs(self._policy_logits(batch))
            base = token_log_probs(self._policy_logits(batch, base=True))
        finally:
            self.policy.train(was_training)
        cap = self.settings.importance_max_weight
        if self.settings.importance == "suffix":
            return suffix_importance_weights(base, policy, mask, max_weight=cap)
        return importance_weights(base.sum(1), policy.sum(1), max_weight=cap)

    def _set_label_prior(self, rows: torch.Tensor | None = None) -> None:
        """``prior='label_mean'``: start every token's R at the base satisfaction rate (q* is unchanged);
        with ``rows`` (``label_rows``), only those rows of a head whose weights are still zero.

        Under several processes the rate is the mean over all ranks' labels (sequential schedule), so every
        rank starts from the same head.
        """
        head = getattr(self.guidance, "head", None)
        if head is None or head.bias is None or not head.is_fresh():
            return  # not a fresh head
        if rows is None and bool(head.bias.any()):
            return  # not a fresh zero-initialised head
        labels = torch.tensor([label for _, _, label in self.buffer.items()], dtype=torch.float64)
        stats = torch.stack([labels.sum(), torch.tensor(float(labels.numel()), dtype=torch.float64)])
        if self.grad_sync is not None:
            import torch.distributed as dist

            dist.all_reduce(stats)
        rate = float((stats[0] / stats[1].clamp(min=1)).clamp(0.02, 0.98))
        with torch.no_grad():
            if rows is None:
                head.bias.fill_(math.log(rate / (1.0 - rate)))
            else:
                head.bias[rows.to(head.bias.device)] = math.log(rate / (1.0 - rate))

    def _guidance_hidden(self, batch: dict) -> torch.Tensor:
        return self.guidance.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])

    def _pool_metrics(self) -> dict[str, float]:
        """``guidance/auc`` over the held-back pool, and how far R separates flagged from unflagged tokens."""
        from steer.guidance.objective import sampled_token_logits

        if not self.auc_pool:
            return {}
        s = self.settings
        items = list(self.auc_pool)
        head = self.guidance.head
        evidence = getattr(self.constraint, "token_evidence", "violation")
        scores, labels, separation, positions = [], [], 0.0, 0
        self.guidance.eval()
        with torch.no_grad():
            for start in range(0, len(items), 32):
                chunk = items[start : start + 32]
                hb = self._to(SampleBuffer.collate(chunk, self.pad_token_id))
                hidden = self._guidance_hidden(hb).float()
                mask = hb["continuation_mask"][:, 1:]
                contexts = self.guidance.contexts(hb["input_ids"], hb["attention_mask"])
                offsets = self.guidance.token_offsets(hb["input_ids"], contexts=contexts)
                token = sampled_token_logits(hidden, head, hb["input_ids"], offsets)
                scores.extend(_sequence_scores(token, mask, evidence).cpu().tolist())
                labels.extend((hb["labels"] >= s.label_threshold).cpu().tolist())
                if self.flagged is not None and bool(self.flagged.any()) and not bool(self.flagged.all()):
                    rows = hidden[:, :-1][mask]
                    contexts = None if contexts is None else contexts[:, :-1][mask]
                    flagged = self.flagged.to(rows.device)
                    for index, part in zip(torch.arange(rows.shape[0]).split(256), rows.split(256)):
                        part_contexts = None if contexts is None else contexts[index.to(contexts.device)]
                        r = torch.sigmoid(self.guidance.logits(part, part_contexts))
                        separation += float((r[:, ~flagged].mean(1) - r[:, flagged].mean(1)).sum())
                        positions += part.shape[0]
        metrics = {"guidance/auc_samples": float(len(items))}
        auc = _roc_auc(labels, scores)
        if not math.isnan(auc):
            metrics["guidance/auc"] = auc
        if positions:
            metrics["guidance/r_separation"] = separation / positions
        return metrics

    def run_round(self, round_index: int) -> dict[str, float]:
        """Sample, label, train the guidance; returns the round's metrics.

        They include the round's wall time and its phases (``time/round_sampling_s``, ``time/round_labelling_s``,
        ``time/round_guidance_steps_s``, ``time/round_auc_pool_s``, ``time/round_s``), measured where the round
        runs (the trainer's thread, a worker thread or a worker process).
        """
        from steer.guidance import guidance_loss_from_hidden, label_samples

        s = self.settings
        seed = round_seed(self.seed, round_index, self.process_index)
        generator = torch.Generator().manual_seed(seed)
        n_samples = s.warmup_samples if (round_index == 0 and s.warmup_samples) else s.samples_per_round
        start = time.perf_counter()
        was_training = self.policy.training
        try:
            batch = sample_with_generator(
                self.policy,
                self.tokenizer,
                self._round_prompts(generator, n_samples),
                max_new_tokens=s.sample_max_new_tokens,
                temperature=s.sample_temperature,
                top_p=s.sample_top_p,
                batch_size=s.sample_batch_size,
                seed=seed,
                desc=f"guidance round {round_index}: sampling",
                disable_tqdm=self.disable_tqdm,
            )
        finally:
            self.policy.train(was_training)
        sample_seconds = time.perf_counter() - start
        labelled = label_samples(
            batch,
            self.constraint,
            label_mode=s.label_mode,
            threshold=s.label_threshold,
            desc=f"guidance round {round_index}: labelling",
            disable_tqdm=self.disable_tqdm,
        )
        label_seconds = time.perf_counter() - start - sample_seconds
        items = SampleBuffer.rows(labelled)
        usable = len(items)
        if (
            self.grad_sync is not None
        ):  # every rank must take the same decision (or the others hang in all-reduce)
            import torch.distributed as dist

            count = torch.tensor([float(usable)], device=self._device())
            dist.all_reduce(count)
            usable = int(count.item())
            if not items and usable:
                logger.warning(
                    "guidance round %d: this rank has no usable sample (%d could not be scored); it contributes "
                    "zero gradients this round",
                    round_index,
                    labelled.num_dropped,
                )
        if not usable:
            raise GuidanceRoundError(
                f"guidance round {round_index}: none of the {len(batch)} policy samples has a usable label "
                f"({labelled.num_dropped} could not be scored by the constraint {self.constraint!r}; the rest were "
                "empty). Check that the constraint returns numbers in [0, 1] for these texts."
            )
        hard = [label >= s.label_threshold for _, _, label in items]
        if items and (all(hard) or not any(hard)):
            message = (
                f"guidance round {round_index}: all {len(items)} samples are labelled "
                f"{'satisfied' if all(hard) else 'violating'} (threshold {s.label_threshold}); the guidance model "
                "learns nothing about the difference this round. Sample more (samples_per_round, "
                "guidance_warmup_samples) or from more challenging prompts."
            )
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        order = torch.randperm(len(items), generator=generator).tolist()
        n_hold = int(len(items) * s.holdout_fraction) if len(items) >= 4 else 0
        self.auc_pool.extend(items[i] for i in order[:n_hold])
        train_items = [items[i] for i in order[n_hold:]]
        self.buffer.extend(train_items)
        self.latest = train_items
        if round_index == 0 and len(self.buffer):
            if self.label_rows is not None:
                self._set_label_prior(self.label_rows)
            elif s.prior == "label_mean":
                self._set_label_prior()

        losses = []
        steps_start = time.perf_counter()
        self.guidance.set_trainable(True)
        params = self.guidance.trainable_parameters()
        guidance_was_training = self.guidance.training
        self.guidance.train()
        try:
            # Under several processes every rank takes the same number of steps (gradients are averaged).
            steps = s.guidance_steps_per_round if len(self.buffer) or self.grad_sync is not None else 0
            bar = progress_bar(
                range(steps),
                desc=f"guidance round {round_index}: guidance steps",
                unit="step",
                disable=self.disable_tqdm,
            )
            for _ in bar:
                if not len(self.buffer):  # nothing to learn from on this rank: contribute zero gradients
                    self.optimizer.zero_grad(set_to_none=True)
                    self.grad_sync(params)
                    self.optimizer.step()
                    continue
                mb = self._to(self.buffer.sample(s.guidance_batch_size, generator, self.pad_token_id))
                weights = self._importance(mb) if s.importance_max_weight is not None else None
                ref_fn = None
                if s.consistency_coef > 0:
                    ref = self._policy_logits(mb)
                    ref_fn = lambda b, t, ref=ref: ref[b, t]  # noqa: E731
                loss, _ = guidance_loss_from_hidden(
                    self._guidance_hidden(mb),
                    self.guidance.head,
                    mb["input_ids"],
                    mb["continuation_mask"],
                    mb["labels"],
                    weights=weights,
                    consistency_coef=s.consistency_coef,
                    ref_logits_fn=ref_fn,
                    guidance=self.guidance,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_sync is not None:
                    self.grad_sync(params)
                if s.max_grad_norm and s.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                self.optimizer.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            self.optimizer.zero_grad(set_to_none=True)
            pool_start = time.perf_counter()
            pool = self._pool_metrics()
            pool_seconds = time.perf_counter() - pool_start
        finally:
            self.guidance.train(guidance_was_training)
            self.guidance.set_trainable(False)
        self.rounds_done = round_index + 1
        steps_seconds = pool_start - steps_start
        round_seconds = time.perf_counter() - start

        metrics = {
            "constraint/satisfaction": float(labelled.scores.float().mean()) if items else math.nan,
            "constraint/violations": float(sum(1 for h in hard if not h)) / len(hard) if items else math.nan,
            "samples_per_second": len(batch) / max(sample_seconds, 1e-9),
            "guidance/samples_dropped": float(labelled.num_dropped),
            "guidance/buffer_size": float(len(self.buffer)),
            **pool,
            # where the round's wall time went (the rest: buffer bookkeeping, the label-count all-reduce)
            "time/round_sampling_s": sample_seconds,
            "time/round_labelling_s": label_seconds,
            "time/round_guidance_steps_s": steps_seconds,
            "time/round_auc_pool_s": pool_seconds,
            "time/round_s": round_seconds,
        }
        if losses:
            metrics["guidance/loss"] = sum(losses) / len(losses)
        logger.info(
            "guidance round %d: %d samples (%.1fs sampling, %.1fs labelling), satisfaction %.3f, "
            "%d guidance steps (loss %s, %.1fs), auc %s on %d held-back samples (%.1fs), %.1fs in all",
            round_index,
            len(batch),
            sample_seconds,
            label_seconds,
            metrics["constraint/satisfaction"],
            len(losses),
            f"{metrics['guidance/loss']:.4f}" if losses else "-",
            steps_seconds,
            f"{metrics['guidance/auc']:.3f}" if "guidance/auc" in metrics else "n/a",
            len(self.auc_pool),
            pool_seconds,
            round_seconds,
        )
        return metrics

    # ------------------------------------------------------------------ state
    def guidance_tensors(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.guidance.trainable_parameters()]

    def state_dict(self) -> dict:
        return {
            "guidance": self.guidance_tensors(),
            "optimizer": self.optimizer.state_dict(),
            "buffer": self.buffer.state_dict(),
            "auc_pool": SampleBuffer.items_state(self.auc_pool),
            "latest": SampleBuffer.items_state(self.latest),
            "rounds_done": self.rounds_done,
        }

    def load_state_dict(self, state: dict) -> None:
        copy_tensors(self.guidance.trainable_parameters(), state["guidance"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.auc_pool.clear()
        self.auc_pool.extend(SampleBuffer.items_from_state(state.get("auc_pool")))
        self.latest = SampleBuffer.items_from_state(state.get("latest"))
        self.rounds_done = int(state["rounds_done"])


def copy_tensors(targets, sources) -> None:
    """Copy ``sources`` into the parameters ``targets`` (same order and shapes)."""
    targets, sources = list(targets), list(sources)
    if len(targets) != len(sources):
        raise ValueError(f"expected {len(targets)} guidance tensors, got {len(sources)}")
    with torch.no_grad():
        for target, source in zip(targets, sources):
            if target.shape != source.shape:
                raise ValueError(
                    f"guidance tensor shape mismatch: {tuple(target.shape)} vs {tuple(source.shape)}"
                )
            target.copy_(source.to(device=target.device, dtype=target.dtype))


# ---------------------------------------------------------------------------------------------- sampling
class _GeneratorSampler:
    """A logits processor that draws the next token with its own ``torch.Generator``.

    Used with greedy ``generate``: it returns ``-inf`` everywhere but the drawn token, so ``generate``
    picks it without touching the process-global RNG (which the trainer's thread is using).
    """

    def __init__(self, generator: torch.Generator, temperature: float, top_p: float) -> None:
        self.generator, self.temperature, self.top_p = generator, temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = (
                cumulative - sorted_logits.softmax(-1) >= self.top_p
            )  # keep the smallest set reaching top_p
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        token = torch.multinomial(probs, 1, generator=self.generator)
        out = torch.full_like(scores, -math.inf)
        return out.scatter(-1, token, 0.0)


def sample_with_generator(
    model,
    tokenizer,
    prompts,
    *,
    max_new_tokens,
    temperature,
    top_p,
    batch_size,
    seed,
    desc: str = "sampling",
    disable_tqdm: bool | None = None,
):
    """``steer.guidance.sample_continuations`` without the global RNG (thread-safe and reproducible)."""
    from steer.guidance import sampling

    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    sampler = _GeneratorSampler(generator, float(temperature), float(top_p))
    return sampling.generate_continuations(
        model,
        tokenizer,
        prompts,
        n_per_prompt=1,
        max_new_tokens=max_new_tokens,
        temperature=0.0,  # greedy over the processor's one-hot scores
        top_p=1.0,
        top_k=0,
        batch_size=batch_size,
        seed=None,
        processor_factory=lambda _mask: sampler,
        desc=desc,
        disable_tqdm=disable_tqdm,
    )


# ---------------------------------------------------------------------------------------------- schedules
class SequentialSchedule:
    """Round ``k`` runs in place before policy step ``kI``; the policy always uses the newest guidance."""

    name = "sequential"

    def __init__(self, learner: GuidanceLearner) -> None:
        self.learner = learner
        self.version = -1  # guidance version the policy steps use (-1: none yet, R = 0.5 everywhere)
        self.samples: list = []  # the newest round's policy samples (where the trainer's KL may act)

    def on_round(self, round_index: int) -> list[dict[str, float]]:
        """Called at the start of step ``round_index * I``; returns the metrics of rounds that finished."""
        metrics = self.learner.run_round(round_index)
        self.version = round_index
        self.samples = list(self.learner.latest)
        return [metrics]

    def finish(self) -> list[dict[str, float]]:
        return []

    def check(self) -> None:
        """Nothing runs in the background: a round's error was raised where it ran."""

    def state_dict(self) -> dict:
        return {
            "schedule": self.name,
            "version": self.version,
            "learner": self.learner.state_dict(),
            "samples": SampleBuffer.items_state(self.samples),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_schedule(state, self.name)
        self.learner.load_state_dict(state["learner"])
        self.version = int(state["version"])
        self.samples = SampleBuffer.items_from_state(state.get("samples"))


class BackgroundSchedule:
    """What the background schedules share: round ``k`` runs in a worker while the policy trains on ``k-1``.

    Subclasses (a worker thread: :class:`ParallelSchedule`; a worker process:
    :class:`~steer.trainers.process_schedule.ProcessSchedule`) implement ``_start(round_index)`` (hand the
    round to the idle worker), ``_collect()`` (wait for the running round, keep its result in ``_done``, record
    and re-raise its error), ``_swap()`` (make ``_done`` the policy's guidance version), ``check()`` and
    ``close()``. This base holds the round protocol (staleness 1; the warm-up round and every round of a
    ``synchronised`` schedule are waited for), the end of training, and the CPU thread split between the
    policy and the worker.
    """

    name = ""

    def _init_background(
        self, *, synchronised: bool, worker_threads: int | None, sync_weights, wait_warmup: bool = True
    ) -> None:
        self.synchronised = synchronised
        self.wait_warmup = wait_warmup
        self.sync_weights = sync_weights
        self.version = -1
        self.samples: list = []
        total = torch.get_num_threads()
        self.worker_threads = worker_threads
        self.main_threads = None
        if worker_threads is None and not synchronised and total > 1:
            self.worker_threads = max(1, total // 2)
        if self.worker_threads is not None and not synchronised:
            self.main_threads = max(1, total - self.worker_threads)
        self._original_threads = total
        self._done: tuple | None = None  # a finished round not swapped in yet (e.g. after a checkpoint)
        self._failure: BaseException | None = None  # a background round's error, raised at the next step
        self._failure_raised = False

    def _start(self, round_index: int) -> None:
        raise NotImplementedError

    def _collect(self) -> None:
        raise NotImplementedError

    def _swap(self) -> list[dict[str, float]]:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _raise_unraised_failure(self) -> None:
        if self._failure is not None and not self._failure_raised:
            self._failure_raised = True
            raise self._failure

    def on_round(self, round_index: int) -> list[dict[str, float]]:
        """Swap in the finished round (if any), start round ``round_index``; returns finished rounds' metrics."""
        self.check()
        if self._failure is not None:  # raised before: no new round after a failed one
            raise self._failure
        self._collect()
        finished = self._swap()
        self._start(round_index)
        if self.synchronised or (round_index == 0 and self.wait_warmup):
            self._collect()
            finished += self._swap()
        return finished

    def finish(self) -> list[dict[str, float]]:
        """End of training: wait for the running round, swap it in, stop the worker.

        Raises a failed round's error unless it was already raised (then training is unwinding from it).
        """
        try:
            if self._failure is not None:
                if self._failure_raised:
                    return []
                self.check()
            self._collect()
            return self._swap()
        finally:
            self.close()


class ParallelSchedule(BackgroundSchedule):
    """Round ``k`` runs in a worker thread on its own model copy while the policy trains on version ``k-1``.

    ``policy_params``/``worker_policy_params``: callables returning the trainable policy tensors of the
    trainer's model and the matching tensors of the worker's copy (same order); the worker's are refreshed
    from the trainer's at every round start. ``guidance_params``: a callable returning the trainer's
    guidance tensors, into which finished versions are swapped.
    ``sync_weights(params)``: averages the swapped-in guidance across processes (``None`` on one process;
    the worker never runs collectives, so that it cannot interleave with the trainer's).
    """

    name = "parallel"

    def __init__(
        self,
        learner: GuidanceLearner,
        *,
        policy_params,
        worker_policy_params,
        guidance_params,
        synchronised: bool = False,
        worker_threads: int | None = None,
        sync_weights=None,
        wait_warmup: bool = True,
    ) -> None:
        if len(policy_params()) != len(worker_policy_params()):
            raise ValueError("the worker's policy copy does not match the trained policy's parameters")
        self.learner = learner
        self.policy_params = policy_params
        self.worker_policy_params = worker_policy_params
        self.guidance_params = guidance_params
        self._init_background(
            synchronised=synchronised,
            worker_threads=worker_threads,
            sync_weights=sync_weights,
            wait_warmup=wait_warmup,
        )
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._future: concurrent.futures.Future | None = None
        self._future_round = -1

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            init = (lambda: set_thread_share(self.worker_threads)) if self.worker_threads else None
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="steer-guidance", initializer=init
            )
            if self.main_threads is not None:
                set_thread_share(self.main_threads)
        return self._executor

    def _collect(self) -> None:
        """Wait for the running round (if any) and keep its result for the next swap; re-raise its error.

        A failed round is remembered (:meth:`check` raises it again) and the worker's guidance is put back
        to the last swapped-in version, so that a checkpoint written now holds the last good state.
        """
        if self._future is None:
            return
        future, round_index = self._future, self._future_round
        self._future = None
        try:
            metrics = future.result()  # re-raises the worker's exception here
        except Exception as err:
            self._failure = err
            logger.error(
                "guidance round %d failed in the background worker (%s: %s); the policy keeps guidance version "
                "%d and training stops at the next step",
                round_index,
                type(err).__name__,
                err,
                self.version,
            )
            copy_tensors(self.learner.guidance.trainable_parameters(), self.guidance_params())
            self._failure_raised = True
            raise
        self._done = (round_index, metrics)

    def check(self) -> None:
        """Raise the error of a background round that failed (the trainer calls this before every step).

        A round failing while the policy trains surfaces at the next policy step, not only at the next round
        start or the end of training.
        """
        future = self._future
        if self._failure is None and future is not None and future.done() and future.exception() is not None:
            with contextlib.suppress(Exception):
                self._collect()
            self._failure_raised = False
        self._raise_unraised_failure()

    def _swap(self) -> list[dict[str, float]]:
        if self._done is None:
            return []
        round_index, metrics = self._done
        self._done = None
        self.samples = list(self.learner.latest)  # the worker is idle here
        copy_tensors(self.guidance_params(), self.learner.guidance.trainable_parameters())
        if self.sync_weights is not None:
            self.sync_weights(self.guidance_params())
            copy_tensors(self.learner.guidance.trainable_parameters(), self.guidance_params())
        self.version = round_index
        return [metrics]

    def _start(self, round_index: int) -> None:
        copy_tensors(self.worker_policy_params(), self.policy_params())  # the worker is idle here
        self._future = self._pool().submit(self.learner.run_round, round_index)
        self._future_round = round_index

    def close(self) -> None:
        if self._future is not None:
            with contextlib.suppress(Exception):
                self._future.result()
            self._future = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
            if self.main_threads is not None:
                set_thread_share(self._original_threads)

    def state_dict(self) -> dict:
        # A checkpoint holds the finished round, to be swapped in at the next round start. A round that failed
        # is left out: the checkpoint is the last good state, and the error is raised at the next step.
        try:
            self._collect()
        except Exception:  # noqa: BLE001 - kept in self._failure, raised by check() at the next step
            self._failure_raised = False
        pending = None
        if self._done is not None:
            pending = {"round": self._done[0], "metrics": dict(self._done[1])}
        return {
            "schedule": self.name,
            "version": self.version,
            "guidance": [p.detach().clone() for p in self.guidance_params()],
            "learner": self.learner.state_dict(),
            "pending": pending,
            "samples": SampleBuffer.items_state(self.samples),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_schedule(state, self.name)
        self.close()
        self._failure, self._failure_raised = None, False
        copy_tensors(self.guidance_params(), state["guidance"])
        self.learner.load_state_dict(state["learner"])
        self.version = int(state["version"])
        self.samples = SampleBuffer.items_from_state(state.get("samples"))
        pending = state.get("pending")
        self._done = None if pending is None else (int(pending["round"]), dict(pending["metrics"]))


def _check_schedule(state: dict, name: str) -> None:
    saved = state.get("schedule")
    if saved != name:
        raise ValueError(
            f"the checkpoint was written with schedule={saved!r} but this run uses schedule={name!r}; "
            "resume with the same ConstrainedConfig.schedule"
        )
