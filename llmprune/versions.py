"""What this installation runs on: package versions and which optional kernels can run here.

``llmprune --version`` prints :func:`describe`; bug reports and benchmark notes (eval/RESULTS.md) quote
it, because a result depends on the torch build, the CUDA runtime and whether the numba/triton
kernels are usable, not only on llmprune's own version.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Distribution names (as pip knows them) reported with their versions, in display order.
PACKAGES = ("torch", "transformers", "lm-eval", "numba", "triton")


def _installed(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _importable(module: str) -> str | None:
    """Why ``module`` cannot be imported here (None when it can): an installed package can still fail to
    import, e.g. a numba built against another numpy."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import-time failure means "not usable", whatever its type
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def versions() -> dict[str, Any]:
    """Versions and capabilities, as plain JSON-ready values.

    Keys: ``llmprune`` (version), ``llmprune_path`` (where it is imported from: a checkout or site-packages),
    ``python``, ``platform``, one key per entry of :data:`PACKAGES` (version or None when not installed),
    ``cuda`` (``{"available", "torch_cuda", "devices", "cusparselt"}``), ``numba`` and ``triton`` usability
    (``{"usable": bool, "reason": str | None}``, under ``numba_kernel`` / ``triton_kernel``).
    """
    import torch

    import llmprune

    info: dict[str, Any] = {
        "llmprune": llmprune.__version__,
        "llmprune_path": str(Path(llmprune.__file__).resolve().parent),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
    }
    for distribution in PACKAGES:
        info[distribution] = _installed(distribution)
    info["torch"] = torch.__version__  # the build tag (+cpu, +cu130) is what matters; metadata may lack it

    cuda_available = torch.cuda.is_available()
    cusparselt = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)()
    info["cuda"] = {
        "available": cuda_available,
        "torch_cuda": torch.version.cuda,  # None for a CPU build of torch
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_available else [],
        "cusparselt": bool(cusparselt),
    }

    numba_reason = "numba is not installed (pip install numba, or llmprune[kernels])" if info["numba"] is None \
        else _importable("numba")
    info["numba_kernel"] = {"usable": numba_reason is None, "reason": numba_reason}

    triton_reason = "triton is not installed (pip install triton, or llmprune[kernels])" if info["triton"] is None \
        else _importable("triton")
    if triton_reason is None and not cuda_available and os.environ.get("TRITON_INTERPRET") != "1":
        triton_reason = "no CUDA device (on CPU it runs only under TRITON_INTERPRET=1, for tests)"
    info["triton_kernel"] = {"usable": triton_reason is None, "reason": triton_reason}
    return info


def describe(info: dict[str, Any] | None = None) -> str:
    """Lines for the terminal, one per item of :func:`versions`."""
    info = info if info is not None else versions()
    lines = [f"llmprune {info['llmprune']} ({info['llmprune_path']})",
             f"python {info['python']}, {info['platform']}"]
    lm_eval = info["lm-eval"] or 'not installed (--tasks needs it: pip install "llmprune[eval]")'
    lines += [f"torch {info['torch']}", f"transformers {info['transformers']}", f"lm-eval {lm_eval}"]
    for kernel, what in (("numba", "CPU 2:4 kernel"), ("triton", "CUDA 2:4 decode kernel")):
        state = info[f"{kernel}_kernel"]
        installed = info[kernel] or "not installed"
        usable = "usable" if state["usable"] else f"not usable: {state['reason']}"
        lines.append(f"{kernel} {installed} ({what}): {usable}")
    cuda = info["cuda"]
    if cuda["available"]:
        devices = ", ".join(cuda["devices"])
        lines.append(f"CUDA {cuda['torch_cuda']}: usable on {devices}; cuSPARSELt "
                     f"{'available' if cuda['cusparselt'] else 'not available (2:4 runs on CUTLASS)'}")
    elif cuda["torch_cuda"] is None:
        lines.append(f"CUDA: not usable: torch {info['torch']} is a CPU build")
    else:
        lines.append(f"CUDA {cuda['torch_cuda']}: not usable: no CUDA device visible")
    return "\n".join(lines)


class VersionAction(argparse.Action):
    """``--version`` that prints :func:`describe` and exits, computed only when asked for (it imports
    torch, numba and triton, which every other command would pay for at parse time otherwise)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(describe())
        parser.exit()
