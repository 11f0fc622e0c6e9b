"""Persona embeddings by matrix factorisation of survey answers (Li et al., 2024, section 3.1).

Model (on observed scaled answers r_ij in [0, 1] only; refusals, nominal and unasked are missing)::

    r_ij ≈ mu + c_j + <e_i, x_j>,   x_j = q_j (or [q_j, 1] with ``user_bias``)

``mu`` is the fixed training mean, ``c_j`` an optional per-question bias, ``e_i`` the persona embedding
(``dim`` values, plus the user's bias as a last coordinate with ``user_bias=True``) and ``q_j`` the
question factor. Objective: ``sum_obs (r - r_hat)^2 + l2 * (sum_i |e_i|^2 + sum_j (|q_j|^2 + c_j^2))``.

Public API
----------
``PersonaEmbedder(dim=16, *, method="als", l2=1.0, question_bias=True, user_bias=False, max_iters=50,
epochs=100, lr=1e-3, batch_size=2048, tol=1e-3, patience=3, seed=0, device="cpu")`` (fields of
``EmbedderConfig``)
    ``fit(responses, valid=None, callback=None)``: ``method="als"`` alternates closed-form ridge solves,
    batched over all users and then all questions (Cholesky on [N, d, d]; Gram matrices by masked
    dense matmuls in row chunks; the training SSE falls out of the normal equations for free);
    ``method="adam"`` runs minibatch (lazy) Adam on the observed entries with the paper's batch 2048.
    ALS is the default: in ``benchmarks/embedder.py`` (18k people x 1.5k questions, 15% observed) it
    converges in ~10 sweeps, ~11 s of CPU, while Adam does not reach ALS's held-out RMSE within
    40 s; at 1k people ALS is still faster. The paper's lr 1e-3 is slow on this objective (49 epochs
    at 1k people stay short of ALS's held-out RMSE); lr 1e-2 gets there in 8 epochs.
    Stops when the objective's relative improvement falls below ``tol``, or, with ``valid``
    responses, when the held-out RMSE has not improved for ``patience`` rounds (best state restored).
    ``callback(step, embedder, stats) -> bool`` may stop training early (returns True).
    ``embeddings`` [U, d_e] (training users, order of ``user_ids``), ``question_factors`` [Q, dim].
    ``fold_in(new_responses, k_answers=None, seed=0)``: embeddings of new people from (``k_answers``
    random of) their answers with the question side frozen: the exact ridge minimiser of the same
    objective for that one vector (closed form, for either method).
    ``transform(responses)`` = ``fold_in`` with all answers. ``predict(embeddings, question_keys=None)``
    -> [U, Q] scaled predictions. ``evaluate(responses, embeddings)`` -> RMSE on observed entries.
    ``save_pretrained(dir)`` / ``from_pretrained(dir)``: ``config.json`` (hyper-parameters, question
    keys, user ids) + ``model.safetensors``.
``option_accuracy(predictions, responses)``: share of observed answers whose nearest scaled option
    to the prediction is the chosen option.
``per_question_mean_rmse(train, test)``: the baseline RMSE (predict each question's training mean).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from steer.io import atomic_save_file, atomic_write_text
from steer.persona.opinionqa import Responses
from steer.progress import progress_bar

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class EmbedderConfig:
    """Hyper-parameters of :class:`PersonaEmbedder` (saved as ``config.json``)."""

    dim: int = field(default=16, metadata={"help": "persona embedding size"})
    method: str = field(default="als", metadata={"help": "'als' (closed-form alternating ridge) or 'adam'"})
    l2: float = field(default=1.0, metadata={"help": "ridge penalty on all factors and question biases"})
    question_bias: bool = field(default=True, metadata={"help": "learn a per-question bias c_j"})
    user_bias: bool = field(default=False, metadata={"help": "append a per-user bias to the embedding"})
    max_iters: int = field(default=50, metadata={"help": "ALS sweeps (users then questions)"})
    epochs: int = field(default=100, metadata={"help": "Adam epochs over the observed entries"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (paper: 1e-3)"})
    batch_size: int = field(
        default=2048, metadata={"help": "Adam minibatch of observed entries (paper: 2048)"}
    )
    tol: float = field(default=1e-3, metadata={"help": "relative improvement below which training stops"})
    patience: int = field(default=3, metadata={"help": "rounds without held-out improvement before stopping"})
    init_std: float = field(
        default=1.0, metadata={"help": "random init std of question factors (x 1/sqrt(dim))"}
    )
    seed: int = field(default=0, metadata={"help": "initialisation and shuffling seed"})
    chunk_size: int = field(default=8192, metadata={"help": "users per dense block in ALS / evaluation"})

    def __post_init__(self) -> None:
        if self.method not in ("als", "adam"):
            raise ValueError(f"method must be 'als' or 'adam', got {self.method!r}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.l2 <= 0:
            raise ValueError(f"l2 must be > 0 (the ridge solves need it), got {self.l2}")

    @property
    def embedding_dim(self) -> int:
        return self.dim + int(self.user_bias)


class _Data:
    """Dense [U, Q] answers on the device, centred once: ``centred = r - mean`` (0 where missing), float mask."""

    def __init__(self, values: np.ndarray, device: torch.device, mean: float | None = None) -> None:
        observed = ~np.isnan(values)
        self.count = int(observed.sum())
        self.mean = float(values[observed].mean()) if mean is None and self.count else float(mean or 0.0)
        self.mask = torch.from_numpy(observed).to(device=device, dtype=torch.float32)
        centred = np.where(observed, values - np.float32(self.mean), np.float32(0.0)).astype(np.float32)
        self.centred = torch.from_numpy(centred).to(device)
        self.shape = values.shape
        self._squares: torch.Tensor | None = None

    @property
    def squares(self) -> torch.Tensor:
        """Per-question sum of squared centred answers [Q] (float64)."""
        if self._squares is None:
            self._squares = (self.centred.double() ** 2).sum(0)
        return self._squares


def _ridge(gram: torch.Tensor, rhs: torch.Tensor, l2: float) -> torch.Tensor:
    """Solve (gram_n + l2 I) x_n = rhs_n for a batch [N, d, d] x [N, d]."""
    d = rhs.shape[-1]
    system = _unpack(gram, d) + l2 * torch.eye(d, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info != 0).any()):  # numerically indefinite (should not happen with l2 > 0): fall back
        return torch.linalg.solve(system, rhs)
    return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)


def _outer(x: torch.Tensor) -> torch.Tensor:
    """Upper-triangle products x_a x_b (a <= b) per row [N, d(d+1)/2]: half the Gram matmul of a full outer."""
    rows, cols = torch.triu_indices(x.shape[1], x.shape[1], device=x.device)
    return x[:, rows] * x[:, cols]


def _unpack(packed: torch.Tensor, d: int) -> torch.Tensor:
    """[N, d(d+1)/2] upper triangles -> symmetric [N, d, d] (one gather)."""
    rows, cols = torch.triu_indices(d, d)
    position = torch.empty(d, d, dtype=torch.long)
    position[rows, cols] = torch.arange(len(rows))
    position[cols, rows] = torch.arange(len(rows))
    return packed[:, position.reshape(-1).to(packed.device)].reshape(-1, d, d)


class PersonaEmbedder:
    """Matrix-factorisation persona embeddings with fold-in for new people (see the module docstring)."""

    def __init__(self, dim: int = 16, *, device: str | torch.device = "cpu", **kwargs) -> None:
        self.config = EmbedderConfig(dim=dim, **kwargs)
        self.device = torch.device(device)
        self.question_keys: list[str] = []
        self.user_ids: list[str] = []
        self.embeddings: torch.Tensor | None = None  # [U, embedding_dim]
        self.question_factors: torch.Tensor | None = None  # [Q, dim]
        self.question_bias: torch.Tensor | None = None  # [Q]
        self.global_mean: float = 0.0
        self.history: list[dict] = []
        self._gram_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------ helpers
    @property
    def is_fitted(self) -> bool:
        return self.question_factors is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("PersonaEmbedder is not fitted: call fit() or from_pretrained() first")

    def _features(self, factors: torch.Tensor | None = None) -> torch.Tensor:
        """x_j per question [Q, embedding_dim] (a constant 1 appended for the user bias)."""
        factors = self.question_factors if factors is None else factors
        if self.config.user_bias:
            return torch.cat([factors, torch.ones_like(factors[:, :1])], 1)
        return factors

    def _offset(self) -> torch.Tensor:
        return self.global_mean + self.question_bias

    def _chunks(self, n: int):
        step = max(1, self.config.chunk_size)
        for start in range(0, n, step):
            yield slice(start, min(n, start + step))

    def _align(self, responses: Responses) -> np.ndarray:
        """The responses' values re-indexed to the training questions [U, Q_train] (NaN elsewhere)."""
        if responses.question_keys == self.question_keys:
            return responses.values
        position = {k: i for i, k in enumerate(self.question_keys)}
        columns = [(j, position[k]) for j, k in enumerate(responses.question_keys) if k in position]
        unknown = responses.num_questions - len(columns)
        if unknown:
            logger.info("%d question(s) unknown to the embedder are ignored", unknown)
        out = np.full((responses.num_users, len(self.question_keys)), np.nan, dtype=np.float32)
        if columns:
            src, dst = map(list, zip(*columns))
            out[:, dst] = responses.values[:, src]
        return out

    # -------------------------------------------------------------------------------- solve steps
    def _solve_users(self, data: _Data) -> torch.Tensor:
        """Closed-form ridge embeddings for every row of ``data`` given the frozen question side."""
        features = self._features()
        cached = getattr(self, "_gram_cache", None)
        if cached is not None and cached[0] is self.question_factors:
            gram_rhs = cached[1]  # fold-in calls reuse the frozen question side's products
        else:
            gram_rhs = _outer(features)
            self._gram_cache = (self.question_factors, gram_rhs)
        bias = self.question_bias.unsqueeze(0)
        out = torch.empty(data.shape[0], self.config.embedding_dim, device=self.device)
        for rows in self._chunks(data.shape[0]):
            mask = data.mask[rows]
            target = torch.addcmul(data.centred[rows], mask, bias, value=-1.0)  # r - mu - c_j on observed
            out[rows] = _ridge(mask @ gram_rhs, target @ features, self.config.l2)
        return out

    def _solve_questions(self, data: _Data) -> float:
        """Closed-form ridge question side given the users; returns the new sum of squared errors.

        The SSE comes for free from the normal equations' statistics:
        sum_i m_ij (s_ij - y_i.w_j)^2 = sum_i m_ij s_ij^2 - 2 w_j.b_j + w_j' G_j w_j.
        """
        dim = self.config.dim
        users = self.embeddings[:, :dim]
        user_bias = self.embeddings[:, dim] if self.config.user_bias else None
        if self.config.question_bias:
            users = torch.cat([users, torch.ones_like(users[:, :1])], 1)
        k = users.shape[1]
        gram = torch.zeros(data.shape[1], k * (k + 1) // 2, device=self.device)
        rhs = torch.zeros(data.shape[1], k, device=self.device)
        squares = data.squares if user_bias is None else torch.zeros_like(data.squares)
        for rows in self._chunks(data.shape[0]):
            mask = data.mask[rows]
            target = data.centred[rows]
            if user_bias is not None:
                target = torch.addcmul(target, mask, user_bias[rows, None], value=-1.0)
                squares += (target.double() ** 2).sum(0)
            gram += mask.T @ _outer(users[rows])
            rhs += target.T @ users[rows]
        solution = _ridge(gram, rhs, self.config.l2)
        self.question_factors = solution[:, :dim].contiguous()
        if self.config.question_bias:
            self.question_bias = solution[:, dim].contiguous()
        w = solution.double()
        quadratic = (w.unsqueeze(1) @ _unpack(gram.double(), k) @ w.unsqueeze(2)).reshape(-1)
        return float((squares - 2 * (w * rhs.double()).sum(1) + quadratic).sum().clamp(min=0.0))

    def _objective(self, data: _Data, embeddings: torch.Tensor | None = None) -> tuple[float, float]:
        """(objective, RMSE) of ``embeddings`` (default: the training ones) on ``data``."""
        embeddings = self.embeddings if embeddings is None else embeddings
        features, bias = self._features(), self.question_bias
        sse = 0.0
        for rows in self._chunks(data.shape[0]):
            error = (embeddings[rows] @ features.T + bias - data.centred[rows]) * data.mask[rows]
            sse += float((error * error).sum())
        penalty = self.config.l2 * float((embeddings**2).sum() + (self.question_factors**2).sum())
        if self.config.question_bias:
            penalty += self.config.l2 * float((self.question_bias**2).sum())
        return sse + penalty, math.sqrt(sse / max(data.count, 1))

    # ------------------------------------------------------------------------------------ training
    def _initialise(self, train: Responses, data: _Data) -> None:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        n_users, n_questions = data.shape
        self.global_mean = data.mean
        self.question_bias = data.centred.sum(0) / data.mask.sum(0).clamp(min=1)  # per-question mean - mu
        if not cfg.question_bias:
            self.question_bias = torch.zeros_like(self.question_bias)
        std = cfg.init_std / math.sqrt(cfg.dim)
        self.question_factors = (torch.randn(n_questions, cfg.dim, generator=generator) * std).to(self.device)
        self.embeddings = (torch.randn(n_users, cfg.embedding_dim, generator=generator) * std).to(self.device)

    def fit(
        self,
        responses: Responses,
        valid: Responses | None = None,
        callback: Callable[[int, PersonaEmbedder, dict], bool] | None = None,
        *,
        disable_tqdm: bool | None = None,
    ) -> PersonaEmbedder:
        """Fit on the observed entries of ``responses`` (``valid``: held-out answers of the same users).

        A progress bar counts ALS iterations (``max_iters``) or Adam epochs (``epochs``), showing the train
        (and held-out) RMSE, unless ``disable_tqdm`` (default: :func:`steer.progress.progress_disabled`);
        the fit ends with one INFO log line.
        """
        if responses.num_questions == 0 or responses.num_users == 0:
            raise ValueError("fit: responses have no users or no questions")
        self.question_keys = list(responses.question_keys)
        self.user_ids = [str(u) for u in responses.user_ids]
        data = _Data(responses.values, self.device)
        if data.count == 0:
            raise ValueError("fit: responses have no observed ordinal answers")
        valid_data = None
        if valid is not None:
            if valid.num_users != responses.num_users or list(valid.user_ids) != list(responses.user_ids):
                raise ValueError("fit: valid must hold the same users (in the same order) as responses")
            valid_data = _Data(self._align(valid), self.device, mean=data.mean)
        self._initialise(responses, data)
        self.history = []
        start = time.perf_counter()
        als = self.config.method == "als"
        bar = progress_bar(
            total=self.config.max_iters if als else self.config.epochs,
            desc=f"embedder fit ({self.config.method})",
            unit="iter" if als else "epoch",
            disable=disable_tqdm,
        )
        with bar:
            if als:
                self._fit_als(data, valid_data, callback, start, bar)
            else:
                self._fit_adam(data, valid_data, callback, start, bar)
        last = self.history[-1] if self.history else {}
        logger.info(
            "embedder fit (%s): %d users x %d questions, %d %s, train RMSE %.4f%s, %.1fs",
            self.config.method,
            responses.num_users,
            responses.num_questions,
            len(self.history),
            "iterations" if als else "epochs",
            last.get("train_rmse", math.nan),
            f", held-out RMSE {last['valid_rmse']:.4f}" if "valid_rmse" in last else "",
            time.perf_counter() - start,
        )
        return self

    @staticmethod
    def _advance(bar, stats: dict) -> None:
        rmse = {k: f"{stats[k]:.4f}" for k in ("train_rmse", "valid_rmse") if k in stats}
        bar.set_postfix(rmse, refresh=False)
        bar.update(1)

    def _penalty(self) -> float:
        penalty = float((self.embeddings**2).sum() + (self.question_factors**2).sum())
        if self.config.question_bias:
            penalty += float((self.question_bias**2).sum())
        return self.config.l2 * penalty

    def _record(
        self, step: int, data: _Data, valid: _Data | None, start: float, sse: float | None = None
    ) -> dict:
        if sse is None:
            objective, rmse = self._objective(data)
        else:
            objective, rmse = sse + self._penalty(), math.sqrt(sse / max(data.count, 1))
        stats = {
            "step": step,
            "objective": objective,
            "train_rmse": rmse,
            "time": time.perf_counter() - start,
        }
        if valid is not None:
            stats["valid_rmse"] = self._objective(valid)[1]
        self.history.append(stats)
        logger.debug("embedder %s", stats)
        return stats

    def _state(self) -> tuple[torch.Tensor, ...]:
        return self.embeddings.clone(), self.question_factors.clone(), self.question_bias.clone()

    def _restore(self, state: tuple[torch.Tensor, ...]) -> None:
        self.embeddings, self.question_factors, self.question_bias = state

    def _should_stop(self, stats: dict, tracker: dict) -> bool:
        """Convergence on the objective, or early stopping on held-out RMSE (tracks the best state)."""
        tol = self.config.tol
        if "valid_rmse" in stats:
            best = tracker.get("best", math.inf)
            if stats["valid_rmse"] < best * (1 - tol):
                tracker["bad"] = 0
            else:
                tracker["bad"] = tracker.get("bad", 0) + 1
            if stats["valid_rmse"] < best:
                tracker.update(best=stats["valid_rmse"], state=self._state())
            return tracker["bad"] >= self.config.patience
        previous = tracker.get("objective")
        tracker["objective"] = stats["objective"]
        return previous is not None and (previous - stats["objective"]) <= tol * abs(previous)

    def _fit_als(self, data: _Data, valid: _Data | None, callback, start: float, bar) -> None:
        tracker: dict = {}
        for step in range(1, self.config.max_iters + 1):
            self.embeddings = self._solve_users(data)
            sse = self._solve_questions(data)
            stats = self._record(step, data, valid, start, sse)
            self._advance(bar, stats)
            stop = self._should_stop(stats, tracker)
            if (callback is not None and callback(step, self, stats)) or stop:
                break
        if "state" in tracker:
            self._restore(tracker["state"])
        # final user solve so the embeddings are the exact ridge optimum for the final question side
        self.embeddings = self._solve_users(data)

    def _fit_adam(self, data: _Data, valid: _Data | None, callback, start: float, bar) -> None:
        """Minibatch Adam on the observed entries (lazy/sparse Adam: only the rows in a batch move).

        Each entry carries 1/n_i of its user's and 1/n_j of its question's penalty, so that an epoch's
        gradient is that of objective / n_observed (the same objective as ALS). On CPU the loop runs on
        one thread: its ops are tiny and multi-thread synchronisation dominates them.
        """
        cfg = self.config
        rows, cols = data.mask.nonzero(as_tuple=True)
        values = data.centred[rows, cols]
        user_count = data.mask.sum(1).clamp(min=1)
        question_count = data.mask.sum(0).clamp(min=1)
        users = self.embeddings.clone().requires_grad_(True)
        factors = self.question_factors.clone().requires_grad_(True)
        bias = self.question_bias.clone().unsqueeze(1).requires_grad_(cfg.question_bias)
        params = [users, factors] + ([bias] if cfg.question_bias else [])
        optimizer = torch.optim.SparseAdam(params, lr=cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed)
        n = len(values)
        embed = torch.nn.functional.embedding
        tracker: dict = {}
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            for epoch in range(1, cfg.epochs + 1):
                order = torch.randperm(n, generator=generator).to(self.device)
                for begin in range(0, n, cfg.batch_size):
                    index = order[begin : begin + cfg.batch_size]
                    r, c = rows[index], cols[index]
                    u, q = embed(r, users, sparse=True), embed(c, factors, sparse=True)
                    x = torch.cat([q, torch.ones_like(q[:, :1])], 1) if cfg.user_bias else q
                    prediction = (u * x).sum(1)
                    penalty = (u * u).sum(1) / user_count[r] + (q * q).sum(1) / question_count[c]
                    if cfg.question_bias:
                        b = embed(c, bias, sparse=True).squeeze(1)
                        prediction = prediction + b
                        penalty = penalty + b * b / question_count[c]
                    loss = ((prediction - values[index]) ** 2).mean() + cfg.l2 * penalty.mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    self.embeddings, self.question_factors = users.detach(), factors.detach()
                    self.question_bias = bias.detach().squeeze(1)
                    stats = self._record(epoch, data, valid, start)
                self._advance(bar, stats)
                stop = self._should_stop(stats, tracker)
                if (callback is not None and callback(epoch, self, stats)) or stop:
                    break
        finally:
            torch.set_num_threads(threads)
        self.embeddings = users.detach().clone()
        self.question_factors = factors.detach().clone()
        self.question_bias = bias.detach().squeeze(1).clone()
        if "state" in tracker:
            self._restore(tracker["state"])

    @torch.no_grad()
    def refit_questions(self, responses: Responses, embeddings: torch.Tensor) -> PersonaEmbedder:
        """Adopt new training-user ``embeddings`` (e.g. fine-tuned with the soft prompt) and re-solve the
        question side for them (one closed-form ridge solve), so fold-in, cohorts and predictions use the
        same space as the new vectors. ``responses`` are the training answers (same users, same order)."""
        self._check_fitted()
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32, device=self.device)
        if embeddings.shape != self.embeddings.shape:
            raise ValueError(f"embeddings shape {tuple(embeddings.shape)} != {tuple(self.embeddings.shape)}")
        if [str(u) for u in responses.user_ids] != [str(u) for u in self.user_ids]:
            raise ValueError("refit_questions: responses must hold the training users in the training order")
        self.embeddings = embeddings.clone()
        self._solve_questions(_Data(self._align(responses), self.device, mean=self.global_mean))
        self._gram_cache = None
        return self

    @torch.no_grad()
    def standardize_(self) -> PersonaEmbedder:
        """Re-parametrise in place so that the training embeddings have mean 0 and std 1 per dimension.

        ``e' = (e - m) / s``, ``x' = s * x``, ``c' = c + <m, x>``: every prediction is unchanged, but
        persona vectors (and group centroids) are no longer all near the origin, and fold-in's ridge
        prior now pulls a new person toward the average training person. The user-bias coordinate
        (``user_bias=True``) is left as it is. Returns ``self``.
        """
        self._check_fitted()
        dim = self.config.dim
        if len(self.embeddings) < 2:
            raise ValueError("standardize_ needs at least two training embeddings")
        head = self.embeddings[:, :dim]
        mean, std = head.mean(0), head.std(0).clamp(min=1e-8)
        self.question_bias = self.question_bias + self.question_factors @ mean
        self.question_factors = self.question_factors * std
        self.embeddings = torch.cat([(head - mean) / std, self.embeddings[:, dim:]], 1)
        self._gram_cache = None
        return self

    # --------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def fold_in(self, responses: Responses, k_answers: int | None = None, *, seed: int = 0) -> torch.Tensor:
        """Embeddings [U_new, d_e] of new people from ``k_answers`` random answers each (all if None)."""
        self._check_fitted()
        if k_answers is not None:
            responses = responses.split_per_user(k_answers, seed=seed)[0]
        return self._solve_users(_Data(self._align(responses), self.device, mean=self.global_mean))

    def transform(self, responses: Responses) -> torch.Tensor:
        """Embeddings of the people in ``responses`` from all their answers (question side frozen)."""
        return self.fold_in(responses)

    @torch.no_grad()
    def predict(
        self, embeddings: torch.Tensor | None = None, question_keys: list[str] | None = None
    ) -> torch.Tensor:
        """Predicted scaled answers [U, Q] (default: training users x training questions)."""
        self._check_fitted()
        embeddings = (
            self.embeddings if embeddings is None else torch.as_tensor(embeddings, device=self.device)
        )
        if embeddings.shape[-1] != self.config.embedding_dim:
            raise ValueError(
                f"embeddings have size {embeddings.shape[-1]}, expected {self.config.embedding_dim}"
            )
        features, offset = self._features(), self._offset()
        if question_keys is not None:
            position = {k: i for i, k in enumerate(self.question_keys)}
            missing = [k for k in question_keys if k not in position]
            if missing:
                raise KeyError(f"questions unknown to the embedder: {missing[:5]}")
            index = torch.tensor([position[k] for k in question_keys], device=self.device, dtype=torch.long)
            features, offset = features[index], offset[index]
        return embeddings.float() @ features.T + offset

    def evaluate(self, responses: Responses, embeddings: torch.Tensor | None = None) -> float:
        """RMSE on the observed entries of ``responses`` (embeddings default: the training users)."""
        prediction = self.predict(embeddings).cpu().numpy()
        values = self._align(responses)
        observed = ~np.isnan(values)
        if not observed.any():
            raise ValueError("evaluate: no observed answers on the embedder's questions")
        return float(np.sqrt(np.mean((prediction[observed] - values[observed]) ** 2)))

    # ------------------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each file atomically)."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "question_factors": self.question_factors.detach().cpu().contiguous(),
            "question_bias": self.question_bias.detach().cpu().contiguous(),
            "embeddings": self.embeddings.detach().cpu().contiguous(),
        }
        atomic_save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        payload = {
            "config": asdict(self.config),
            "global_mean": self.global_mean,
            "question_keys": self.question_keys,
            "user_ids": self.user_ids,
        }
        atomic_write_text(directory / CONFIG_NAME, json.dumps(payload, indent=1))
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu"
    ) -> PersonaEmbedder:
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"PersonaEmbedder checkpoint incomplete: {directory / name} not found"
                )
        payload = json.loads((directory / CONFIG_NAME).read_text())
        for key in ("config", "global_mean", "question_keys"):
            if key not in payload:
                raise ValueError(f"{directory / CONFIG_NAME}: missing field {key!r}")
        config = dict(payload["config"])
        known = {f.name for f in fields(EmbedderConfig)}
        unknown = sorted(set(config) - known)
        if unknown or "dim" not in config:
            raise ValueError(f"{directory / CONFIG_NAME}: unknown config fields {unknown} or no 'dim'")
        embedder = cls(config.pop("dim"), device=device, **config)
        tensors = load_file(str(directory / WEIGHTS_NAME), device=str(embedder.device))
        for key in ("question_factors", "question_bias", "embeddings"):
            if key not in tensors:
                raise ValueError(f"{directory / WEIGHTS_NAME}: missing tensor {key!r}")
        if tensors["question_factors"].shape != (len(payload["question_keys"]), embedder.config.dim):
            raise ValueError(
                f"{directory / WEIGHTS_NAME}: question_factors shape {tuple(tensors['question_factors'].shape)} "
                f"does not match {len(payload['question_keys'])} question keys x dim {embedder.config.dim}"
            )
        embedder.question_factors = tensors["question_factors"]
        embedder.question_bias = tensors["question_bias"]
        embedder.embeddings = tensors["embeddings"]
        embedder.global_mean = float(payload["global_mean"])
        embedder.question_keys = list(payload["question_keys"])
        embedder.user_ids = list(payload.get("user_ids", []))
        return embedder


def option_accuracy(predictions: torch.Tensor | np.ndarray, responses: Responses) -> float:
    """Share of observed answers whose nearest scaled option to the prediction is the chosen one.

    ``predictions`` [U, Q] are aligned with ``responses.question_keys``. Ties between options with
    equal scaled values (e.g. CONTROLGRPb_W49) count as correct when the chosen option is among them.
    """
    predictions = torch.as_tensor(predictions).detach().cpu().numpy()
    if predictions.shape != responses.values.shape:
        raise ValueError(f"predictions shape {predictions.shape} != responses {responses.values.shape}")
    correct = total = 0
    observed = responses.observed
    for j, key in enumerate(responses.question_keys):
        users = np.nonzero(observed[:, j])[0]
        if len(users) == 0:
            continue
        levels = responses.questions[key].scaled_array()
        nearest = levels[np.abs(predictions[users, j, None] - levels[None, :]).argmin(1)]
        correct += int(np.isclose(nearest, responses.values[users, j]).sum())
        total += len(users)
    if total == 0:
        raise ValueError("option_accuracy: no observed answers")
    return correct / total


def per_question_mean_rmse(train: Responses, test: Responses) -> float:
    """RMSE of predicting each question's training mean (the global mean where a question is unseen)."""
    position = {k: i for i, k in enumerate(train.question_keys)}
    train_values = train.values
    global_mean = float(np.nanmean(train_values))
    counts = (~np.isnan(train_values)).sum(0)
    sums = np.nansum(train_values, 0)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), global_mean)
    errors = []
    for j, key in enumerate(test.question_keys):
        column = test.values[:, j]
        column = column[~np.isnan(column)]
        if len(column):
            errors.append(column - (means[position[key]] if key in position else global_mean))
    if not errors:
        raise ValueError("per_question_mean_rmse: no observed test answers")
    errors = np.concatenate(errors)
    return float(np.sqrt(np.mean(errors**2)))
