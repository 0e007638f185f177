"""`python -m kvlib generate`: the greedy continuation of a prompt, printed, with its time to first token and
per-token decode latency.

With pretrained weights the prompt goes through the model's tokenizer (with `--chat`, through its chat template
as one user message, ready for the assistant's answer) and the continuation is printed as text. Random weights
come without a tokenizer, and their text would be meaningless anyway: the prompt is then encoded as its UTF-8
bytes and the new token ids are printed, under a banner that says so.

Exactly `--max_new_tokens` tokens are generated, as everywhere in the study (kvlib.models.decode never stops early); the
printed text ends at the first end-of-sequence token and says how many generated tokens it leaves out.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from kvlib.caches.base import CACHE_LAYOUTS
from kvlib.cli.common import add_model_args, flag, one_line_warnings, positive_int
from kvlib.core.errors import KvlibError
from kvlib.models.decode import NAIVE, check_lengths, generate
from kvlib.models.loading import LoadedModel, load

DEFAULT_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="greedy continuation of a prompt, with TTFT and per-token latency")
    add_model_args(p, model="smollm2-135m")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue [the novel's first sentence]")
    flag(p, "max_new_tokens", type=positive_int, default=32, help="[32]")
    p.add_argument("--cache", default="static", help=f"none or a layout ({', '.join(CACHE_LAYOUTS)}) [static]")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.set_defaults(func=run)


def encode(lm: LoadedModel, prompt: str, chat: bool) -> tuple[torch.Tensor, str]:
    """(input_ids (1, P) on the model's device, how the prompt was encoded)."""
    tok = lm.tokenizer
    if tok is None:  # random weights: no tokenizer (chat was refused before loading)
        ids = [b % lm.cfg.vocab_size for b in prompt.encode("utf-8")]
        how = "its UTF-8 bytes as token ids (random weights come without a tokenizer)"
    elif chat:
        if not getattr(tok, "chat_template", None):
            raise KvlibError(f"{lm.cfg.name} has no chat template; drop --chat")
        messages = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        how = "the tokenizer's chat template (one user message)"
    else:
        # The tokenizer's own special tokens: Gemma's <bos>, which it was trained to see first (and HF's
        # generate gets from tokenizer(prompt)); SmolLM2's tokenizer adds none.
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        how = "the tokenizer"
    if not ids:
        raise KvlibError("the prompt is empty")
    return torch.tensor([ids], dtype=torch.long, device=lm.device), how


def shown_text(tokenizer: Any, tokens: list[int]) -> tuple[str, str]:
    """(the continuation up to the first end-of-sequence token, a note on what was left out or "")."""
    eos = tokenizer.eos_token_id
    cut = tokens.index(eos) if eos is not None and eos in tokens else len(tokens)
    note = ""
    if cut < len(tokens):
        note = f"[end of sequence after {cut} tokens; the {len(tokens) - cut} generated after it are not shown]"
    return tokenizer.decode(tokens[:cut]), note


def lossy_label(cache: Any) -> str:
    """What a lossy layout did in this run, from the cache itself: ' (lossy: 12 of 40 tokens per sequence not held
    exactly)', ' (lossy layout, exact in this run: it quantized or evicted no token)'; '' for an exact layout or
    no cache."""
    if cache is None or type(cache).exact:
        return ""
    lost = cache.lossy_tokens()
    if lost == 0:
        return " (lossy layout, exact in this run: it quantized or evicted no token)"
    return f" (lossy: {lost} of {cache.seq_len} tokens per sequence not held exactly)"


def run(args: argparse.Namespace) -> int:
    if args.cache != NAIVE and args.cache not in CACHE_LAYOUTS:
        raise KvlibError(f"unknown cache {args.cache!r}; choose none or one of {', '.join(CACHE_LAYOUTS)}")
    if not args.prompt:
        raise KvlibError("the prompt is empty")
    if args.chat and args.weights == "random":
        raise KvlibError("--chat needs the model's tokenizer and chat template; random weights have neither")
    with one_line_warnings():
        lm = load(args.model, args.weights, args.device, args.dtype, args.seed, with_hf=False)
    if args.chat and lm.tokenizer is None:
        raise KvlibError(f"{lm.cfg.name} has no tokenizer here ({lm.weights} weights), so no chat template")
    ids, how = encode(lm, args.prompt, args.chat)
    P, N = ids.shape[1], args.max_new_tokens
    check_lengths(lm.model, P, N)

    g = generate(lm.model, ids, N, cache=args.cache)
    tokens = g.tokens[0].tolist()
    print(
        f"{lm.cfg.name} ({lm.weights}: {lm.source}), {lm.device} {lm.dtype_name}, cache {args.cache}"
        f"{lossy_label(g.cache)}, greedy, {N} new tokens; loaded in {lm.load_s:.1f} s"
    )
    if lm.weights == "random":
        print("** RANDOM WEIGHTS **: the text would be meaningless, so token ids are shown instead")
        print(f"prompt ({P} tokens): {how}")
        print(f"new token ids: {tokens}")
    else:
        text, note = shown_text(lm.tokenizer, tokens)
        print(f"--- prompt ({P} tokens, through {how}) ---")
        print(lm.tokenizer.decode(ids[0]) if args.chat else args.prompt)
        print("--- continuation ---")
        print(text)
        print(f"---{' ' + note if note else ''}")
    decode = g.decode_s
    steps = (
        f"per-token p50 {statistics.median(decode) * 1e3:.1f} ms (mean {statistics.fmean(decode) * 1e3:.1f} ms) over "
        f"{len(decode)} decode steps"
        if decode
        else "no decode step (one new token)"
    )
    print(f"time to first token {g.prefill_s * 1e3:.1f} ms (prompt of {P} tokens), {steps}")
    return 0
