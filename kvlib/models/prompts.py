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
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from kvlib.core import checks
from kvlib.core.errors import KvlibError

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


def bos_ids(tokenizer: Any) -> list[int]:
    """The special tokens `tokenizer` puts before a text by default: Gemma's [<bos>], which the model was trained
    to see first (and which serves as its attention sink); [] for SmolLM2 and GPT-2, whose tokenizers add none."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if not plain or with_special[-len(plain) :] != plain:
        return []
    return with_special[: len(with_special) - len(plain)]


def _passage_ids(tokenizer: Any, start: int, n_tokens: int) -> list[int]:
    """`n_tokens` token ids: the tokenizer's leading special tokens (`bos_ids`), then the novel from character
    `start`."""
    bos = bos_ids(tokenizer)[:n_tokens]
    n_tokens -= len(bos)
    if n_tokens == 0:
        return bos
    text = corpus_text()
    chars = CHARS_PER_TOKEN * n_tokens + 64
    while True:
        ids = tokenizer(text[start : start + chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens or start + chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise KvlibError(f"the corpus has only {len(ids)} tokens from offset {start}; {n_tokens} were asked for")
    return bos + ids[:n_tokens]


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


# ---- pass-key retrieval prompts ----------------------------------------------------------------------------------
# The probe of Mohtashami & Jaggi 2023 ("Landmark Attention", the pass-key task) in the form kvpress and LongLoRA
# use: an instruction line, filler text, the key sentence hidden at a depth of the filler, and the question at the end.

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
NEUTRAL_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLERS = ("novel", "neutral")
KEY_DIGITS = 5
_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Esq.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"”’)_])\s+")


def filler_sentences(filler: str) -> list[str]:
    """The filler as sentences: "novel", the study's text from its first sentence (paragraph ends and [.!?] before
    a space end a sentence; "Mr." and the like, or a next word in lower case, do not); "neutral",
    NEUTRAL_FILLER's five sentences (repeated by
    the builder)."""
    filler = checks.one_of("filler", filler, FILLERS)
    if filler == "neutral":
        return [s for s in _SENTENCE_END.split(NEUTRAL_FILLER) if s]
    sentences: list[str] = []
    for para in corpus_text().split("\n\n"):
        pieces = [p for p in _SENTENCE_END.split(" ".join(para.split())) if p]
        for p in pieces:  # "Mr. Bennet" and '“... it?” cried his wife' stay one sentence
            if (
                sentences
                and not sentences[-1].endswith("\n")
                and (sentences[-1].endswith(_ABBREVIATIONS) or p[0].islower())
            ):
                sentences[-1] += " " + p
            else:
                sentences.append(p)
        if sentences:
            sentences[-1] += "\n"  # a paragraph's last sentence: never joined to the next paragraph's first
    return [s.rstrip("\n") for s in sentences]


def passkey_keys(n_keys: int, seed: int = 0) -> list[int]:
    """`n_keys` five-digit keys (10000..99999) from a torch Generator seeded with `seed`: the same seed, the same
    keys, whatever the depths asked."""
    checks.whole("keys", n_keys)
    checks.seed("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, (n_keys,), generator=gen).tolist()


@dataclass(frozen=True)
class PasskeyPrompt:
    """One pass-key prompt, built token by token, so every span is exact:
    ids = instruction | filler[:cut] | key sentence | filler[cut:] | question."""

    ids: list[int]  # exactly the tokens asked for
    key: int
    depth: float  # the depth asked for: a fraction of the filler's tokens before the key sentence
    key_start: int  # token index of the key sentence's first token
    key_end: int  # one past its last token
    filler_start: int  # the filler's first token (= the instruction's length)
    filler_tokens: int  # filler tokens in the prompt (both sides of the key)
    context_len: int  # tokens before the question: instruction + filler + key sentence

    @property
    def actual_depth(self) -> float:
        """Where the key sentence really starts, as a fraction of the filler's tokens (0: first, 1: after all)."""
        return (self.key_start - self.filler_start) / self.filler_tokens if self.filler_tokens else 0.0

    @property
    def question_len(self) -> int:
        return len(self.ids) - self.context_len


class PasskeyPrompts:
    """Builds pass-key prompts of exactly `n_tokens` tokens for one tokenizer and filler.

    Every piece is tokenized on its own and the ids concatenated (pieces after the first start with a space, so
    each tokenizes as it would in running text). The instruction is tokenized with the tokenizer's special tokens
    (a BOS where the model has one); the rest without. The filler is repeated sentence by sentence until it holds
    n_tokens - instruction - key sentence - question tokens and is then cut to exactly that many (so only the
    filler's last sentence, just before the question, may be cut short). The key sentence goes at the sentence
    boundary of the filler nearest to depth x filler tokens: never inside a sentence, never split itself.

    Raises KvlibError when n_tokens cannot hold the instruction, the key sentence, the question and one filler token.
    """

    def __init__(self, tokenizer: Any, n_tokens: int, filler: str = "novel") -> None:
        self.tokenizer = tokenizer
        self.n_tokens = checks.whole("tokens", n_tokens)
        self.filler = checks.one_of("filler", filler, FILLERS)
        self.instruction = _ids(tokenizer, PASSKEY_INSTRUCTION, special=True)
        self.question = _ids(tokenizer, PASSKEY_QUESTION)
        longest_key = _ids(tokenizer, PASSKEY_SENTENCE.format(key=10**KEY_DIGITS - 1))
        fixed = len(self.instruction) + len(self.question) + len(longest_key)
        self.min_tokens = fixed + 1
        if n_tokens < self.min_tokens:
            raise KvlibError(
                f"--tokens {n_tokens} cannot hold the instruction ({len(self.instruction)} tokens), the key sentence "
                f"({len(longest_key)}), the question ({len(self.question)}) and any filler: use at least "
                f"{self.min_tokens}"
            )
        self._sentences = self._filler_ids(n_tokens - len(self.instruction) - len(self.question))

    def _filler_ids(self, needed: int) -> list[list[int]]:
        """Token ids of whole filler sentences (each with a leading space), repeated until they hold `needed`."""
        sentences = filler_sentences(self.filler)
        out: list[list[int]] = []
        total, i = 0, 0
        while total < needed:
            batch = [" " + s for s in sentences[i : i + 64]] or [" " + s for s in sentences[:64]]
            i = i + 64 if i + 64 < len(sentences) else 0  # the neutral filler (and, past its end, the novel) repeats
            for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]:
                out.append(list(ids))
                total += len(ids)
                if total >= needed:
                    break
        return out

    def prompt(self, depth: float, key: int) -> PasskeyPrompt:
        """The prompt with `key` (five digits) at `depth` (0..1) of the filler."""
        depth = checks.fraction("depth", depth)
        key = checks.whole("key", key, minimum=10 ** (KEY_DIGITS - 1), maximum=10**KEY_DIGITS - 1)
        key_ids = _ids(self.tokenizer, PASSKEY_SENTENCE.format(key=key))
        n_filler = self.n_tokens - len(self.instruction) - len(key_ids) - len(self.question)
        filler = [t for s in self._sentences for t in s][:n_filler]
        bounds, at = [0], 0  # sentence boundaries within the filler kept, and its end
        for s in self._sentences:
            at += len(s)
            if at >= n_filler:
                break
            bounds.append(at)
        bounds.append(n_filler)
        cut = min(bounds, key=lambda b: (abs(b - depth * n_filler), b))
        ids = self.instruction + filler[:cut] + key_ids + filler[cut:] + self.question
        start = len(self.instruction) + cut
        context = len(ids) - len(self.question)
        return PasskeyPrompt(ids, key, depth, start, start + len(key_ids), len(self.instruction), n_filler, context)


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class WordTokenizer:
    """A stand-in tokenizer for random weights (no real tokenizer): digits one id each (1..10), every other word or
    punctuation mark a hashed id, so pass-key prompts keep their shape and a continuation's digits can be read.
    Decoding writes digits as digits and anything else as " ?"."""

    _TOKEN = re.compile(r"\d|\w+|[^\w\s]")

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = checks.whole("vocab_size", vocab_size, minimum=64)

    def _encode(self, text: str) -> list[int]:
        return [
            1 + int(t) if t.isdigit() else 11 + zlib.crc32(t.encode()) % (self.vocab_size - 12)
            for t in self._TOKEN.findall(text)
        ]

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self._encode(text)}
        return {"input_ids": [self._encode(t) for t in text]}

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return "".join(str(i - 1) if 1 <= i <= 10 else " ?" for i in (int(x) for x in ids))
