"""Cache layouts beyond the basic two: importing this package registers them by name with `kvlib.caches.base`.

- "paged": a block pool with per-sequence block tables (paged.py); also the storage for prefix sharing (prefix.py)
- "quantized": int8 / int4 keys and values with scales, optional full-precision tail (quantized.py); lossy
- "window": attention sinks plus a sliding window, bounded memory (window.py); lossy once it slides
"""

from kvlib.caches import paged, quantized, window

__all__ = ["paged", "quantized", "window"]
