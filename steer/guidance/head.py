"""GuidanceHead: the vocabulary head of the guidance model, ``z[v] = w_v . h + b_v (+ u . h)``.

A plain head learns each token's row only where the policy sampled that token: the BCE on ``z[t, x_t]`` sends
gradient to row ``x_t`` alone, and through the zero-initialised rows none reaches the backbone at first. What
the context says about the constraint *whatever the next token*, e.g. "a topic word has already been written",
then has to be learned once per row, and rows of tokens the rounds rarely sample never learn it.

``shared=True`` adds one context logit ``u . h`` to every token's logit: every sampled position trains ``u``
(and, through it, the backbone), so the evidence of the context reaches tokens never sampled in that context.
For ``q* ∝ p . sigmoid(z)`` a large shared logit (the prefix already satisfies the constraint) sends every R
to 1 and q* back to p; a very negative one cancels in the normalisation. ``u`` starts at zero, so a fresh head
is still exactly its prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GuidanceHead", "shared_logit"]


class GuidanceHead(nn.Linear):
    """``nn.Linear(hidden, vocab)`` (weight and bias zero) plus, with ``shared``, a zero ``[hidden]`` vector
    ``shared`` whose dot product with the hidden state is added to every token's logit."""

    def __init__(self, hidden_size: int, vocab_size: int, *, shared: bool = False, device=None) -> None:
        super().__init__(hidden_size, vocab_size, bias=True, device=device, dtype=torch.float32)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        if shared:
            self.shared = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=torch.float32))
        else:
            self.register_parameter("shared", None)

    def forward(self, hidden: Tensor) -> Tensor:
        z = F.linear(hidden, self.weight, self.bias)
        extra = shared_logit(self, hidden)
        return z if extra is None else z + extra.unsqueeze(-1)

    def is_fresh(self) -> bool:
        """No context has moved the head yet (weights, and the shared vector, still zero)."""
        return not bool(self.weight.any()) and (self.shared is None or not bool(self.shared.any()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared={self.shared is not None}"


def shared_logit(head: nn.Module, hidden: Tensor) -> Tensor | None:
    """``u . h`` over the last dimension of ``hidden`` (``[...]`` float32), or ``None`` for a head without it
    (also a bare ``nn.Linear``)."""
    shared = getattr(head, "shared", None)
    if shared is None:
        return None
    return hidden.float() @ shared.float()
