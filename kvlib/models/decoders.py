"""The study's two from-scratch decoders behind one type: what every decoding path, cache and measurement takes."""

from __future__ import annotations

from kvlib.models.config import ModelConfig
from kvlib.models.gpt2 import GPT
from kvlib.models.llama import Llama

Decoder = GPT | Llama  # what every decoding path accepts: forward(input_ids, position_ids, cache, start, ...)
DECODERS = (GPT, Llama)  # for isinstance checks


def build_model(cfg: ModelConfig) -> Decoder:
    """The decoder of `cfg`'s architecture, with PyTorch's default initialisation (see init_random)."""
    return Llama(cfg) if cfg.arch == "llama" else GPT(cfg)
