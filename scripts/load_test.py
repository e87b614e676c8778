"""Load and fault test of ``acd serve`` on loopback: bounded, streaming, stops by itself.

    python scripts/load_test.py                 # starts acd serve here; the full profile
    python scripts/load_test.py --quick         # the smoke profile (make loadtest LOADTEST_ARGS=--quick)
    python scripts/load_test.py --json-out run.json --md-out run.md
    python scripts/load_test.py --url http://127.0.0.1:8000   # a running server (no kill phase)

It starts ``acd serve`` as a child process on a free loopback port (``--max-concurrency``
is the queue bound B) and runs, in order:

* **load**: 1, 8 and 32 concurrent clients (``--clients``), each sending ``--requests``
  streamed chat requests one after another;
* **overload**: 4 x B clients at once, one request each: the server must refuse what it
  cannot admit with 429 (and ``Retry-After``), and answer the rest;
* **disconnects**: clients that leave mid-stream and clients that leave while their
  request is still queued (admitted, waiting for the engine behind requests it cannot be
  batched with); their slots must come back (the server's ``acd_queue_depth`` gauge returns
  to 0), and a follow-up burst of B requests must all be admitted;
* **kill**: clients streaming when the server is killed (SIGKILL) must end with a
  connection error of a documented kind (closed mid-response, reset, refused), never hang;
  the server restarted on the same port must serve a burst again.

Every request has a deadline (``--timeout-s``): one that passes it counts as ``timeout`` (a
hung request). An admitted request must end with ``data: [DONE]`` after a final chunk; a 200
stream that ends otherwise counts as ``lost``. In the load and overload phases only ``ok``
and ``429`` are allowed; anything else (a 5xx, a timeout, a lost answer) fails the run.

Per phase it reports requests/s, generated tokens/s (the server's ``usage``), p50/p99 time
to first token (the first chunk with content), p99 latency (to ``[DONE]``) and the outcomes
by kind; a Markdown table on stdout (``--json``: the JSON instead), ``--json-out`` /
``--md-out`` write them to files. The exit status is 1 when a check fails.

Backends (``--backends``, default both): each gets its own server (``acd serve --backend``)
and its own table; llama.cpp is reported as skipped, with the reason, where ``llama_cpp`` is
not importable.

Safety rails: the URL must be a loopback address; at most 256 clients in a phase; every
request has its deadline and the whole run ``--budget-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import errno
import importlib.util
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

logger = logging.getLogger("load_test")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_CLIENTS = 256
PROMPTS = [
    "Name three colours.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Give me a tip for learning to cook.",
    "Describe a cat in one sentence.",
    "How do I kill a Python process that is stuck?",
    "Suggest a name for a bakery.",
    "Why is the sky blue? One sentence.",
]
LONG_PROMPT = "Write a long story about a dragon who learns to cook, with many chapters."
# The streams that hold a slot run until the context is full (the server clamps max_tokens
# to the room left), so they outlast the phase on any model; their clients leave first.
LONG_TOKENS = 1_000_000
# What a client may see when the server dies under it (documented in docs/serving.md).
CONNECTION_ERRORS = {"conn_refused", "conn_closed", "conn_reset"}
ALLOWED_UNDER_LOAD = {"ok", "429"}


@dataclass
class Profile:
    """The sizes of one run (``--quick`` shrinks every one of them)."""

    clients: list[int]
    requests: int
    max_concurrency: int
    max_tokens: int
    timeout_s: float
    budget_s: float


FULL = Profile([1, 8, 32], 4, 32, 32, 180.0, 1800.0)
QUICK = Profile([1, 4], 2, 4, 8, 90.0, 600.0)


@dataclass
class Outcome:
    """One request: how it ended and its timings."""

    kind: str  # ok | 429 | http_<status> | lost | stream_error | timeout | conn_* | ...
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    retry_after: str | None = None
    detail: str = ""


@dataclass
class PhaseResult:
    """What one phase measured and whether its checks held."""

    name: str
    clients: int
    wall_s: float
    outcomes: dict[str, int]
    requests_per_s: float | None = None
    tokens_per_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    latency_p99_s: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- one request ------------------------------------------------------------------------------


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        yield at
        at = at.__cause__ or at.__context__


def _kind_of(exc: BaseException) -> str:
    """A transport failure by the kind a client sees (documented in docs/serving.md)."""
    causes = list(_causes(exc))
    errnos = {getattr(c, "errno", None) for c in causes}
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "timeout"
    if any(isinstance(c, ConnectionRefusedError) for c in causes) or errno.ECONNREFUSED in errnos:
        return "conn_refused"  # nothing listens: the server is down
    if any(isinstance(c, ConnectionResetError) for c in causes) or errnos & {
        errno.ECONNRESET,
        errno.EPIPE,
    }:
        return "conn_reset"  # the server's end vanished mid-exchange
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "conn_closed"  # closed before the response (or its body) was complete
    if isinstance(exc, httpx.ConnectError):
        return "conn_error"
    return f"client_{type(exc).__name__}"


def _body(model: str, prompt: str, max_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


async def stream_request(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    timeout_s: float,
    first_token: asyncio.Event | None = None,
    hold: asyncio.Event | None = None,
) -> Outcome:
    """One streamed chat request, bounded by ``timeout_s``; never raises.

    ``first_token`` is set at the first content chunk; with ``hold`` the client then waits
    for it and leaves mid-stream (closing the connection) instead of reading on.
    """
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            return await _stream(http, url, body, start, first_token, hold)
    except TimeoutError:
        return Outcome("timeout", latency_s=time.perf_counter() - start)
    except httpx.HTTPError as exc:
        return Outcome(_kind_of(exc), detail=str(exc)[:200])
    except OSError as exc:
        return Outcome(_kind_of(exc), detail=str(exc)[:200])


async def _stream(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    start: float,
    first_token: asyncio.Event | None,
    hold: asyncio.Event | None,
) -> Outcome:
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            kind = "429" if response.status_code == 429 else f"http_{response.status_code}"
            return Outcome(
                kind,
                latency_s=time.perf_counter() - start,
                retry_after=response.headers.get("retry-after"),
                detail=response.text[:200],
            )
        ttft: float | None = None
        tokens = 0
        finished = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue  # blank separators and ": keep-alive" comments
            data = line[6:]
            if data == "[DONE]":
                kind = "ok" if finished else "lost"
                if ttft is None:
                    ttft = time.perf_counter() - start
                return Outcome(kind, ttft, time.perf_counter() - start, tokens)
            event = json.loads(data)
            if "error" in event:
                return Outcome("stream_error", detail=json.dumps(event)[:200])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if ttft is None and (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - start
                    if first_token is not None:
                        first_token.set()
                    if hold is not None:
                        await hold.wait()
                        return Outcome("left_mid_stream", ttft)
                if choice.get("finish_reason"):
                    finished = True
        return Outcome("lost", ttft, time.perf_counter() - start, tokens, detail="no [DONE]")


# -- phases -----------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (p99 of fewer than 100 samples is their maximum)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return round(ordered[int(rank) - 1], 3)


def _summarize(name: str, clients: int, wall: float, outcomes: list[Outcome]) -> PhaseResult:
    ok = [o for o in outcomes if o.kind == "ok"]
    result = PhaseResult(
        name=name,
        clients=clients,
        wall_s=round(wall, 2),
        outcomes=dict(sorted(Counter(o.kind for o in outcomes).items())),
    )
    if ok and wall > 0:
        result.requests_per_s = round(len(ok) / wall, 3)
        result.tokens_per_s = round(sum(o.tokens for o in ok) / wall, 1)
        result.ttft_p50_s = _pct([o.ttft_s for o in ok if o.ttft_s is not None], 50)
        result.ttft_p99_s = _pct([o.ttft_s for o in ok if o.ttft_s is not None], 99)
        result.latency_p99_s = _pct([o.latency_s for o in ok if o.latency_s is not None], 99)
    refused = [o for o in outcomes if o.kind == "429"]
    result.checks["only ok and 429"] = set(result.outcomes) <= ALLOWED_UNDER_LOAD
    result.checks["every 429 has Retry-After"] = all(o.retry_after for o in refused)
    bad = [o for o in outcomes if o.kind not in ALLOWED_UNDER_LOAD]
    result.notes += [f"{o.kind}: {o.detail}" for o in bad[:5]]
    return result


def _client() -> httpx.AsyncClient:
    # No pool limit: each client holds its own connection, as separate applications would.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=10.0))


async def load_phase(
    url: str, model: str, clients: int, requests: int, p: Profile, extra: dict[str, Any]
) -> PhaseResult:
    """``clients`` concurrent clients, each sending ``requests`` streamed requests in turn."""

    async def client(i: int, http: httpx.AsyncClient) -> list[Outcome]:
        out = []
        for j in range(requests):
            prompt = PROMPTS[(i * requests + j) % len(PROMPTS)]
            body = _body(model, prompt, p.max_tokens, extra)
            out.append(await stream_request(http, url, body, p.timeout_s))
        return out

    start = time.perf_counter()
    async with _client() as http:
        per_client = await asyncio.gather(*(client(i, http) for i in range(clients)))
    wall = time.perf_counter() - start
    return _summarize(f"load {clients}", clients, wall, [o for c in per_client for o in c])


async def overload_phase(url: str, model: str, p: Profile, extra: dict[str, Any]) -> PhaseResult:
    """4 x the queue bound at once, one request each: the bound must hold (429s)."""
    clients = 4 * p.max_concurrency
    start = time.perf_counter()
    async with _client() as http:
        outcomes = await asyncio.gather(
            *(
                stream_request(
                    http,
                    url,
                    _body(model, PROMPTS[i % len(PROMPTS)], p.max_tokens, extra),
                    p.timeout_s,
                )
                for i in range(clients)
            )
        )
    result = _summarize(
        f"overload {clients} (4 x {p.max_concurrency})",
        clients,
        time.perf_counter() - start,
        outcomes,
    )
    result.checks["the bound refused some (429)"] = result.outcomes.get("429", 0) > 0
    result.checks["the bound admitted some"] = result.outcomes.get("ok", 0) > 0
    return result


async def queue_depth(http: httpx.AsyncClient, url: str) -> float | None:
    """The server's ``acd_queue_depth`` gauge (admitted, unfinished requests)."""
    try:
        text = (await http.get(url + "/metrics", timeout=10)).text
    except httpx.HTTPError:
        return None
    match = re.search(r"^acd_queue_depth(?:\{[^}]*\})?\s+(\S+)$", text, re.M)
    return float(match.group(1)) if match else None


async def _wait_depth(
    http: httpx.AsyncClient, url: str, want: float, timeout_s: float, at_least: bool = False
) -> tuple[bool, float | None, float]:
    start = time.perf_counter()
    depth = None
    while time.perf_counter() - start < timeout_s:
        depth = await queue_depth(http, url)
        if depth is not None and (depth >= want if at_least else depth == want):
            return True, depth, time.perf_counter() - start
        await asyncio.sleep(0.1)
    return False, depth, time.perf_counter() - start


async def disconnect_phase(
    url: str, model: str, p: Profile, extra: dict[str, Any], alt_method: str
) -> PhaseResult:
    """Clients leave mid-stream and while queued; their slots must come back."""
    bound = p.max_concurrency
    # One long stream holds the engine (a running batch takes no newcomers), so the other
    # B - 1 requests are admitted and wait for it: those clients leave while queued, then
    # the stream's client leaves mid-stream.
    held = 1
    queued = max(1, bound - held)
    result = PhaseResult(f"disconnects ({held} mid-stream, {queued} queued)", held + queued, 0, {})
    start = time.perf_counter()
    async with _client() as http, _client() as probe:
        base = await queue_depth(probe, url)
        if base is None:
            result.notes.append("no acd_queue_depth in /metrics: slots checked by the burst only")
        leave = asyncio.Event()
        firsts = [asyncio.Event() for _ in range(held)]
        long_body = _body(model, LONG_PROMPT, LONG_TOKENS, extra)
        holders = [
            asyncio.create_task(stream_request(http, url, long_body, p.timeout_s, ev, leave))
            for ev in firsts
        ]
        try:
            async with asyncio.timeout(p.timeout_s):
                await asyncio.gather(*(ev.wait() for ev in firsts))
        except TimeoutError:
            result.notes.append("the long streams gave no first token in time")
        # Other settings than the running batch's: admitted, but they wait for the engine.
        other = {**extra, "method": alt_method}
        waiting = [
            asyncio.create_task(
                stream_request(
                    http, url, _body(model, PROMPTS[i % 8], p.max_tokens, other), p.timeout_s
                )
            )
            for i in range(queued)
        ]
        if base is not None:
            admitted, depth, _ = await _wait_depth(
                probe, url, held + queued, p.timeout_s / 3, at_least=True
            )
            result.checks["the queued requests were admitted"] = admitted
            if not admitted:
                result.notes.append(f"acd_queue_depth reached {depth}, not {held + queued}")
        else:
            await asyncio.sleep(1.0)
        still_waiting = sum(not t.done() for t in waiting)
        result.checks["the queued requests were still waiting when they left"] = (
            still_waiting == queued
        )
        for task in waiting:  # leave while queued: the connection closes before any token
            task.cancel()
        leave.set()  # leave mid-stream
        outcomes = await asyncio.gather(*holders)
        await asyncio.gather(*waiting, return_exceptions=True)
        gone = time.perf_counter()
        result.outcomes = dict(Counter(o.kind for o in outcomes))
        result.outcomes["left_while_queued"] = still_waiting
        if base is not None:
            back, depth, took = await _wait_depth(probe, url, 0, 60.0)
            result.checks["slots back (acd_queue_depth 0)"] = back
            result.notes.append(
                f"slots back {took:.2f} s after the clients left"
                if back
                else f"acd_queue_depth still {depth} 60 s after the clients left"
            )
        burst = await asyncio.gather(
            *(
                stream_request(
                    http, url, _body(model, PROMPTS[i % 8], p.max_tokens, extra), p.timeout_s
                )
                for i in range(bound)
            )
        )
        kinds = Counter(o.kind for o in burst)
        result.checks[f"a burst of {bound} after it: all admitted"] = kinds == Counter(ok=bound)
        result.notes.append(f"burst after {time.perf_counter() - gone:.2f} s: {dict(kinds)}")
    result.checks["no hung request"] = all(o.kind != "timeout" for o in outcomes)
    result.wall_s = round(time.perf_counter() - start, 2)
    return result


async def kill_phase(
    server: ServerProcess, model: str, p: Profile, extra: dict[str, Any]
) -> PhaseResult:
    """Kill the server under streaming clients; then restart it and serve a burst."""
    url = server.url
    clients = max(2, p.max_concurrency // 2)
    result = PhaseResult(f"kill and restart ({clients} clients)", clients, 0, {})
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    async with _client() as http:
        streaming = asyncio.Event()
        body = _body(model, LONG_PROMPT, LONG_TOKENS, extra)

        async def client(i: int) -> None:
            # Requests in turn until one fails: the one in flight when the server dies, or
            # the next (refused); each bounded by the deadline, so a hang shows as a timeout.
            # The first to reach the engine streams; the others wait behind it, so the kill
            # meets both a stream and queued requests.
            for _ in range(4):
                outcome = await stream_request(http, url, body, p.timeout_s, streaming)
                outcomes.append(outcome)
                if outcome.kind != "ok":
                    return

        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        try:
            async with asyncio.timeout(p.timeout_s):
                await streaming.wait()
        except TimeoutError:
            result.notes.append("no stream started before the kill")
        await asyncio.sleep(0.5)
        server.kill()
        killed = time.perf_counter()
        await asyncio.gather(*tasks)
        result.notes.append(
            f"every client ended {time.perf_counter() - killed:.2f} s after the kill"
        )
        after = await stream_request(http, url, body, p.timeout_s)  # the server is down
        outcomes.append(after)
        result.outcomes = dict(sorted(Counter(o.kind for o in outcomes).items()))
        errors = {k for k in result.outcomes if k != "ok"}
        result.checks["clients saw connection errors, not hangs"] = (
            bool(errors) and errors <= CONNECTION_ERRORS
        )
        result.checks["a request to the dead server is refused"] = after.kind == "conn_refused"
        took = server.start()
        result.notes.append(f"restarted and ready in {took:.1f} s")
        burst = await asyncio.gather(
            *(
                stream_request(
                    http, url, _body(model, PROMPTS[i % 8], p.max_tokens, extra), p.timeout_s
                )
                for i in range(clients)
            )
        )
        kinds = Counter(o.kind for o in burst)
        result.checks[f"after the restart a burst of {clients}: all answered"] = kinds == Counter(
            ok=clients
        )
        result.notes.append(f"burst after the restart: {dict(kinds)}")
    result.wall_s = round(time.perf_counter() - start, 2)
    return result


# -- the server -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``acd serve`` as a child process on a fixed loopback port (so it can be restarted)."""

    def __init__(self, args: list[str], log_path: Path, start_timeout_s: float) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            *(sys.executable, "-m", "acd_engine.cli.main", "serve"),
            *("--host", "127.0.0.1", "--port", str(self.port), *args),
        ]
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it and wait for /health 200; returns the seconds that took."""
        began = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"acd serve exited {self.process.returncode}:\n{self.tail()}")
            if time.perf_counter() - began > self.start_timeout_s:
                raise RuntimeError(
                    f"acd serve not ready in {self.start_timeout_s:g} s:\n{self.tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.perf_counter() - began
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the clients (a crash, an OOM kill)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def tail(self, n: int = 30) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


@contextlib.contextmanager
def started(server: ServerProcess) -> Iterator[float]:
    try:
        yield server.start()
    finally:
        server.stop()


# -- the run ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory_gib = round(kib / 2**20, 1)
    versions = {}
    for name in ("torch", "transformers", "uvicorn", "fastapi"):
        with contextlib.suppress(Exception):  # a version is a nice-to-have
            from importlib.metadata import version

            versions[name] = version(name)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def backend_unavailable(backend: str, model: str | None = None) -> str | None:
    """Why ``backend`` cannot be measured here, or None."""
    if backend != "llamacpp":
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not installed (pip install 'acd-decoding[llamacpp]')"
    if model is not None and not model.endswith(".gguf"):
        return f"llama.cpp runs a .gguf file, and --model is {model}"
    return None


async def run_phases(
    url: str, p: Profile, extra: dict[str, Any], alt_method: str, server: ServerProcess | None
) -> list[PhaseResult]:
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    phases = []
    for clients in p.clients:
        phases.append(await load_phase(url, model, clients, p.requests, p, extra))
        logger.info("%s done", phases[-1].name)
    phases.append(await overload_phase(url, model, p, extra))
    logger.info("%s done", phases[-1].name)
    phases.append(await disconnect_phase(url, model, p, extra, alt_method))
    logger.info("%s done", phases[-1].name)
    if server is not None:
        phases.append(await kill_phase(server, model, p, extra))
        logger.info("%s done", phases[-1].name)
    return phases


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the machine, one table per backend, the checks."""
    m = report["machine"]
    cfg = report["config"]
    lines = [
        f"acd serve load test, {report['date']} ({report['profile']} profile, {report['wall_s']} s)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}; "
        f"Python {m['python']}; load average at the start {m['load_average']}.",
        f"Server: `acd serve --max-concurrency {cfg['max_concurrency']}`, method "
        f"`{cfg['method']}`, greedy, `max_tokens` {cfg['max_tokens']}, streamed with usage; "
        f"{cfg['requests']} requests per client in the load phases.",
    ]

    def s(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f} s"

    def n(v: float | None) -> str:
        return "–" if v is None else f"{v:g}"

    for run in report["runs"]:
        lines += ["", f"Backend {run['backend']}:"]
        if "skipped" in run:
            lines[-1] += f" skipped: {run['skipped']}."
            continue
        if "error" in run:
            lines += ["", "```", run["error"], "```"]
            continue
        lines += [
            "",
            "| phase | clients | outcomes | requests/s | tokens/s | p50 TTFT | p99 TTFT | p99 latency |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for ph in run["phases"]:
            outcomes = ", ".join(f"{k} {v}" for k, v in ph["outcomes"].items())
            lines.append(
                f"| {ph['name']} | {ph['clients']} | {outcomes} | {n(ph['requests_per_s'])} | "
                f"{n(ph['tokens_per_s'])} | {s(ph['ttft_p50_s'])} | {s(ph['ttft_p99_s'])} | "
                f"{s(ph['latency_p99_s'])} |"
            )
        lines += ["", "Checks:"]
        for ph in run["phases"]:
            for name, ok in ph["checks"].items():
                lines.append(f"- [{'x' if ok else ' '}] {ph['name']}: {name}")
            lines += [f"  - {note}" for note in ph["notes"]]
        lines += [f"- {note}" for note in run["notes"]]
    lines += ["", f"Result: {'PASS' if report['passed'] else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="The smoke profile (about a minute).")
    p.add_argument("--url", help="A running server (loopback only); default: start one here.")
    p.add_argument(
        "--backends",
        default="torch,llamacpp",
        help="acd serve --backend of the servers started here, comma-separated; one that "
        "cannot run here is reported as skipped.",
    )
    p.add_argument("--clients", help="Client counts of the load phases, comma-separated.")
    p.add_argument("--requests", type=int, help="Requests per client in the load phases.")
    p.add_argument("--max-concurrency", type=int, help="The queue bound B of the server started.")
    p.add_argument("--max-tokens", type=int, help="max_tokens of each request.")
    p.add_argument("--method", default="acd", help="Decoding method of each request.")
    p.add_argument("--model", help="acd serve --model for the server started here.")
    p.add_argument("--timeout-s", type=float, help="Deadline of each request (a hang past it).")
    p.add_argument("--budget-s", type=float, help="Deadline of the whole run.")
    p.add_argument("--json", action="store_true", help="Print the JSON report, not Markdown.")
    p.add_argument("--json-out", type=Path, help="Also write the JSON report here.")
    p.add_argument("--md-out", type=Path, help="Also write the Markdown report here.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="load_test: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    base = QUICK if args.quick else FULL
    profile = Profile(
        clients=[int(c) for c in args.clients.split(",")] if args.clients else base.clients,
        requests=args.requests or base.requests,
        max_concurrency=args.max_concurrency or base.max_concurrency,
        max_tokens=args.max_tokens or base.max_tokens,
        timeout_s=args.timeout_s or base.timeout_s,
        budget_s=args.budget_s or base.budget_s,
    )
    if not all(1 <= c <= MAX_CLIENTS for c in profile.clients) or profile.requests < 1:
        p.error(f"client counts must be in [1, {MAX_CLIENTS}] and requests >= 1")
    if not 1 <= 4 * profile.max_concurrency <= MAX_CLIENTS:
        p.error(f"4 x --max-concurrency must be at most {MAX_CLIENTS}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or not set(backends) <= {"torch", "llamacpp"}:
        p.error(f"backends must be torch and/or llamacpp, got {args.backends!r}")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"url must be a loopback address (127.0.0.1, localhost, ::1), got {args.url}")
    extra = {"method": args.method}
    alt_method = "plain" if args.method != "plain" else "base"
    started_at = time.perf_counter()
    deadline = time.monotonic() + profile.budget_s
    box = machine()  # before the run: the load average is the machine's, not ours
    runs: list[dict[str, Any]] = []
    for backend in ["(--url)"] if args.url else backends:
        why = None if args.url else backend_unavailable(backend, args.model)
        if why is not None:
            runs.append({"backend": backend, "skipped": why})
            logger.info("backend %s skipped: %s", backend, why)
            continue
        try:
            runs.append(
                run_backend(backend, args, profile, extra, alt_method, deadline - time.monotonic())
            )
        except (RuntimeError, TimeoutError) as exc:  # a server that did not start; the budget
            error = str(exc) or f"over --budget-s {profile.budget_s:g}"
            logger.error("backend %s failed: %s", backend, error)
            runs.append({"backend": backend, "error": error, "passed": False})
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "profile": "quick" if args.quick else "full",
        "wall_s": round(time.perf_counter() - started_at, 1),
        "machine": box,
        "config": {**asdict(profile), "method": args.method, "url": args.url, "model": args.model},
        "runs": runs,
        "passed": all(r.get("passed", True) for r in runs) and any("phases" in r for r in runs),
    }
    text = markdown(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    if args.md_out:
        args.md_out.write_text(text)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else text)
    return 0 if report["passed"] else 1


def run_backend(
    backend: str,
    args: argparse.Namespace,
    profile: Profile,
    extra: dict[str, Any],
    alt_method: str,
    budget_s: float,
) -> dict[str, Any]:
    """Every phase against one server: ``--url``'s, or ``acd serve`` started here."""
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="acd-loadtest-") as tmp:
        server: ServerProcess | None = None
        if args.url:
            url = args.url.rstrip("/")
            notes.append("the server was given by --url: no kill phase")
            runner: contextlib.AbstractContextManager[float] = contextlib.nullcontext(0.0)
        else:
            serve_args = [
                *("--max-concurrency", str(profile.max_concurrency)),
                *("--max-tokens", str(profile.max_tokens), "--method", args.method),
                *(("--model", args.model) if args.model else ()),
                *(("--backend", backend) if backend != "torch" else ()),
            ]
            server = ServerProcess(serve_args, Path(tmp) / "serve.log", start_timeout_s=300)
            url = server.url
            runner = started(server)
        with runner as ready_s:
            logger.info("backend %s: server at %s (ready in %.1f s)", backend, url, ready_s)
            notes.append(f"the server was ready in {ready_s:.1f} s")

            async def bounded() -> list[PhaseResult]:
                async with asyncio.timeout(budget_s):
                    return await run_phases(url, profile, extra, alt_method, server)

            phases = asyncio.run(bounded())
    return {
        "backend": backend,
        "phases": [asdict(ph) for ph in phases],
        "notes": notes,
        "passed": all(all(ph.checks.values()) for ph in phases),
    }


if __name__ == "__main__":
    raise SystemExit(main())
