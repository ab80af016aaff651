"""Prefill and decode throughput of aqjax on the default model, beside the peers measured on this machine.

Usage:  python bench/decode.py [--model PATH] [--new 128] [--reps 3] [--batches 1,8,32] [--json out.json]
                               [--layouts unrolled,scan]

Prefill: one ~512-token chat prompt at batch 1 (the compiled `start`, which also samples the first token).
Decode: a short chat prompt repeated B times, 128 greedy tokens with EOS ignored; only the 127 decode steps
after the first token are timed (tok/s = B * 127 / t), as the HF peer's hand-written loop is. Median of reps,
after one compile/warm-up run per shape. Each measure runs for both layer layouts (`--layouts`): unrolled over
per-layer weights (the CPU default) and a scan over stacked weights (whose weight slices XLA:CPU copies).

Peers (shared/peers/README.md, same machine, same model): HF transformers float32 (torch, 2 threads) and
llama.cpp Q4_1. Ceilings: batch-1 decode streams every float32 weight once per token: 538 MB at the ~44.8 GB/s
the machine copies (read + write, 2 threads) -> ~83 tok/s; the peers' float32 GEMV streamed 29.5 GB/s (~55 tok/s),
which aqjax now exceeds (part of the weights stays in the 260 MiB L3). Prefill is compute-bound (0.27 GFLOP/token
at ~300 GFLOP/s -> ~1100 tok/s before attention; measured runs reach it, so that estimate is loose).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Run as `python bench/decode.py`, this folder comes first on sys.path and its gate.py would shadow the
# `gate` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import jax
import numpy as np

from aqjax import decode
from aqjax.engine import Generator
from aqjax.sampling import SamplingConfig

PEERS = {
    "prefill": {"hf": 775.0, "llama.cpp": 258.7},
    1: {"hf": 30.7, "llama.cpp": 102.0},
    8: {"hf": 124.8},
    32: {"hf": 305.3},
}
TARGETS = {"prefill": 900.0, 1: 50.0, 32: 600.0}
CEILINGS = {"prefill": 1100.0, 1: 83.0}

LONG_TEXT = (
    "The observatory on the ridge above the valley was founded in 1911 by a society of amateur astronomers "
    "who had raised the money through subscriptions, concerts and a lottery. Its first instrument was a "
    "refracting telescope with a lens of twenty centimetres, ground by a local optician who had never made "
    "anything larger than spectacles. The dome was built of timber and canvas, and on windy nights the "
    "members had to hold the shutters open by hand. In 1923 a storm tore the canvas away, and the society "
    "replaced it with a copper dome that still stands, green with age. During the 1930s the observatory "
    "became known for its careful records of variable stars: two schoolteachers measured the brightness of "
    "more than four hundred stars every clear night for eleven years, and their notebooks were later used "
    "by professional astronomers to study long-period pulsations. The Second World War closed the site, "
    "because the lights of the town below had to be dimmed and the ridge was used as a lookout post. After "
    "the war a reflecting telescope with a mirror of sixty centimetres was donated by a university that no "
    "longer needed it, and a small library and lecture room were added. Light pollution from the growing "
    "town slowly made deep-sky work impossible, so in the 1970s the society turned to public education. "
    "Every Friday evening volunteers showed visitors the Moon, the planets and bright double stars, and "
    "school classes came during the day to look at the Sun through filtered instruments. In 1986 thousands "
    "of people queued on the ridge to see Halley's comet, and the road had to be closed to cars. Today the "
    "observatory is run by a trust, its historic telescope has been restored, and a digital camera records "
    "meteors every night. Its archive of photographic plates, some more than a century old, is being scanned "
    "so that researchers can compare the positions and brightness of stars over long periods of time. "
    "The trust also lends small telescopes to schools and libraries, trains volunteers to use them, and "
    "publishes a monthly sky guide that lists the rising and setting times of the planets, the phases of "
    "the Moon and the dates of meteor showers. Each summer a star party on the ridge draws observers from "
    "across the region, who camp in the fields and compare their instruments until dawn."
)
SHORT_PROMPT = "Write a Python function that checks whether a number is prime."


def _median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_prefill(gen, ids, reps):
    def run():
        return gen.start([ids], SamplingConfig(), max_new_tokens=1)[1].out

    jax.block_until_ready(run())  # compile
    t = _median_time(run, reps)
    return len(ids) / t, t


def bench_decode(gen, ids, batch, new, reps, *, gate=None, policy=None):
    """Decode tok/s and s/step for `batch` copies of `ids`, `new` greedy tokens (EOS ignored)."""
    prompts = [ids] * batch

    def run():
        # stop_ids=[]: EOS ignored, every row decodes exactly `new` tokens
        _, state = gen.start(prompts, SamplingConfig(), max_new_tokens=new, stop_ids=[], gate=gate, policy=policy)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state = decode.jit_decode_until_done(gen.params, state, policy, cfg=gen.cfg, gate=gate)
        jax.block_until_ready(state)
        return time.perf_counter() - t0, state

    run()  # compile
    times = []
    for _ in range(reps):
        t, state = run()
        times.append(t)
    n_out = np.asarray(state.n_out)[:batch]
    steps = int(np.max(n_out)) - 1
    t = statistics.median(times)
    return batch * steps / t, t / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--layouts", default="unrolled,scan",
                    help="layer-loop layouts to compare (models.params.compute_params): unrolled over per-layer "
                         "weights (the CPU default) and/or a scan over stacked weights")
    args = ap.parse_args(argv)

    from models.loader import load_model

    m = load_model(args.model)
    tok = m.tokenizer
    long_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Summarize the following text:\n\n"
                                                    + LONG_TEXT}]))
    short_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": SHORT_PROMPT}]))

    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or set(layouts) - {"unrolled", "scan"}:
        ap.error(f"--layouts: expected unrolled and/or scan, got {args.layouts!r}")
    rows = []
    for layout in layouts:
        gen = Generator(m.cfg, m.params, stop_ids=tok.stop_ids, unroll_layers=(layout == "unrolled"))
        tag = f" ({layout})" if len(layouts) > 1 else ""
        rate, t = bench_prefill(gen, long_ids, args.reps)
        rows.append(("prefill", f"{len(long_ids)}-token prompt, B=1{tag}", rate, f"{t * 1000:.0f} ms"))
        for b in [int(x) for x in args.batches.split(",")]:
            rate, step = bench_decode(gen, short_ids, b, args.new, args.reps)
            rows.append((b, f"decode B={b}{tag}", rate, f"{step * 1000:.1f} ms/step"))
        del gen

    print(f"\naqjax decode benchmark: {m.cfg.name}, float32, jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{args.new} new tokens, median of {args.reps}\n")
    head = f"{'measure':<36}{'aqjax tok/s':>12}{'time':>16}{'HF tok/s':>10}{'x HF':>7}{'llama.cpp':>11}{'x l.cpp':>8}" \
           f"{'target':>8}{'ceiling':>9}"
    print(head)
    print("-" * len(head))
    out = []
    for key, label, rate, t in rows:
        peers = PEERS.get(key, {})
        hf, lc = peers.get("hf"), peers.get("llama.cpp")

        def fmt(x, spec):
            width = int("".join(c for c in spec.split(".")[0] if c.isdigit()))
            return format(x, spec) if x else "-".rjust(width)

        print(f"{label:<36}{rate:>12.1f}{t:>16}{fmt(hf, '>10.1f')}{fmt(hf and rate / hf, '>7.2f')}"
              f"{fmt(lc, '>11.1f')}{fmt(lc and rate / lc, '>8.2f')}{fmt(TARGETS.get(key), '>8.0f')}"
              f"{fmt(CEILINGS.get(key), '>9.0f')}")
        out.append({"measure": label, "tok_per_s": rate, "time": t, "hf": hf, "llama_cpp": lc})
    print("\nCeilings: batch-1 decode ~83 tok/s (538 MB of float32 weights per token at the 44.8 GB/s the machine"
          " copies;"
          " the peers' GEMV streamed 29.5 GB/s, ~55 tok/s); prefill ~1100 tok/s (0.27 GFLOP/token at ~300 GFLOP/s)."
          " Peers: shared/peers/README.md.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
