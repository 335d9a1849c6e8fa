"""Streaming detokenization and stop strings: turning token deltas into safe text deltas.

Why this is not ``decode(all_tokens)`` every step: that is O(n) per token, O(n²) per request,
and it runs on the gateway's event loop for every streamed token. Why it is not
``decode([token])`` either: byte-level BPE (GPT-2 style) and byte-fallback SentencePiece split
one UTF-8 character over several tokens, and SentencePiece drops the leading space of the first
token of a decoded slice. Decoding a token alone therefore emits U+FFFD replacement characters
mid-character and loses spaces.

Both detokenizers here use the prefix/read-offset scheme of vLLM and TGI: decode a short window
twice, once ending at the last emitted token (``prefix_text``) and once ending at the newest
token (``new_text``); the text to emit is the difference, and it is held back while it ends in
U+FFFD (an incomplete character). Both decodes start at the same token, so whatever a tokenizer
does at the start of a slice cancels out. The window is a few tokens, so each step costs
O(window), and tokens that fall out of the window are dropped.

* :class:`DecodeStreamDetokenizer` runs that scheme inside the ``tokenizers`` library
  (``tokenizers.decoders.DecodeStream``, Rust): one call per token instead of two decodes, two
  list slices and the string arithmetic in Python. Measured interleaved in one run
  (``bench/detokenizer_ab.py``, ``bench/results/detokenizer-ab/``) on the tiny model's
  byte-level BPE and on real Qwen3 and Llama 2 tokenizers, it costs 0.33-0.50 of the window's
  time per token with one-token deltas (the usual decode step) and 0.78-0.96 with four-token
  ones, with identical deltas. The gateway uses it for every fast tokenizer.
* :class:`IncrementalDetokenizer` is the same scheme written out over any ``decode`` function:
  the fallback for tokenizers without a Rust backend (slow, pure-Python ones).

:class:`StopStringMatcher` finds stop strings across delta boundaries. It holds back only the
tail that could still become a stop string (the longest suffix that is a proper prefix of one),
never a fixed number of characters, so text reaches the client as early as possible. Output
is cut before the stop string, which is not included (OpenAI and vLLM behave the same).

:class:`OutputDecoder` combines both with ``max_tokens`` and the usage counts for one
request, so the gateway's streaming and non-streaming paths share one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from switchyard.messages import EngineOutput

__all__ = [
    "DecodeStreamDetokenizer",
    "Detokenizer",
    "IncrementalDetokenizer",
    "OutputDecoder",
    "StopStringMatcher",
]

_REPLACEMENT = "\ufffd"

#: Prompt tokens that seed the window, so the first generated token is decoded in context
#: (SentencePiece's leading space). vLLM uses the same number.
PROMPT_CONTEXT_TOKENS = 5

#: A UTF-8 character is at most 4 bytes, so the bytes of an incomplete one (at most 3) lie in
#: the last 3 tokens, whatever the tokenizer.
MAX_CHAR_TOKENS = 3

#: Pending tokens that still end in U+FFFD with no clean boundary are real invalid bytes (random
#: weights produce them); past this many they are emitted instead of being held forever.
MAX_PENDING_TOKENS = 8


class Detokenizer(Protocol):
    """Token IDs in, text deltas out that never split a character (special tokens skipped)."""

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append new tokens and return the text that is now complete ('' while held back)."""
        ...

    def flush(self) -> str:
        """Return whatever is still held back; call once when the stream ends."""
        ...


class DecodeStreamDetokenizer:
    """:class:`Detokenizer` on the ``tokenizers`` library's own ``DecodeStream`` (module docstring).

    What the library does not do is added here, with the same rules as
    :class:`IncrementalDetokenizer`: tokens are stepped one at a time, so complete text before
    an unfinished character in the same delta goes out at once; a run of tokens that never
    becomes clean text (invalid bytes from random weights, or special tokens) is emitted after
    :data:`MAX_PENDING_TOKENS` rather than held forever; and :meth:`flush` emits what is held.
    Those rare paths decode the held tokens alone and restart the stream without context.

    Note: hot path, one ``step`` per streamed token; the held list stays empty while text flows.
    """

    __slots__ = ("_held", "_step", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer, *, prompt_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._step = DecodeStream(context, skip_special_tokens=True).step
        self._held: list[int] = []  # tokens stepped since the last text

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        step, tokenizer, held = self._step, self._tokenizer, self._held
        out = ""
        for token in token_ids:
            try:
                text = step(tokenizer, token)
            except Exception:  # the library's InvalidPrefix: a window it cannot difference
                held.append(token)
                out += self._release_held()
                step = self._step
                continue
            if text is not None:
                if held:
                    held.clear()
                out = out + text if out else text
            else:
                held.append(token)
                if len(held) >= MAX_PENDING_TOKENS:
                    out += self._release_held()
                    step = self._step
        return out

    def flush(self) -> str:
        return self._release_held() if self._held else ""

    def _release_held(self) -> str:
        """Emit the held tokens as they decode (U+FFFD included) and start a fresh stream."""
        text: str = self._tokenizer.decode(self._held, skip_special_tokens=True)
        self._held.clear()
        self._step = DecodeStream(skip_special_tokens=True).step
        return text


class IncrementalDetokenizer:
    """Turns a stream of token IDs into text deltas that never split a character.

    ``decode`` maps token IDs to text (special tokens skipped); it is called on windows of a
    few tokens only.

    Note: hot path, one call per streamed delta. State is three ints and a short list.
    """

    __slots__ = ("_decode", "_prefix_offset", "_read_offset", "_tokens")

    def __init__(
        self, decode: Callable[[Sequence[int]], str], *, prompt_token_ids: Sequence[int] = ()
    ) -> None:
        self._decode = decode
        self._tokens: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # Window: tokens[prefix_offset:read_offset] were already emitted (context only);
        # tokens[read_offset:] are pending.
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append new tokens and return the text that is now complete ('' while held back)."""
        tokens = self._tokens
        tokens.extend(token_ids)
        if len(tokens) == self._read_offset:
            return ""
        return self._advance(force=False)

    def flush(self) -> str:
        """Return whatever is still held back; call once when the stream ends."""
        if len(self._tokens) == self._read_offset:
            return ""
        return self._advance(force=True)

    def _advance(self, *, force: bool) -> str:
        tokens, decode, prefix, read = self._tokens, self._decode, self._prefix_offset, self._read_offset
        prefix_text = decode(tokens[prefix:read])
        new_text = decode(tokens[prefix:])
        end = len(tokens)
        if not force and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            # The text ends inside a character (or the new tokens are special ones). Emit up to
            # the last token boundary that ends on a whole character: an incomplete character's
            # bytes lie in the last MAX_CHAR_TOKENS tokens. Rare, so the extra decodes are cheap.
            end = -1
            for j in range(len(tokens) - 1, max(read, len(tokens) - 1 - MAX_CHAR_TOKENS), -1):
                text = decode(tokens[prefix:j])
                if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
                    new_text, end = text, j
                    break
            if end == -1:
                if len(tokens) - read < MAX_PENDING_TOKENS:
                    return ""
                end = len(tokens)  # not a character in progress but invalid bytes: emit them
        delta = new_text[len(prefix_text) :]
        # Slide the window: the emitted tokens become the context; older ones are dropped so
        # the list and each decode stay O(window), not O(output).
        del tokens[:read]
        self._prefix_offset, self._read_offset = 0, end - read
        return delta


class StopStringMatcher:
    """Cuts a text stream at the first occurrence of any stop string.

    Feed it text deltas; it returns the text that is safe to send. A tail that might be the
    start of a stop string is held back until the next delta decides it. Once a stop string
    is found, :attr:`stopped` is set, the text before it is returned and everything after is
    discarded.

    Note: hot path. With no stop strings the delta passes through untouched.
    """

    __slots__ = ("_held", "_max_hold", "_partials", "_stops", "stop_string", "stopped")

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = tuple(s for s in dict.fromkeys(stop) if s)
        # Every proper prefix of every stop string: a buffer ending in one of these may be
        # the start of a match and must be held back.
        self._partials = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""
        self.stopped = False
        self.stop_string: str | None = None

    def feed(self, delta: str) -> str:
        """Return the part of ``held + delta`` that can be sent now."""
        if self.stopped or not delta:
            return ""
        if not self._stops:
            return delta
        buf = self._held + delta if self._held else delta
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut, self.stop_string = i, s
        if cut != -1:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        hold = 0
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            if buf[-k:] in self._partials:
                hold = k
                break
        if hold:
            self._held = buf[-hold:]
            return buf[:-hold]
        self._held = ""
        return buf

    def flush(self) -> str:
        """Return the held-back tail at the end of the stream (it never became a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class OutputDecoder:
    """Engine outputs of one request in, client text out: detokenizer, stop strings, max_tokens.

    :attr:`finish_reason` is set by the output that ends the request: the engine's own finish,
    a stop string (``"stop"``), or ``max_tokens`` reached (``"length"``). When it is set but
    the engine had not finished, the caller must abort the engine request.

    Note: hot path; :meth:`feed` runs once per engine output.
    """

    __slots__ = (
        "_detok",
        "_stops",
        "cached_tokens",
        "completion_tokens",
        "finish_reason",
        "max_tokens",
        "min_tokens",
        "prompt_tokens",
    )

    def __init__(
        self,
        detokenizer: Detokenizer,
        *,
        num_prompt_tokens: int,
        stop: Sequence[str],
        max_tokens: int,
        min_tokens: int = 0,
    ) -> None:
        """``detokenizer`` is this request's, seeded with its prompt (``TokenizerAdapter.detokenizer``)."""
        self._detok = detokenizer
        self._stops = StopStringMatcher(stop)
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = num_prompt_tokens, 0, 0
        self.finish_reason: str | None = None

    def feed(self, out: EngineOutput) -> str:
        """Text to send for this output; sets :attr:`finish_reason` when the request is done."""
        ids = out.token_ids
        room = self.max_tokens - self.completion_tokens
        capped = len(ids) > room
        if capped:
            ids = ids[:room]
        self.completion_tokens += len(ids)
        self.cached_tokens = out.num_cached_tokens or self.cached_tokens
        done = capped or out.finished or self.completion_tokens >= self.max_tokens
        text = self._detok.add_tokens(ids)
        if done:
            text += self._detok.flush()
        if self.completion_tokens > self.min_tokens:  # as vLLM: no stop strings before min_tokens
            text = self._stops.feed(text)
            if self._stops.stopped:
                self.finish_reason = "stop"
                return text
        if done:
            text += self._stops.flush()
            reason = out.finish_reason if out.finished and not capped else None
            self.finish_reason = str(reason) if reason else "length"
        return text
