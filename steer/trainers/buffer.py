"""A bounded FIFO buffer of labelled policy samples for training the guidance model.

Samples are stored unpadded (prompt tokens followed by the sampled continuation, up to and including
the first EOS), so samples from rounds with different prompt widths mix freely. Minibatches are
right-padded, which is the layout of the SFT corpus batches the guidance is applied to.
"""

from __future__ import annotations

from collections import deque

import torch

__all__ = ["SampleBuffer"]


class SampleBuffer:
    """Keeps the newest ``capacity`` labelled samples; the oldest are dropped first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"sample buffer capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._items: deque[tuple[torch.Tensor, torch.Tensor, float]] = deque(maxlen=self.capacity)
        self.total_added = 0

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def rows(labelled) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """Unpadded ``(input_ids, continuation_mask, label)`` items of a :class:`steer.guidance.LabelledSamples`.

        Left padding is removed and each row ends at its last continuation token (the first EOS, if any);
        rows without a single continuation token carry no training signal and are skipped.
        """
        batch = labelled.batch
        ids = batch.input_ids.detach().cpu()
        keep = batch.attention_mask.detach().cpu().bool() | batch.continuation_mask.detach().cpu().bool()
        cont = batch.continuation_mask.detach().cpu().bool()
        labels = labelled.labels.detach().cpu().float()
        items = []
        for row in range(ids.shape[0]):
            row_ids, row_cont = ids[row][keep[row]], cont[row][keep[row]]
            positions = row_cont.nonzero()
            if positions.numel() == 0:
                continue
            end = int(positions[-1]) + 1
            items.append((row_ids[:end].clone(), row_cont[:end].clone(), float(labels[row])))
        return items

    def extend(self, items: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Append items (oldest dropped beyond capacity)."""
        self._items.extend(items)
        self.total_added += len(items)

    def add(self, labelled) -> int:
        """Add a :class:`steer.guidance.LabelledSamples`; returns how many samples were added."""
        items = self.rows(labelled)
        self.extend(items)
        return len(items)

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, pad_token_id: int = 0
    ) -> dict:
        """A right-padded minibatch drawn uniformly without replacement (all items if fewer)."""
        if not self._items:
            raise RuntimeError("the sample buffer is empty")
        n = len(self._items)
        order = torch.randperm(n, generator=generator)[: min(batch_size, n)].tolist()
        return self.collate([self._items[i] for i in order], pad_token_id)

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, torch.Tensor, float]], pad_token_id: int = 0) -> dict:
        width = max(int(ids.numel()) for ids, _, _ in items)
        input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        continuation_mask = torch.zeros((len(items), width), dtype=torch.bool)
        for row, (ids, cont, _) in enumerate(items):
            input_ids[row, : ids.numel()] = ids
            attention_mask[row, : ids.numel()] = 1
            continuation_mask[row, : ids.numel()] = cont
        labels = torch.tensor([label for _, _, label in items], dtype=torch.float32)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "continuation_mask": continuation_mask,
            "labels": labels,
        }

    def items(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """A snapshot (list copy) of the stored items, oldest first."""
        return list(self._items)

    @staticmethod
    def items_state(items) -> dict:
        """Items as tensors and numbers only, so they load with ``torch.load(weights_only=True)``."""
        items = list(items)
        return {
            "input_ids": [ids for ids, _, _ in items],
            "continuation_mask": [cont for _, cont, _ in items],
            "labels": torch.tensor([label for _, _, label in items], dtype=torch.float32),
        }

    @staticmethod
    def items_from_state(state: dict | None) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        if state is None:
            return []
        for key in ("input_ids", "continuation_mask", "labels"):
            if key not in state:
                raise KeyError(f"sample buffer state is missing {key!r}")
        return [
            (ids.long(), cont.bool(), float(label))
            for ids, cont, label in zip(
                state["input_ids"], state["continuation_mask"], state["labels"].tolist()
            )
        ]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "total_added": self.total_added, **self.items_state(self._items)}

    def load_state_dict(self, state: dict) -> None:
        items = self.items_from_state(state)
        self._items.clear()
        self._items.extend(items)
        self.total_added = int(state.get("total_added", len(self._items)))
