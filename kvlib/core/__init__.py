"""The bottom layer: what every other part of kvlib may use and which uses none of them.

- config.py: a model's architecture (ModelConfig, the presets) and the KV-cache bytes it implies
- errors.py: KvlibError, the one-line user error every command prints
- checks.py: argument checks that raise those errors
- stats.py: the study's one rule for "different" (intervals of repeats, Wilson intervals, rank correlation)
- hardware.py: what this CPU computes natively (the dtypes it has instructions for)
- rope.py: rotary position embeddings (RoPE), shared by the Llama and Gemma decoders and the window cache
"""
