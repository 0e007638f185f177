"""Model configurations: a frozen dataclass and the presets the study uses.

The presets copy the shapes of the public GPT-2 family so that, with random weights, timing and memory are those
of the real architecture. `n_kv_head` below `n_head` gives grouped-query (or, at 1, multi-query) attention; such
models exist only in kvlib (Hugging Face's GPT-2 has no such option) and always use random weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


class KvlibError(Exception):
    """An error the user can fix (bad input, missing device, ...): the CLI prints it as one line."""


@dataclass(frozen=True)
class GPTConfig:
    name: str
    vocab_size: int = 50257
    n_positions: int = 1024  # the context length: prompt + new tokens may not exceed it
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # 0 means "same as n_head" (plain multi-head attention, as in GPT-2)
    layer_norm_eps: float = 1e-5
    hf_id: str | None = None  # hub id of the pretrained weights, when there are any

    def __post_init__(self) -> None:
        # (kvlib.checks imports this module, so its rules are spelled out here: bools are not sizes)
        if self.n_kv_head == 0 and not isinstance(self.n_kv_head, bool):
            object.__setattr__(self, "n_kv_head", self.n_head)
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise KvlibError(f"config {self.name}: {name} must be a positive integer, got {v!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
            raise KvlibError(f"config {self.name}: layer_norm_eps must be a finite number > 0, got {eps!r}")
        if self.n_embd % self.n_head:
            raise KvlibError(f"config {self.name}: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise KvlibError(f"config {self.name}: n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_head != self.n_head

    def with_kv_heads(self, n_kv_head: int) -> GPTConfig:
        """The same model with fewer key/value heads (grouped-query attention); random weights only."""
        suffix = "" if n_kv_head == self.n_head else f"-kv{n_kv_head}"
        return replace(self, name=f"{self.name}{suffix}", n_kv_head=n_kv_head, hf_id=None if suffix else self.hf_id)

    def n_params(self) -> int:
        """Parameters, counting the tied embedding / LM head once."""
        d, hd = self.n_embd, self.head_dim
        qkv = d * (self.n_head + 2 * self.n_kv_head) * hd + (self.n_head + 2 * self.n_kv_head) * hd
        attn_out = d * d + d
        mlp = d * 4 * d + 4 * d + 4 * d * d + d
        norms = 2 * 2 * d
        per_layer = qkv + attn_out + mlp + norms
        return self.vocab_size * d + self.n_positions * d + self.n_layer * per_layer + 2 * d

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes one token adds to the KV cache: 2 (K and V) x layers x kv heads x head_dim x element size."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * bytes_per_element


PRESETS: dict[str, GPTConfig] = {
    # For tests and the smoke profile: small enough that every path runs in milliseconds.
    "tiny": GPTConfig(name="tiny", vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4),
    "distilgpt2": GPTConfig(name="distilgpt2", n_layer=6, hf_id="distilbert/distilgpt2"),
    "gpt2": GPTConfig(name="gpt2", n_layer=12, hf_id="openai-community/gpt2"),
    "gpt2-medium": GPTConfig(
        name="gpt2-medium", n_embd=1024, n_layer=24, n_head=16, hf_id="openai-community/gpt2-medium"
    ),
}


def get_preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name, such as a list
        raise KvlibError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def config_from_hf(hf_config: Any, name: str) -> GPTConfig:
    """A GPTConfig with the shapes of a Hugging Face GPT2Config."""
    return GPTConfig(
        name=name,
        vocab_size=hf_config.vocab_size,
        n_positions=hf_config.n_positions,
        n_embd=hf_config.n_embd,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        layer_norm_eps=hf_config.layer_norm_epsilon,
    )


def hf_config_from(cfg: GPTConfig) -> Any:
    """The Hugging Face GPT2Config with this config's shapes (multi-head attention only)."""
    from transformers import GPT2Config

    if cfg.is_gqa:
        raise KvlibError(f"{cfg.name}: Hugging Face GPT-2 has no grouped-query attention (n_kv_head={cfg.n_kv_head})")
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        layer_norm_epsilon=cfg.layer_norm_eps,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=cfg.vocab_size - 1,  # GPT-2's <|endoftext|> is the last id
        eos_token_id=cfg.vocab_size - 1,
        attn_implementation="sdpa",
    )
