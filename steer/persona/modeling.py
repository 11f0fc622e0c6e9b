"""``PersonaSoftPromptModel``: a causal LM + :class:`~steer.persona.soft_prompt.SoftPromptNetwork` (+ an
optional LM adapter and persona gate, :mod:`steer.persona.adapter`, and a table of user vectors), the module
:class:`steer.trainers.persona.PersonaTrainer` trains."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from steer.persona.adapter import PersonaGate, persona_active
from steer.persona.soft_prompt import SoftPromptNetwork, apply_ordinal_tilt, steered_inputs

__all__ = ["PersonaOutput", "PersonaSoftPromptModel", "group_contrast"]


@dataclass
class PersonaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    option_logits: torch.Tensor | None = None


def group_contrast(
    probs: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    question_id: torch.Tensor,
    scale_sq: float | None = None,
) -> torch.Tensor | None:
    """Squared error of the between-group differences of the expected ordinal answer.

    For rows sharing a question, ``dm = m_i - mean(m)`` (model) is compared with ``dt = t_i - mean(t)`` (real).
    With ``scale_sq`` (the data's mean ``dt^2``, a constant): ``mean (dm - dt)^2 / scale_sq``; without it, the
    batch's own ``sum (dm - dt)^2 / sum dt^2``. Either is about 1 for a persona-blind model and 0 when every
    group difference is right. ``None`` when no question has two rows in the batch.
    """
    m = (probs * scale).sum(-1)
    t = (target * scale).sum(-1)
    same = (question_id[:, None] == question_id[None, :]).to(m.dtype)  # [B, B]
    counts = same.sum(1)
    keep = counts > 1
    if not bool(keep.any()):
        return None
    dm = m - (same @ m) / counts
    dt = t - (same @ t) / counts
    error = (dm - dt)[keep] ** 2
    if scale_sq is not None:
        return error.mean() / scale_sq
    return error.sum() / ((dt[keep] ** 2).sum() + 1e-6)


class PersonaSoftPromptModel(nn.Module):
    """Causal LM + :class:`SoftPromptNetwork` (+ optional ``nn.Embedding`` of user vectors).

    The LM's own weights are frozen. With ``train_lm_adapter`` its LoRA parameters (a ``PeftModel`` from
    :func:`steer.persona.adapter.add_lm_adapter`) train too, and ``gate`` (a :class:`PersonaGate` attached to that
    adapter) conditions the update on each row's persona.

    ``forward`` returns the mean answer-token cross-entropy and the first-answer-token logits of the
    option letters (``option_logits`` [B, K], ``-inf`` beyond each question's options). With a target
    distribution the loss is its cross-entropy over the options; with the network's ``ordinal_tilt`` the option
    logits include the persona's tilt and the loss is always over the options (target, else the answer).
    """

    accepts_loss_kwargs = False

    def __init__(
        self,
        model,
        network: SoftPromptNetwork,
        user_vectors: torch.Tensor | None = None,
        *,
        train_user_vectors: bool = False,
        contrast_weight: float = 0.0,
        contrast_scale: float | None = None,
        train_lm_adapter: bool = False,
        gate: PersonaGate | None = None,
    ) -> None:
        super().__init__()
        network.check_model(model)
        self.contrast_weight = float(contrast_weight)
        self.contrast_scale = None if contrast_scale is None else float(contrast_scale)
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        if train_lm_adapter:
            adapter = [p for n, p in self.model.named_parameters() if "lora_" in n]
            if not adapter:
                raise ValueError("train_lm_adapter=True needs a model with a LoRA adapter (add_lm_adapter)")
            for param in adapter:
                param.requires_grad_(True)
        elif gate is not None:
            raise ValueError("a persona gate needs the LM adapter (train_lm_adapter=True)")
        self.gate = gate
        self.network = network
        self.user_vectors = None
        if user_vectors is not None:
            user_vectors = torch.as_tensor(user_vectors, dtype=torch.float32)
            if user_vectors.dim() != 2 or user_vectors.shape[1] != network.config.persona_dim:
                raise ValueError(
                    f"user_vectors has shape {tuple(user_vectors.shape)}; expected [num_users, "
                    f"persona_dim={network.config.persona_dim}]"
                )
            self.user_vectors = nn.Embedding.from_pretrained(
                user_vectors.clone(), freeze=not train_user_vectors
            )
        elif train_user_vectors:
            raise ValueError("train_persona_vectors=True needs user_vectors (one row per user_index)")

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the LM's own weights stay frozen and its adapter has no dropout: no dropout, ever
        if mode and self._checkpointing:
            # transformers checkpoints a decoder layer only while that layer is in training mode: flip the flag on
            # the checkpointed layers themselves (their dropout children stay in eval mode)
            for module in self.model.modules():
                if getattr(module, "gradient_checkpointing", False) is True:
                    module.training = True
        return self

    _checkpointing = False

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ):
        """Recompute the frozen LM's layers in the backward pass (embedding mode only).

        In prefix mode every layer writes the text's keys/values into the persona cache, which a replayed
        layer would write twice, so checkpointing is refused there (a clear error, not a silent no-op).
        """
        if self.network.mode == "prefix":
            raise ValueError(
                "activation_checkpointing (gradient_checkpointing) is not supported with soft_prompt_mode='prefix' "
                "(the layers write into the persona's key/value cache); use soft_prompt_mode='embedding' or turn "
                "activation_checkpointing off"
            )
        if self.gate is not None:
            raise ValueError(
                "activation_checkpointing is not supported with lm_adapter_gate (a replayed layer would run without "
                "its persona's gates); turn one of them off"
            )
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )
        self._checkpointing = True
        self.train(self.training)

    def activation_checkpointing_disable(self):
        self.model.activation_checkpointing_disable()
        self._checkpointing = False
        self.train(self.training)

    @property
    def is_activation_checkpointing(self) -> bool:
        return self._checkpointing

    def personas(self, persona=None, user_index=None) -> torch.Tensor:
        if persona is not None:
            return persona
        if user_index is None:
            raise ValueError("PersonaSoftPromptModel needs a 'persona' vector or a 'user_index' per example")
        if self.user_vectors is None:
            raise ValueError("examples carry 'user_index' but the trainer has no user_vectors table")
        return self.user_vectors(user_index)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        persona=None,
        user_index=None,
        option_ids=None,
        option_mask=None,
        answer_index=None,
        target_probs=None,
        question_id=None,
        option_scale=None,
    ) -> PersonaOutput:
        vectors = self.personas(persona, user_index)
        if labels is None:
            raise ValueError("PersonaSoftPromptModel.forward needs labels (answer tokens, -100 elsewhere)")
        is_label = labels != -100
        if not bool(is_label.any(1).all()):
            raise ValueError("every example needs at least one answer token in labels")
        width = labels.shape[1]
        first = is_label.float().argmax(1)  # first answer column per row
        keep = int(width - first.min()) + 1  # logits from the position before the earliest answer token
        kwargs = steered_inputs(self.model, self.network, vectors, input_ids, attention_mask)
        with persona_active(self.gate, vectors):
            logits = self.model(**kwargs, use_cache=False, logits_to_keep=keep).logits
        logits = logits[:, -keep:].float()
        window = labels[:, -keep:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), ignore_index=-100
        )
        option_logits = None
        if option_ids is not None:
            offset = width - keep
            rows = torch.arange(labels.shape[0], device=labels.device)
            at = logits[rows, first - 1 - offset]  # [B, V] next-token logits for the first answer token
            option_logits = at.gather(1, option_ids)
            if self.network.config.ordinal_tilt:
                if option_scale is None:
                    raise ValueError(
                        "ordinal_tilt needs every example's 'scale' (its options' scaled ordinal positions)"
                    )
                option_logits = apply_ordinal_tilt(option_logits, self.network.tilt(vectors), option_scale)
            if option_mask is not None:
                option_logits = option_logits.masked_fill(~option_mask, float("-inf"))
        elif self.network.config.ordinal_tilt:
            raise ValueError("ordinal_tilt needs option_ids (the option letters' token ids) in every batch")
        if target_probs is None and self.network.config.ordinal_tilt:
            # the tilt acts on the option letters' logits: the loss is the answer's cross-entropy over the options
            loss = F.cross_entropy(option_logits, answer_index)
        if target_probs is not None:
            if option_logits is None:
                raise ValueError("a target distribution needs option_ids (the option letters' token ids)")
            log_q = option_logits.log_softmax(-1)
            target = target_probs.to(log_q.dtype)
            # cross-entropy H(target, q) over the options (padding options: target 0, log q = -inf)
            loss = -(target * log_q.masked_fill(target == 0, 0.0)).sum(-1).mean()
            if self.contrast_weight > 0 and question_id is not None and option_scale is not None:
                contrast = group_contrast(log_q.exp(), target, option_scale, question_id, self.contrast_scale)
                if contrast is not None:
                    loss = loss + self.contrast_weight * contrast
        return PersonaOutput(loss=loss, option_logits=option_logits)
