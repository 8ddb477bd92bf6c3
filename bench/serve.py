"""Serving throughput: many concurrent clients against `openglm serve`, with batching and without.

For each mode the server runs as its own process (`python -m openglm serve --model runs/tiny`, one
torch thread by default, as bench/generate.py explains) on a loopback port; `--clients` asyncio
clients (httpx) then send OpenAI `/v1/completions` requests back to back for `--duration` seconds
(requests in flight at the end are waited for and counted). Every request samples exactly
`--max-tokens` tokens (`min_tokens == max_tokens`, temperature 0.8, top-p 0.9, a seed per request)
from one of a fixed set of English / Chinese prompts, so both modes do the same work. Modes:

* batching: continuous batching, up to `--max-batch` rows per forward (the server's default);
* no batching: `--max-batch 1`, one request decoding at a time, the others queued.

Prints requests/s, generated tokens/s, p50 / p99 latency (submit to full response) and errors
(any non-200 answer or failed connection; must be 0), then the tokens/s ratio (target >= 3x).

    python bench/serve.py                      # 64 clients x 30 s per mode, the README table
    python bench/serve.py --duration 5 --clients 8   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "It is a truth universally acknowledged that [gMASK]",
    "Elizabeth was [MASK] to see her sister.",
    "Mr. Darcy walked into the room and [gMASK]",
    "曹操引兵[gMASK]",
    "玄德曰：[gMASK]",
    "The weather at Netherfield was [MASK], and the party [MASK].",
    "She could not help [gMASK]",
    "孔明笑曰：[gMASK]",
]


@dataclass
class Result:
    mode: str
    requests: int
    errors: int
    seconds: float
    tokens: int
    p50: float
    p99: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, max_batch: int, threads: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "openglm", "serve", "--model", str(model), "--port", str(port), "--max-batch", str(max_batch)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read().decode() if server.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start within 120 s")


async def load(url: str, model_name: str, clients: int, duration: float, max_tokens: int) -> tuple[list[float], int, int, float]:
    """Latencies of successful requests, their generated tokens, errors, and the wall time."""
    latencies: list[float] = []
    counts = {"tokens": 0, "errors": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        start = time.monotonic()
        stop = start + duration

        async def worker(index: int) -> None:
            n = 0
            while time.monotonic() < stop:
                body = {
                    "model": model_name,
                    "prompt": PROMPTS[(index + n) % len(PROMPTS)],
                    "max_tokens": max_tokens,
                    "min_tokens": max_tokens,
                    "temperature": 0.8,
                    "top_p": 0.9,
                    "seed": index * 100_000 + n,
                }
                n += 1
                sent = time.monotonic()
                try:
                    response = await client.post("/v1/completions", json=body)
                except httpx.HTTPError:
                    counts["errors"] += 1
                    continue
                if response.status_code != 200:
                    counts["errors"] += 1
                    continue
                latencies.append(time.monotonic() - sent)
                counts["tokens"] += response.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(worker(i) for i in range(clients)))
        return latencies, counts["tokens"], counts["errors"], time.monotonic() - start


def run_mode(mode: str, args: argparse.Namespace, max_batch: int) -> Result:
    port = free_port()
    server = start_server(args.model, port, max_batch, args.threads)
    url = f"http://127.0.0.1:{port}"
    try:
        model_name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(load(url, model_name, min(args.clients, 8), 3, args.max_tokens))  # warm-up
        latencies, tokens, errors, seconds = asyncio.run(load(url, model_name, args.clients, args.duration, args.max_tokens))
    finally:
        server.terminate()
        server.wait(30)
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return Result(mode, len(latencies), errors, seconds, tokens, cuts[49], cuts[98])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per mode")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    results = [run_mode("batching", args, args.max_batch), run_mode("no batching", args, 1)]
    print(f"{args.clients} clients x {args.duration:g} s per mode, {args.max_tokens} tokens per request, {args.model}, "
          f"{args.threads} server thread(s); load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print()
    print("| mode | requests | requests/s | tokens/s | p50 latency | p99 latency | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.mode} | {r.requests} | {r.requests_per_s:.1f} | {r.tokens_per_s:.0f} | {r.p50:.2f} s | {r.p99:.2f} s | {r.errors} |")
    ratio = results[0].tokens_per_s / results[1].tokens_per_s
    print(f"\nbatching / no batching: {ratio:.2f}x tokens/s (target >= 3x)")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "ratio": ratio, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    if any(r.errors for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
