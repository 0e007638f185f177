"""Measurements for notebook 07: the cache layouts side by side (memory, speed, agreement with the exact path).

Every function returns a tidy pandas DataFrame (one row per measured thing) with units in the column names:
`_bytes`, `_ms`, `_pct`. Definitions used throughout:

- held_bytes: what the layout holds for the batch at the end of the run. Contiguous and quantized layouts:
  nbytes() (their preallocated tensors); paged: allocated_bytes() (the blocks the sequences hold; the pool
  behind them is shared by all sequences an engine serves, and is reported as pool_bytes).
- used_bytes: the part of held_bytes that stores real tokens; waste_pct = 100 x (1 - used / held).
- ttft_ms: prefill of the prompt plus the choice of the first token; tpot_ms: the median decode step of a run.
  Both are medians over `repeats` runs after `warmup` runs, variants interleaved within every repeat, with the
  spread over repeats as _min / _max columns.
- Error of a lossy layout, against the static cache (exact) on the same prompts:
  max_abs_logit_diff over every step, with teacher forcing (the lossy cache is fed the exact path's tokens, so
  every step compares logits for the same sequence); token_agreement_pct: the share of those steps whose argmax
  is the exact token (agreeing_steps of compared_steps, steps x sequences); tokens_equal: whether free-running
  greedy decoding produced exactly the same tokens; first_divergence_step: the first step where it did not (NA
  when none).
- lossy_tokens / quantized_tokens, of stored_tokens (per sequence, at the end of the run): how many tokens a lossy
  layout actually quantized or evicted. A lossy layout at 0 kept every token exactly in that run (a full-precision
  tail longer than the sequence, a window that never filled): its error and saving then measure nothing about
  what the layout loses, and the notebook says so instead of reporting them as results.
"""

from kvlib.study.strategies.common import (
    Variant,
    bytes_per_token,
    error_vs_exact,
    held_bytes,
    interleaved_runs,
    lossy_tokens,
    teacher_forced_logits,
    timing_summary,
    used_bytes,
)
from kvlib.study.strategies.comparison import (
    best_saving_at_equal_tokens,
    comparison_table,
    default_variants,
    memory_by_length,
    window_memory,
)
from kvlib.study.strategies.gqa import check_kv_heads, default_kv_heads, gqa_reduction
from kvlib.study.strategies.paged import MixedRun, mixed_batch, paged_latency, paged_waste, run_mixed_batch, waste_pct
from kvlib.study.strategies.prefix import prefix_sharing
from kvlib.study.strategies.quantized import default_quantized_variants, quantized_error

__all__ = [
    "MixedRun",
    "Variant",
    "best_saving_at_equal_tokens",
    "bytes_per_token",
    "check_kv_heads",
    "comparison_table",
    "default_kv_heads",
    "default_quantized_variants",
    "default_variants",
    "error_vs_exact",
    "gqa_reduction",
    "held_bytes",
    "interleaved_runs",
    "lossy_tokens",
    "memory_by_length",
    "mixed_batch",
    "paged_latency",
    "paged_waste",
    "prefix_sharing",
    "quantized_error",
    "run_mixed_batch",
    "teacher_forced_logits",
    "timing_summary",
    "used_bytes",
    "waste_pct",
    "window_memory",
]
