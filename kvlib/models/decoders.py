"""The study's from-scratch decoders behind one type: what every decoding path, cache and measurement takes."""

from __future__ import annotations

from kvlib.core.config import ModelConfig
from kvlib.models.gemma3 import Gemma3
from kvlib.models.gpt2 import GPT
from kvlib.models.llama import Llama

Decoder = GPT | Llama | Gemma3  # what every decoding path accepts: forward(input_ids, position_ids, cache, start, ...)
DECODERS = (GPT, Llama, Gemma3)  # for isinstance checks
BUILDERS = {"gpt2": GPT, "llama": Llama, "gemma3": Gemma3}


def build_model(cfg: ModelConfig) -> Decoder:
    """The decoder of `cfg`'s architecture, with PyTorch's default initialisation (see init_random)."""
    return BUILDERS[cfg.arch](cfg)
