"""Field fault, kind 4: claims the run did not do. `verify --padded --batch_size 1` (or `--prompt_len 2 --batch_size
5`) printed "(left-padded)" and "all paths agree" while adding no pad slot. Every label that says what a run did is
computed from what it did: the padding from the attention mask the paths ran with, a lossy layout's loss from the
count its cache keeps."""

from __future__ import annotations

import torch

from kvlib.cli import main
from kvlib.measure.verify import padded_lengths, padding_label

TINY = ["verify", "--model", "tiny", "--weights", "random", "--max-new-tokens", "3"]


def test_padded_lengths_always_pad_every_row_but_the_first():
    for b in range(2, 40):
        for p in range(2, 130):
            lengths = padded_lengths(b, p)
            assert len(lengths) == b and lengths[0] == p
            assert all(1 <= n < p for n in lengths[1:])
    assert padded_lengths(3, 100) == [100, 84, 67]  # the README's recorded run keeps its lengths


def test_verify_padded_with_one_prompt_is_refused_in_one_line(capsys):
    assert main([*TINY, "--batch-size", "1", "--prompt-len", "16", "--padded"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "Traceback" not in cap.err and len(cap.err.strip().splitlines()) == 1
    assert "nothing would be padded" in cap.err


def test_verify_padded_one_token_prompts_are_refused(capsys):
    assert main([*TINY, "--batch-size", "4", "--prompt-len", "1", "--padded"]) == 2
    assert "nothing would be padded" in capsys.readouterr().err


def test_verify_padded_two_token_prompts_of_five_report_the_pad_slots_they_had(capsys):
    assert main([*TINY, "--batch-size", "5", "--prompt-len", "2", "--padded"]) == 0
    out = capsys.readouterr().out
    assert "prompts of 2, 1, 1, 1, 1 tokens, left-padded to 2 (4 pad slots)" in out and "all paths agree" in out


def test_the_padding_label_is_read_from_the_mask():
    assert padding_label(None) == "no padding"
    assert padding_label(torch.ones(3, 5, dtype=torch.long)) == "no padding"
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    assert padding_label(mask) == "prompts of 3, 2, 1 tokens, left-padded to 3 (3 pad slots)"


def test_a_hybrid_models_padded_pass_is_skipped_and_said_when_nothing_can_pad(capsys):
    args = ["verify", "--model", "tiny-gemma", "--weights", "random", "--max-new-tokens", "2"]
    assert main([*args, "--batch-size", "1", "--prompt-len", "12"]) == 0
    out = capsys.readouterr().out
    assert "left-padded pass is skipped" in out and "left-padded to" not in out
    assert main([*args, "--batch-size", "2", "--prompt-len", "12"]) == 0
    out = capsys.readouterr().out
    assert "-- no padding --" in out and "-- prompts of 12, 9 tokens, left-padded to 12 (3 pad slots) --" in out


def _generate_header(capsys, cache: str, prompt: str | None = None) -> str:
    args = ["generate", "--model", "tiny", "--weights", "random", "--cache", cache, "--max_new_tokens", "3"]
    assert main([*args, *(["--prompt", prompt] if prompt else [])]) == 0
    return capsys.readouterr().out.splitlines()[0]


def test_generate_says_what_a_lossy_layout_lost_in_this_run(capsys):
    """`generate --cache window` printed '(lossy)' whether or not the window had evicted anything."""
    assert "(lossy layout, exact in this run: it quantized or evicted no token)" in _generate_header(
        capsys, "window", "short"
    )
    assert "(lossy: 23 of 91 tokens per sequence not held exactly)" in _generate_header(capsys, "window")  # 4 + 64 kept
    assert "(lossy: 91 of 91 tokens" in _generate_header(capsys, "quantized")
    assert "lossy" not in _generate_header(capsys, "static")
