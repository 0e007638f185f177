"""A from-scratch decoder with the Llama architecture, in plain PyTorch (SmolLM2, Llama 2/3, Mistral-style blocks).

What differs from GPT-2 (kvlib.models.gpt2), each a few lines below:
- positions are rotations of queries and keys (RoPE, Su et al. 2021, "RoFormer"), not an embedding added to the
  input. Keys are rotated *before* they are cached, so a cached key carries its original position: the cache
  layouts store and return keys without knowing about positions (a window layout keeps each kept key's true
  position; StreamingLLM's re-numbering inside the window is not done);
- RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm: no mean subtraction, no bias;
- a SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)), width `intermediate_size`;
- grouped-query attention (Ainslie et al. 2023): n_kv_head key/value heads, each shared by n_head / n_kv_head
  query heads, so the cache holds n_kv_head heads per layer;
- no biases anywhere; the LM head may be tied to the input embedding or not.

It computes the same function as Hugging Face's LlamaForCausalLM (transformers 5.23,
models/llama/modeling_llama.py; tests prove it token for token and logit for logit) and takes that model's
weights. Two differences of layout, not of function: q/k/v are one fused projection (`qkv_proj`) and gate/up one
(`gate_up_proj`), as in vLLM: fewer, larger matrix multiplies per step. Names otherwise follow Hugging Face's,
except the two that every decoding path uses for both architectures: `wte` (HF: model.embed_tokens) and `h`
(HF: model.layers).

Shapes: B batch, T new positions in this call, C = n_embd, nh / nkv query / key-value heads, hd head_dim,
I intermediate_size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlib.caches.base import KVCache
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.core.rope import RopeTable, rope_inv_freq, rotate_folded
from kvlib.models.attention import attend, attention_mask, output_wanted
from kvlib.models.fastpath import Linear


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back before the weight (as HF's)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        # In-place where a fresh tensor is ours anyway: the same arithmetic in the same order as HF's. (F.rms_norm
        # computes the same but was slower at batch 1: in torch 2.13 on CPU it is a composite of ~9 ops.)
        h = h * h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.split_sizes = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim)
        self.qkv_proj = Linear(cfg.n_embd, sum(self.split_sizes), bias=False)  # HF: q_proj, k_proj, v_proj
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        start: int,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, (nh + 2 nkv) hd)
        # Queries and keys are adjacent in the fused projection: rotate both in one pass, before k enters the cache.
        qk = rotate_folded(qkv[..., : (nh + nkv) * hd].view(B, T, nh + nkv, hd), cos, sin)  # (B, T, nh + nkv, hd)
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hd)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, nkv, T, hd)
        v = qkv[..., (nh + nkv) * hd :].view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        y = attend(q, k, v, cache, self.layer_idx, start, mask, is_causal)  # (B, nh, T, hd)
        if not output_wanted():
            return x  # a replay keeps only the cache's writes (kvlib.models.attention.outputs_unused)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=False)  # HF: gate_proj, up_proj
        self.down_proj = Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # each (B, T, I)
        return self.down_proj(F.silu(gate).mul_(up))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        start: int,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "llama":
            raise KvlibError(f"{cfg.name} is a {cfg.arch} config, not a llama one")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # HF: model.embed_tokens
        self.h = nn.ModuleList(LlamaBlock(cfg, i) for i in range(cfg.n_layer))  # HF: model.layers
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        # Not a buffer: model.to(bfloat16) would round the frequencies, and the angles p * f of late positions
        # with them (by radians). HF's own buffer is rounded that way; kvlib.models.loading restores it to float32.
        self.inv_freq = rope_inv_freq(cfg)  # (hd/2,) float32
        self.rope = RopeTable(self.inv_freq, cfg.n_positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        key_valid: torch.Tensor | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, T) at cache slots [start, start + T); the same contract as GPT.forward.

        `position_ids` (B, T) give the rotation angles (they differ from slots under left padding); `key_valid`
        (B, >= start + T) is False at padding. Returns (B, 1, V) with `last_only`, else (B, T, V).
        """
        T = input_ids.shape[1]
        mask, is_causal = attention_mask(T, start, key_valid, input_ids.device)
        x = self.wte(input_ids)  # (B, T, C)
        cos, sin = self.rope(position_ids, x.dtype)  # (B, T, 1, hd) each, shared by every layer
        for block in self.h:
            x = block(x, cos, sin, cache, start, mask, is_causal)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def init_random(self, seed: int) -> Llama:
        """Hugging Face's Llama initialisation (every matrix and the embedding N(0, 0.02), norms 1), seeded."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():  # a tied LM head is the embedding, listed once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return self

    @torch.no_grad()
    def load_hf_state(self, hf_model: nn.Module) -> Llama:
        """Copy the weights of a Hugging Face LlamaForCausalLM with the same shapes (q/k/v and gate/up fused)."""
        src = hf_model.model
        self.wte.weight.copy_(src.embed_tokens.weight)
        for mine, theirs in zip(self.h, src.layers, strict=True):
            a, m = theirs.self_attn, theirs.mlp
            if any(p.bias is not None for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.down_proj)):
                raise KvlibError("a Llama with biases is not implemented in kvlib")
            mine.input_layernorm.weight.copy_(theirs.input_layernorm.weight)
            mine.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
            mine.self_attn.qkv_proj.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            mine.self_attn.o_proj.weight.copy_(a.o_proj.weight)
            mine.mlp.gate_up_proj.weight.copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
            mine.mlp.down_proj.weight.copy_(m.down_proj.weight)
        self.norm.weight.copy_(src.norm.weight)
        if not self.cfg.tie_word_embeddings:
            self.lm_head.weight.copy_(hf_model.lm_head.weight)
        return self

    def weight_bytes(self) -> int:
        """Bytes of the parameters, counting a tied embedding / LM head once."""
        return sum(p.numel() * p.element_size() for p in self.parameters())
