"""Hugging Face's QuantizedCache, for comparison with kvlib's quantized layout.

transformers 5 offers three backends: "quanto" (needs the optimum-quanto package; 2 or 4 bits), "hqq" (needs hqq;
1-8 bits), and "fp8" (built in: float8_e4m3fn with one frozen per-tensor scale). A backend that cannot be built
is reported as "unavailable: <why>", never skipped in silence.

The runs here are a plain greedy loop of HF forward calls (prefill, then one token per call), optionally fed fixed
tokens (teacher forcing), so that quantized and full-precision caches are compared on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvlib.models.decode import Clock, Generation

HF_BACKENDS = ("quanto", "hqq", "fp8")


def make_hf_quantized_cache(
    hf_model: Any, backend: str, nbits: int | None = None, residual_len: int | None = None
) -> Any:
    """A transformers QuantizedCache; raises ImportError / ValueError when the backend cannot be built."""
    from transformers.cache_utils import QuantizedCache  # heavy: seconds to import

    options = {} if backend == "fp8" else {"nbits": nbits, "residual_length": residual_len}
    return QuantizedCache(
        backend=backend, config=hf_model.config, **{k: v for k, v in options.items() if v is not None}
    )


def hf_backend_status(hf_model: Any | None, backend: str, nbits: int | None = None) -> str:
    """ "ok", or "unavailable: <one line why>"."""
    if hf_model is None:
        return "unavailable: no Hugging Face model (grouped-query configs have none; load with with_hf=True)"
    try:
        make_hf_quantized_cache(hf_model, backend, nbits)
    except (ImportError, ValueError) as e:
        return f"unavailable: {str(e).splitlines()[0]}"
    return "ok"


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable in `obj` (tensors, tuples, lists, dicts; a tensor subclass such as a quanto
    QTensor counts its inner tensors)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


def hf_cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers cache, quantized states included (its layers' tensors, whatever their layout)."""
    return sum(_tensor_bytes(list(vars(layer).values())) for layer in cache.layers)


def hf_quantized_tokens(cache: Any) -> int:
    """Tokens per sequence a transformers cache holds in quantized form (the fewest over its layers): every token
    seen minus the full-precision residual (`keys`) of a QuantizedLayer; all of them for fp8, which has no residual;
    0 for a cache that does not quantize."""
    counts = []
    for layer in cache.layers:
        if not hasattr(layer, "_quantized_keys"):
            return 0
        residual = getattr(layer, "keys", None)
        in_residual = residual.shape[-2] if isinstance(residual, torch.Tensor) and residual.dim() == 4 else 0
        counts.append(int(layer.cumulative_length) - in_residual)
    return min(counts, default=0)


@torch.inference_mode()
def hf_greedy_loop(
    hf_model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    make_cache: Callable[[], Any],
    forced_tokens: torch.Tensor | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Greedy decoding with a fresh cache from `make_cache`; with `forced_tokens` (B, N) each step is fed the
    given token instead of its own choice (teacher forcing). Timed like kvlib.models.decode.generate."""
    B = input_ids.shape[0]
    clock = Clock(input_ids.device)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=input_ids.device)
    logits_log = (
        torch.empty(max_new_tokens, B, hf_model.config.vocab_size, device=input_ids.device) if keep_logits else None
    )
    t0 = clock.now()  # TTFT includes creating the cache, as in kvlib.models.decode.generate and HF generate
    cache = make_cache()
    logits = hf_model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    out[:, 0] = logits.argmax(-1)
    if logits_log is not None:
        logits_log[0] = logits.float()
    prev = clock.now()
    prefill_s, decode_s = prev - t0, []
    feed = out if forced_tokens is None else forced_tokens
    for i in range(1, max_new_tokens):
        step = hf_model(input_ids=feed[:, i - 1 : i], past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = step.logits[:, -1]
        out[:, i] = logits.argmax(-1)
        if logits_log is not None:
            logits_log[i] = logits.float()
        now = clock.now()
        decode_s.append(now - prev)
        prev = now
    return Generation(out, prefill_s, decode_s, logits_log, cache)  # cache: the transformers cache, for its bytes
