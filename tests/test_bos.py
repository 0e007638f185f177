"""Regression (issue 15): prompts and perplexity texts carried no <bos> for Gemma, whose tokenizer adds one by
default and which was trained to see it first (it is also its attention sink). Texts now start with the
tokenizer's own leading special tokens, at the same total length; tokenizers that add none are unchanged."""

from __future__ import annotations

import torch

from kvlib.measure.perplexity import text_token_ids
from kvlib.models.prompts import bos_ids, prompts_for


class CharTokenizer:
    """One id per character (ord % 250 + 3); optionally a leading BOS (id 2), like Gemma's tokenizer."""

    pad_token_id = 0

    def __init__(self, bos: bool) -> None:
        self.bos = bos

    def __call__(self, text, add_special_tokens=True):
        def one(t):
            return ([2] if self.bos and add_special_tokens else []) + [ord(c) % 250 + 3 for c in t]

        return {"input_ids": [one(t) for t in text] if isinstance(text, list) else one(text)}


def test_bos_ids_finds_the_leading_special_tokens():
    assert bos_ids(CharTokenizer(bos=True)) == [2]
    assert bos_ids(CharTokenizer(bos=False)) == []


def test_perplexity_text_starts_with_bos_at_the_asked_length():
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    with_bos = text_token_ids(CharTokenizer(bos=True), text, 20)
    without = text_token_ids(CharTokenizer(bos=False), text, 20)
    assert with_bos.shape == without.shape == (1, 20)
    assert with_bos[0, 0] == 2 and torch.equal(with_bos[0, 1:], without[0, :19])


def test_prompts_start_with_bos_at_the_asked_length():
    with_bos = prompts_for(256, CharTokenizer(bos=True), 2, 16, seed=3)
    without = prompts_for(256, CharTokenizer(bos=False), 2, 16, seed=3)
    assert with_bos.shape == without.shape == (2, 16)
    assert bool((with_bos[:, 0] == 2).all()) and torch.equal(with_bos[:, 1:], without[:, :15])
