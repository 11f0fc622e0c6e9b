"""``ConstrainedConfig``: TRL's ``SFTConfig`` + the constraint term, the guidance model and its rounds.

Every field has ``help`` metadata (``steer train constrained --help`` lists them) and is validated in
``__post_init__`` with an error that names it. :meth:`ConstrainedConfig.kl_settings`,
:meth:`~ConstrainedConfig.round_settings` and :meth:`~ConstrainedConfig.guidance_config` hand each part to the
object that owns it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from steer.guidance import GuidanceConfig
from steer.guidance.constraint_kl import KLSettings

from .schedule import RoundSettings

__all__ = ["ConstrainedConfig"]


def _choice(name: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"ConstrainedConfig.{name} must be one of {list(options)}, got {value!r}")


def _at_least(name: str, value: Any, low: float, *, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"ConstrainedConfig.{name} must be {'>' if strict else '>='} {low}, got {value!r}")


@dataclass
class ConstrainedConfig(SFTConfig):
    """``SFTConfig`` + the constraint term, the guidance model and its training rounds.

    Every field has ``help`` metadata (``steer train constrained --help`` lists them) and is validated in
    ``__post_init__`` with an error that names it.
    """

    kl_coef: float = field(
        default=1.0,
        metadata={
            "help": "λ: weight of KL(q* || p_theta) added to the SFT loss (>= 0). 0 = the plain-SFT baseline: no "
            "guidance rounds, every other setting identical. It weighs the corpus positions; the samples' weight is "
            "kl_sample_coef when set, so with kl_positions 'samples' and kl_sample_coef set it only switches the "
            "rounds on."
        },
    )
    kl_reference: str = field(
        default="policy",
        metadata={
            "help": "Reference distribution inside q*: 'policy' (the current policy, detached; no extra forward) "
            "or 'base' (the frozen base model with adapters disabled, or with kl_reference_adapter; needs a PEFT "
            "policy)."
        },
    )
    kl_reference_adapter: str | None = field(
        default=None,
        metadata={
            "help": "kl_reference='base': a PEFT adapter directory (e.g. the plain-SFT twin's output_dir, trained "
            "with the same LoRA shape) that becomes the frozen reference, q* = p_ref * R / Z with p_ref = the base "
            "with this adapter, as RLHF anchors on its SFT model; the policy adapter starts from its weights. None: "
            "the base model itself. Ignored with kl_coef 0 (the plain-SFT twin that trains it)."
        },
    )
    policy_init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "A PEFT adapter directory (a finished run's output_dir with the policy's LoRA shape) that the "
            "policy adapter starts from, e.g. the plain-SFT twin's while kl_reference_adapter anchors the KL on "
            "another model. None: the kl_reference_adapter when set, else a fresh LoRA. Ignored with kl_coef 0, "
            "like kl_reference_adapter (the plain-SFT twin is usually what it points at)."
        },
    )
    policy_export_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight w of the trained policy in the adapter saved to output_dir, interpolated in weight space "
            "toward where it started (WiSE-FT): delta_W = w * delta_W(trained) + (1 - w) * delta_W(start), with the "
            "start the policy_init_adapter, else the kl_reference_adapter, else none (a fresh LoRA: the change is "
            "scaled by w). Exact, as one LoRA of the two ranks summed; the trained adapter stays in "
            "output_dir/trained_policy and in the checkpoints. 1: the trained adapter as is. Ignored with kl_coef 0."
        },
    )
    kl_chunk_size: int = field(
        default=256,
        metadata={
            "help": "Positions per chunk in the vocabulary-wide KL (bounds its extra memory). 'fused' uses at most "
            "this many: all N counted positions at once when one [N, vocab] fp32 tensor fits in 64 MiB, else about "
            "N/16 (at least 16)."
        },
    )
    kl_implementation: str = field(
        default="fused",
        metadata={
            "help": "How the KL term is computed: 'fused' (from the hidden states: LM head, guidance head, q*, KL "
            "and gradients a chunk of positions at a time, never a [tokens, vocab] tensor; the SFT NLL comes out "
            "of the same head pass unless TRL's own loss is needed, e.g. label smoothing) or 'chunked' (TRL "
            "computes the SFT loss, then the policy logits and z at the counted positions are materialised; the "
            "reference implementation). 'fused' falls back to 'chunked' when the output head is adapted (not a "
            "plain nn.Linear)."
        },
    )
    kl_positions: str = field(
        default="both",
        metadata={
            "help": "Where the KL acts: 'corpus' (the supervised positions of the training batch), 'samples' "
            "(the continuation positions of the newest round's policy samples, appended to each batch: where "
            "the policy generates) or 'both'."
        },
    )
    kl_corpus_stop_at_violation: bool = field(
        default=True,
        metadata={
            "help": "Corpus positions: drop every position after the first target token that the oracle flags on "
            "its own (token prior < label_threshold): past a violation the constraint is lost and R carries no signal."
        },
    )
    kl_stop_when_satisfied: bool = field(
        default=False,
        metadata={
            "help": "For a constraint that stays satisfied once met (a topic, any_of words: Constraint.monotone): at "
            "positions after a prefix that already satisfies it, R = 1 exactly, so q* is the KL reference there "
            "(Constraint.prefix_satisfied judges each prefix). Without it the learned R keeps favouring the "
            "constraint's words after they were written."
        },
    )
    kl_stop_at_violating_prefix: bool = field(
        default=False,
        metadata={
            "help": "For a contextual oracle (a classifier), whose single tokens flag nothing: the oracle scores every "
            "prefix of each continuation the KL counts (corpus rows and the policy's own samples; a decoder "
            "classifier reading the policy's token ids does it in one pass per row, Constraint.prefix_probs) and "
            "the positions after the first prefix with P(satisfied) < label_threshold are dropped. Past such a "
            "prefix R is small for every token and q* favours whatever dilutes the text (filler a whole-text "
            "classifier calls safe). On the detox-classifier recipe it did not by itself keep the policy fluent "
            "with kl_reference policy; with a classifier use a fixed reference (recipes/detox_classifier/RESULTS.md, "
            "part 3)."
        },
    )
    kl_violating_prefix_min_tokens: int = field(
        default=2,
        metadata={
            "help": "kl_stop_at_violating_prefix: the oracle judges prefixes of at least this many tokens. A "
            "classifier trained on whole texts does not judge one token: steer's toxicity oracle scores the first "
            "token of 162 of 300 Perspective-clean RTP continuations below 0.5, their two-token prefixes 1 of 300 "
            "(recipes/detox_classifier/RESULTS.md, part 3)."
        },
    )
    kl_sample_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the KL on the policy-sample positions (default: kl_coef). The corpus positions are "
            "anchored by the SFT loss, the samples are not: there q* = p_theta * R is re-applied to the policy at "
            "every step, so a smaller weight here trades some detox for less drift on clean text. 0 = no samples."
        },
    )
    kl_sample_batch_size: int = field(
        default=8,
        metadata={
            "help": "Policy samples appended to each training micro-batch when kl_positions uses samples."
        },
    )
    guidance_backbone: str = field(
        default="lora",
        metadata={
            "help": "Guidance model backbone: 'lora' (a second LoRA adapter on the policy's frozen base weights; "
            "needs a PEFT policy) or 'separate' (a copy of the base's first guidance_num_layers layers)."
        },
    )
    guidance_lora_r: int = field(default=16, metadata={"help": "LoRA rank of the guidance adapter."})
    guidance_lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the guidance adapter."})
    guidance_num_layers: int | None = field(
        default=None, metadata={"help": "'separate' backbone: number of base layers to copy (None: all)."}
    )
    guidance_shared_logit: bool = field(
        default=False,
        metadata={
            "help": "Add one context logit, shared by every token, to the guidance head (steer.guidance.head): "
            "what the prefix already says about the constraint (e.g. a topic word written) is learned from every "
            "sampled position instead of once per vocabulary row."
        },
    )
    guidance_token_rows: bool = field(
        default=True,
        metadata={
            "help": "Train the guidance head's per-token rows and bias. False (needs guidance_shared_logit or "
            "guidance_token_rank) keeps them at the prior: R(x<t, v) = sigmoid(prior_v + u.h(x<t)), so only the "
            "context (the shared logit and the guidance LoRA) is learned and tokens differ only by their prior (and "
            "the token term, with guidance_token_rank)."
        },
    )
    guidance_token_rank: int = field(
        default=0,
        metadata={
            "help": "Rank r of a token term in the guidance head tied to the base model's output embeddings E: "
            "z[v] += e_v.(B A h(x<t)). Every sampled token trains the one low-rank map, so what the rounds learn "
            "about a token (e.g. 'leads toward the topic') reaches tokens with nearby embeddings, which per-token "
            "rows learn only from their own samples. 0 = off."
        },
    )
    guidance_lr: float = field(
        default=5e-4, metadata={"help": "Learning rate of the guidance model's AdamW."}
    )
    guidance_prior: str = field(
        default="token",
        metadata={
            "help": "How the guidance head starts: 'token' (bias = the oracle's score of each vocabulary token's own "
            "text, cached per oracle + tokenizer, so tokens never sampled still carry the oracle's judgement), "
            "'label_mean' (every token at the warm-up round's satisfaction rate) or 'none' (R = 0.5)."
        },
    )
    guidance_prior_floor: float = field(
        default=0.02,
        metadata={
            "help": "The token prior is clipped to [floor, 1 - floor] before its logit becomes the head bias."
        },
    )
    guidance_context_prior: str = field(
        default="none",
        metadata={
            "help": "'corpus': also score the words of the training texts and prompts with the oracle, and for each "
            "flagged word the tokenizer splits (SmolLM2: ' fuck' = ' f' + 'uck') set z of its completing token after "
            "its leading tokens (fixed offsets on top of the token prior, cached; steer.guidance.context_prior). "
            "The corpus KL then also stops at such a completion. Needs guidance_prior='token'. 'none': off."
        },
    )
    guidance_context_texts: int = field(
        default=20000,
        metadata={
            "help": "How many training rows (besides every prompt) the context prior's words are read from."
        },
    )
    guidance_prior_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where token priors are cached (default: $STEER_CACHE/priors)."},
    )
    guidance_warmup_samples: int | None = field(
        default=None,
        metadata={
            "help": "Policy samples of the warm-up round (round 0), sized for a first AUC (default: samples_per_round)."
        },
    )
    guidance_auc_pool: int = field(
        default=256,
        metadata={
            "help": "Held-back samples (never trained on, pooled over rounds, newest kept) on which guidance/auc "
            "is measured each round."
        },
    )
    importance_max_weight: float = field(
        default=5.0,
        metadata={
            "help": "kl_reference='base': guidance samples come from the policy but R must hold under the base, so "
            "each sample is weighted by p_base/p_policy (self-normalised), truncated at this value."
        },
    )
    importance_weighting: str = field(
        default="sequence",
        metadata={
            "help": "kl_reference='base': 'sequence' weights each sample by p_base/p_policy of its whole "
            "continuation; 'suffix' weights the guidance loss at each token by the ratio of the tokens after it "
            "only (R is a conditional given the prefix: the prefix needs no weight), so samples of prefixes the "
            "policy prefers keep their weight (steer.guidance.suffix_importance_weights)."
        },
    )
    guidance_steps_per_round: int = field(
        default=8,
        metadata={
            "help": "Guidance optimizer steps per round, on sample-buffer minibatches. 0: R stays at its priors "
            "(the priors-only ablation); the rounds still draw, label and score samples."
        },
    )
    guidance_batch_size: int = field(default=16, metadata={"help": "Sequences per guidance minibatch."})
    guidance_interval: int = field(
        default=20,
        metadata={
            "help": "Policy optimizer steps between guidance rounds (> 0). A warm-up round runs before step 1."
        },
    )
    guidance_holdout_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Fraction of each round's fresh samples held back from guidance training (into the AUC pool, "
            "see guidance_auc_pool) to measure guidance/auc."
        },
    )
    samples_per_round: int = field(
        default=32, metadata={"help": "Continuations sampled from the policy per round (per process)."}
    )
    sample_max_new_tokens: int = field(
        default=20, metadata={"help": "Maximum length of a sampled continuation."}
    )
    sample_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature for guidance rounds."}
    )
    sample_top_p: float = field(
        default=1.0, metadata={"help": "Nucleus (top-p) truncation for guidance rounds."}
    )
    sample_batch_size: int = field(
        default=16, metadata={"help": "Prompts per generation batch in guidance rounds."}
    )
    label_mode: str = field(
        default="hard",
        metadata={
            "help": "Labels from the constraint: 'hard' (score >= label_threshold) or 'soft' (the score)."
        },
    )
    label_threshold: float = field(
        default=0.5, metadata={"help": "Threshold in [0, 1] for hard labels (and for guidance/auc)."}
    )
    consistency_coef: float = field(
        default=0.0, metadata={"help": "Weight of the guidance consistency regulariser (>= 0; 0 = off)."}
    )
    schedule: str = field(
        default="sequential",
        metadata={
            "help": "'sequential': each round runs before the policy steps that use it. 'parallel': round k+1 "
            "runs in a background thread (own model copy: one extra set of base weights) while the policy "
            "trains with round k's guidance (staleness 1, logged as guidance/staleness). 'process': the same "
            "versions, with rounds in a worker process (own interpreter and, on a GPU, own CUDA context; the "
            "frozen base weights shared with the policy, trainable weights exchanged at every round)."
        },
    )
    parallel_synchronised: bool = field(
        default=False,
        metadata={
            "help": "'parallel'/'process' schedules: wait for every round at once (reproduces 'sequential'; for "
            "tests)."
        },
    )
    guidance_warmup_wait: bool = field(
        default=True,
        metadata={
            "help": "'parallel'/'process' schedules: wait for the warm-up round (round 0) before the first policy "
            "step. False: it runs in the worker like any other round, the policy trains steps [0, "
            "guidance_interval) with the guidance it starts from (its priors; no policy samples for the KL yet) "
            "and round 0 is swapped in at step guidance_interval (the paper's parallel scheme from the start)."
        },
    )
    parallel_worker_threads: int | None = field(
        default=None,
        metadata={
            "help": "'parallel'/'process' schedules on CPU: intra-op threads of the worker (None: half the "
            "trainer's threads; the trainer keeps the rest while the worker runs)."
        },
    )
    guidance_process_device: str | None = field(
        default=None,
        metadata={
            "help": "'process' schedule: the device the worker computes on (e.g. 'cuda:1'; None: the policy's)."
        },
    )
    guidance_process_timeout: float = field(
        default=3600.0,
        metadata={
            "help": "'process' schedule: seconds to wait for the worker's answer (a round, a state) before "
            "stopping it and failing."
        },
    )
    sample_buffer_size: int = field(
        default=512,
        metadata={"help": "Capacity of the FIFO sample buffer (sequences; oldest dropped first)."},
    )

    def __post_init__(self) -> None:
        # CPU-safe defaults. SFTConfig turns bf16=None into True, which TrainingArguments refuses without a
        # bf16-capable accelerator: keep it off there (an explicit bf16=True still gets TrainingArguments' error).
        if self.bf16 is None and not self.fp16:
            from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

            self.bf16 = not self.use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available())
        # TRL's BaseConfig still defaults the deprecated alias gradient_checkpointing to True: carry it over to
        # activation_checkpointing so that TrainingArguments does not warn about a name the user never set.
        if self.activation_checkpointing is None and self.gradient_checkpointing is True:
            self.activation_checkpointing, self.gradient_checkpointing = True, None
        super().__post_init__()
        _at_least("kl_coef", self.kl_coef, 0.0)
        _choice("kl_reference", self.kl_reference, ("policy", "base"))
        if self.kl_reference_adapter is not None and self.kl_reference != "base":
            raise ValueError(
                "ConstrainedConfig.kl_reference_adapter is the frozen reference of kl_reference='base', got "
                f"kl_reference={self.kl_reference!r}"
            )
        if not 0.0 < self.policy_export_weight <= 1.0:
            raise ValueError(
                f"ConstrainedConfig.policy_export_weight must be in (0, 1], got {self.policy_export_weight!r}"
            )
        _at_least("kl_chunk_size", self.kl_chunk_size, 1)
        _at_least("kl_violating_prefix_min_tokens", self.kl_violating_prefix_min_tokens, 1)
        _choice("kl_implementation", self.kl_implementation, ("chunked", "fused"))
        _choice("kl_positions", self.kl_positions, ("corpus", "samples", "both"))
        if self.kl_sample_coef is not None:
            _at_least("kl_sample_coef", self.kl_sample_coef, 0.0)
        _at_least("kl_sample_batch_size", self.kl_sample_batch_size, 1)
        _choice("guidance_prior", self.guidance_prior, ("token", "label_mean", "none"))
        _at_least("guidance_prior_floor", self.guidance_prior_floor, 0.0, strict=True)
        if self.guidance_prior_floor >= 0.5:
            raise ValueError(
                f"ConstrainedConfig.guidance_prior_floor must be in (0, 0.5), got {self.guidance_prior_floor}"
            )
        _choice("guidance_context_prior", self.guidance_context_prior, ("none", "corpus"))
        if self.guidance_context_prior != "none" and self.guidance_prior != "token":
            raise ValueError(
                f"ConstrainedConfig.guidance_context_prior={self.guidance_context_prior!r} adds offsets to the token "
                f"prior's head bias, so it needs guidance_prior='token', got {self.guidance_prior!r}"
            )
        _at_least("guidance_context_texts", self.guidance_context_texts, 1)
        if self.guidance_warmup_samples is not None:
            _at_least("guidance_warmup_samples", self.guidance_warmup_samples, 1)
        _at_least("guidance_auc_pool", self.guidance_auc_pool, 1)
        _at_least("importance_max_weight", self.importance_max_weight, 1.0)
        _choice("importance_weighting", self.importance_weighting, ("sequence", "suffix"))
        _choice("guidance_backbone", self.guidance_backbone, ("lora", "separate"))
        _at_least("guidance_lora_r", self.guidance_lora_r, 1)
        _at_least("guidance_lora_alpha", self.guidance_lora_alpha, 0, strict=True)
        if self.guidance_num_layers is not None:
            _at_least("guidance_num_layers", self.guidance_num_layers, 1)
        _at_least("guidance_token_rank", self.guidance_token_rank, 0)
        if not self.guidance_token_rows and not self.guidance_shared_logit and not self.guidance_token_rank:
            raise ValueError(
                "ConstrainedConfig.guidance_token_rows=False needs guidance_shared_logit=True or guidance_token_rank "
                "> 0 (otherwise no part of the guidance head learns)"
            )
        _at_least("guidance_lr", self.guidance_lr, 0.0, strict=True)
        _at_least("guidance_steps_per_round", self.guidance_steps_per_round, 0)
        _at_least("guidance_batch_size", self.guidance_batch_size, 1)
        _at_least("guidance_interval", self.guidance_interval, 1)
        _at_least("guidance_holdout_fraction", self.guidance_holdout_fraction, 0.0)
        if self.guidance_holdout_fraction >= 1.0:
            raise ValueError(
                f"ConstrainedConfig.guidance_holdout_fraction must be < 1, got {self.guidance_holdout_fraction}"
            )
        _at_least("samples_per_round", self.samples_per_round, 1)
        _at_least("sample_max_new_tokens", self.sample_max_new_tokens, 1)
        _at_least("sample_temperature", self.sample_temperature, 0.0, strict=True)
        _at_least("sample_top_p", self.sample_top_p, 0.0, strict=True)
        if self.sample_top_p > 1.0:
            raise ValueError(f"ConstrainedConfig.sample_top_p must be in (0, 1], got {self.sample_top_p}")
        _at_least("sample_batch_size", self.sample_batch_size, 1)
        _choice("label_mode", self.label_mode, ("hard", "soft"))
        _at_least("label_threshold", self.label_threshold, 0.0)
        if self.label_threshold > 1.0:
            raise ValueError(
                f"ConstrainedConfig.label_threshold must be in [0, 1], got {self.label_threshold}"
            )
        _at_least("consistency_coef", self.consistency_coef, 0.0)
        _choice("schedule", self.schedule, ("sequential", "parallel", "process"))
        if not self.guidance_warmup_wait and self.schedule == "sequential":
            raise ValueError(
                "ConstrainedConfig.guidance_warmup_wait=False needs schedule='parallel' or 'process' (the "
                "'sequential' schedule runs every round before the steps that use it)"
            )
        _at_least("guidance_process_timeout", self.guidance_process_timeout, 0.0, strict=True)
        if self.parallel_worker_threads is not None:
            _at_least("parallel_worker_threads", self.parallel_worker_threads, 1)
        _at_least("sample_buffer_size", self.sample_buffer_size, 1)
        if self.packing:
            raise ValueError(
                "ConstrainedConfig.packing is not supported: the guidance model scores each sequence on its own"
            )
        if self.padding_free:
            raise ValueError(
                "ConstrainedConfig.padding_free is not supported (the guidance forward needs padding)"
            )

    def kl_settings(self) -> KLSettings:
        """The constraint term's fields, for :class:`~steer.guidance.ConstraintKL` (the one reader of kl_coef)."""
        return KLSettings(
            coef=self.kl_coef,
            sample_coef=self.kl_sample_coef,
            reference=self.kl_reference,
            implementation=self.kl_implementation,
            positions=self.kl_positions,
            stop_at_violation=self.kl_corpus_stop_at_violation,
            stop_when_satisfied=self.kl_stop_when_satisfied,
            stop_at_violating_prefix=self.kl_stop_at_violating_prefix,
            violation_threshold=self.label_threshold,
            violation_min_tokens=self.kl_violating_prefix_min_tokens,
            chunk_size=self.kl_chunk_size,
        )

    def round_settings(self) -> RoundSettings:
        return RoundSettings(
            samples_per_round=self.samples_per_round,
            sample_max_new_tokens=self.sample_max_new_tokens,
            sample_temperature=self.sample_temperature,
            sample_top_p=self.sample_top_p,
            sample_batch_size=self.sample_batch_size,
            label_mode=self.label_mode,
            label_threshold=self.label_threshold,
            guidance_steps_per_round=self.guidance_steps_per_round,
            guidance_batch_size=self.guidance_batch_size,
            consistency_coef=self.consistency_coef,
            holdout_fraction=self.guidance_holdout_fraction,
            max_grad_norm=self.max_grad_norm,
            warmup_samples=self.guidance_warmup_samples,
            auc_pool_size=self.guidance_auc_pool,
            prior=self.guidance_prior,
            importance_max_weight=self.importance_max_weight if self.kl_reference == "base" else None,
            importance=self.importance_weighting,
        )

    def guidance_config(self) -> GuidanceConfig:
        return GuidanceConfig(
            backbone=self.guidance_backbone,
            lora_r=self.guidance_lora_r,
            lora_alpha=self.guidance_lora_alpha,
            separate_num_layers=self.guidance_num_layers,
            shared_logit=self.guidance_shared_logit,
            token_rows=self.guidance_token_rows,
            token_rank=self.guidance_token_rank,
        )
