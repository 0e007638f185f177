"""A from-scratch decoder with the Gemma 3 architecture (text only), in plain PyTorch: Gemma 3 270M and its kin.

It is kvlib's Llama (kvlib.models.llama) with Gemma 3's changes, each a few lines below, read from Hugging Face's
transformers 5.23 models/gemma3/modeling_gemma3.py (Gemma3ForCausalLM), whose function it computes (tests):
- the input embedding is multiplied by sqrt(n_embd), a float32 scalar cast to the model's dtype first (so in
  bfloat16 the factor itself is rounded, as HF's);
- RMSNorm with Gemma's convention: x / rms(x) * (1 + weight), all in float32, cast back at the end (Llama casts
  before the weight); weights start at 0;
- four norms per block: before and after attention, before and after the MLP (the residual adds the post-norm's
  output), and RMSNorms over head_dim on every query and key head (before RoPE);
- a GeGLU MLP: down(gelu_tanh(gate(x)) * up(x));
- head_dim is a size of its own (256 for 270M, where n_embd / n_head = 160), and attention scores are scaled by
  query_pre_attn_scalar ** -0.5 rather than head_dim ** -0.5;
- hybrid attention: `cfg.layer_types` says which layers are "sliding_attention" (query at slot i sees keys at slots
  i - sliding_window < j <= i, as HF's sliding_window_overlay) and which "full_attention"; the two kinds use
  different RoPE bases (rope_local_theta, rope_theta);
- tied embeddings: the LM head is the embedding.

Caches. With a full cache (static, dynamic, paged, prefix) or none (naive) the model applies the sliding window
itself: a sliding layer attends only to the last sliding_window keys the cache returns (sliced, so that a decode
step reads at most the window whatever the cache holds). With the "hybrid" layout (kvlib.caches.hybrid) a sliding
layer's cache is a ring of sliding_window slots: it returns the slot (absolute position in the cache) of every key
it holds, and the mask is built from those, so ring order and wrap-around change nothing. The eviction policies
(kvlib.caches.eviction) keep any subset of the slots and know each kept key's slot: their attention goes through
kvlib.models.attention.attend (which shows H2O, TOVA and SnapKV the attention their keys received) with the mask
over every slot, window included, mapped onto the kept keys. Other lossy layouts refuse a hybrid model
(kvlib.caches.base).

Shapes: B batch, T new positions in this call, S keys attended to, C = n_embd, nh / nkv query / key-value heads,
hd head_dim, I intermediate_size, V vocabulary, W sliding_window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlib.caches.base import KVCache
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError
from kvlib.core.rope import RopeTable, rope_inv_freq, rotate_folded
from kvlib.models.attention import attend, attention_mask, output_wanted, sdpa
from kvlib.models.fastpath import Linear, one_query_attention

ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


class GemmaRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + weight), in float32, cast back last (HF's Gemma3RMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def window_mask(
    q_slots: torch.Tensor, k_slots: torch.Tensor, window: int | None, key_valid: torch.Tensor | None
) -> torch.Tensor:
    """Which keys each query may see, from their cache slots: (1 or B, 1, T, S) bool.

    q_slots (T,), k_slots (S,) absolute slots (-1: an empty ring slot); query i sees key j when 0 <= j <= i, and
    i - window < j with a window; with key_valid (B, >= max slot + 1) padding keys are hidden, but a query always
    sees itself (a padding query then gets a finite, unused output instead of NaN, as kvlib's attention_mask).
    """
    q, k = q_slots[:, None], k_slots[None, :]  # (T, 1), (1, S)
    allowed = (k >= 0) & (k <= q)  # (T, S)
    if window is not None:
        allowed &= k > q - window
    if key_valid is None:
        return allowed[None, None]
    allowed = allowed[None] & key_valid[:, k_slots.clamp(min=0)][:, None, :]  # (B, T, S)
    allowed |= (k == q)[None]
    return allowed[:, None]


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.window = cfg.window_of(layer_idx)  # None on a full-attention layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.split_sizes = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim)
        self.qkv_proj = Linear(cfg.n_embd, sum(self.split_sizes), bias=False)  # HF: q_proj, k_proj, v_proj
        self.o_proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, start: int, masks: Masks
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)  # (B, T, nh hd), (B, T, nkv hd) x 2
        q = rotate_folded(self.q_norm(q.view(B, T, nh, hd)), cos, sin).transpose(1, 2)  # (B, nh, T, hd)
        k = rotate_folded(self.k_norm(k.view(B, T, nkv, hd)), cos, sin).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if cache is not None and cache.keeps_positions:  # an eviction policy: its kept keys are any subset
            mask, is_causal = masks.over_every_slot(self.window)
            y = attend(q, k, v, cache, self.layer_idx, start, mask, is_causal, scale=self.scale)  # (B, nh, T, hd)
            if not output_wanted():
                return x  # a replay keeps only the cache's writes (kvlib.models.attention.outputs_unused)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))
        k_slots = None  # None: the keys sit at slots [0, S) (or [start, start + T) without a cache)
        if cache is not None and hasattr(cache, "update_with_slots"):
            k, v, k_slots = cache.update_with_slots(self.layer_idx, k, v, start)  # a ring says where each key is
        elif cache is not None:
            k, v = cache.update(self.layer_idx, k, v, start)  # (B, nkv, S, hd)
        first = start if cache is None else 0  # slot of the first key returned, when they are contiguous
        if k_slots is None and first + k.shape[2] != start + T:
            raise KvlibError(
                f"{cache.name} cache returned {k.shape[2]} keys for slots [0, {start + T}): "
                f"{type(cache).__name__} cannot be used with {masks.cfg_name}'s per-slot masks"
            )
        if k_slots is None and self.window is not None and start - self.window + 1 > first:
            lo = start - self.window + 1  # no query of this call sees a key before slot lo: read the window only
            k, v, first = k[:, :, lo - first :], v[:, :, lo - first :], lo
        mask, is_causal = masks.get(self.window, k_slots, first, k.shape[2])
        if T == 1 and q.is_cpu and q.dtype != torch.float32 and self.scale == hd**-0.5:
            y = one_query_attention(q, k, v, mask)  # see kvlib.models.attention.attend
        else:
            y = sdpa(q, k, v, mask, is_causal, self.scale)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class Masks:
    """The attention masks of one forward pass, made once per kind and reused by every layer of that kind.

    `get(window, k_slots, first, S)` -> (mask or None, is_causal) for keys at `k_slots` (S,), or at the contiguous
    slots [first, first + S) when k_slots is None. No mask where none is needed: one new token with no padding
    (a full layer's keys, a sliding layer's window, a ring: every key returned is visible), or a fresh prefill
    no longer than the window (plain causal)."""

    def __init__(self, T: int, start: int, key_valid: torch.Tensor | None, device: torch.device, cfg_name: str):
        self.T, self.start, self.key_valid, self.device, self.cfg_name = T, start, key_valid, device, cfg_name
        self._made: dict[tuple, tuple[torch.Tensor | None, bool]] = {}

    def first(self, T: int) -> Masks:
        """The masks of the same call cut to its first `T` positions (a causal model's prefill of a prefix:
        kvlib.study.passkey replays a recorded prefill up to the end of the context)."""
        if not 0 < T <= self.T:
            raise ValueError(f"first {T} positions of a call of {self.T}")
        return Masks(T, self.start, self.key_valid, self.device, self.cfg_name)

    def over_every_slot(self, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) over every slot [0, start + T), for a cache that keeps an arbitrary subset of them
        (an eviction policy: kvlib.models.attention.attend maps the mask onto the keys it kept, by their slots).
        A sliding layer hides keys outside its window even when the policy kept them."""
        T, start = self.T, self.start
        if self.key_valid is None and (window is None or start + T <= window):
            return attention_mask(T, start, None, self.device)  # nothing to hide but the future
        key = (window, "every slot")
        if key not in self._made:
            q_slots = torch.arange(start, start + T, device=self.device)
            k_slots = torch.arange(start + T, device=self.device)
            self._made[key] = window_mask(q_slots, k_slots, window, self.key_valid), False
        return self._made[key]

    def get(
        self, window: int | None, k_slots: torch.Tensor | None, first: int, S: int
    ) -> tuple[torch.Tensor | None, bool]:
        key = (window, "ring" if k_slots is not None else first, S)
        if key not in self._made:
            self._made[key] = self._make(window, k_slots, first, S)
        return self._made[key]

    def _make(
        self, window: int | None, k_slots: torch.Tensor | None, first: int, S: int
    ) -> tuple[torch.Tensor | None, bool]:
        T, start, key_valid = self.T, self.start, self.key_valid
        if k_slots is None and first == 0 and (window is None or start + T <= window):
            return attention_mask(T, start, key_valid, self.device)  # Llama's rules: no window to apply
        if T == 1 and key_valid is None:
            return None, False  # every key returned is within the window (sliced, or a ring of W slots)
        if k_slots is None:
            k_slots = torch.arange(first, first + S, device=self.device)
        q_slots = torch.arange(start, start + T, device=self.device)
        return window_mask(q_slots, k_slots, window, key_valid), False


class GeGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_up_proj = Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=False)  # HF: gate_proj, up_proj
        self.down_proj = Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # each (B, T, I)
        return self.down_proj(self.act(gate) * up)


class Gemma3Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        eps = cfg.norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.n_embd, eps)
        self.self_attn = Gemma3Attention(cfg, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.n_embd, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.n_embd, eps)
        self.mlp = GeGLU(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.n_embd, eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, start: int, masks: Masks
    ) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, start, masks))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "gemma3":
            raise KvlibError(f"{cfg.name} is a {cfg.arch} config, not a gemma3 one")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # HF: model.embed_tokens
        self.embed_scale = cfg.n_embd**0.5  # HF: a float32 scalar tensor, cast to the weights' dtype when used
        self._embed_scales: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> that cast scalar, made once
        self.h = nn.ModuleList(Gemma3Block(cfg, i) for i in range(cfg.n_layer))  # HF: model.layers
        self.norm = GemmaRMSNorm(cfg.n_embd, cfg.norm_eps)
        if not cfg.tie_word_embeddings:
            raise KvlibError(f"{cfg.name}: Gemma 3 ties its LM head to the embedding")
        with torch.device("meta"):  # its own weight would be replaced at once: don't allocate 262,144 x 640 floats
            self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        # Not buffers (see kvlib.models.llama): float32 frequencies whatever the model's dtype.
        self.rope_full = RopeTable(rope_inv_freq(cfg), cfg.n_positions)
        self.rope_local = RopeTable(rope_inv_freq(cfg, cfg.rope_local_theta), cfg.n_positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        key_valid: torch.Tensor | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, T) at cache slots [start, start + T); the same contract as Llama.forward.

        `position_ids` (B, T) give the rotation angles (they differ from slots under left padding); `key_valid`
        (B, >= start + T) is False at padding. Returns (B, 1, V) with `last_only`, else (B, T, V): with a
        262,144-word vocabulary the LM head is the largest matrix, so a step that needs one token's logits asks
        for one row.
        """
        T = input_ids.shape[1]
        masks = Masks(T, start, key_valid, input_ids.device, self.cfg.name)
        x = self.wte(input_ids)  # (B, T, C)
        x = x * self._embed_scale(x)
        rope = {
            None: self.rope_full(position_ids, x.dtype),  # (B, T, 1, hd) each, shared by the full layers
            "local": self.rope_local(position_ids, x.dtype) if self.cfg.is_hybrid else None,
        }
        for block in self.h:
            cos, sin = rope[None if block.self_attn.window is None else "local"]
            x = block(x, cos, sin, cache, start, masks)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.norm(x))

    def _embed_scale(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(n_embd) as HF applies it: a float32 scalar cast to x's dtype (rounded in half precision), made
        once per (dtype, device) rather than at every decode step."""
        key = (x.dtype, x.device)
        if key not in self._embed_scales:
            self._embed_scales[key] = torch.tensor(self.embed_scale, dtype=torch.float32, device=x.device).to(x.dtype)
        return self._embed_scales[key]

    @torch.no_grad()
    def init_random(self, seed: int) -> Gemma3:
        """Matrices and the embedding N(0, 0.02) (HF's initializer_range), seeded; norms get N(0, 0.1) instead of
        HF's zeros, so that tests exercise the (1 + weight) convention."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():  # the tied LM head is the embedding, listed once
            std = 0.1 if name.endswith("norm.weight") else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    @torch.no_grad()
    def load_hf_state(self, hf_model: nn.Module) -> Gemma3:
        """Copy the weights of a Hugging Face Gemma3ForCausalLM with the same shapes (q/k/v and gate/up fused)."""
        src = hf_model.model
        self.wte.weight.copy_(src.embed_tokens.weight)
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")
        for mine, theirs in zip(self.h, src.layers, strict=True):
            a, m = theirs.self_attn, theirs.mlp
            if any(p.bias is not None for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.down_proj)):
                raise KvlibError("a Gemma 3 with biases is not implemented in kvlib")
            for norm in (*norms, "post_feedforward_layernorm"):
                getattr(mine, norm).weight.copy_(getattr(theirs, norm).weight)
            mine.self_attn.q_norm.weight.copy_(a.q_norm.weight)
            mine.self_attn.k_norm.weight.copy_(a.k_norm.weight)
            mine.self_attn.qkv_proj.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            mine.self_attn.o_proj.weight.copy_(a.o_proj.weight)
            mine.mlp.gate_up_proj.weight.copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
            mine.mlp.down_proj.weight.copy_(m.down_proj.weight)
        self.norm.weight.copy_(src.norm.weight)
        return self

    def weight_bytes(self) -> int:
        """Bytes of the parameters, counting the tied embedding / LM head once."""
        return sum(p.numel() * p.element_size() for p in self.parameters())
