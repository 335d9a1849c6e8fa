"""``TokenizerAdapter``'s defences against huge prompts: the length bound and GIL-free encoding.

The bound (``chars_per_token_bound``) must never reject a prompt that fits, so it is checked
against adversarial text (runs of the longest tokens, combining marks, special tokens) and
withheld for pipelines that can lose characters. Encoding a long prompt must not stall the
event loop: measured with a ticker task while a 1 MB prompt is tokenized.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from switchyard.errors import ContextLengthError
from switchyard.router.gateway.tokenizer import TokenizerAdapter, chars_per_token_bound


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> TokenizerAdapter:
    return TokenizerAdapter.from_model_dir(tiny_model_dir)


def test_tiny_models_bound_is_its_longest_token(tokenizer: TokenizerAdapter) -> None:
    """Byte-level BPE with the full byte alphabet, no normalizer: the longest entry, '<|im_start|>'."""
    assert tokenizer.max_chars_per_token == len("<|im_start|>") == 12


def test_the_bound_holds_on_adversarial_text(tokenizer: TokenizerAdapter) -> None:
    bound = tokenizer.max_chars_per_token
    assert bound is not None
    rng = random.Random(0)
    pieces = [" ", "-", "\n", "the", " switchyard", "<|im_start|>", "é", "e\u0301", "你", "🎉", "\x00", "Ġ"]
    texts = ["<|im_start|>" * 500, " " * 5000, " switchyard" * 500]
    texts += ["".join(rng.choice(pieces) * rng.randint(1, 200) for _ in range(30)) for _ in range(200)]
    for text in texts:
        assert len(tokenizer.encode(text, add_special_tokens=False)) * bound >= len(text)


def _bpe(normalizer: normalizers.Normalizer | None, pre: pre_tokenizers.PreTokenizer | None) -> Tokenizer:
    tok = Tokenizer(models.BPE({"<unk>": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")], unk_token="<unk>"))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre is not None:
        tok.pre_tokenizer = pre
    return tok


@pytest.mark.parametrize(
    ("normalizer", "pre", "expected"),
    [
        (None, None, 5),  # '<unk>': one unknown token per unknown character
        (normalizers.NFC(), None, 20),  # NFC composes up to 4 code points into one
        (normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]), None, 20),
        (normalizers.Replace(" ", "▁"), pre_tokenizers.Metaspace(), 5),
        (normalizers.Replace("  ", " "), None, None),  # shrinks text: no bound
        (normalizers.StripAccents(), None, None),  # drops combining marks
        (None, pre_tokenizers.Whitespace(), None),  # drops whitespace
        (None, pre_tokenizers.Split(" ", behavior="removed"), None),
    ],
)
def test_the_bound_is_withheld_where_characters_can_vanish(
    normalizer: normalizers.Normalizer | None, pre: pre_tokenizers.PreTokenizer | None, expected: int | None
) -> None:
    assert chars_per_token_bound(_bpe(normalizer, pre)) == expected


def test_fused_unknowns_and_other_models_get_no_bound() -> None:
    fused = Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], unk_token="<unk>", fuse_unk=True))
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert chars_per_token_bound(fused) is None and chars_per_token_bound(wordpiece) is None


def test_a_prompt_that_cannot_fit_is_rejected_by_length(tokenizer: TokenizerAdapter) -> None:
    tokenizer.check_fits("x" * (12 * 99), 100, param="prompt")  # may be 99 tokens: the exact check decides
    with pytest.raises(ContextLengthError, match="1200 characters, at least 100 tokens") as err:
        tokenizer.check_fits("x" * 1200, 100, param="messages")
    assert err.value.param == "messages"


async def test_a_long_prompt_is_encoded_without_stalling_the_loop(tiny_model_dir: Path) -> None:
    """No length bound here, so the whole 1 MB prompt is tokenized (~0.5 s); the loop keeps ticking."""
    tok = TokenizerAdapter.from_model_dir(tiny_model_dir)
    tok.max_chars_per_token = None
    text = "the quick brown fox jumps over the lazy dog " * 24_000
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    ids = await tok.encode_prompt(text, context=10**9)
    took = time.perf_counter() - start
    task.cancel()
    assert ids == tok.encode(text)
    assert took > 0.1, "too fast to show anything; make the prompt longer"
    assert max(lags) < 0.05, f"the loop stalled {max(lags) * 1000:.0f} ms while a {took:.2f} s encode ran"
