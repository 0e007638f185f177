"""llama.cpp as a peer engine: the same GGUF weights the study dequantizes for kvlib and Hugging Face, run by the
engine people run on their own machines, with its own KV cache types.

llama.cpp reaches Python as `llama-cpp-python` (requirements-llamacpp.txt; `make setup` builds it once per machine
with CPU-native flags). It multiplies with the quantized weights themselves (SmolLM2's Q4_1, Gemma 3's Q4_K_M) and
8-bit activations, where kvlib and Hugging Face run the same weights dequantized to float32: the engines are expected
to agree closely, not exactly (kvlib.study.llamacpp measures how closely).

Its cache types are llama.cpp's `-ctk/-ctv` list (common/arg.cpp `kv_cache_types`): f32, f16, bf16, q8_0 (blocks of
32 values with one f16 scale: 8.5 bits a value), q5_0/q5_1, q4_0/q4_1, iq4_nl. A quantized value cache needs flash
attention (llama.cpp refuses otherwise; `open_engine` says so first). Since April 2026 llama.cpp rotates queries,
keys and values by an orthonormal Walsh-Hadamard matrix when a cache type is quantized and the head size is a
multiple of 64 (src/llama-kv-cache.cpp, `attn_rot_k/v`), the rotation kvlib's quantized layout offers as
`rotate=True`; the environment variable LLAMA_ATTN_ROT_DISABLE=1, read when a context is created, turns it off
(`rotate=False` here).

Every measurement feeds the engine token ids (teacher forcing), so kvlib, Hugging Face and llama.cpp can score the
same ids; `tokenizer(llm)` wraps llama.cpp's own tokenizer in the call convention kvlib's prompt helpers use.

Errors a user can fix are one line (KvlibError): llama.cpp missing from the environment, an unknown cache type, a
quantized value cache without flash attention, a GGUF llama.cpp cannot read, a batch it cannot hold.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from kvlib.core.config import PRESETS
from kvlib.core.errors import KvlibError
from kvlib.models.gguf_cache import find_gguf

PIN = "llama-cpp-python==0.3.36"  # requirements-llamacpp.txt
# llama.cpp's KV cache types (common/arg.cpp kv_cache_types), in its order; f16 is its default and the reference
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
REFERENCE = "f16"
ROTATION_ENV = "LLAMA_ATTN_ROT_DISABLE"
UBATCH = 512  # tokens llama.cpp evaluates at once (n_batch and n_ubatch here, llama.cpp's default)
ROTATION_HEAD_MULTIPLE = 64  # llama.cpp rotates a quantized cache only when the head size is a multiple of 64


def binding() -> Any:
    """The `llama_cpp` module; KvlibError (one line) when this environment lacks it."""
    try:
        import llama_cpp  # here, not at the top: an optional build (make setup); without it, one line, not a crash
    except ImportError as e:
        raise KvlibError(
            f"llama.cpp is not installed in this environment ({PIN}: {e}); `make setup` builds it"
        ) from None
    return llama_cpp


def available() -> bool:
    """Whether llama.cpp can be imported here (the tests and notebooks that need it skip without it)."""
    try:
        binding()
    except KvlibError:
        return False
    return True


def check_cache_type(name: str) -> str:
    """`name` when it is one of llama.cpp's cache types, else KvlibError naming them."""
    if name not in CACHE_TYPES:
        raise KvlibError(f"unknown llama.cpp cache type {name!r}; choose one of {', '.join(CACHE_TYPES)}")
    return name


def is_quantized(name: str) -> bool:
    """Whether cache type `name` is a block-quantized type (not f32, f16 or bf16)."""
    return check_cache_type(name) not in ("f32", "f16", "bf16")


def ggml_type(name: str) -> int:
    """ggml's type id of cache type `name` (ggml's stable numbering, from the gguf package's enum)."""
    return int(gguf.GGMLQuantizationType[check_cache_type(name).upper()])


def element_bytes(name: str) -> float:
    """Bytes one cached value takes in type `name`: a block's bytes / its values (gguf.GGML_QUANT_SIZES), e.g.
    q8_0 34/32 = 1.0625, q4_0 18/32 = 0.5625, f16 2."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[check_cache_type(name).upper()]]
    return size / block


def check_types(type_k: str, type_v: str, flash_attn: bool) -> None:
    """Both types known, and a quantized value cache only with flash attention (llama.cpp's own rule)."""
    check_cache_type(type_k)
    check_cache_type(type_v)
    if is_quantized(type_v) and not flash_attn:
        raise KvlibError(f"llama.cpp needs flash attention for a quantized value cache (--cache-type-v {type_v})")


def block_values(name: str) -> int:
    """Values per quantization block of cache type `name` (32 for q8_0 and q4_0; 1 for f16)."""
    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[check_cache_type(name).upper()]][0])


def check_head(shape: GGUFShape, type_k: str, type_v: str, flash_attn: bool, model: str = "the model") -> None:
    """With flash attention llama.cpp reads the cache one head at a time, so a quantized type needs heads that are a
    whole number of its blocks (32 values for q8_0/q4_0); it fails to create the context otherwise (tiny-llama's
    16-value heads). KvlibError saying so, before llama.cpp is asked."""
    if not flash_attn:
        return
    for t, dim in ((type_k, shape.head_dim_k), (type_v, shape.head_dim_v)):
        if dim % block_values(t):
            raise KvlibError(
                f"llama.cpp's {t} cache with flash attention needs heads of a multiple of {block_values(t)} values; "
                f"{model}'s have {dim}"
            )


# ---- the GGUF ----------------------------------------------------------------------------------------------------


def gguf_file(model: str) -> Path:
    """The GGUF file llama.cpp runs for `model`: a preset with GGUF weights (smollm2-135m, gemma3-270m: the file its
    package ships) or a path to a .gguf file. KvlibError otherwise."""
    if model in PRESETS:
        cfg = PRESETS[model]
        if not cfg.gguf_requirement:
            with_gguf = ", ".join(n for n, c in PRESETS.items() if c.gguf_requirement)
            raise KvlibError(f"{model} has no GGUF weights for llama.cpp; choose {with_gguf} or a .gguf file")
        return find_gguf(cfg)
    path = Path(model)
    if not path.is_file():
        raise KvlibError(f"unknown model {model!r} for llama.cpp: neither a preset with GGUF weights nor a .gguf file")
    return path


@dataclass(frozen=True)
class GGUFShape:
    """What the GGUF says of the model, read with the gguf package (no llama.cpp needed)."""

    architecture: str
    n_layer: int
    n_kv_head: int
    head_dim_k: int
    head_dim_v: int
    sliding_window: int | None  # tokens a sliding-window layer attends to (Gemma 3), None without
    sliding_layers: int  # how many layers use the window
    context_length: int
    weight_bytes: int  # every tensor's bytes as stored (quantized), llama.cpp's llama_model_size
    # what a decode step reads of the weights, counted as every tensor: exact for tied embeddings (SmolLM2, Gemma 3:
    # the output head reads the whole table); an untied model's step reads one row of its input embedding
    step_weight_bytes: int
    file_type: str  # the weights' quantization, e.g. "Q4_1"


def read_shape(path: Path) -> GGUFShape:
    """The model's shape and weight bytes from the GGUF's metadata, read by llama.cpp itself with only the vocabulary
    loaded (0.1-0.8 s; the gguf package's reader takes 5-22 s on these files, parsing every token). Read once per
    file (its size and modification time). KvlibError when llama.cpp cannot read the file."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise KvlibError(f"cannot read {path} as a GGUF file ({e.strerror or e})") from None
    return _read_shape(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_shape(path: Path, size: int, mtime_ns: int) -> GGUFShape:
    llama_cpp = binding()
    from llama_cpp import _internals  # the binding's model wrapper: the model alone, no context to create

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except (ValueError, RuntimeError, OSError) as e:
        raise KvlibError(f"cannot read {path} as a GGUF file (llama.cpp: {str(e).splitlines()[0][:120]})") from None
    try:
        md = model.metadata()
        total = int(llama_cpp.llama_model_size(model.model))
    finally:
        model.close()
    arch = md.get("general.architecture", "")

    def num(key: str, default: int = 0) -> int:
        value = md.get(f"{arch}.{key}")
        return int(float(value)) if value not in (None, "") else default

    n_layer, n_head, n_embd = num("block_count"), num("attention.head_count"), num("embedding_length")
    head_k = num("attention.key_length", n_embd // max(n_head, 1))
    window = num("sliding_window") or num("attention.sliding_window") or None
    # llama.cpp's Gemma 3: every 6th layer global, the others sliding (the GGUF names no pattern)
    sliding = (n_layer - n_layer // 6 if arch.startswith("gemma3") else n_layer) if window else 0
    try:
        ftype = gguf.LlamaFileType(int(md.get("general.file_type", -1))).name.removeprefix("MOSTLY_")
    except ValueError:
        ftype = str(md.get("general.file_type", "?"))
    return GGUFShape(
        arch, n_layer, num("attention.head_count_kv", n_head), head_k, num("attention.value_length", head_k),
        window, sliding, num("context_length"), total, total, ftype,
    )  # fmt: skip


def swa_cells(shape: GGUFShape, n_ubatch: int = UBATCH) -> int | None:
    """Cells a sliding-window layer's cache holds when llama.cpp keeps only the window (swa_full off, its command
    line's default): the window plus one micro-batch, rounded up to 256 (src/llama-kv-cache-iswa.cpp); None without
    sliding layers."""
    if not shape.sliding_window:
        return None
    return -(-(shape.sliding_window + n_ubatch) // 256) * 256


def kv_cache_bytes(
    shape: GGUFShape, tokens: int, type_k: str, type_v: str, read: bool = False, sliding_cells: int | None = None
) -> int:
    """Bytes of keys and values for `tokens` positions of one sequence in types `type_k`/`type_v`:
    n_layer x n_kv_head x (head_dim_k x bytes(type_k) + head_dim_v x bytes(type_v)) per position (`element_bytes`).
    A sliding-window layer holds at most `sliding_cells` positions (`swa_cells`; None: every position, llama.cpp's
    swa_full); `read=True`: what one decode step reads, a sliding-window layer at most its window."""
    per_layer_token = shape.n_kv_head * (
        shape.head_dim_k * element_bytes(type_k) + shape.head_dim_v * element_bytes(type_v)
    )
    full = shape.n_layer - shape.sliding_layers
    limit = shape.sliding_window if read else sliding_cells
    sliding_tokens = min(tokens, limit) if (shape.sliding_window and limit) else tokens
    return round(per_layer_token * (full * tokens + shape.sliding_layers * sliding_tokens))


# ---- the engine --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _rotation(rotate: bool) -> Iterator[None]:
    """LLAMA_ATTN_ROT_DISABLE set for the context being created (llama.cpp reads it then), restored after."""
    before = os.environ.get(ROTATION_ENV)
    os.environ[ROTATION_ENV] = "0" if rotate else "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ROTATION_ENV]
        else:
            os.environ[ROTATION_ENV] = before


@dataclass
class Engine:
    """One llama.cpp context on one GGUF: its cache types, flash attention and rotation fixed at creation."""

    llm: Any  # llama_cpp.Llama
    path: Path
    shape: GGUFShape
    type_k: str
    type_v: str
    flash_attn: bool
    rotate: bool  # asked for; llama.cpp applies it only to a quantized type with head size a multiple of 64
    n_ctx: int
    threads: int
    logits_all: bool

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    def cache_bytes(self, tokens: int | None = None) -> int:
        """Bytes the cache holds for `tokens` positions (default: the whole context it was created with), a
        sliding-window layer its window and one micro-batch (`swa_cells`)."""
        n = self.n_ctx if tokens is None else tokens
        cells = swa_cells(self.shape, min(UBATCH, self.n_ctx))
        return kv_cache_bytes(self.shape, n, self.type_k, self.type_v, sliding_cells=cells)

    def read_bytes(self, tokens: int) -> int:
        """Bytes of keys and values one decode step reads with `tokens` positions cached (a sliding-window layer
        its window)."""
        return kv_cache_bytes(self.shape, tokens, self.type_k, self.type_v, read=True)

    def reset(self) -> None:
        """An empty cache: the next `eval` starts at position 0."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def _check_fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise KvlibError(f"{n} tokens do not fit the llama.cpp context of {self.n_ctx}")

    def logprobs(self, ids: Sequence[int]) -> tuple[torch.Tensor, float]:
        """(log p(. | ids[:i+1]) for i = 0 .. N-2, (N - 1, V) float32 on the host; seconds taken): teacher forcing
        of `ids` through a fresh cache, every position's logits (needs logits_all=True)."""
        if not self.logits_all:
            raise KvlibError("this llama.cpp engine was opened without logits_all; it keeps only the last logits")
        ids = [int(i) for i in ids]
        self._check_fits(len(ids))
        self.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        seconds = time.perf_counter() - t0
        logits = torch.from_numpy(np.array(self.llm.scores[: len(ids) - 1], dtype=np.float32, copy=True))
        return torch.log_softmax(logits, dim=-1), seconds

    def next_token(self) -> int:
        """The greedy choice after the last token evaluated: the argmax of its logits, read in place (no copy of
        the vocabulary's floats inside a timed step)."""
        ptr = self.llm._ctx.get_logits_ith(-1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> tuple[list[int], float, list[float]]:
        """Greedy decoding of one sequence: (the new tokens, seconds to the first token: prefill and argmax, seconds
        of each of the max_new_tokens - 1 decode steps: one token's evaluation and argmax)."""
        ids = [int(i) for i in ids]
        self._check_fits(len(ids) + max_new_tokens)
        self.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        tok = self.next_token()
        prefill = time.perf_counter() - t0
        tokens, steps = [tok], []
        for _ in range(max_new_tokens - 1):
            t0 = time.perf_counter()
            self.llm.eval([tok])
            tok = self.next_token()
            steps.append(time.perf_counter() - t0)
            tokens.append(tok)
        return tokens, prefill, steps

    def close(self) -> None:
        """Free the context and the model now (rather than at garbage collection)."""
        with contextlib.suppress(Exception):
            self.llm.close()


def open_engine(
    model: str | Path,
    n_ctx: int,
    type_k: str = REFERENCE,
    type_v: str = REFERENCE,
    flash_attn: bool = True,
    rotate: bool = True,
    logits_all: bool = False,
    threads: int | None = None,
) -> Engine:
    """A llama.cpp context on `model` (a preset with GGUF weights or a .gguf path) holding `n_ctx` positions in
    cache types `type_k`/`type_v`, with `threads` threads (default: torch's, as kvlib runs) for decoding and
    prefill. `logits_all` keeps every position's logits (for `Engine.logprobs`; n_ctx x vocabulary floats).
    KvlibError (one line) for llama.cpp missing, an unknown type, a quantized value cache without flash attention,
    a context of fewer than 2 positions, or a file llama.cpp cannot read."""
    llama_cpp = binding()
    check_types(type_k, type_v, flash_attn)
    if not isinstance(n_ctx, int) or n_ctx < 2:
        raise KvlibError(f"a llama.cpp context needs at least 2 positions, got {n_ctx!r}")
    path = gguf_file(str(model))
    shape = read_shape(path)
    check_head(shape, type_k, type_v, flash_attn, path.name)
    if shape.context_length and n_ctx > shape.context_length:
        raise KvlibError(f"{n_ctx} positions exceed {path.name}'s trained context of {shape.context_length}")
    threads = threads or torch.get_num_threads()
    try:
        with _rotation(rotate):
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(UBATCH, n_ctx),
                n_ubatch=min(UBATCH, n_ctx),
                swa_full=False,  # a sliding-window layer keeps its window (llama.cpp's command-line default)
                n_threads=threads,
                n_threads_batch=threads,
                type_k=ggml_type(type_k),
                type_v=ggml_type(type_v),
                flash_attn=flash_attn,
                logits_all=logits_all,
                verbose=False,
            )
    except (ValueError, RuntimeError, OSError) as e:
        raise KvlibError(f"llama.cpp cannot load {path}: {str(e).splitlines()[0][:160] if str(e) else e!r}") from None
    return Engine(llm, path, shape, type_k, type_v, flash_attn, rotate, n_ctx, threads, logits_all)


# ---- a GGUF of a random-weight model ------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half layout of a Q or K projection -> llama.cpp's interleaved one (its converter's
    LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(hf: Any, path: str | Path) -> Path:
    """Write `hf` (a transformers LlamaForCausalLM) to `path` as a float32 GGUF of architecture llama, the way
    llama.cpp's converter does (Q and K rows permuted to its interleaved rotary layout), with a byte-level
    SentencePiece vocabulary of the model's size (tokens "<0xNN>" and placeholders: for token ids, not for text).
    For random-weight models (the smoke profile, tests); returns `path`."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("kvlib tiny-llama (random weights)")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = c.vocab_size
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


class Tokenizer:
    """llama.cpp's tokenizer in the call convention of kvlib's prompt helpers (`tok(text, add_special_tokens=...)
    ["input_ids"]`): add_special_tokens adds what the GGUF says a text starts with (Gemma's <bos>)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.engine.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)}


def build_info() -> str:
    """Which llama.cpp ran: the binding's version and llama.cpp's CPU features as compiled (e.g. "AVX2 = 1")."""
    llama_cpp = binding()
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return f"llama-cpp-python {llama_cpp.__version__} ({info})"


def mean_nll(logprobs: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """-log p(ids[i] | ids[:i]) for i = 1 .. N-1 (float64) from `Engine.logprobs`'s (N - 1, V) table."""
    target = torch.as_tensor([int(i) for i in ids[1:]], dtype=torch.long)
    if logprobs.shape[0] != target.numel():
        raise KvlibError(f"{logprobs.shape[0]} log-probability rows for {target.numel()} scored tokens")
    return -logprobs.gather(1, target[:, None])[:, 0].double()
