"""Soak benchmark: N concurrent streams for T minutes through ``switchyard serve``, killing instances.

Why: the failure tests each check one fault once; a soak checks that faults repeated under
sustained load leave nothing behind. No request may be *lost* (hung past its deadline, or a
stream that ends without ``[DONE]``, without an error event, or with fewer tokens than asked
for); a request that fails must fail with a clear error (an HTTP error body or an SSE error
event). And the serving process tree must not grow: its RSS and open file descriptors are
sampled throughout.

What a run does:

* spawns ``python -m switchyard.cli serve --engine sim`` (the simulator: no inference) and
  waits for ``/health``;
* runs ``--streams`` client loops, each issuing streamed ``/v1/completions`` one after another
  (``ignore_eos``, ``max_tokens`` drawn from ``--max-tokens``) over a fresh connection each, for
  ``--minutes``;
* every ``--kill-every-s`` seconds SIGKILLs one instance actor process (a Ray worker whose
  title names ``InstanceActor``, found among serve's descendants): a crashed engine host. The
  supervisor restarts it; streams on it fail over;
* samples the RSS and fd count of serve's whole process tree (and of the serve process alone)
  every ``--sample-every-s`` seconds;
* stops serve with SIGINT and records its exit status and how long it took.

Writes ``results.json`` and ``soak.png`` into ``--out`` (and ``serve.log``, serve's output, which
is not committed); exits 1 if any request was lost.

    python -m bench.soak --streams 100 --minutes 2 --kill-every-s 30 --out bench/results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil  # type: ignore[import-untyped]  # ships with Ray

from bench.provenance import run_header

__all__ = [
    "KillEvent",
    "RequestRecord",
    "ResourceSample",
    "ServeProcess",
    "instance_processes",
    "main",
    "summarize",
    "tree_usage",
]

Outcome = Literal["ok", "failed", "lost"]
INSTANCE_MARK = "InstanceActor"
"""What the process title of a Ray worker hosting an instance actor contains."""


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it; times are seconds since the run started."""

    start_s: float
    outcome: Outcome
    ttft_s: float | None
    total_s: float | None
    tokens: int
    expected_tokens: int
    detail: str = ""
    """Why it failed or was lost (the error message, "no [DONE]", "deadline")."""


@dataclass(frozen=True)
class KillEvent:
    at_s: float
    pid: int
    title: str
    instances_before: int
    restored_after_s: float | None = None
    """Seconds until as many instance processes ran again as before the kill (None: never)."""


@dataclass(frozen=True)
class ResourceSample:
    at_s: float
    rss_bytes: int  # serve and every descendant
    fds: int
    processes: int
    serve_rss_bytes: int  # the serve process alone (router + gateway)
    serve_fds: int


# -- pure aggregation ---------------------------------------------------------------------------


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles (``p50``...) of ``values``; {} when there are none."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for q in qs:
        rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
        out[f"p{q:g}"] = ordered[rank - 1]
    out["max"] = ordered[-1]
    return out


def _growth(samples: Sequence[ResourceSample], attr: str, window_s: float) -> dict[str, float] | None:
    """Median of ``attr`` over the first and the last ``window_s`` of the samples (at most a
    quarter of the run each, so the two never overlap), and the ratio last / first."""
    if not samples:
        return None
    t0, t1 = samples[0].at_s, samples[-1].at_s
    window_s = min(window_s, (t1 - t0) / 4)
    first = [getattr(s, attr) for s in samples if s.at_s <= t0 + window_s]
    last = [getattr(s, attr) for s in samples if s.at_s >= t1 - window_s]
    a, b = statistics.median(first), statistics.median(last)
    return {"first": a, "last": b, "ratio": (b / a) if a else float("nan")}


def summarize(
    records: Sequence[RequestRecord],
    samples: Sequence[ResourceSample],
    kills: Sequence[KillEvent],
    *,
    duration_s: float,
    window_s: float = 30.0,
) -> dict[str, Any]:
    """The report: counts by outcome, the reasons, latency percentiles of completed requests,
    and how memory and fds moved (median of the first vs the last ``window_s``)."""
    counts = {o: sum(r.outcome == o for r in records) for o in ("ok", "failed", "lost")}
    reasons: dict[str, dict[str, int]] = {"failed": {}, "lost": {}}
    for r in records:
        if r.outcome != "ok":
            bucket = reasons[r.outcome]
            bucket[r.detail] = bucket.get(r.detail, 0) + 1
    ok = [r for r in records if r.outcome == "ok"]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    total = [r.total_s for r in ok if r.total_s is not None]
    restored = [k.restored_after_s for k in kills if k.restored_after_s is not None]
    return {
        "requests": len(records),
        **counts,
        "reasons": reasons,
        "requests_per_s": len(records) / duration_s if duration_s > 0 else 0.0,
        "tokens_ok": sum(r.tokens for r in ok),
        "ttft_s": percentiles(ttft),
        "total_s": percentiles(total),
        "kills": len(kills),
        "kills_restored": len(restored),
        "restore_s": percentiles(restored, (50, 100)),
        "rss_bytes": _growth(samples, "rss_bytes", window_s),
        "fds": _growth(samples, "fds", window_s),
        "serve_rss_bytes": _growth(samples, "serve_rss_bytes", window_s),
        "serve_fds": _growth(samples, "serve_fds", window_s),
        "peak_rss_bytes": max((s.rss_bytes for s in samples), default=0),
        "peak_fds": max((s.fds for s in samples), default=0),
    }


# -- the serve process --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tree(pid: int) -> list[Any]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def instance_processes(pid: int) -> list[Any]:
    """The instance actors' processes below ``pid`` (Ray workers titled ``ray::...InstanceActor...``)."""
    found = []
    for proc in _tree(pid)[1:]:
        with contextlib.suppress(psutil.Error):
            if INSTANCE_MARK in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def tree_usage(pid: int) -> tuple[int, int, int, int, int]:
    """(RSS bytes, open fds, processes) of ``pid`` and its descendants, then RSS and fds of ``pid``."""
    rss = fds = n = own_rss = own_fds = 0
    for i, proc in enumerate(_tree(pid)):
        with contextlib.suppress(psutil.Error):
            r, f = proc.memory_info().rss, proc.num_fds()
            rss, fds, n = rss + r, fds + f, n + 1
            if i == 0:
                own_rss, own_fds = r, f
    return rss, fds, n, own_rss, own_fds


@dataclass
class ServeProcess:
    """``switchyard serve --engine sim`` as a child process, its output in a log file."""

    port: int
    instances: int = 2
    extra_args: Sequence[str] = ()
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "switchyard.cli", "serve", "--engine", "sim",
            "--instances", str(self.instances), "--port", str(self.port), *self.extra_args,
        ]  # fmt: skip
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def wait_healthy(self, within_s: float = 180.0) -> None:
        """Return once ``/health`` answers 200 and every instance process runs."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode} during start-up")
            if (
                await http_status(self.port, "/health") == 200
                and len(instance_processes(self.pid)) >= self.instances
            ):
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"serve not healthy within {within_s:g} s")

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60.0) -> tuple[int | None, float]:
        """Send ``sig`` and wait; (exit status or None if it had to be killed, seconds taken)."""
        assert self.proc is not None
        t0 = time.monotonic()
        code: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        return code, time.monotonic() - t0


async def http_status(port: int, path: str) -> int | None:
    """Status of a ``GET`` (None when the connection fails)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 5)
        return int(line.split()[1]) if line else None
    except (OSError, TimeoutError, ValueError, IndexError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# -- one streamed request -----------------------------------------------------------------------


async def stream_completion(
    port: int, *, model: str, prompt: str, max_tokens: int, deadline_s: float, t0: float
) -> RequestRecord:
    """One streamed completion, classified: ``ok`` (``[DONE]`` after ``max_tokens`` tokens),
    ``failed`` (an HTTP error body or an SSE error event: a clear error), ``lost`` (anything
    else: a cut connection, a short stream, the deadline)."""
    start = time.monotonic()
    ttft: float | None = None
    tokens = 0
    body = json.dumps({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip

    def record(outcome: Outcome, detail: str = "") -> RequestRecord:
        end = time.monotonic()
        return RequestRecord(
            start - t0, outcome, ttft, end - start if outcome == "ok" else None, tokens, max_tokens, detail
        )

    writer = None
    try:
        async with asyncio.timeout(deadline_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                rest = await reader.read()
                try:
                    message = json.loads(rest[rest.index(b"{") :])["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    return record("lost", f"HTTP {status} without an error body")
                return record("failed", f"HTTP {status}: {_short(message)}")
            buffer = b""
            usage_tokens = None
            finished = False
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line[:-2].split(b";")[0], 16)
                if size == 0:
                    break
                buffer += (await reader.readexactly(size + 2))[:-2]
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    data = event.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        if not finished or usage_tokens != max_tokens:
                            return record("lost", "truncated: [DONE] before max_tokens")
                        tokens = usage_tokens
                        return record("ok")
                    payload = json.loads(data)
                    if "error" in payload:
                        return record("failed", f"SSE error: {_short(payload['error'].get('message', ''))}")
                    for choice in payload.get("choices") or ():
                        if choice.get("text") and ttft is None:
                            ttft = time.monotonic() - start
                        if choice.get("finish_reason"):
                            finished = True
                    if payload.get("usage"):
                        usage_tokens = payload["usage"]["completion_tokens"]
            return record("lost", "stream ended without [DONE] or an error")
    except TimeoutError:
        return record("lost", "deadline: no end within the request deadline")
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return record("lost", f"connection: {type(exc).__name__}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _short(message: str) -> str:
    """An error message without its per-request details (ids, addresses), to group by."""
    words = [w for w in message.split() if not any(c.isdigit() for c in w)]
    return " ".join(words)[:120]


# -- the run ------------------------------------------------------------------------------------


@dataclass
class SoakRun:
    args: argparse.Namespace
    serve: ServeProcess
    t0: float = 0.0
    records: list[RequestRecord] = field(default_factory=list)
    samples: list[ResourceSample] = field(default_factory=list)
    kills: list[KillEvent] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def client(self, i: int, end: float) -> None:
        rng = random.Random(self.args.seed * 100_003 + i)
        lo, hi = self.args.max_tokens
        n = 0
        while time.monotonic() < end:
            prompt = f"stream {i} request {n}: " + " ".join(
                rng.choice(_WORDS) for _ in range(rng.randint(4, 40))
            )
            self.records.append(
                await stream_completion(
                    self.serve.port, model=self.args.model, prompt=prompt, max_tokens=rng.randint(lo, hi),
                    deadline_s=self.args.request_deadline_s, t0=self.t0,
                )
            )  # fmt: skip
            n += 1

    async def sampler(self, end: float) -> None:
        while time.monotonic() < end:
            rss, fds, n, own_rss, own_fds = await asyncio.to_thread(tree_usage, self.serve.pid)
            self.samples.append(ResourceSample(self.now(), rss, fds, n, own_rss, own_fds))
            await asyncio.sleep(self.args.sample_every_s)

    async def killer(self, end: float) -> None:
        """Kill one instance process at ``k * --kill-every-s`` (k = 1, 2, ...) on a fixed
        schedule, each kill watched until the fleet is whole again (concurrently: a slow restore
        does not delay the next kill)."""
        if self.args.kill_every_s <= 0:
            return
        rng = random.Random(self.args.seed)
        watchers = []
        k = 0
        while True:
            k += 1
            at = self.t0 + k * self.args.kill_every_s
            if at >= end - 1.0:
                break
            await asyncio.sleep(at - time.monotonic())
            victims = await asyncio.to_thread(instance_processes, self.serve.pid)
            if not victims:
                continue
            victim = rng.choice(sorted(victims, key=lambda p: p.pid))
            title = ""
            with contextlib.suppress(psutil.Error):
                title = " ".join(victim.cmdline()).strip()
                victim.kill()
            watchers.append(
                asyncio.create_task(self._watch_restore(self.now(), victim.pid, title, len(victims), end))
            )
        for kill in await asyncio.gather(*watchers):
            self.kills.append(kill)

    async def _watch_restore(self, at: float, pid: int, title: str, before: int, end: float) -> KillEvent:
        """The kill's record once as many instance processes run as before it (or the run ended)."""
        restored = None
        while time.monotonic() < end:
            await asyncio.sleep(0.25)
            running = await asyncio.to_thread(instance_processes, self.serve.pid)
            if len(running) >= before and pid not in {p.pid for p in running}:
                restored = self.now() - at
                break
        return KillEvent(at, pid, title, before, restored)

    async def run(self) -> None:
        self.t0 = time.monotonic()
        end = self.t0 + self.args.minutes * 60
        await asyncio.gather(
            self.sampler(end), self.killer(end), *(self.client(i, end) for i in range(self.args.streams))
        )


_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "engines", "hum")


def plot(doc: dict[str, Any], path: Path) -> None:
    """Throughput and failures, TTFT, and the process tree's RSS and fds against time; kills marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = doc["records"]
    samples, kills = doc["samples"], doc["kills"]
    duration = max([s["at_s"] for s in samples] + [r["start_s"] for r in records] + [1.0])
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    bin_s = max(1.0, duration / 60)
    bins = int(duration // bin_s) + 1
    for outcome, color in (("ok", "tab:green"), ("failed", "tab:orange"), ("lost", "tab:red")):
        counts = [0] * bins
        for r in records:
            if r["outcome"] == outcome:
                counts[int(r["start_s"] // bin_s)] += 1
        axes[0].plot(
            [i * bin_s for i in range(bins)], [c / bin_s for c in counts], label=outcome, color=color
        )
    axes[0].set_ylabel("requests/s (by start)")
    axes[0].legend(loc="upper right")
    ok = [r for r in records if r["outcome"] == "ok" and r["ttft_s"] is not None]
    axes[1].scatter([r["start_s"] for r in ok], [r["ttft_s"] * 1000 for r in ok], s=2, alpha=0.3)
    axes[1].set_ylabel("TTFT (ms)")
    axes[1].set_yscale("log")
    t = [s["at_s"] for s in samples]
    axes[2].plot(t, [s["rss_bytes"] / 2**20 for s in samples], label="serve + descendants")
    axes[2].plot(t, [s["serve_rss_bytes"] / 2**20 for s in samples], label="serve process")
    axes[2].set_ylabel("RSS (MiB)")
    axes[2].legend(loc="upper right")
    axes[3].plot(t, [s["fds"] for s in samples], label="serve + descendants")
    axes[3].plot(t, [s["serve_fds"] for s in samples], label="serve process")
    axes[3].set_ylabel("open fds")
    axes[3].set_xlabel("seconds")
    axes[3].legend(loc="upper right")
    for ax in axes:
        for k in kills:
            ax.axvline(k["at_s"], color="gray", linestyle=":", linewidth=1)
    s = doc["summary"]
    fig.suptitle(
        f"soak: {doc['config']['streams']} streams, {doc['config']['minutes']:g} min, "
        f"{s['kills']} instance kills; ok {s['ok']}, failed {s['failed']}, lost {s['lost']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--streams", type=int, default=100, help="concurrent client streams (default 100)")
    p.add_argument("--minutes", type=float, default=2.0, help="how long the streams run (default 2)")
    p.add_argument(
        "--kill-every-s", type=float, default=30.0, help="SIGKILL one instance process this often; 0: never"
    )
    p.add_argument("--instances", type=int, default=4, help="simulated instances serve runs (default 4)")
    p.add_argument(
        "--max-tokens", type=lambda s: tuple(int(x) for x in s.split(",")), default=(16, 128),
        help="LO,HI: each request asks for a uniform draw (default 16,128)",
    )  # fmt: skip
    p.add_argument("--request-deadline-s", type=float, default=120.0, help="past it a request counts as lost")
    p.add_argument("--sample-every-s", type=float, default=1.0, help="RSS/fd sampling period (default 1)")
    p.add_argument("--model", default="switchyard-sim", help="served model name (serve's default for sim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for serve (repeatable)")
    p.add_argument("--keep-records", action="store_true", help="store every request in results.json")
    p.add_argument("--out", type=Path, required=True, help="results directory (results.json, soak.png)")
    args = p.parse_args(argv)
    if len(args.max_tokens) != 2 or not 0 < args.max_tokens[0] <= args.max_tokens[1]:
        p.error("--max-tokens takes LO,HI with 0 < LO <= HI")
    return args


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    serve = ServeProcess(
        free_port(), instances=args.instances, extra_args=args.serve_arg, log_path=args.out / "serve.log"
    )
    serve.start()
    run = SoakRun(args, serve)
    try:
        await serve.wait_healthy()
        await run.run()
    finally:
        leftover_before = len(_tree(serve.pid)) - 1 if serve.proc and serve.proc.poll() is None else None
        code, stop_s = serve.stop()
    duration = run.now()
    summary = summarize(run.records, run.samples, run.kills, duration_s=args.minutes * 60)
    summary["serve_exit"] = {"status": code, "stop_s": stop_s, "descendants_at_stop": leftover_before}
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "wall_s": duration,
        "kills": [asdict(k) for k in run.kills],
        "samples": [asdict(s) for s in run.samples],
        "records": [asdict(r) for r in run.records],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_before = dt.datetime.now(dt.UTC), os.getloadavg()
    doc = asyncio.run(_main(args))
    doc = {**run_header("bench.soak", argv, started, load_before), **doc}
    plot(doc, args.out / "soak.png")
    if not args.keep_records:
        doc["records"] = [r for r in doc["records"] if r["outcome"] != "ok"]  # keep every failure
        doc["records_note"] = "only failed and lost requests are kept (--keep-records keeps all)"
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(doc["summary"], indent=2))
    return 1 if doc["summary"]["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
