"""Prompts for measurement: real text for pretrained models, seeded synthetic token ids otherwise.

Timing and memory depend on how many tokens there are, not on which, so random weights get synthetic ids (no
tokenizer needed; a seeded generator makes every run of a configuration see the same prompts). A pretrained model
gets passages of *Pride and Prejudice* (kvlib/data/README.md says where the text comes from), so that what it
generates, and what a lossy cache changes in it, can be read. `prompts_for` picks between the two.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import random
from importlib import resources
from typing import Any

import torch

from kvlib import checks
from kvlib.errors import KvlibError

CORPUS_FILE = "pride_and_prejudice.txt.gz"
CORPUS_NAME = "Pride and Prejudice (Jane Austen, 1813; Project Gutenberg #1342)"
CHARS_PER_TOKEN = 8  # generous: English BPE averages about 4 characters a token


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


def _left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths, left-padded to the longest: (input_ids, attention_mask), each (B, max_len)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


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


# ---- real text -------------------------------------------------------------------------------------------------


@functools.cache
def corpus_text() -> str:
    """The novel proper, illustration captions removed (kvlib/data/README.md): about 688,000 characters."""
    return gzip.decompress(resources.files("kvlib").joinpath("data", CORPUS_FILE).read_bytes()).decode("utf-8")


@functools.cache
def _paragraph_starts() -> tuple[int, ...]:
    """Character offsets where a paragraph of the novel begins (prompts start there, not mid-word)."""
    text = corpus_text()
    starts, i = [0], text.find("\n\n")
    while i >= 0:
        starts.append(i + 2)
        i = text.find("\n\n", i + 2)
    return tuple(s for s in starts if s < len(text))


def _passage_ids(tokenizer: Any, start: int, n_tokens: int) -> list[int]:
    """The first `n_tokens` token ids of the novel from character `start` (no special tokens added)."""
    text = corpus_text()
    chars = CHARS_PER_TOKEN * n_tokens + 64
    while True:
        ids = tokenizer(text[start : start + chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens or start + chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise KvlibError(f"the corpus has only {len(ids)} tokens from offset {start}; {n_tokens} were asked for")
    return ids[:n_tokens]


def text_prompts(
    tokenizer: Any, lengths: list[int], seed: int = 0, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """One passage of the novel per length, each exactly that many tokens, starting at a paragraph chosen with
    `seed` (different rows, different paragraphs; the same seed, the same passages)."""
    text_len = len(corpus_text())
    starts = _paragraph_starts()
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        # Only paragraphs with (generously) enough text after them.
        room = bisect.bisect_right(starts, max(text_len - CHARS_PER_TOKEN * n - 64, 0))
        start = starts[rng.randrange(max(room, 1))]
        rows.append(torch.tensor(_passage_ids(tokenizer, start, n), dtype=torch.long, device=device))
    return rows


def prompts_for(
    vocab_size: int,
    tokenizer: Any | None,
    batch_size: int,
    prompt_len: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(batch_size, prompt_len) prompts: passages of the novel when a tokenizer is given (pretrained models have
    one), else synthetic ids."""
    if tokenizer is None:
        return synthetic_prompts(vocab_size, batch_size, prompt_len, seed, device)
    return torch.stack(text_prompts(tokenizer, [prompt_len] * batch_size, seed, device))


def padded_prompts_for(
    vocab_size: int,
    tokenizer: Any | None,
    lengths: list[int],
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths, (input_ids, attention_mask) each (B, max(lengths)): passages of
    the novel when a tokenizer is given, else synthetic ids. Pad slots hold the tokenizer's pad id (or 0)."""
    if tokenizer is None:
        return left_padded_prompts(vocab_size, lengths, seed, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = _left_pad(text_prompts(tokenizer, lengths, seed), pad_id)
    return ids.to(device), mask.to(device)


def prompt_source(tokenizer: Any | None) -> str:
    """What `prompts_for` gives with this tokenizer, in words (for headers and records)."""
    return f"text of {CORPUS_NAME}" if tokenizer is not None else "synthetic token ids"
