"""Custom kernels (optional dependencies, imported lazily)."""

# How a packed 2:4 layer computes (see ``sparse_linear.SparseLinear``); here so the CLI lists them without torch.
BACKENDS = ("dense", "semi-structured", "triton", "numba", "auto")
