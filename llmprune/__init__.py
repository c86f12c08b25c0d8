"""llmprune: post-training pruning for LLMs, from a Hugging Face checkpoint to a sparse one."""
from __future__ import annotations

__version__ = "0.1.0"

from . import eval  # noqa: E402
from .errors import LLMPruneError  # noqa: E402
from .formats import save  # noqa: E402
from .models import load_model as load  # noqa: E402
from .pipeline import prune  # noqa: E402

__all__ = ["LLMPruneError", "eval", "load", "prune", "save", "__version__"]
