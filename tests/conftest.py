"""Shared fixtures: tiny random models of each supported family, a word-level tokenizer, shared data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from llmprune.resources import shared_dir

VOCAB = 128
SHARED = shared_dir()
STORIES = SHARED / "models" / "stories260K"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct-q4_1"

needs_stories = pytest.mark.skipif(not STORIES.exists(), reason=f"real model stories260K not found at {STORIES} (set LLMPRUNE_SHARED)")
needs_wikitext = pytest.mark.skipif(not (SHARED / "data" / "wikitext-2").exists(),
                                    reason=f"WikiText-2 data not found under {SHARED} (set LLMPRUNE_SHARED)")

# Small but structurally faithful configs: hidden 32, 2-3 layers, GQA where the family has it.
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TINY_CONFIGS: dict[str, dict] = {
    "llama": _COMMON,
    "mistral": {**_COMMON, "sliding_window": 8},
    "qwen2": _COMMON,
    "qwen3": {**_COMMON, "head_dim": 8},
    "gemma": {**_COMMON, "head_dim": 8},
    "gemma2": {**_COMMON, "head_dim": 8, "sliding_window": 4},
    "gemma3_text": {**_COMMON, "head_dim": 8, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "phi3": {**_COMMON, "pad_token_id": 0},
    "opt": dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=64),
}


def tiny_model(model_type: str = "llama", attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-weight causal LM of ``model_type`` (no download)."""
    settings = {**TINY_CONFIGS[model_type], "bos_token_id": 1, "eos_token_id": 2, **overrides}
    config = transformers.CONFIG_MAPPING[model_type](**settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


def word_tokenizer(vocab_size: int = VOCAB):
    """A whitespace word-level fast tokenizer over a fixed vocabulary of common words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def word_text(ntokens: int, seed: int = 0) -> str:
    """Random text in the word tokenizer's vocabulary with some repeated structure to learn from."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (ntokens,), generator=gen)
    return " ".join(f"w{i - 3}" for i in ids.tolist())


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A saved tiny Llama with a tokenizer: what a user's local checkpoint directory looks like."""
    directory = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def calib_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(word_text(4000))
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
