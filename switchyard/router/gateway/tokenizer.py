"""The gateway's tokenizer: the one place text becomes token IDs and back.

The gateway tokenizes each request exactly once (the router needs token IDs for prefix
hashing, the engine needs them to run), so this adapter wraps a Hugging Face tokenizer with
the few operations the request path needs and keeps their costs visible:

* **Loading is blocking** (file reads, JSON parsing, building the Rust tokenizer): it happens
  in :meth:`TokenizerAdapter.from_model_dir` at start-up, never per request.
* **Encoding is CPU work, kept off the event loop when it is long.** A short prompt costs
  microseconds and is encoded inline (a thread hop would cost more). A prompt over
  :data:`OFFLOAD_THRESHOLD_CHARS` characters is encoded in a worker thread through the Rust
  tokenizer's batch API, which releases the GIL while it works; its single-text ``encode``
  does not, so a thread running it stalls the loop all the same (measured: a 4 MB prompt
  stalled every stream for 4.8 s through ``encode`` in a thread, 17 ms through
  ``encode_batch_fast``). Chat templating of a long transcript (Jinja, pure Python) also runs
  in a thread, where the interpreter's switch interval lets the loop in every 5 ms.
* **A prompt that cannot fit is rejected before it is tokenized.** Each token covers at most
  :attr:`TokenizerAdapter.max_chars_per_token` characters of the text (derived from the
  tokenizer: its longest vocabulary entry, times what its normalizer can shrink text by), so
  ``ceil(chars / max_chars_per_token)`` tokens is a lower bound that costs one ``len()``.
  When that bound alone exceeds the model's context the request gets its 400 at once, instead
  of after seconds of CPU. The bound is only derived for pipelines where it provably holds
  (see :func:`chars_per_token_bound`); otherwise there is no pre-check, only the thread.
* **Thread safety.** Encoding and decoding go straight to the Rust ``tokenizers.Tokenizer``
  when the HF tokenizer is a fast one. Its ``encode``/``decode`` only read the tokenizer, so
  the loop thread and worker threads can use it at once; transformers' ``__call__`` instead
  rewrites truncation/padding state on every call, which races ("Already borrowed").
  Slow (pure Python) tokenizers fall back to the HF methods, which do not mutate state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from switchyard.errors import ConfigError, ContextLengthError, InvalidRequestError
from switchyard.router.gateway.detokenizer import DecodeStreamDetokenizer, Detokenizer, IncrementalDetokenizer

__all__ = ["OFFLOAD_THRESHOLD_CHARS", "TokenizerAdapter", "chars_per_token_bound"]

#: Prompts (or rendered chat transcripts) longer than this many characters are tokenized in a
#: worker thread instead of on the event loop. Measured on the tiny test model's byte-level
#: BPE: about 0.4 µs per character, so the threshold bounds an inline stall to roughly 1 ms; a
#: thread hop is about 50-100 µs.
OFFLOAD_THRESHOLD_CHARS = 2048

#: Chat transcripts with more messages than this are rendered in a worker thread.
OFFLOAD_THRESHOLD_MESSAGES = 64

# What a normalizer can shrink text by, per kind: 1 = never shrinks. NFC/NFKC compose at most
# 4 code points into one (the longest canonical decomposition, e.g. U+1F82, is 4 long).
_NORMALIZER_SHRINK = {"Prepend": 1, "NFD": 1, "NFKD": 1, "Lowercase": 1, "NFC": 4, "NFKC": 4}
# Pre-tokenizers that keep every character (they only split); others (Whitespace, BERT's) drop some.
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts"}


def _shrink(normalizer: Mapping[str, Any] | None) -> int | None:
    """How many characters of input one character of normalized text can stand for; None: unbounded."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factor = 1
        for part in normalizer.get("normalizers", ()):
            f = _shrink(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Replace":  # a plain string replaced by one at least as long never shrinks
        pattern, content = normalizer.get("pattern", {}).get("String"), normalizer.get("content")
        ok = isinstance(pattern, str) and isinstance(content, str) and len(content) >= len(pattern)
        return 1 if ok else None
    return _NORMALIZER_SHRINK.get(str(kind))


def _keeps_every_char(pre_tokenizer: Mapping[str, Any] | None) -> bool:
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_keeps_every_char(p) for p in pre_tokenizer.get("pretokenizers", ()))
    return kind in _KEEPING_PRE_TOKENIZERS and pre_tokenizer.get("behavior") != "Removed"


def _has_byte_level(pre_tokenizer: Mapping[str, Any] | None) -> bool:
    if pre_tokenizer is None:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers", ()))
    return pre_tokenizer.get("type") == "ByteLevel"


def chars_per_token_bound(fast: Any) -> int | None:
    """Most characters of input text one token can cover, for a ``tokenizers.Tokenizer``; None
    when the pipeline gives no such bound.

    Why it holds: a BPE token's vocabulary string is what it covers of the normalized text (in
    bytes for byte-level BPE, which is at least the characters; a byte-fallback token such as
    ``<0x41>`` covers one byte), so the longest entry, added tokens included, bounds it; the
    normalizer's shrink factor carries that back to the input. Every piece must keep every
    character: a pre-tokenizer that drops whitespace, or an unknown-token fallback that fuses
    a run of unknown characters into one token, would make a huge text a handful of tokens.
    So the bound is given only for BPE models that cannot lose characters (byte-level with its
    full byte alphabet, byte fallback, or one unknown token per unknown character), with
    keeping pre-tokenizers, known normalizers and no truncation; anything else gets None.
    """
    spec = json.loads(fast.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or spec.get("truncation") is not None:
        return None
    pre = spec.get("pre_tokenizer")
    factor = _shrink(spec.get("normalizer"))
    if factor is None or not _keeps_every_char(pre):
        return None
    vocab: dict[str, int] = fast.get_vocab(with_added_tokens=True)
    if _has_byte_level(pre):
        from tokenizers.pre_tokenizers import ByteLevel

        lossless = all(ch in vocab for ch in ByteLevel.alphabet())
    else:
        lossless = bool(model.get("byte_fallback")) or (
            model.get("unk_token") is not None and not model.get("fuse_unk")
        )
    if not lossless or not vocab:
        return None
    return factor * max(len(token) for token in vocab)


class TokenizerAdapter:
    """A loaded HF tokenizer with the gateway's operations: encode, chat template, decode.

    Build it with :meth:`from_model_dir` at start-up (blocking), or wrap an already loaded
    tokenizer. All methods are safe to call from the event loop and worker threads at once.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._hf = tokenizer
        self._fast = getattr(tokenizer, "backend_tokenizer", None)
        self.eos_token_id: int | None = tokenizer.eos_token_id
        """The end-of-sequence token, or None when the tokenizer defines none."""
        self.vocab_size: int = len(tokenizer)
        """Number of token IDs, added tokens included; valid prompt IDs are below it."""
        self.has_chat_template: bool = getattr(tokenizer, "chat_template", None) is not None
        self.max_chars_per_token: int | None = (
            chars_per_token_bound(self._fast) if self._fast is not None else None
        )
        """Most characters of text one token covers (:func:`chars_per_token_bound`); None
        when this tokenizer gives no bound, and prompts are then never rejected by length alone."""

    @classmethod
    def from_model_dir(cls, model_dir: Path | str) -> TokenizerAdapter:
        """Load the tokenizer of a local HF model directory. Blocking: call at start-up."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load a tokenizer from {model_dir}: {exc}") from exc
        return cls(tokenizer)

    # -- encoding -------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token IDs of ``text``. ``add_special_tokens`` adds BOS where the model wants one."""
        if self._fast is not None:
            ids: list[int] = self._fast.encode(text, add_special_tokens=add_special_tokens).ids
            return ids
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def _encode_releasing_gil(self, text: str, add_special_tokens: bool) -> list[int]:
        """:meth:`encode` for a worker thread: the batch API releases the GIL, ``encode`` does not."""
        if self._fast is not None:
            (encoding,) = self._fast.encode_batch_fast([text], add_special_tokens=add_special_tokens)
            ids: list[int] = encoding.ids
            return ids
        return self.encode(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The chat template applied to ``messages``, ending with the assistant's turn opener."""
        if not self.has_chat_template:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions with a plain prompt",
                param="messages",
            )
        try:
            text = self._hf.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja's TemplateError and the templates' raise_exception()
            msg = f"the chat template rejected the messages: {exc}"
            raise InvalidRequestError(msg, param="messages") from exc
        if not isinstance(text, str):  # some transformers versions return a list for batches
            text = text[0]
        return str(text)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token IDs of the rendered chat. The template already writes any BOS, so none is added."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def check_fits(self, text: str, context: int, *, param: str) -> None:
        """Reject ``text`` when even its fewest possible tokens leave no room in ``context``.

        Costs one ``len()``; tokenizing a hostile 4 MB prompt to find the same answer costs
        seconds of CPU. Silent when the tokenizer gives no bound or the text may fit: the exact
        check runs on the token IDs.
        """
        if self.max_chars_per_token is None:
            return
        at_least = -(-len(text) // self.max_chars_per_token)
        if at_least >= context:
            raise ContextLengthError(
                f"this model's maximum context length is {context} tokens, but the prompt has "
                f"{len(text)} characters, at least {at_least} tokens (this tokenizer's tokens "
                f"cover at most {self.max_chars_per_token} characters each); shorten the prompt",
                param=param,
            )

    async def encode_prompt(self, text: str, *, context: int, param: str = "prompt") -> list[int]:
        """Token IDs of a request's prompt: checked against ``context`` by length first
        (:meth:`check_fits`), then encoded, in a GIL-releasing worker thread when long."""
        self.check_fits(text, context, param=param)
        if len(text) > OFFLOAD_THRESHOLD_CHARS:
            return await asyncio.to_thread(self._encode_releasing_gil, text, True)
        return self.encode(text)

    async def encode_messages(
        self, messages: Sequence[Mapping[str, str]], *, context: int, param: str = "messages"
    ) -> list[int]:
        """Token IDs of a chat: rendered (in a thread for many messages), checked against
        ``context`` by length, then encoded like :meth:`encode_prompt`. The template writes any
        BOS itself, so none is added."""
        if len(messages) > OFFLOAD_THRESHOLD_MESSAGES:
            text = await asyncio.to_thread(self.render_chat, messages)
        else:
            text = self.render_chat(messages)
        self.check_fits(text, context, param=param)
        if len(text) > OFFLOAD_THRESHOLD_CHARS:
            return await asyncio.to_thread(self._encode_releasing_gil, text, False)
        return self.encode(text, add_special_tokens=False)

    def check_token_ids(self, token_ids: Sequence[int], *, param: str) -> None:
        """Reject prompt token IDs outside the vocabulary (the engine would crash on them)."""
        if not token_ids or (min(token_ids) >= 0 and max(token_ids) < self.vocab_size):
            return  # min/max run in C; the search below only runs for a bad request
        bad = next(t for t in token_ids if not 0 <= t < self.vocab_size)
        raise InvalidRequestError(
            f"token ID {bad} is out of range; this model's vocabulary has {self.vocab_size} tokens",
            param=param,
        )

    # -- decoding -------------------------------------------------------------------------

    def detokenizer(self, prompt_token_ids: Sequence[int]) -> Detokenizer:
        """A new request's streaming detokenizer, seeded with the end of its prompt: the
        library's ``DecodeStream`` for a fast tokenizer (cheaper per token, measured), the
        window over :meth:`decode` otherwise (``gateway/detokenizer.py``)."""
        if self._fast is not None:
            return DecodeStreamDetokenizer(self._fast, prompt_token_ids=prompt_token_ids)
        return IncrementalDetokenizer(self.decode, prompt_token_ids=prompt_token_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` with special tokens (EOS, chat markers) skipped.

        Note: hot path for slow tokenizers, called on short windows by the incremental
        detokenizer (fast ones stream through :meth:`detokenizer` instead).
        """
        if self._fast is not None:
            text: str = self._fast.decode(token_ids, skip_special_tokens=True)
            return text
        return str(self._hf.decode(token_ids, skip_special_tokens=True))
