"""Incremental detokenization, stop strings and the per-request output decoder.

The detokenizer tests run on both implementations: the library's ``DecodeStream`` (what the
gateway uses for fast tokenizers) and the window over a ``decode`` function (the fallback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models

from switchyard.messages import EngineOutput, FinishReason
from switchyard.router.gateway.detokenizer import (
    MAX_PENDING_TOKENS,
    DecodeStreamDetokenizer,
    Detokenizer,
    IncrementalDetokenizer,
    OutputDecoder,
    StopStringMatcher,
)
from switchyard.router.gateway.tokenizer import TokenizerAdapter

MakeDetokenizer = Callable[..., Detokenizer]

TEXTS = [
    "hello world, the quick brown fox",
    "héllo wörld — naïve café",
    "你好, 世界! switchyard routes requests",
    "emoji 🎉🚀 and flags 🇫🇷 mixed with ascii",
    "  leading spaces and\nnewlines\n\n  indented",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> TokenizerAdapter:
    return TokenizerAdapter.from_model_dir(tiny_model_dir)


@pytest.fixture(params=["decode_stream", "window"])
def make_detok(request: pytest.FixtureRequest, tokenizer: TokenizerAdapter) -> MakeDetokenizer:
    """``make_detok(prompt_token_ids=...)`` builds the detokenizer under test."""
    if request.param == "decode_stream":
        return lambda prompt_token_ids=(): tokenizer.detokenizer(prompt_token_ids)
    return lambda prompt_token_ids=(): IncrementalDetokenizer(
        tokenizer.decode, prompt_token_ids=prompt_token_ids
    )


def test_fast_tokenizers_stream_through_the_library(tokenizer: TokenizerAdapter) -> None:
    assert isinstance(tokenizer.detokenizer([1, 2]), DecodeStreamDetokenizer)


def stream_text(detok: Detokenizer, ids: Sequence[int], step: int = 1) -> list[str]:
    deltas = [detok.add_tokens(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_streamed_text_equals_full_decode_without_replacement_chars(
    tokenizer: TokenizerAdapter, make_detok: MakeDetokenizer, text: str, step: int
) -> None:
    """Token-by-token deltas join to the full text, and no delta contains U+FFFD."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = make_detok(prompt_token_ids=tokenizer.encode("prompt: "))
    deltas = stream_text(detok, ids, step)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_character_split_over_byte_tokens_is_held_until_complete(
    tokenizer: TokenizerAdapter, make_detok: MakeDetokenizer
) -> None:
    """An emoji encoded as several byte tokens is emitted once, whole, by its last token."""
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # the tiny vocabulary has no merge for it
    detok = make_detok()
    deltas = [detok.add_tokens([t]) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🎉"


def test_complete_text_before_an_unfinished_character_is_not_held(
    tokenizer: TokenizerAdapter, make_detok: MakeDetokenizer
) -> None:
    """Only the unfinished character waits; the text before it in the same delta goes out."""
    head = tokenizer.encode("abc ", add_special_tokens=False)
    emoji = tokenizer.encode("🎉", add_special_tokens=False)
    detok = make_detok()
    assert detok.add_tokens([*head, emoji[0]]) == "abc "
    assert detok.add_tokens(emoji[1:]) == "🎉"


def test_special_tokens_are_skipped(tokenizer: TokenizerAdapter, make_detok: MakeDetokenizer) -> None:
    """EOS and chat markers produce no text, at the end or in the middle."""
    eos = tokenizer.eos_token_id or 2
    hello = tokenizer.encode("hello", add_special_tokens=False)
    world = tokenizer.encode(" world", add_special_tokens=False)
    assert "".join(stream_text(make_detok(), [*hello, eos])) == "hello"
    assert "".join(stream_text(make_detok(), [*hello, eos, *world, eos])) == "hello world"


def test_an_unfinished_character_at_the_end_is_flushed(
    tokenizer: TokenizerAdapter, make_detok: MakeDetokenizer
) -> None:
    """A stream cut inside a character (max_tokens) still emits what it has, as U+FFFD."""
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    detok = make_detok()
    assert detok.add_tokens(ids[:-1]) == "ok "
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_both_implementations_emit_identical_deltas(tokenizer: TokenizerAdapter) -> None:
    """Same text, same boundaries: the library is a drop-in for the window."""
    ids = tokenizer.encode(" ".join(TEXTS), add_special_tokens=False)
    prompt = tokenizer.encode("prompt: ")
    window = IncrementalDetokenizer(tokenizer.decode, prompt_token_ids=prompt)
    assert stream_text(tokenizer.detokenizer(prompt), ids) == stream_text(window, ids)


def test_decode_windows_stay_small_for_long_outputs(tokenizer: TokenizerAdapter) -> None:
    """Each step decodes a few tokens, not the whole output (O(window) per token)."""
    seen: list[int] = []

    def spy(ids: Sequence[int]) -> str:
        seen.append(len(ids))
        return tokenizer.decode(ids)

    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    assert len(ids) > 1000
    text = "".join(stream_text(IncrementalDetokenizer(spy), ids))
    assert text == tokenizer.decode(ids)
    assert max(seen) <= 2 * MAX_PENDING_TOKENS


def test_leading_space_survives_a_tokenizer_that_strips_it_at_slice_start() -> None:
    """SentencePiece drops a slice's leading space; the shared prefix window cancels that out."""
    vocab = {1: "▁Hello", 2: "▁world", 3: "!", 4: "▁again"}

    def sp_decode(ids: Sequence[int]) -> str:
        return "".join(vocab[i] for i in ids).replace("▁", " ").removeprefix(" ")

    detok = IncrementalDetokenizer(sp_decode, prompt_token_ids=[1])
    assert "".join(stream_text(detok, [2, 3, 4])) == " world! again"


def test_leading_space_survives_in_the_library_too() -> None:
    """The same with a real SentencePiece-style decoder (Metaspace strips a slice's leading space)."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁again": 4}
    sp = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    assert sp.decode([2]) == "world", "the decoder strips a slice's leading space"
    detok = DecodeStreamDetokenizer(sp, prompt_token_ids=[1])
    assert "".join(stream_text(detok, [2, 3, 4])) == " world! again"


def test_invalid_bytes_are_emitted_after_the_pending_limit(
    tokenizer: TokenizerAdapter, make_detok: MakeDetokenizer
) -> None:
    """A run of lone lead bytes (random weights do this) cannot stall the stream forever."""
    lead = tokenizer.encode("é", add_special_tokens=False)[0]  # 0xC3 alone: never completes
    detok = make_detok()
    deltas = [detok.add_tokens([lead]) for _ in range(MAX_PENDING_TOKENS * 3)]
    assert any(deltas), "held forever"
    assert all(len(d) <= MAX_PENDING_TOKENS for d in deltas)


# -- stop strings ---------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, deltas: Sequence[str]) -> list[str]:
    out = [matcher.feed(d) for d in deltas]
    out.append(matcher.flush())
    return out


def test_stop_string_split_across_deltas_is_found_and_cut() -> None:
    """'STOP' arriving as 'ST' + 'OP' ends the output before it; the rest is dropped."""
    m = StopStringMatcher(["STOP"])
    out = feed_all(m, ["Hello ST", "OP world"])
    assert "".join(out) == "Hello "
    assert m.stopped and m.stop_string == "STOP"


def test_only_a_possible_partial_match_is_held_back() -> None:
    """Text that cannot start a stop string is released immediately."""
    m = StopStringMatcher(["</end>"])
    assert m.feed("abc <") == "abc "  # '<' might begin '</end>'
    assert m.feed("b>") == "<b>"  # it did not
    assert m.feed("x</e") == "x"
    assert m.feed("nd> tail") == ""
    assert m.stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    m = StopStringMatcher(["world", "lo w"])
    assert "".join(feed_all(m, ["hel", "lo world"])) == "hel"
    assert m.stop_string == "lo w"


def test_overlapping_prefix_is_matched() -> None:
    """'aab' inside 'aaab' is found even though the first 'aa' was a false start."""
    m = StopStringMatcher(["aab"])
    assert "".join(feed_all(m, ["a", "a", "a", "b", "c"])) == "a"


def test_held_tail_is_released_at_end_when_no_stop_completes() -> None:
    m = StopStringMatcher(["STOP"])
    out = feed_all(m, ["the end ST"])
    assert out == ["the end ", "ST"]
    assert not m.stopped


def test_no_stop_strings_passes_deltas_through() -> None:
    m = StopStringMatcher([])
    assert feed_all(m, ["a", "b"]) == ["a", "b", ""]


def test_stop_at_the_very_start_yields_empty_output() -> None:
    m = StopStringMatcher(["\n"])
    assert feed_all(m, ["\nrest"]) == ["", ""]


# -- the per-request decoder ----------------------------------------------------------------


def out(ids: Sequence[int], *, finished: bool = False, reason: FinishReason | None = None) -> EngineOutput:
    return EngineOutput("r", list(ids), finished=finished, finish_reason=reason, num_prompt_tokens=3)


def test_decoder_caps_at_max_tokens_with_length(tokenizer: TokenizerAdapter) -> None:
    """More tokens than max_tokens are cut, and the finish reason is 'length'."""
    ids = tokenizer.encode("a b c d e f g h", add_special_tokens=False)
    dec = OutputDecoder(tokenizer.detokenizer([5, 6, 7]), num_prompt_tokens=3, stop=[], max_tokens=3)
    text = dec.feed(out(ids))
    assert text == tokenizer.decode(ids[:3])
    assert (dec.finish_reason, dec.completion_tokens, dec.prompt_tokens) == ("length", 3, 3)


def test_decoder_reports_engine_finish_reason(tokenizer: TokenizerAdapter) -> None:
    ids = tokenizer.encode("hello", add_special_tokens=False)
    dec = OutputDecoder(tokenizer.detokenizer([5]), num_prompt_tokens=1, stop=[], max_tokens=50)
    assert dec.feed(out(ids)) == "hello"
    assert dec.finish_reason is None
    assert dec.feed(out([2], finished=True, reason=FinishReason.STOP)) == ""
    assert dec.finish_reason == "stop"
    assert dec.completion_tokens == len(ids) + 1


def test_decoder_ignores_stop_strings_before_min_tokens(tokenizer: TokenizerAdapter) -> None:
    """As in vLLM, stop strings only apply once min_tokens tokens were generated."""
    a = tokenizer.encode("x", add_special_tokens=False)
    dec = OutputDecoder(
        tokenizer.detokenizer([5]), num_prompt_tokens=1, stop=["x"], max_tokens=10, min_tokens=1
    )
    assert dec.feed(out(a)) == "x"
    assert dec.feed(out(a)) == ""
    assert dec.finish_reason == "stop"
