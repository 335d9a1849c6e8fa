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

logger = logging.getLogger(__name__)

__all__ = ["TINY_MODEL_NAME", "build_tiny_model", "default_cache_dir"]

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

# A ChatML-style template: simple, and it exercises the gateway's chat-template path.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def default_cache_dir() -> Path:
    """Where built models live: ``$SWITCHYARD_CACHE_DIR`` or ``~/.cache/switchyard``."""
    root = os.environ.get("SWITCHYARD_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "switchyard"


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


def _recipe_key() -> str:
    blob = json.dumps({"recipe": _RECIPE, "template": _CHAT_TEMPLATE}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the directory of the tiny model, building it first if needed (a few seconds)."""
    root = (cache_dir or default_cache_dir()) / "models"
    target = root / f"{TINY_MODEL_NAME}-{_recipe_key()}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info("building the tiny random-weight smoke-test model in %s", target)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        staging = Path(tmp) / "model"
        _write_tokenizer(staging)
        _write_weights(staging)
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


def _write_weights(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(int(_RECIPE["seed"]))
    config = LlamaConfig(
        vocab_size=_RECIPE["vocab_size"],
        hidden_size=_RECIPE["hidden_size"],
        intermediate_size=_RECIPE["intermediate_size"],
        num_hidden_layers=_RECIPE["num_hidden_layers"],
        num_attention_heads=_RECIPE["num_attention_heads"],
        num_key_value_heads=_RECIPE["num_key_value_heads"],
        max_position_embeddings=_RECIPE["max_position_embeddings"],
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
