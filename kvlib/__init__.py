"""kvlib: from-scratch GPT-2 and Llama decoders, their KV-cache layouts, decoding paths and measurements.

The folders name the parts (README "Layout of the repository"): models/, caches/, measure/, study/, report/.
"""

import kvlib.caches  # noqa: F401  (registers the paged, quantized and window cache layouts by name)
