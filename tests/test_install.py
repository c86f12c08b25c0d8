"""A plain (non-editable) install works away from the checkout: build the wheel, install it into a fresh
virtual environment, and run ``llmprune prune``, ``eval --tasks`` and ``info`` from a temporary directory.

Everything a command reads must ship in the wheel (the lm-eval task configs are package data); before
they did, ``llmprune eval --tasks piqa`` from an installed wheel stopped with "task config folder ...
does not exist". The fresh environment reuses this environment's dependencies (torch, transformers,
lm-eval, ...) through a ``.pth`` file naming a folder of links to them, llmprune itself left out, so
pip installs only the wheel, offline, in seconds, and still checks that the wheel's declared
dependencies are satisfied.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from conftest import SHARED, STORIES, needs_stories, needs_wikitext

from llmprune.resources import REPO_ROOT

TASK_DATA = SHARED / "data" / "tasks"
pytestmark = [
    pytest.mark.slow, needs_stories, needs_wikitext,
    pytest.mark.skipif(not (TASK_DATA / "piqa.validation.jsonl").is_file(),
                       reason=f"task data not found at {TASK_DATA} (set LLMPRUNE_SHARED)"),
]
# What the wheel is built from: the package and the files pyproject.toml names.
SOURCES = ("pyproject.toml", "README.md", "llmprune")
TASK_CONFIGS = sorted(p.name for p in (REPO_ROOT / "llmprune" / "eval" / "tasks").glob("*.yaml"))


def _setuptools_builds_here() -> bool:
    """pyproject.toml's build backend (setuptools>=77, for the SPDX license field) is importable here:
    the wheel is built offline, without pip's isolated build environment."""
    try:
        return int(version("setuptools").split(".")[0]) >= 77
    except (PackageNotFoundError, ValueError):
        return False


def _run(command: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    proc = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, (f"{' '.join(map(str, command))} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a clean copy of the sources (no build/ or egg-info left in the checkout)."""
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nb[ic]"))
        else:
            shutil.copy(path, source / name)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", dist, source], cwd=tmp, env=dict(os.environ))
    wheels = list(dist.glob("llmprune-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _dependency_view(tmp: Path) -> Path:
    """A folder of links to this environment's installed packages, llmprune's own entries left out (an
    editable install's finder and metadata would point back at the checkout)."""
    view = tmp / "deps"
    view.mkdir()
    folders = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()])
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            name = entry.name.lower()
            if name.startswith(("llmprune", "__editable__")) or name.endswith(".pth") or (view / entry.name).exists():
                continue
            (view / entry.name).symlink_to(entry)
    return view


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed; its dependencies resolve through the view."""
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True, timeout=60)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(purelib, "deps-of-the-test-env.pth").write_text(f"{_dependency_view(tmp)}\n")
    # pip (run from here, installing into the fresh environment) resolves the wheel's dependencies
    # offline against what that environment sees: a missing one fails the install.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index", "--no-compile", wheel],
         cwd=tmp, env=dict(os.environ))
    return env_dir


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    if not _setuptools_builds_here():
        pytest.skip("setuptools>=77 is not installed in this environment; the offline wheel build needs it "
                    "(pip install 'setuptools>=77')")
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    assert TASK_CONFIGS and {f"llmprune/eval/tasks/{name}" for name in [*TASK_CONFIGS, "utils.py"]} <= shipped

    env_dir = _fresh_venv(tmp_path, wheel)
    llmprune_cli = env_dir / "bin" / "llmprune"
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(LLMPRUNE_SHARED=str(SHARED.resolve()), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")

    # The commands below import llmprune from the fresh environment, not from this checkout.
    where = "import importlib.util; print(importlib.util.find_spec('llmprune').origin)"
    origin = _run([env_dir / "bin" / "python", "-c", where], work, env).strip()
    assert Path(origin).is_relative_to(env_dir) and not Path(origin).is_relative_to(REPO_ROOT), origin

    _run([llmprune_cli, "prune", STORIES, "--method", "wanda", "--pattern", "2:4", "--nsamples", "4",
          "--seqlen", "128", "--out", "pruned", "--quiet"], work, env)
    assert (work / "pruned" / "llmprune.json").is_file()

    _run([llmprune_cli, "eval", "pruned", "--tasks", "piqa", "--limit", "5", "--json", "piqa.json", "--quiet"],
         work, env)
    piqa = json.loads((work / "piqa.json").read_text())["tasks"]["piqa"]
    assert piqa["samples"] == 5 and 0 <= piqa["acc"] <= 1 and 0 <= piqa["acc_norm"] <= 1

    info = _run([llmprune_cli, "info", "pruned"], work, env)
    assert "wanda" in info and "2:4" in info
    assert sorted(p.name for p in work.iterdir()) == ["piqa.json", "pruned"]  # nothing else written to the cwd
