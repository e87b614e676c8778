"""Load test of ``acd serve``: N clients x M requests, loopback only, bounded in count and time.

    python scripts/load_test.py                       # starts a server in-process, 1/4/16 clients
    python scripts/load_test.py --url http://127.0.0.1:8000 --clients 4 --requests 8

Each client sends its requests one after another (``POST /v1/chat/completions``, not
streamed); clients run concurrently, so the server's coalescer sees up to N requests at
once. Printed per client count: requests/s, p50/p95 latency and generated tokens/s. Not a
test (no pass/fail): the figures go in docs/serving.md.

Safety rails: the URL must be a loopback address; at most 64 clients x 64 requests; every
round stops at ``--budget-s`` (unfinished requests are cancelled and reported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

import httpx

logger = logging.getLogger("load_test")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
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


@contextmanager
def local_server(max_concurrency: int) -> Iterator[str]:
    """``acd serve`` with the default model in this process, on a free loopback port."""
    from acd_engine import get_engine
    from acd_integrations.server import ServerOptions, create_app, serve_in_thread

    app = create_app(ServerOptions(max_concurrency=max_concurrency), engine=get_engine())
    with serve_in_thread(app) as url:
        yield url


async def one_round(
    url: str, model: str, clients: int, requests: int, body: dict[str, Any], budget_s: float
) -> dict[str, Any]:
    """``clients`` concurrent clients, each sending ``requests`` requests in turn."""
    latencies: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for j in range(requests):
            prompt = PROMPTS[(i * requests + j) % len(PROMPTS)]
            payload = {**body, "model": model, "messages": [{"role": "user", "content": prompt}]}
            start = time.perf_counter()
            r = await http.post(url + "/v1/chat/completions", json=payload)
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                continue
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=budget_s) as http:
        tasks = [asyncio.create_task(client(i, http)) for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=budget_s)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                name = type(task.exception()).__name__
                errors[name] = errors.get(name, 0) + 1
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat),
        "asked": clients * requests,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 3),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p95_s": round(lat[max(0, int(0.95 * len(lat)) - 1)], 3) if lat else None,
        "tokens_per_s": round(tokens / wall, 1),
        "errors": errors,
        "timed_out": bool(pending),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="A running server (loopback only); default: start one here.")
    p.add_argument("--clients", default="1,4,16", help="Client counts, comma-separated.")
    p.add_argument("--requests", type=int, default=4, help="Requests per client (max 64).")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--method", default="acd")
    p.add_argument("--budget-s", type=float, default=300.0, help="Time limit of each round.")
    p.add_argument("--json", action="store_true", help="Print one JSON object per round.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    counts = [int(c) for c in args.clients.split(",")]
    if not all(1 <= c <= 64 for c in counts) or not 1 <= args.requests <= 64:
        p.error("clients and requests must each be in [1, 64]")
    body = {"max_tokens": args.max_tokens, "temperature": 0, "method": args.method}

    def run(url: str) -> None:
        host = urlparse(url).hostname
        if host not in LOOPBACK:
            p.error(f"url must be a loopback address (127.0.0.1, localhost, ::1), got {host}")
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        for clients in counts:
            result = asyncio.run(one_round(url, model, clients, args.requests, body, args.budget_s))
            if args.json:
                sys.stdout.write(json.dumps(result) + "\n")
            else:
                logger.info(
                    "%2d clients: %3d/%d requests in %6.1fs  %.2f req/s  p50 %.2fs  p95 %.2fs  "
                    "%.1f tokens/s  errors %s",
                    clients,
                    result["requests"],
                    result["asked"],
                    result["wall_s"],
                    result["requests_per_s"],
                    result["p50_s"] or 0,
                    result["p95_s"] or 0,
                    result["tokens_per_s"],
                    result["errors"] or "none",
                )

    if args.url:
        run(args.url.rstrip("/"))
    else:
        with local_server(max_concurrency=max(counts) + 4) as url:
            run(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
