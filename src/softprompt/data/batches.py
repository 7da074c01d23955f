"""Encoded examples and their collation into right-padded training rows with the loss positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    """One encoded record."""

    input_ids: list[int]
    """The formatted input, tokenized with the tokenizer's defaults."""
    target_ids: list[int]
    """Tokens that carry the loss: the gold label word, or the target text followed by EOS."""
    label: int | None = None
    """Gold label index (classification)."""
    target: str | None = None
    """Gold target text (generation)."""



@dataclass
class Batch:
    """Right-padded training rows plus where the loss is read."""

    input_ids: torch.Tensor
    """(B, T) input followed by target tokens, right-padded."""
    attention_mask: torch.Tensor
    """(B, T) 1 for real tokens."""
    loss_rows: torch.Tensor
    """(K,) row of each target token."""
    loss_positions: torch.Tensor
    """(K,) position whose hidden state predicts that token (the one before it)."""
    loss_tokens: torch.Tensor
    """(K,) the target token ids."""
    num_input_tokens: int
    """Real (non-pad) tokens in the batch, for throughput."""

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in vars(self).values()))


def collate(examples: list[Example], pad_id: int) -> Batch:
    rows = [e.input_ids + e.target_ids for e in examples]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_rows, loss_positions, loss_tokens = [], [], []
    for i, (row, example) in enumerate(zip(rows, examples)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        start = len(example.input_ids)
        for j, token in enumerate(example.target_ids):
            loss_rows.append(i)
            loss_positions.append(start + j - 1)
            loss_tokens.append(token)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Batch(
        input_ids, attention_mask, as_tensor(loss_rows), as_tensor(loss_positions), as_tensor(loss_tokens),
        int(attention_mask.sum()),
    )
