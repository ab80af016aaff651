"""Speculative decoding on the default model: tokens/s against plain decoding, per drafter, side by side.

Usage:  python bench/speculative.py [--new 128] [--reps 2] [--batches 1,8] [--b1-prompts 4] [--workloads grounded,chat]
                                    [--drafters lookup,self,draft,feature,hybrid] [--k 4]
                                    [--policy policies/default.yaml]
                                    [--json out.json]

Workloads (greedy, the tokenizer's stop ids, at most --new tokens per row):
  grounded  extract / summarize from a long given text (bench/decode.py's LONG_TEXT, ~560 prompt tokens);
            rows of a batch ask different questions about it;
  chat      open-ended chat questions, one per row.
At batch 1 the first --b1-prompts questions run one after another (times and statistics summed).
Each runs without a policy and under --policy (default: policies/default.yaml, phrase rules: every token is
gated). For every configuration: plain decoding (`Generator`), then every drafter (`SpeculativeGenerator`),
each compiled once (warm-up), then --reps timed runs interleaved across the methods (median; interleaving
keeps load changes on a shared machine from favouring one method). Only the decode loop is timed (the prefill
is the same for all). tok/s = tokens generated after the first / loop time. "tok/step" = mean tokens per target
forward (the mean accepted length plus the bonus token), "accept" = accepted / proposed draft tokens.
"same" checks that every row's greedy output is identical to plain decoding's (the run fails otherwise).
With batch 1, the run also measures the ceiling: what a target forward over T = 1, 3, 5, ... positions costs
in plain steps (`verify_costs`), hence the tokens per step each target needs.

The draft model comes from `scripts/train_draft.py`, the feature draft head from
`scripts/train_feature_drafter.py` (default locations, or --draft / --feature); without them the "draft" /
"feature" rows are skipped with a note. Timings depend on the machine's load: on a shared machine, compare
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Run as `python bench/speculative.py`, this folder comes first on sys.path and its gate.py would shadow the
# `gate` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402

from aqjax import decode  # noqa: E402
from aqjax import speculative as spec  # noqa: E402
from aqjax.engine import Generator  # noqa: E402
from aqjax.sampling import SamplingConfig  # noqa: E402


def _long_text() -> str:
    # bench/decode.py's text, loaded by path (this folder is not importable as a package)
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("_bench_decode", os.path.join(_HERE, "decode.py"))
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.LONG_TEXT


LONG_TEXT = _long_text()

GROUNDED = [
    "Summarize the following text in a few sentences.",
    "List every year mentioned in the following text and what happened in it.",
    "Extract the names of the instruments and buildings described in the following text.",
    "What did the volunteers do, according to the following text?",
    "Write a short summary of the following text for a newsletter.",
    "Which events closed or changed the observatory? Answer from the following text.",
    "Extract three facts about the archive and the library from the following text.",
    "Summarize the history of the dome from the following text.",
]
CHAT = [
    "Tell me about the history of Rome.",
    "What are good habits for learning a new language?",
    "Explain how a bicycle works.",
    "Write a short story about a dragon who loves books.",
    "What should I pack for a week-long hiking trip?",
    "Why is the sky blue?",
    "Give me some tips for cooking rice.",
    "How do airplanes stay in the air?",
]
TARGETS = {"grounded": 2.0, "chat": 1.4}  # issue 5, batch 1
LLAMA_CPP_B1 = 102.0  # ungoverned batch-1 decode on this machine (bench/decode.py PEERS)


def _batches(tok, workload: str, batch: int, b1_prompts: int) -> list[list[list[int]]]:
    """The batches one configuration runs: one batch of `batch` different questions, or at batch 1 the first
    `b1_prompts` questions one after another (a single answer is a noisy sample of a drafter's acceptance)."""
    qs = [f"{q}\n\n{LONG_TEXT}" for q in GROUNDED] if workload == "grounded" else CHAT
    enc = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in qs]
    if batch == 1:
        return [[enc[i % len(enc)]] for i in range(b1_prompts)]
    return [[enc[i % len(enc)] for i in range(batch)]]


def _plain_runner(gen, batches, new, gate, policy):
    """Plain decoding of each batch in turn; (loop seconds summed, results concatenated, None)."""
    def run():
        total, results = 0.0, []
        for prompts in batches:
            n, state = gen.start(prompts, SamplingConfig(), max_new_tokens=new, gate=gate, policy=policy)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            state = decode.jit_decode_until_done(gen.params, state, policy, cfg=gen.cfg, gate=gate)
            jax.block_until_ready(state)
            total += time.perf_counter() - t0
            results += gen.results(state, n, [len(p) for p in prompts])
        return total, results, None

    return run


def _spec_runner(sg, kind, batches, new, gate, policy, k):
    """Speculative decoding of each batch in turn; (loop seconds summed, results, SpecStats over all rows)."""
    def run():
        total, results, stats = 0.0, [], []
        for prompts in batches:
            n, st, r = sg.start(prompts, SamplingConfig(), max_new_tokens=new, gate=gate, policy=policy,
                                speculative=kind, draft_k=k)
            jax.block_until_ready(st)
            dparams = r.pop("dparams")
            t0 = time.perf_counter()
            st = spec.jit_spec_until_done(sg.params, dparams, st, policy, **r)
            jax.block_until_ready(st)
            total += time.perf_counter() - t0
            results += sg.results(st, n, [len(p) for p in prompts])
            stats.append(spec._stats(st, n))
        merged = spec.SpecStats(*(sum((getattr(x, f) for x in stats), ()) for f in
                                  ("tokens", "steps", "drafted", "accepted")))
        return total, results, merged

    return run


def _measure(runners: dict, reps: int) -> dict:
    """Median loop time per method. The timed repetitions are interleaved (plain, lookup, ..., plain, lookup,
    ...) after one compile/warm-up run each, so a change in the machine's load hits every method alike."""
    out = {name: run() for name, run in runners.items()}  # compile + warm up
    times = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            t, res, stats = run()
            times[name].append(t)
            out[name] = (t, res, stats)
    return {name: (statistics.median(times[name]),) + out[name][1:] for name in runners}


def verify_costs(gen, prompt, k: int, steps: int = 32, reps: int = 3) -> dict[int, float]:
    """Seconds per target forward over T positions (batch 1, after `prompt`), for every verification width of
    k drafts (`aqjax.speculative.verify_widths`): the price of a speculative step against a plain one (T = 1)."""
    import functools

    import jax.numpy as jnp
    from jax import lax

    from aqjax.cache import KVCache
    from models.llama import forward, logits_from_hidden

    cfg, params = gen.cfg, gen.params
    S = 1 << (len(prompt) + 32).bit_length()

    @functools.partial(jax.jit, static_argnames="T", donate_argnums=(1,))
    def loop(params, cache, T):
        def body(i, c):
            h, c = forward(params, jnp.ones((1, T), jnp.int32), c, cfg=cfg, n_new=jnp.ones((1,), jnp.int32))
            tok = jnp.argmax(logits_from_hidden(params, h, cfg=cfg), axis=-1)
            return c.replace(lengths=c.lengths + (tok[:, 0] < 0))  # keeps the head's work
        return lax.fori_loop(0, steps, body, cache)

    def fresh():
        c = KVCache.init(cfg, 1, S, gen.dtype)
        return c.replace(lengths=jnp.full((1,), len(prompt), jnp.int32))

    out = {}
    for T in spec.verify_widths(k):
        jax.block_until_ready(loop(params, fresh(), T))
        times = []
        for _ in range(reps):
            c = fresh()
            jax.block_until_ready(c)
            t0 = time.perf_counter()
            jax.block_until_ready(loop(params, c, T))
            times.append((time.perf_counter() - t0) / steps)
        out[T] = statistics.median(times)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--workloads", default="grounded,chat")
    ap.add_argument("--drafters", default="lookup,self,draft,feature,hybrid")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--b1-prompts", type=int, default=4, help="questions run one after another at batch 1")
    ap.add_argument("--adaptive", choices=["default", "on", "off"], default="default",
                    help="per-row adaptive draft length (default: the drafter's default)")
    ap.add_argument("--self-layers", type=int, default=8)
    ap.add_argument("--draft", default=None, help="draft model dir (default: scripts/train_draft.py's location)")
    ap.add_argument("--feature", default=None,
                    help="feature draft dir (default: scripts/train_feature_drafter.py's location)")
    ap.add_argument("--policy", default=os.path.join(os.path.dirname(_HERE), "policies", "default.yaml"))
    ap.add_argument("--no-policy-runs", action="store_true", help="only the ungoverned runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from aqjax.drafters import default_draft_dir, default_feature_dir, load_draft, load_feature_draft
    from gate.policy import compile_policy, load_policy
    from models.loader import load_model

    m = load_model(args.model)
    tok = m.tokenizer
    gen = Generator(m.cfg, m.params, stop_ids=tok.stop_ids)
    drafters = args.drafters.split(",")
    notes = []
    draft = None
    if "draft" in drafters:
        path = args.draft or default_draft_dir(m.cfg)
        try:
            draft = load_draft(path, m.cfg)
            meta = draft.meta
            notes.append(f"draft model: {path} ({draft.cfg.n_layers} layers, head vocabulary "
                         f"{len(draft.vocab_ids)}, trained in {meta.get('time_total_s', '?')} s, held-out "
                         f"acceptance {meta.get('eval_acceptance', '?')})")
        except (FileNotFoundError, ValueError) as e:
            notes.append(f"draft rows skipped: {e}")
            drafters.remove("draft")
    feature = None
    if "feature" in drafters or "hybrid" in drafters:
        path = args.feature or default_feature_dir(m.cfg)
        try:
            feature = load_feature_draft(path, m.cfg)
            meta = feature.meta
            notes.append(f"feature draft: {path} ({len(feature.net['blocks'])} blocks, head vocabulary "
                         f"{len(feature.vocab_ids)}, {meta.get('corpus_answer_tokens', '?')} training tokens, "
                         f"trained in {meta.get('time_train_s', '?')} s, held-out acceptance "
                         f"{meta.get('eval_acceptance', '?')})")
        except (FileNotFoundError, ValueError) as e:
            notes.append(f"feature / hybrid rows skipped: {e}")
            drafters = [d for d in drafters if d not in ("feature", "hybrid")]
    sg = spec.SpeculativeGenerator(gen, draft=draft, feature=feature, self_layers=args.self_layers,
                                   adaptive=None if args.adaptive == "default" else args.adaptive == "on")
    policies = [("none", None, None)]
    if not args.no_policy_runs:
        compiled = compile_policy(load_policy(args.policy), tok, vocab_size=m.cfg.vocab_size)
        policies.append((os.path.basename(args.policy), compiled.gate, compiled.arrays))

    rows, mismatches = [], []
    for workload in args.workloads.split(","):
        for b in [int(x) for x in args.batches.split(",")]:
            batches = _batches(tok, workload, b, args.b1_prompts)
            for pname, gate, policy in policies:
                runners = {"plain": _plain_runner(gen, batches, args.new, gate, policy)}
                for kind in drafters:
                    runners[kind] = _spec_runner(sg, kind, batches, args.new, gate, policy, args.k)
                measured = _measure(runners, args.reps)
                t_plain, ref, _ = measured["plain"]
                n_tok = sum(max(len(r.tokens) - 1, 0) for r in ref)
                for name, (t, res, stats) in measured.items():
                    same = [r.tokens for r in res] == [r.tokens for r in ref]
                    if not same:
                        mismatches.append((workload, b, pname, name))
                    rows.append(dict(workload=workload, batch=b, policy=pname, method=name, tok_s=n_tok / t,
                                     x=t_plain / t,
                                     tok_step=1.0 if stats is None else stats.tokens_per_step,
                                     accept=None if stats is None else stats.acceptance, same=same, tokens=n_tok))
                    print(f"  {workload} B={b} {pname}: {name} {n_tok / t:.1f} tok/s ({t_plain / t:.2f}x)",
                          file=sys.stderr, flush=True)

    print(f"\naqjax speculative decoding: {m.cfg.name}, float32, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}, greedy, <= {args.new} new tokens/row, k = {args.k}, median of {args.reps}; "
          f"batch 1 = {args.b1_prompts} questions in turn, adaptive draft length {args.adaptive}\n")
    head = (f"{'workload':<10}{'B':>3} {'policy':<13}{'method':<8}{'tok/s':>8}{'x plain':>9}{'tok/step':>10}"
            f"{'accept':>8}{'tokens':>8}  same")
    print(head)
    print("-" * len(head))
    for r in rows:
        acc = "-" if r["accept"] is None or np.isnan(r["accept"]) else f"{r['accept']:.2f}"
        print(f"{r['workload']:<10}{r['batch']:>3} {r['policy']:<13}{r['method']:<8}{r['tok_s']:>8.1f}"
              f"{r['x']:>9.2f}{r['tok_step']:>10.2f}{acc:>8}{r['tokens']:>8}  {'yes' if r['same'] else 'NO'}")
    best = {}
    for r in rows:
        if r["batch"] == 1 and r["method"] != "plain":
            key = (r["workload"], r["policy"])
            best[key] = max(best.get(key, (0, 0, "")), (r["x"], r["tok_s"], r["method"]))
    if 1 in [int(x) for x in args.batches.split(",")]:
        # the ceiling: a step that verifies k drafts costs c plain steps, so x plain <= tokens/step / c
        costs = verify_costs(gen, _batches(tok, "grounded", 1, 1)[0][0], args.k)
        c = {T: t / costs[1] for T, t in costs.items()}
        full = c[args.k + 1]
        print("\nVerification cost at batch 1 (target forward over T positions, in plain steps): "
              + ", ".join(f"T={T} {v:.2f}" for T, v in c.items())
              + f". Ceiling: x plain <= tokens/step / {full:.2f} at full width (drafting costs extra), so "
              + ", ".join(f"{w} {g}x needs >= {g * full:.2f} tokens/step" for w, g in TARGETS.items())
              + f"; all {args.k} drafts accepted every step would give {(args.k + 1) / full:.2f}x.")
    print("\nTargets (issue 5, batch 1): >= 2x on grounded, >= 1.4x on chat; llama.cpp ungoverned batch 1: "
          f"~{LLAMA_CPP_B1:.0f} tok/s.")
    for (w, p), (x, rate, kind) in sorted(best.items()):
        goal = TARGETS.get(w)
        print(f"  best at B=1: {w:<9} {p:<13} {kind:<7} {x:.2f}x ({rate:.1f} tok/s)"
              + (f"  target {goal}x: {'met' if x >= goal else 'not met'}" if goal else ""))
    for n in notes:
        print("Note:", n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "notes": notes}, f, indent=1)
    if mismatches:
        print(f"\nGREEDY OUTPUT DIFFERS from plain decoding in {mismatches}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
