"""Cache layouts beyond the basic two: importing this package registers them by name with `kvlib.caches.base`.

- "paged": a block pool with per-sequence block tables (paged.py); also the storage for prefix sharing (prefix.py)
- "quantized": int8 / int4 keys and values with scales, optional full-precision tail (quantized.py); lossy
- "hybrid": per layer type, a ring of sliding_window slots on sliding layers, static on full ones (hybrid.py);
  exact, for models trained with sliding windows (Gemma 3)
- "window": attention sinks plus a sliding window, bounded memory (window.py); lossy once it slides
- "streaming", "h2o", "tova", "snapkv", "knorm": eviction policies under one token budget (eviction.py); lossy
  once a sequence outgrows the budget
"""

from kvlib.caches import eviction, hybrid, paged, quantized, window

__all__ = ["eviction", "hybrid", "paged", "quantized", "window"]
