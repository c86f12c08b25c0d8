"""Custom kernels (optional dependencies, imported lazily)."""
