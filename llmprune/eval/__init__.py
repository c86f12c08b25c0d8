"""Evaluation harness: perplexity (paper protocol)."""
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
