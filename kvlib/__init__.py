"""kvlib: a from-scratch GPT-2, its KV-cache layouts, decoding paths and measurements (see README.md)."""

import kvlib.layouts  # noqa: F401  (registers the paged, quantized and window cache layouts by name)
