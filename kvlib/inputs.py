"""Prompts for measurement: synthetic token ids, seeded, so no tokenizer or data set is needed.

Timing and memory depend on how many tokens there are, not on which; a seeded generator makes every run of a
configuration see the same prompts.
"""

from __future__ import annotations

import torch

from kvlib import checks
from kvlib.config import KvlibError


def synthetic_prompts(
    vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(batch_size, prompt_len) token ids, uniform over the vocabulary but for its last id (end-of-text)."""
    checks.whole("vocab_size", vocab_size, minimum=2, where="synthetic_prompts:")
    checks.whole("batch_size", batch_size, where="synthetic_prompts:")
    checks.whole("prompt_len", prompt_len, where="synthetic_prompts:")
    checks.seed("seed", seed, where="synthetic_prompts:")
    device = checks.torch_device("device", device, where="synthetic_prompts:")
    gen = torch.Generator().manual_seed(seed)
    try:
        return torch.randint(0, vocab_size - 1, (batch_size, prompt_len), generator=gen).to(device)
    except (RuntimeError, MemoryError) as e:  # (torch.OutOfMemoryError is a RuntimeError)
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise KvlibError(
            f"synthetic_prompts: cannot allocate batch_size {batch_size} x prompt_len {prompt_len} token ids ({why})"
        ) from None


def left_padded_prompts(
    vocab_size: int, lengths: list[int], seed: int = 0, device: torch.device | str = "cpu", pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of the given lengths, left-padded to the longest: (input_ids, attention_mask), each (B, max_len)."""
    lengths = checks.whole_list("lengths", lengths, where="left_padded_prompts:")
    checks.whole("vocab_size", vocab_size, minimum=2, where="left_padded_prompts:")
    checks.whole("pad_id", pad_id, minimum=0, maximum=vocab_size - 1, where="left_padded_prompts:")
    width = max(lengths)
    ids = synthetic_prompts(vocab_size, len(lengths), width, seed, device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return ids.masked_fill(mask == 0, pad_id), mask
