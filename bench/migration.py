"""Live-migration benchmark: downtime and total time against sequence length, beside recompute.

Why: Llumnix's claim, which our migration must reproduce on stock vLLM, is that multi-stage
migration keeps a request's *downtime* (suspend on the source -> first token on the
destination) nearly flat in sequence length, because all but the last few blocks are copied
while the source keeps decoding; recomputing the sequence on the destination instead costs a
prefill that grows with it. This script measures all three side by side in one run, on two
real vLLM CPU engines (NIXL over UCX TCP/shared memory) started in this process:

* ``multistage``: the default ``MigrationCoordinator`` (pre-copy stages, then the tail);
* ``stop_and_copy``: the same coordinator with ``max_stages=0`` (everything moves while stopped);
* ``recompute``: what a move without KV costs the request: a cold prefill of a sequence of the
  same length on the destination (time to its first token). The source's suspend, a few ms in
  the other two, is not added to it, which favours recompute slightly.

Each request decodes ``--decode-before`` tokens on the source before it moves and keeps
decoding after, so the pre-copy races a live decode. The model is a random-weight Llama built
locally (``--shape bench-100m``: ~100M parameters, 64 KiB of float32 KV per token), big
enough that prefill costs what it costs on a small real model; nothing is downloaded. GPU
numbers are not measured here (no GPU on this machine).

    python -m bench.migration --out bench/results/migration [--lengths 256,512,1024,2048] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.provenance import run_header
from switchyard.cache import cache_dir
from switchyard.config import EngineConfig, KvTransferConfig, MigrationConfig
from switchyard.messages import EngineRequest, SamplingOptions
from switchyard.router.migration import EnginePeer, MigrationCoordinator, MigrationOutcome
from switchyard.router.movable_stream import MovableStream
from switchyard.testing.tiny_model import MODEL_SHAPES, build_tiny_model
from switchyard.workers.vllm.engine import VLLMEngine
from switchyard.workers.vllm.env import apply_vllm_env, vllm_env
from switchyard.workers.vllm.kv_transfer import kv_bytes_per_block

__all__ = ["main"]

_ids = itertools.count()
STRATEGIES = ("multistage", "stop_and_copy", "recompute")


def _prompt(rng: random.Random, n: int) -> list[int]:
    """Fresh random token ids: no run can hit another's prefix cache."""
    return [rng.randrange(10, 500) for _ in range(n)]


def _request(tokens: list[int], max_tokens: int) -> EngineRequest:
    opts = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest(f"bench-mig-{next(_ids)}", tokens, opts)


async def _migrate_once(
    coord: MigrationCoordinator,
    src: VLLMEngine,
    dst: VLLMEngine,
    tokens: list[int],
    decode_before: int,
    decode_after: int,
) -> tuple[MigrationOutcome, list[float]]:
    """Stream a request on ``src``, move it to ``dst`` after ``decode_before`` tokens, finish it.

    Returns the outcome and the source's inter-token gaps before the move (its decode step).
    """
    req = _request(tokens, decode_before + decode_after)
    stream = MovableStream(req.request_id, src.instance_id, src.generate(req))
    got = 0
    outcome: MigrationOutcome | None = None
    gaps: list[float] = []
    last = time.monotonic()
    async for out in stream:
        now = time.monotonic()
        if got and outcome is None:
            gaps.append(now - last)
        last = now
        got += len(out.token_ids)
        if outcome is None and got >= decode_before:
            outcome = await stream.move(
                coord, EnginePeer(src, src.instance_id), EnginePeer(dst, dst.instance_id)
            )
    if outcome is None or got != req.sampling.max_tokens:
        raise RuntimeError(f"request ended early: {got} tokens, outcome {outcome}")
    return outcome, gaps


async def _cold_prefill_s(engine: VLLMEngine, tokens: list[int]) -> float:
    """Time to the first token of an uncached prompt: what recomputing it costs."""
    t0 = time.monotonic()
    async for _ in engine.generate(_request(tokens, 1)):
        return time.monotonic() - t0
    raise RuntimeError("no output")


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    cache = cache_dir()
    apply_vllm_env(vllm_env(EngineConfig(), cache_dir=cache), override=False)
    model_dir = build_tiny_model(cache, shape=args.shape)
    cfg = EngineConfig(
        dtype="float32",
        max_model_len=max(args.lengths) + args.decode_after + 64,
        max_num_seqs=4,
        cpu_kvcache_space_gib=args.kv_gib,
    )
    src = await VLLMEngine.start(cfg, instance_id="src", model_dir=model_dir, kv_transfer=KvTransferConfig())
    dst = await VLLMEngine.start(cfg, instance_id="dst", model_dir=model_dir, kv_transfer=KvTransferConfig())
    bpb = kv_bytes_per_block(src.async_llm.vllm_config)
    coordinators = {
        "multistage": MigrationCoordinator(MigrationConfig(), kv_bytes_per_block=bpb),
        "stop_and_copy": MigrationCoordinator(MigrationConfig(max_stages=0), kv_bytes_per_block=bpb),
    }
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    try:
        # Warm-up: the first NIXL handshake between two engines (tens of seconds on a busy CPU,
        # past the default step deadline) and the first prefill of each shape are one-off
        # costs; a 2-block request moves both ways, with a patient coordinator, before timing.
        # It decodes long enough after the cut to still be running when the move reaches it.
        warm = MigrationCoordinator(MigrationConfig(step_timeout_s=300), kv_bytes_per_block=bpb)
        for a, b in ((src, dst), (dst, src)):
            outcome, _ = await _migrate_once(warm, a, b, _prompt(rng, 64), 2, 48)
            print(
                f"warm-up {a.instance_id} -> {b.instance_id}: {outcome.status} {outcome.reason}", flush=True
            )
        for length, rep in itertools.product(args.lengths, range(args.reps)):
            prompt_len = length - args.decode_before
            for name, coord in coordinators.items():
                outcome, gaps = await _migrate_once(
                    coord, src, dst, _prompt(rng, prompt_len), args.decode_before, args.decode_after
                )
                step = _median(gaps)
                rows.append(
                    {
                        "strategy": name,
                        "length": length,
                        "rep": rep,
                        "status": outcome.status,
                        "reason": outcome.reason,
                        "stages": outcome.stages,
                        "precopied_tokens": outcome.precopied_tokens,
                        "blocks_moved": outcome.blocks_moved,
                        "bytes_moved": outcome.blocks_moved * bpb,
                        "downtime_ms": None if outcome.downtime_s is None else outcome.downtime_s * 1e3,
                        "total_ms": outcome.total_s * 1e3,
                        "source_decode_step_ms": None if step is None else step * 1e3,
                    }
                )
            ttft = await _cold_prefill_s(dst, _prompt(rng, length))
            rows.append({"strategy": "recompute", "length": length, "rep": rep, "downtime_ms": ttft * 1e3})
            print(
                f"length {length} rep {rep}: "
                + ", ".join(f"{r['strategy']} {r['downtime_ms']:.0f} ms" for r in rows[-3:]),
                flush=True,
            )
    finally:
        await asyncio.gather(src.close(), dst.close())
    return {"kv_bytes_per_block": bpb, "block_size": cfg.block_size, "rows": rows}


def summarize(rows: Sequence[dict[str, Any]], lengths: Sequence[int]) -> list[dict[str, Any]]:
    """Medians per (length, strategy), and how many times recompute's downtime multistage's is."""
    out = []
    for length in lengths:
        entry: dict[str, Any] = {"length": length}
        for name in STRATEGIES:
            mine = [r for r in rows if r["length"] == length and r["strategy"] == name]
            down = [r["downtime_ms"] for r in mine if r["downtime_ms"] is not None]
            entry[name] = {
                "downtime_ms_median": _median(down),
                "total_ms_median": _median([r["total_ms"] for r in mine if "total_ms" in r]),
                "statuses": sorted({r.get("status", "measured") for r in mine}),
                "mb_moved_median": _median([r["bytes_moved"] / 1e6 for r in mine if "bytes_moved" in r]),
                "stages_median": _median([r["stages"] for r in mine if "stages" in r]),
            }
        ms = entry["multistage"]["downtime_ms_median"]
        rc = entry["recompute"]["downtime_ms_median"]
        entry["recompute_over_multistage_downtime"] = rc / ms if ms and rc else None
        steps = [
            r["source_decode_step_ms"]
            for r in rows
            if r["length"] == length and r.get("source_decode_step_ms")
        ]
        entry["source_decode_step_ms_median"] = _median(steps)
        out.append(entry)
    return out


def plot(summary: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [e["length"] for e in summary]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"multistage": "o-", "stop_and_copy": "s-", "recompute": "^-"}
    for name in STRATEGIES:
        ax.plot(x, [e[name]["downtime_ms_median"] for e in summary], styles[name], label=f"{name} downtime")
    ax.plot(x, [e["multistage"]["total_ms_median"] for e in summary], "o--", label="multistage total time")
    ax.plot(
        x, [e["source_decode_step_ms_median"] for e in summary], ":", color="grey", label="one decode step"
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length at migration (tokens)")
    ax.set_ylabel("ms (median)")
    ax.set_title("Live migration on vLLM CPU (NIXL): downtime vs recompute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/migration"))
    parser.add_argument(
        "--lengths", type=lambda s: [int(v) for v in s.split(",")], default=[256, 512, 1024, 2048]
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="bench-100m")
    parser.add_argument("--decode-before", type=int, default=8, help="tokens decoded on the source first")
    parser.add_argument("--decode-after", type=int, default=16, help="tokens decoded after the move")
    parser.add_argument("--kv-gib", type=int, default=2, help="KV cache per engine (GiB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.lengths) <= args.decode_before or args.reps < 1:
        parser.error("every length must exceed --decode-before, and --reps must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    measured = asyncio.run(_run(args))
    summary = summarize(measured["rows"], args.lengths)
    results = {
        **run_header("bench.migration", argv, started, load_before),
        "accelerator": "none (vLLM CPU build)",
        "setup": {
            "model_shape": args.shape,
            "shape_fields": MODEL_SHAPES[args.shape],
            "dtype": "float32",
            "block_size": measured["block_size"],
            "kv_bytes_per_block": measured["kv_bytes_per_block"],
            "decode_before": args.decode_before,
            "decode_after": args.decode_after,
            "reps": args.reps,
            "transport": "NIXL over UCX (UCX_TLS=tcp,self,sm), two engines on one host",
            "recompute": "cold prefill of a same-length sequence on the destination (TTFT)",
        },
        "summary": summary,
        "rows": measured["rows"],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(summary, args.out / "migration.png")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'migration.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
