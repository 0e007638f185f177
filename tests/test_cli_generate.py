"""`python -m kvlib generate` and real-text prompts: text with a tokenizer, token ids with random weights, one-line
errors. A character-level stand-in tokenizer replaces SmolLM2's, so that nothing here needs the real weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kvlib.cli.generate as generate_cli
from kvlib.cli import main
from kvlib.models.decode import generate
from kvlib.models.loading import load
from kvlib.models.prompts import corpus_text, padded_prompts_for, prompts_for, synthetic_prompts, text_prompts


class CharTokenizer:
    """One token per character (id = its code point); decode writes each id back as its character."""

    pad_token_id = None
    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="module")
def tiny_llama():
    return load("tiny-llama", weights="random", seed=0, with_hf=False)


def with_tokenizer(monkeypatch, lm, tokenizer):
    """Make `generate` see `lm` as a pretrained model with this tokenizer."""
    fake = dataclasses.replace(lm, weights="pretrained", source="stand-in", tokenizer=tokenizer)
    monkeypatch.setattr(generate_cli, "load", lambda *a, **k: fake)


def run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_random_weights_print_token_ids_and_say_the_text_is_meaningless(capsys):
    code, out, _ = run(
        capsys, "--model", "tiny-llama", "--weights", "random", "--prompt", "Hello", "--max-new-tokens", "4"
    )
    assert code == 0
    assert "RANDOM WEIGHTS" in out and "meaningless" in out and "UTF-8 bytes" in out
    ids = [b for b in b"Hello"]
    lm = load("tiny-llama", weights="random", with_hf=False)
    want = generate(lm.model, torch.tensor([ids]), 4).tokens[0].tolist()
    assert f"new token ids: {want}" in out
    assert "time to first token" in out and "per-token p50" in out and "over 3 decode steps" in out


def test_text_continuation_stops_showing_at_end_of_sequence(capsys, monkeypatch, tiny_llama):
    tok = CharTokenizer()
    prompt = "It is a truth"
    tokens = generate(tiny_llama.model, torch.tensor([tok(prompt)["input_ids"]]), 6).tokens[0].tolist()
    tok.eos_token_id = tokens[3]  # the model "ends its answer" at the 4th new token (or earlier)
    cut = tokens.index(tokens[3])
    with_tokenizer(monkeypatch, tiny_llama, tok)
    code, out, _ = run(capsys, "--prompt", prompt, "--max_new_tokens", "6", "--cache", "paged")
    assert code == 0 and "RANDOM" not in out
    assert f"--- prompt ({len(prompt)} tokens, through the tokenizer) ---\n{prompt}\n" in out
    assert f"--- continuation ---\n{tok.decode(tokens[:cut])}\n" in out
    assert f"end of sequence after {cut} tokens; the {6 - cut} generated after it are not shown" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--weights", "random", "--chat"], "random weights have neither"),
        (["--weights", "random", "--cache", "nonsense"], "unknown cache 'nonsense'"),
        (["--weights", "random", "--prompt", ""], "the prompt is empty"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_loading(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(generate_cli, "load", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    code, out, err = run(capsys, "--model", "tiny-llama", *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err and out == ""


def test_unknown_model_is_one_line(capsys):
    code, out, err = run(capsys, "--model", "gpt7")
    assert code == 2 and "unknown model preset 'gpt7'" in err and err.count("\n") == 1 and out == ""


def test_chat_without_a_chat_template_is_one_line(capsys, monkeypatch, tiny_llama):
    with_tokenizer(monkeypatch, tiny_llama, CharTokenizer())
    code, out, err = run(capsys, "--chat", "--prompt", "Hi")
    assert code == 2 and "tiny-llama has no chat template; drop --chat" in err and err.count("\n") == 1
    assert out == ""


def test_prompt_longer_than_the_context_is_one_line(capsys):
    code, out, err = run(capsys, "--model", "tiny-llama", "--weights", "random", "--prompt", "x" * 250)
    assert code == 2 and "250 + max_new_tokens 32 = 282 exceeds the tiny-llama context of 256" in err
    assert err.count("\n") == 1 and out == ""


# ---- real-text prompts -------------------------------------------------------------------------------------------


def test_corpus_is_the_novel_without_captions():
    text = corpus_text()
    assert text.startswith("It is a truth universally acknowledged")
    assert text.rstrip().endswith("the means of uniting them.")
    assert "[Illustration" not in text and "Copyright 1894" not in text and len(text) > 600_000


def test_text_prompts_are_passages_of_exact_length_chosen_by_seed():
    tok = CharTokenizer()
    rows = text_prompts(tok, [40, 40, 25], seed=3)
    assert [len(r) for r in rows] == [40, 40, 25]
    assert not torch.equal(rows[0], rows[1])  # different paragraphs
    for r in rows:
        assert tok.decode(r.tolist()) in corpus_text()  # real, contiguous text (code points < 500 here)
    assert all(torch.equal(a, b) for a, b in zip(rows, text_prompts(tok, [40, 40, 25], seed=3), strict=True))
    ids = prompts_for(512, tok, 2, 30, seed=1)
    assert ids.shape == (2, 30) and torch.equal(ids, torch.stack(text_prompts(tok, [30, 30], seed=1)))
    assert torch.equal(prompts_for(512, None, 2, 30, seed=1), synthetic_prompts(512, 2, 30, seed=1))


def test_padded_text_prompts_are_left_padded():
    ids, mask = padded_prompts_for(512, CharTokenizer(), [12, 5], seed=0)
    assert ids.shape == mask.shape == (2, 12)
    assert mask[1].tolist() == [0] * 7 + [1] * 5 and (ids[1, :7] == 0).all() and mask[0].all()
