"""Serving benchmark: N concurrent streaming clients against `python -m serving.main`, gate on and off.

    python bench/serve.py                                  # 1, 8, 32, 64 clients, 64 tokens each, default model
    python bench/serve.py --clients 1,8 --max-tokens 32    # a quicker run
    python bench/serve.py --slots-per-run                  # restart the server per N with slots = N
    python bench/serve.py --layers scan                    # the layers in a scan ([engine] unroll_layers = false)
    python bench/serve.py --modes on,on+lookup --workload grounded --clients 1,4   # speculative decoding
    python bench/serve.py --llama-cpp /path/to/venv/bin/python                    # add llama.cpp's server

Modes: "off" (no gate), "on" (gate on), each optionally "+lookup" (`[engine] speculative = "lookup"`, draft_k
and speculative_rows from the flags). Workloads: "chat" (short open questions) or "grounded" (questions about a
~560-token text given in the prompt: extraction and summaries, where prompt lookup finds drafts).

For each gate mode the server runs in its own process (warmed up before measuring: compile time is reported
separately, not counted). Every client streams one chat completion (temperature 0, different prompts) and
the table reports:

  tok/s      aggregate completion tokens per second (all clients' tokens / wall time of the round)
  TTFT       time from sending a request to its first content chunk, p50 and p99 over the clients
  ITL        inter-token latency per stream, (last chunk - first chunk) / (tokens - 1), p50 and p99

"gate on" serves under policies/default.yaml (the per-slot phrase gate on every token, audit records written
and fsync'd per answer); "gate off" runs with --no-gate (no gate in the compiled step, no audit).
llama.cpp's OpenAI-compatible server (llama-cpp-python[server], same GGUF, n_threads = the CPUs) is run on the
same load when llama_cpp is importable by this interpreter or by the one `--llama-cpp` names (it serves one
request at a time; its throughput is its batch-1 rate). The ceiling for aggregate throughput on a CPU is the
batched decode rate (bench/decode.py: ~540 tok/s at 32 rows here), which continuous batching approaches as the
slots fill.
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
CHAT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, step by step.",
    "Describe a walk through a forest in autumn.",
    "List ten facts about the ocean and explain each one.",
    "Write a letter to a friend about your favourite book.",
    "Explain the rules of chess to a beginner.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a recipe for a vegetable soup with every step.",
]




def _grounded_prompts() -> list[str]:
    """bench/speculative.py's grounded workload: questions about bench/decode.py's long text, given in the prompt."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_bench_speculative", os.path.join(here, "speculative.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [f"{q}\n\n{module.LONG_TEXT}" for q in module.GROUNDED]


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
    health = "/health"

    def __init__(self, args, mode: str, slots: int, workdir: str):
        import hashlib

        gate = mode.split("+")[0] == "on"
        speculative = mode.split("+")[1] if "+" in mode else "none"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = os.path.join(workdir, f"bench-{self.port}.toml")
        with open(cfg, "w") as f:
            f.write("[engine]\n" + ("" if args.layers == "auto" else
                                     f"unroll_layers = {'true' if args.layers == 'unrolled' else 'false'}\n")
                    + f'speculative = "{speculative}"\ndraft_k = {args.draft_k}\n'
                    f"speculative_rows = {args.speculative_rows}\n\n")
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
        self._start(cmd, workdir)

    def _start(self, cmd, workdir):
        self.log = open(os.path.join(workdir, f"server-{self.port}.log"), "w")
        t = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: see {self.log.name}")
            try:
                if httpx.get(self.url + self.health, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.startup_s = time.monotonic() - t
        models = httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        self.model = models["data"][0]["id"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class LlamaCppServer(Server):
    """llama-cpp-python's OpenAI-compatible server on the same GGUF (no key; one request at a time)."""

    health = "/v1/models"

    def __init__(self, args, python: str, workdir: str):  # noqa: D107 (no super().__init__: another command)
        from models.download import default_model_path

        gguf = args.model or str(default_model_path())
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(self.port), "--host", "127.0.0.1",
               "--n_threads", str(os.cpu_count()), "--n_ctx", str(max(2048, args.max_len)),
               # by default it abandons the stream it is serving when another request arrives (empty 200 answers)
               "--interrupt_requests", "False"]
        self._start(cmd, workdir)


def _llama_cpp_python(arg: str | None) -> str | None:
    """The interpreter that can run llama_cpp.server: --llama-cpp, else this one when it has llama_cpp."""
    if arg:
        return arg
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    return None


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = chunks = 0
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
                    chunks += 1
    tokens = tokens or chunks  # a server that reports no usage when streaming (llama-cpp-python): a token a chunk
    if tokens == 0:  # an empty answer is counted as a failure (a server that dropped the stream)
        return {"ok": False, "status": "empty"}
    return {"ok": True, "ttft": (first or time.perf_counter()) - t0, "tokens": tokens,
            "itl": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None}


async def _round(server: Server, n: int, max_tokens: int, prompts: list[str]) -> dict:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(client, server.url, server.model, prompts[i % len(prompts)], max_tokens)
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
    p.add_argument("--max-len", type=int, default=0, help="context per slot (default 512, grounded 1024)")
    p.add_argument("--chunk-steps", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--modes", default="off,on", help="off, on, off+lookup, on+lookup (comma-separated)")
    p.add_argument("--workload", choices=["chat", "grounded"], default="chat")
    p.add_argument("--draft-k", type=int, default=4, help="draft tokens per step in +lookup modes")
    p.add_argument("--speculative-rows", type=int, default=1, help="the most slots a speculative chunk runs over")
    p.add_argument("--rounds", type=int, default=1, help="rounds per N; the table shows the median round")
    p.add_argument("--slots-per-run", action="store_true", help="restart the server per N with slots = N")
    p.add_argument("--layers", choices=["auto", "unrolled", "scan"], default="auto",
                   help="[engine] unroll_layers (auto: the server's default, unrolled on CPU)")
    p.add_argument("--llama-cpp", metavar="PYTHON", help="an interpreter with llama-cpp-python[server] installed "
                   "(default: this one, when it has llama_cpp)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp row even when it is installed")
    args = p.parse_args(argv)
    args.max_len = args.max_len or (1024 if args.workload == "grounded" else 512)
    clients = [int(x) for x in args.clients.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    for m in modes:
        if m not in ("off", "on", "off+lookup", "on+lookup"):
            p.error(f"unknown mode {m!r}")
    prompts = _grounded_prompts() if args.workload == "grounded" else CHAT_PROMPTS
    print(f"# aqjax serving benchmark: {args.workload} workload, {args.max_tokens} tokens per client, "
          f"max_len {args.max_len}, chunk_steps {args.chunk_steps}, prefill_chunk {args.prefill_chunk}, "
          f"layers {args.layers}"
          + (f", +lookup: draft_k {args.draft_k}, speculative_rows {args.speculative_rows}"
             if any("+" in m for m in modes) else ""))
    print(f"# host: {os.cpu_count()} CPUs visible; results depend on what else runs on the machine")
    llama = None if args.no_llama_cpp else _llama_cpp_python(args.llama_cpp)
    if args.no_llama_cpp:
        print("# llama.cpp: skipped (--no-llama-cpp)")
    elif llama is None:
        print("# llama.cpp: llama-cpp-python is not installed, so there is no llama.cpp row in this run "
              "(pip install 'llama-cpp-python[server]' somewhere and pass --llama-cpp PYTHON to add one)")
    runs = []
    for mode in modes:
        for group in ([[n] for n in clients] if args.slots_per_run else [clients]):
            runs.append((mode, group))
    if llama is not None:
        runs.append(("llama.cpp", clients))
    rows = []
    with tempfile.TemporaryDirectory(prefix="aqjax-bench-") as work:
        for mode, group in runs:
            slots = max(group)
            if mode == "llama.cpp":
                server = LlamaCppServer(args, llama, work)
                what = "llama.cpp server (one request at a time)"
            else:
                server = Server(args, mode, slots, work)
                what = f"gate {mode}: server with {slots} slots"
            print(f"# {what} ready in {server.startup_s:.0f} s (load + compile)", flush=True)
            try:
                asyncio.run(_round(server, 1, 4, prompts))  # one unmeasured request
                for n in group:
                    reps = []
                    for _ in range(args.rounds):
                        r = asyncio.run(_round(server, n, args.max_tokens, prompts))
                        reps.append(r)
                        print(f"  {mode:>10} N={n:<3} {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft50']:.2f}s "
                              f"p99 {r['ttft99']:.2f}s  ITL p50 {r['itl50'] * 1e3:.0f}ms p99 {r['itl99'] * 1e3:.0f}ms"
                              f"  ({r['ok']}/{n} ok)", flush=True)
                    r = sorted(reps, key=lambda x: x["tok_s"])[len(reps) // 2]  # the median round
                    r.update(mode=mode, slots=1 if mode == "llama.cpp" else slots,
                             ok=min(x["ok"] for x in reps))
                    rows.append(r)
            finally:
                server.stop()
    print()
    by = {(r["mode"], r["clients"]): r for r in rows}
    base = "off" if "off" in modes else modes[0]
    print(f"| mode | clients | slots | tok/s | vs {base} | vs llama.cpp | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) "
          "| ITL p99 (ms) | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = by.get((base, r["clients"]))
        lc = by.get(("llama.cpp", r["clients"]))
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
        vs_lc = f"{r['tok_s'] / lc['tok_s']:.2f}x" if lc else "-"
        print(f"| {r['mode']} | {r['clients']} | {r['slots']} | {r['tok_s']:.1f} | {ratio} | {vs_lc} | "
              f"{r['ttft50']:.2f} | {r['ttft99']:.2f} | {r['itl50'] * 1e3:.0f} | {r['itl99'] * 1e3:.0f} | "
              f"{r['ok']}/{r['clients']} |")
    for n in clients:
        if ("on", n) in by and ("off", n) in by:
            cost = 1 - by[("on", n)]["tok_s"] / by[("off", n)]["tok_s"]
            print(f"# gate cost at N={n}: {cost * 100:+.1f}% throughput")
    if ("llama.cpp", 32) in by and ("on", 32) in by:
        ratio = by[("on", 32)]["tok_s"] / by[("llama.cpp", 32)]["tok_s"]
        print(f"# at 32 streams, governed aqjax / llama.cpp: {ratio:.2f}x (target >= 3x)")
    print("# ceiling: the batched decode rate (bench/decode.py; ~540 tok/s at 32 rows on this 2-core machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
