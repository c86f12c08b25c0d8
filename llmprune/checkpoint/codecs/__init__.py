"""The storage formats a checkpoint's linears can use, by their ``sparsity_config.format`` name.

``base.Codec`` says what a codec does; each format is one file beside it. Dense tensors need no codec.
"""
from __future__ import annotations

from ...errors import LLMPruneError
from .base import Codec, Ranges
from .bitmask import BITMASK
from .int24 import INT24
from .sparse24 import SPARSE24

CODECS: dict[str, Codec] = {codec.format: codec for codec in (SPARSE24, BITMASK, INT24)}


def codec_for(format_name: str) -> Codec:
    """The codec of a ``sparsity_config.format``, with a clear error for an unknown one."""
    if format_name not in CODECS:
        raise LLMPruneError(f"unknown sparse storage format {format_name!r}; use one of {', '.join(CODECS)}")
    return CODECS[format_name]


__all__ = ["CODECS", "Codec", "Ranges", "codec_for"]
