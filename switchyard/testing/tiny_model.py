"""Build the tiny random-weight Llama that ``switchyard serve`` runs when no model is given.

Nothing is downloaded: a byte-level BPE tokenizer is trained on a synthetic corpus and a
2-layer Llama (hidden 64, head_dim 32 — the smallest head size the vLLM CPU attention
backend supports) gets random weights with a fixed seed. The result is a real Hugging Face
model directory, so it exercises the same loading, tokenization, chat-template and engine
paths as any model. Its output is gibberish; it is a smoke-test model, and says so.

The directory name includes a hash of the recipe, so a changed recipe never reuses a stale
build, and the build is written to a temporary directory and renamed into place, so two
processes building at once never see half a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from switchyard.cache import cache_dir as switchyard_cache_dir

logger = logging.getLogger(__name__)

__all__ = ["MODEL_SHAPES", "TINY_MODEL_NAME", "build_tiny_model"]

TINY_MODEL_NAME = "switchyard-tiny"

_RECIPE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 2048,
    "seed": 0,
    "version": 2,
}

#: Larger random-weight shapes for benchmarks that need prefill to cost what it costs on a real
#: model (migration vs recompute): only the size fields of ``_RECIPE`` may change.
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {},
    # ~100M parameters, Llama-style (head_dim 128, no GQA): 64 KiB of float32 KV per token.
    "bench-100m": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
    },
}

# A ChatML-style template: simple, and it exercises the gateway's chat-template path.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    """A deterministic synthetic corpus: enough variety for a 512-token BPE vocabulary."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "switchyard",
        "routes",
        "requests",
        "to",
        "engines",
        "with",
        "cache",
        "affinity",
        "and",
        "live",
        "migration",
        "of",
        "running",
        "requests",
        "between",
        "instances",
        "prefill",
        "decode",
        "kubernetes",
        "operator",
        "pools",
        "tokens",
        "blocks",
        "prefix",
        "hash",
        "ring",
        "load",
        "balance",
        "latency",
        "throughput",
        "hello",
        "world",
        "system",
        "user",
        "assistant",
        "question",
        "answer",
        "code",
        "python",
        "function",
        "return",
        "value",
    ]
    lines = []
    for i in range(2000):
        n = 5 + i % 11
        lines.append(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(n)))
        lines.append(f"{i} + {i % 17} = {i + i % 17}.")
    return lines


def _recipe_key(recipe: dict[str, int]) -> str:
    blob = json.dumps({"recipe": recipe, "template": _CHAT_TEMPLATE}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_tiny_model(cache_dir: Path | None = None, *, shape: str = "tiny") -> Path:
    """Return the directory of the tiny model, building it first if needed (a few seconds).

    ``shape`` names an entry of ``MODEL_SHAPES``: the same tokenizer and recipe at another size.
    """
    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {sorted(MODEL_SHAPES)}")
    recipe = {**_RECIPE, **MODEL_SHAPES[shape]}
    root = (cache_dir or switchyard_cache_dir()) / "models"
    target = root / f"{TINY_MODEL_NAME}-{_recipe_key(recipe)}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info("building the tiny random-weight smoke-test model in %s", target)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        staging = Path(tmp) / "model"
        _write_tokenizer(staging)
        _write_weights(staging, recipe)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its build is identical.
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_RECIPE["vocab_size"],
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(out)


def _write_weights(out: Path, recipe: dict[str, int]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(int(recipe["seed"]))
    config = LlamaConfig(
        vocab_size=recipe["vocab_size"],
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_hidden_layers"],
        num_attention_heads=recipe["num_attention_heads"],
        num_key_value_heads=recipe["num_key_value_heads"],
        max_position_embeddings=recipe["max_position_embeddings"],
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
