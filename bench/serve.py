"""Serving benchmark: N concurrent streaming clients against `python -m serving.main`, gate on and off.

    python bench/serve.py                                  # 1, 8, 32, 64 clients, 64 tokens each, default model
    python bench/serve.py --clients 1,8 --max-tokens 32    # a quicker run
    python bench/serve.py --slots-per-run                  # restart the server per N with slots = N
    python bench/serve.py --unroll-layers                  # the layers unrolled ([engine] unroll_layers)

For each gate mode the server runs in its own process (warmed up before measuring: compile time is reported
separately, not counted). Every client streams one chat completion (temperature 0, different prompts) and
the table reports:

  tok/s      aggregate completion tokens per second (all clients' tokens / wall time of the round)
  TTFT       time from sending a request to its first content chunk, p50 and p99 over the clients
  ITL        inter-token latency per stream, (last chunk - first chunk) / (tokens - 1), p50 and p99

"gate on" serves under policies/default.yaml (the per-slot phrase gate on every token, audit records written
and fsync'd per answer); "gate off" runs with --no-gate (no gate in the compiled step, no audit).
llama.cpp's OpenAI-compatible server (llama-cpp-python[server], same GGUF) is added when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "bench-key"
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, step by step.",
    "Describe a walk through a forest in autumn.",
    "List ten facts about the ocean and explain each one.",
    "Write a letter to a friend about your favourite book.",
    "Explain the rules of chess to a beginner.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a recipe for a vegetable soup with every step.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


class Server:
    def __init__(self, args, gate: bool, slots: int, workdir: str):
        import hashlib

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = os.path.join(workdir, f"bench-{self.port}.toml")
        with open(cfg, "w") as f:
            f.write(f"[engine]\nunroll_layers = {'true' if args.unroll_layers else 'false'}\n\n")
            f.write(f'[[keys]]\nsha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"\nprincipal = "bench"\n')
        cmd = [sys.executable, "-m", "serving.main", "--config", cfg, "--port", str(self.port),
               "--slots", str(slots), "--max-len", str(args.max_len), "--chunk-steps", str(args.chunk_steps),
               "--prefill-chunk", str(args.prefill_chunk), "--max-queue", str(max(64, slots)),
               "--state-dir", os.path.join(workdir, f"state-{self.port}"), "--log-level", "warning",
               "--policy", os.path.join(ROOT, "policies", "default.yaml")]
        if args.model:
            cmd += ["--model", args.model]
        if not gate:
            cmd.append("--no-gate")
        self.log = open(os.path.join(workdir, f"server-{self.port}.log"), "w")
        t = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.startup_s = time.monotonic() - t
        models = httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        self.model = models["data"][0]["id"]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "status": chunk["error"].get("code")}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
    return {"ok": True, "ttft": (first or time.perf_counter()) - t0, "tokens": tokens,
            "itl": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None}


async def _round(server: Server, n: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(client, server.url, server.model, PROMPTS[i % len(PROMPTS)], max_tokens)
                                         for i in range(n)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    itl = [r["itl"] for r in ok if r["itl"] is not None]
    return {"clients": n, "ok": len(ok), "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
            "ttft50": _pct([r["ttft"] for r in ok], 50), "ttft99": _pct([r["ttft"] for r in ok], 99),
            "itl50": _pct(itl, 50), "itl99": _pct(itl, 99)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,8,32,64", help="comma-separated numbers of concurrent clients")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default="", help="model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--chunk-steps", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--modes", default="off,on", help="gate modes to run: off, on")
    p.add_argument("--slots-per-run", action="store_true", help="restart the server per N with slots = N")
    p.add_argument("--unroll-layers", action="store_true",
                   help="serve with [engine] unroll_layers = true (default: the scan, see serving.engine.EngineConfig)")
    args = p.parse_args(argv)
    clients = [int(x) for x in args.clients.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    print(f"# aqjax serving benchmark: {args.max_tokens} tokens per client, max_len {args.max_len}, "
          f"chunk_steps {args.chunk_steps}, prefill_chunk {args.prefill_chunk}, "
          f"layers {'unrolled' if args.unroll_layers else 'in a scan'}")
    print(f"# host: {os.cpu_count()} CPUs visible; results depend on what else runs on the machine")
    if importlib.util.find_spec("llama_cpp") is None:
        print("# llama.cpp: llama-cpp-python is not installed, so there is no llama.cpp row in this run "
              "(pip install 'llama-cpp-python[server]' to add one)")
    else:
        print("# llama.cpp: llama-cpp-python is installed, but this script does not drive it yet")
    rows = []
    with tempfile.TemporaryDirectory(prefix="aqjax-bench-") as work:
        for mode in modes:
            runs = [[n] for n in clients] if args.slots_per_run else [clients]
            for group in runs:
                slots = max(group)
                server = Server(args, mode == "on", slots, work)
                print(f"# gate {mode}: server with {slots} slots ready in {server.startup_s:.0f} s "
                      "(load + compile)", flush=True)
                try:
                    asyncio.run(_round(server, 1, 4))  # one unmeasured request
                    for n in group:
                        r = asyncio.run(_round(server, n, args.max_tokens))
                        r.update(mode=mode, slots=slots)
                        rows.append(r)
                        print(f"  {mode:>3} N={n:<3} {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft50']:.2f}s "
                              f"p99 {r['ttft99']:.2f}s  ITL p50 {r['itl50'] * 1e3:.0f}ms p99 {r['itl99'] * 1e3:.0f}ms"
                              f"  ({r['ok']}/{n} ok)", flush=True)
                finally:
                    server.stop()
    print()
    print("| gate | clients | slots | tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | ITL p99 (ms) | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['slots']} | {r['tok_s']:.1f} | {r['ttft50']:.2f} | "
              f"{r['ttft99']:.2f} | {r['itl50'] * 1e3:.0f} | {r['itl99'] * 1e3:.0f} | {r['ok']}/{r['clients']} |")
    by = {(r["mode"], r["clients"]): r for r in rows}
    for n in clients:
        if ("on", n) in by and ("off", n) in by:
            cost = 1 - by[("on", n)]["tok_s"] / by[("off", n)]["tok_s"]
            print(f"# gate cost at N={n}: {cost * 100:+.1f}% throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
