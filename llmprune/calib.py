"""Calibration data: a spec (wikitext2, c4, a local file) → ``LongTensor[nsamples, seqlen]``.

Windows are drawn the way SparseGPT and Wanda draw them: the corpus is tokenized once as one
stream and each sample is a window starting at ``random.randint(0, ntokens - seqlen - 1)``
from a ``random.Random(seed)``, so a given seed reproduces the same set.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .errors import LLMPruneError
from .resources import shared_file

WIKITEXT2_VALID = ("data", "wikitext-2", "wiki.valid.tokens")
WIKITEXT2_TEST = ("data", "wikitext-2", "wikitext-2-raw-v1.test.json")
TEXT_FIELDS = ("text", "content", "document")


def _records_text(records: list, source: str) -> list[str]:
    """Strings from a list of strings or of dicts with a text field."""
    texts = []
    for record in records:
        if isinstance(record, str):
            texts.append(record)
            continue
        if isinstance(record, dict):
            field = next((f for f in TEXT_FIELDS if isinstance(record.get(f), str)), None)
            if field:
                texts.append(record[field])
                continue
        raise LLMPruneError(f"{source}: each record must be a string or have a 'text' field; got {str(record)[:80]}")
    return texts


def read_text_file(path: Path) -> str:
    """The text of a local .txt/.tokens, .json, .jsonl or .parquet corpus, documents joined by blank lines."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".tokens", ".raw", ".md"):
            return path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return "\n\n".join(_records_text([json.loads(line) for line in lines], str(path)))
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("text"), list):
                data = data["text"]
            if not isinstance(data, list):
                raise LLMPruneError(f"{path}: expected a JSON list of strings or records")
            return "\n\n".join(_records_text(data, str(path)))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            field = next((f for f in TEXT_FIELDS if f in table.column_names), None)
            if field is None:
                raise LLMPruneError(f"{path}: no text column (looked for {', '.join(TEXT_FIELDS)})")
            return "\n\n".join(str(t) for t in table.column(field).to_pylist())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LLMPruneError(f"cannot read calibration file {path}: {exc}") from exc
    raise LLMPruneError(f"unsupported calibration file type {suffix!r} ({path}); use .txt, .json, .jsonl or .parquet")


def _hub_text(name: str, config: str | None, split: str, field: str = "text", **kwargs) -> str:
    try:
        from datasets import load_dataset

        rows = load_dataset(name, config, split=split, **kwargs)
    except Exception as exc:  # datasets raises many types when offline
        raise LLMPruneError(
            f"cannot fetch {name} from the Hugging Face Hub ({type(exc).__name__}); offline, use 'wikitext2' "
            f"with the shared data present, or a local .txt/.jsonl/.json/.parquet file"
        ) from exc
    return "\n\n".join(rows[field])


# Named texts per purpose: a file under the shared folder when present, else load_dataset(name, config, split, **kw).
# Calibration falls back to WikiText-2 *train* (the papers' choice); offline it reads the validation split.
NAMED_TEXTS: dict[str, dict[str, tuple[tuple[str, ...] | None, tuple]]] = {
    "calibration": {
        "wikitext2": (WIKITEXT2_VALID, ("wikitext", "wikitext-2-raw-v1", "train", {})),
        "c4": (None, ("allenai/c4", None, "train", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}})),
    },
    "evaluation": {
        "wikitext2": (WIKITEXT2_TEST, ("wikitext", "wikitext-2-raw-v1", "test", {})),
        "c4": (None, ("allenai/c4", None, "validation",
                      {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}})),
    },
}


def named_text(spec: str, purpose: str = "calibration") -> tuple[str, str]:
    """(text, provenance) for ``wikitext2``, ``c4`` or a local file, for calibration or evaluation."""
    if spec in NAMED_TEXTS[purpose]:
        local_parts, (name, config, split, kwargs) = NAMED_TEXTS[purpose][spec]
        local = shared_file(*local_parts) if local_parts else None
        if local:
            return read_text_file(local), str(local)
        return _hub_text(name, config, split, **kwargs), f"{name} {config or ''} {split} (Hub)"
    path = Path(spec).expanduser()
    if path.exists():
        return read_text_file(path), str(path)
    raise LLMPruneError(f"unknown {purpose} text {spec!r}: use wikitext2, c4, or a path to a local text file")


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """Draw ``nsamples`` windows of ``seqlen`` tokens from a 1-D token stream."""
    if nsamples < 1 or seqlen < 2:
        raise LLMPruneError(f"need nsamples >= 1 and seqlen >= 2; got {nsamples} x {seqlen}")
    if ids.numel() <= seqlen:
        raise LLMPruneError(
            f"calibration corpus {source} has {ids.numel()} tokens; windows of seqlen={seqlen} need more than that. "
            f"Use a larger corpus or a smaller --seqlen."
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def tokens(spec: str, tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """Calibration token blocks ``LongTensor[nsamples, seqlen]`` for a spec."""
    text, source = named_text(spec, "calibration")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return sample_windows(ids, nsamples, seqlen, seed, source)
