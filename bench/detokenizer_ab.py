"""Interleaved A/B of the gateway's two streaming detokenizers, per streamed token.

* ``window``: ``IncrementalDetokenizer`` over ``TokenizerAdapter.decode`` (the prefix/read-offset
  window written out in Python: two decodes per token);
* ``decode_stream``: ``DecodeStreamDetokenizer``, the same scheme inside the ``tokenizers``
  library (``tokenizers.decoders.DecodeStream``), what ``TokenizerAdapter.detokenizer`` returns
  for a fast tokenizer;
* ``raw_step``: ``DecodeStream.step`` alone, the floor the wrapper adds to.

Each is fed the same tokens one delta at a time (a mixed text: ASCII, accents, CJK, emoji, so
multi-byte characters split over tokens) after the same prompt, exactly as the gateway feeds a
request, and ends with ``flush``. Rounds alternate the order of the implementations, so a slow
minute of this shared box hits all of them; per round the ratio to ``window`` is taken, and the
medians over rounds are reported. Both detokenizers' deltas are compared too: they must be equal.
The stream ends on a whole character: cut inside one, both flush the held bytes as U+FFFD, but
not always as many (the window decodes them with its context, the library alone).

The tiny test model's tokenizer (byte-level BPE) is always measured; pass real ones as
``--tokenizer-json NAME=PATH`` (a ``tokenizer.json``)::

    python -m bench.detokenizer_ab --tokenizer-json qwen3=/path/qwen3/tokenizer.json \\
        --tokenizer-json llama2=/path/llama2/tokenizer.json --out bench/results/detokenizer-ab
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.provenance import run_header
from switchyard.router.gateway.detokenizer import Detokenizer, IncrementalDetokenizer
from switchyard.router.gateway.tokenizer import TokenizerAdapter

TEXT = (
    "The quick brown fox jumps over the lazy dog, and the router streams tokens back. "
    "héllo wörld — naïve café, über-straße; "
    "你好\uff0c世界\uff01路由器把请求分发给实例。 "  # fullwidth comma and exclamation mark
    "emoji 🎉🚀 and flags 🇫🇷🇯🇵 mixed with ascii.\n"
    "def f(x):\n    return x * 2  # code, with    spaces\n"
)
PROMPT = "You are a helpful assistant. Answer briefly: "


def _adapter(path: Path | None) -> TokenizerAdapter:
    if path is None:
        from switchyard.testing.tiny_model import build_tiny_model

        return TokenizerAdapter.from_model_dir(build_tiny_model())
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return TokenizerAdapter(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path))))


def _run(make: Callable[[], Detokenizer], ids: Sequence[int], delta: int) -> tuple[float, list[str]]:
    """Seconds per token for one request's whole stream, and its deltas."""
    detok = make()
    chunks = [ids[i : i + delta] for i in range(0, len(ids), delta)]
    gc.collect()
    t0 = time.perf_counter()
    out = [detok.add_tokens(c) for c in chunks]
    out.append(detok.flush())
    return (time.perf_counter() - t0) / len(ids), out


def _raw(adapter: TokenizerAdapter, prompt: Sequence[int], ids: Sequence[int]) -> float:
    from tokenizers.decoders import DecodeStream

    tok = adapter._fast
    step = DecodeStream(list(prompt[-5:]), skip_special_tokens=True).step
    gc.collect()
    t0 = time.perf_counter()
    for t in ids:
        step(tok, t)
    return (time.perf_counter() - t0) / len(ids)


def measure(name: str, adapter: TokenizerAdapter, *, tokens: int, rounds: int, delta: int) -> dict[str, Any]:
    base = adapter.encode(TEXT, add_special_tokens=False)
    ids = (base * (tokens // len(base) + 1))[:tokens]
    while adapter.decode(ids[-4:]).endswith("\ufffd"):  # end on a whole character (see below)
        ids.pop()
    prompt = adapter.encode(PROMPT)
    makers: dict[str, Callable[[], Detokenizer]] = {
        "window": lambda: IncrementalDetokenizer(adapter.decode, prompt_token_ids=prompt),
        "decode_stream": lambda: adapter.detokenizer(prompt),
    }
    per_token: dict[str, list[float]] = {"window": [], "decode_stream": [], "raw_step": []}
    deltas: dict[str, list[str]] = {}
    for rnd in range(rounds):
        order = list(makers) if rnd % 2 == 0 else list(reversed(makers))
        for impl in order:
            seconds, deltas[impl] = _run(makers[impl], ids, delta)
            per_token[impl].append(seconds)
        per_token["raw_step"].append(_raw(adapter, prompt, ids))
    ratios = [d / w for d, w in zip(per_token["decode_stream"], per_token["window"], strict=True)]
    result = {
        "tokenizer": name,
        "vocab_size": adapter.vocab_size,
        "tokens": len(ids),
        "tokens_per_delta": delta,
        "us_per_token_median": {k: statistics.median(v) * 1e6 for k, v in per_token.items()},
        "us_per_token_rounds": {k: [round(x * 1e6, 3) for x in v] for k, v in per_token.items()},
        "decode_stream_over_window_median": statistics.median(ratios),
        "decode_stream_over_window_max": max(ratios),
        "identical_deltas": deltas["window"] == deltas["decode_stream"],
        "identical_text": "".join(deltas["window"]) == "".join(deltas["decode_stream"]),
    }
    med, ratio, worst = result["us_per_token_median"], statistics.median(ratios), max(ratios)
    print(
        f"{name} (delta {delta}): window {med['window']:.2f} us/token, decode_stream "
        f"{med['decode_stream']:.2f}, raw step {med['raw_step']:.2f}; ratio {ratio:.2f} (max {worst:.2f});"
        f" identical deltas: {result['identical_deltas']}",
        flush=True,
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer-json", action="append", default=[], metavar="NAME=PATH", help="a real tokenizer.json"
    )
    parser.add_argument("--tokens", type=int, default=4000, help="tokens per measured stream")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--deltas", default="1,4", help="tokens per delta to measure, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("bench/results/detokenizer-ab"))
    args = parser.parse_args(argv)
    started, load_before = dt.datetime.now(dt.UTC), os.getloadavg()
    tokenizers: list[tuple[str, Path | None]] = [("tiny", None)]
    for spec in args.tokenizer_json:
        name, _, path = spec.partition("=")
        tokenizers.append((name, Path(path)))
    results = []
    for name, path in tokenizers:
        adapter = _adapter(path)
        for delta in (int(d) for d in args.deltas.split(",")):
            results.append(measure(name, adapter, tokens=args.tokens, rounds=args.rounds, delta=delta))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {**run_header("bench.detokenizer_ab", argv, started, load_before), "results": results}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
