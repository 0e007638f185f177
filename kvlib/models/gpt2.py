"""A from-scratch decoder with the GPT-2 architecture, in plain PyTorch; and `build_model`, which builds the decoder
of a config's architecture (this one, or kvlib.models.llama.Llama).

It computes the same function as Hugging Face's GPT2LMHeadModel (tests prove it token for token and logit for
logit) and can take that model's weights. Two differences of layout, not of function: the fused q/k/v projection
is an nn.Linear (HF's Conv1D stores the transpose), and attention may have fewer key/value heads than query heads
(`n_kv_head`), which GPT-2 itself never does.

Attention over the KV cache is kvlib.models.attention.attend, shared with the Llama decoder.

Speed: every matrix is a kvlib.models.fastpath.Linear, an nn.Linear that uses faster kernels for CPU inference, and one
new token's attention in half precision on CPU is written out (kvlib.models.fastpath.one_query_attention). Both compute
the same function; README "Speed" has the measurements.

Shapes: B batch, T new positions in this call, S positions visible to attention (cached + new), C = n_embd,
nh / nkv query / key-value heads, hd head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvlib.caches.base import KVCache
from kvlib.core.config import ModelConfig
from kvlib.models.attention import attend, attention_mask, output_wanted
from kvlib.models.fastpath import Linear


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.split_sizes = (
            cfg.n_head * cfg.head_dim,
            cfg.n_kv_head * cfg.head_dim,
            cfg.n_kv_head * cfg.head_dim,
        )
        self.c_attn = Linear(cfg.n_embd, sum(self.split_sizes))  # fused q, k, v projection
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None, start: int, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        y = attend(q, k, v, cache, self.layer_idx, start, mask, is_causal)  # (B, nh, T, hd)
        if not output_wanted():
            return x  # a replay keeps only the cache's writes (kvlib.models.attention.outputs_unused)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation; F.gelu computes it in one fused kernel.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None, start: int, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start, mask, is_causal)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        key_valid: torch.Tensor | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, T) at cache slots [start, start + T).

        `position_ids` (B, T) index the position embedding (they differ from slots under left padding);
        `key_valid` (B, >= start + T) is False at padding. With `last_only`, only the last position goes through
        the LM head (all that greedy decoding needs; the head is the largest matmul of a small model).
        Returns (B, 1, V) with `last_only`, else (B, T, V).
        """
        T = input_ids.shape[1]
        mask, is_causal = attention_mask(T, start, key_valid, input_ids.device)
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        for block in self.h:
            x = block(x, cache, start, mask, is_causal)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def init_random(self, seed: int) -> GPT:
        """GPT-2's initialisation (N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)), seeded."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    @torch.no_grad()
    def load_hf_state(self, hf_model: nn.Module) -> GPT:
        """Copy the weights of a Hugging Face GPT2LMHeadModel with the same shapes."""
        src = hf_model.transformer
        self.wte.weight.copy_(src.wte.weight)
        self.wpe.weight.copy_(src.wpe.weight)
        for mine, theirs in zip(self.h, src.h, strict=True):
            mine.ln_1.load_state_dict(theirs.ln_1.state_dict())
            mine.ln_2.load_state_dict(theirs.ln_2.state_dict())
            # HF's Conv1D holds weight as (in, out); nn.Linear as (out, in).
            for a, b in (
                (mine.attn.c_attn, theirs.attn.c_attn),
                (mine.attn.c_proj, theirs.attn.c_proj),
                (mine.mlp.c_fc, theirs.mlp.c_fc),
                (mine.mlp.c_proj, theirs.mlp.c_proj),
            ):
                a.weight.copy_(b.weight.t())
                a.bias.copy_(b.bias)
        self.ln_f.load_state_dict(src.ln_f.state_dict())
        return self

    def weight_bytes(self) -> int:
        """Bytes of the parameters, counting the tied embedding / LM head once."""
        return sum(p.numel() * p.element_size() for p in self.parameters())
