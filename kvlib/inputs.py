"""Prompts for measurement: synthetic token ids, seeded, so no tokenizer or data set is needed.

Timing and memory depend on how many tokens there are, not on which; a seeded generator makes every run of a
configuration see the same prompts.
"""

from __future__ import annotations

import torch


def synthetic_prompts(
    vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(batch_size, prompt_len) token ids, uniform over the vocabulary but for its last id (end-of-text)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size - 1, (batch_size, prompt_len), generator=gen).to(device)


def left_padded_prompts(
    vocab_size: int, lengths: list[int], seed: int = 0, device: torch.device | str = "cpu", pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of the given lengths, left-padded to the longest: (input_ids, attention_mask), each (B, max_len)."""
    width = max(lengths)
    ids = synthetic_prompts(vocab_size, len(lengths), width, seed, device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return ids.masked_fill(mask == 0, pad_id), mask
