"""The gateway's tokenizer: the one place text becomes token IDs and back.

The gateway tokenizes each request exactly once (the router needs token IDs for prefix
hashing, the engine needs them to run), so this adapter wraps a Hugging Face tokenizer with
the few operations the request path needs and keeps their costs visible:

* **Loading is blocking** (file reads, JSON parsing, building the Rust tokenizer): it happens
  in :meth:`TokenizerAdapter.from_model_dir` at start-up, never per request.
* **Encoding is CPU work on the event loop.** A short prompt costs microseconds and is
  encoded inline (a thread hop would cost more). A prompt over :data:`OFFLOAD_THRESHOLD_CHARS`
  characters is encoded in a worker thread with :func:`asyncio.to_thread`, so one huge prompt
  does not stall every stream the gateway is serving. Measured on the tiny test model's
  byte-level BPE: about 0.4 µs per character, so the threshold bounds an inline stall to
  roughly 1 ms; a thread hop is about 50-100 µs.
* **Thread safety.** Encoding and decoding go straight to the Rust ``tokenizers.Tokenizer``
  when the HF tokenizer is a fast one. Its ``encode``/``decode`` only read the tokenizer, so
  the loop thread and worker threads can use it at once; transformers' ``__call__`` instead
  rewrites truncation/padding state on every call, which races ("Already borrowed").
  Slow (pure Python) tokenizers fall back to the HF methods, which do not mutate state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from switchyard.errors import ConfigError, InvalidRequestError
from switchyard.router.gateway.detokenizer import DecodeStreamDetokenizer, Detokenizer, IncrementalDetokenizer

__all__ = ["OFFLOAD_THRESHOLD_CHARS", "TokenizerAdapter"]

#: Prompts (or chat transcripts) longer than this many characters are tokenized in a worker
#: thread instead of on the event loop; see the module docstring for the measurement.
OFFLOAD_THRESHOLD_CHARS = 2048


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

    async def encode_prompt(self, text: str) -> list[int]:
        """:meth:`encode` for a request's prompt, off the event loop when the prompt is long."""
        if len(text) > OFFLOAD_THRESHOLD_CHARS:
            return await asyncio.to_thread(self.encode, text)
        return self.encode(text)

    async def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """:meth:`encode_chat`, off the event loop when the transcript is long."""
        if sum(len(m["content"]) for m in messages) > OFFLOAD_THRESHOLD_CHARS:
            return await asyncio.to_thread(self.encode_chat, messages)
        return self.encode_chat(messages)

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
