"""llmprune: post-training pruning for LLMs, from a Hugging Face checkpoint to a sparse one."""
from __future__ import annotations

from ._version import __version__  # noqa: E402
from . import eval  # noqa: E402
from .checkpoint import save  # noqa: E402
from .errors import LLMPruneError  # noqa: E402
from .loading import load  # noqa: E402
from .pipeline import prune  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .report import PruneReport  # noqa: E402
from .state import state  # noqa: E402
from . import hf_integration  # noqa: E402,F401  (plain from_pretrained loads our checkpoints right)

__all__ = ["LLMPruneError", "PruneReport", "Recipe", "eval", "load", "prune", "save", "state", "__version__"]
