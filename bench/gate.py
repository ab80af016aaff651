"""What the admissibility gate costs, on the default model, side by side in one run.

Usage:  python bench/gate.py [--phrases 1000] [--new 64] [--reps 3] [--batches 1,32]
        python bench/gate.py part2 [--reps 3] [--each]    (every gate of both parts: see "Part 2" below)
        python bench/gate.py micro [--kinds ...] [--kernels]  (each part-2 gate's cost per step, no model)

1. Decode step time without a gate and with a realistic policy: a JSON schema (turn level) + N banned
   phrases (deployment) + more phrases at the agent and session levels (the hierarchy), at batch 1 and 32,
   interleaved runs, medians, as a ratio. Target: gated <= 1.02x ungated.
2. The gate's own cost per token in microseconds, inside the compiled loop (a `lax.scan` over the fed tokens
   of a JSON answer at batch 1; evaluate + check + advance of the whole policy chain, and of each gate
   alone), beside the per-token mask cost that xgrammar (~4.9 us) and outlines-core (~32.9 us) measured on
   this machine for the same schema and tokenizer (shared/peers/README.md, results/grammar.json).
   Target: no worse than xgrammar's.
3. Compile time and table memory of the policy. Targets: < 5 s, < 100 MB.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

# Run as `python bench/gate.py`, this folder comes first on sys.path, and this file would shadow the `gate`
# package; drop it and load the sibling benchmark by path instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
_spec = importlib.util.spec_from_file_location("_bench_decode", os.path.join(_HERE, "decode.py"))
_bench_decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_decode)
SHORT_PROMPT, bench_decode = _bench_decode.SHORT_PROMPT, _bench_decode.bench_decode

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aqjax import ops  # noqa: E402
from aqjax.engine import Generator  # noqa: E402
from gate import phrases as phrases_mod  # noqa: E402
from gate import structure as structure_mod  # noqa: E402
from gate.policy import Policy, compile_policy  # noqa: E402
from models.params import per_layer  # noqa: E402

PEERS_US = {"xgrammar 0.2.8": 4.9, "outlines-core 0.2.14": 32.9}


def _layout(gen) -> str:
    """Which layer layout the model ran (models.params.compute_params; AQJAX_UNROLL_LAYERS=0/1 picks one)."""
    return "layers unrolled" if per_layer(gen.params) else "layers in a scan"


def realistic_policy(n_phrases: int) -> Policy:
    words = phrases_mod._demo_phrases(n_phrases + 40, seed=1)
    deployment = [{"phrase": w, "action": "suppress"} for w in words[:n_phrases]]
    agent = [{"phrase": w, "action": "substitute"} for w in words[n_phrases:n_phrases + 20]]
    session = [{"phrase": w, "action": "substitute"} for w in words[n_phrases + 20:]]
    return Policy.from_dict({
        "aqjax_policy": 1,
        "name": f"bench-{n_phrases}",
        # A marker with no letters cannot complete any phrase (the compiler rejects messages that could).
        "messages": {"redaction": "[█████]"},
        "levels": {
            "deployment": {"phrases": deployment},
            "agent": {"phrases": agent},
            "session": {"phrases": session},
            "turn": {"structure": {"json_schema": structure_mod.BENCH_SCHEMA}},
        },
    })


def tables_bytes(arrays) -> int:
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(arrays))


def gate_us_per_token(gate, policy, ids, vocab: int, n_passes: int = 50, with_argmax: bool = False) -> float:
    """Microseconds per fed token of evaluate + check + advance at batch 1, inside one compiled scan.

    The [1, V] mask is fully computed (summed), or, with_argmax, applied to logits and argmax'ed as in the loop.
    """
    # distinct logits so the masked argmax depends on every mask entry (nothing can be optimized away)
    logits = jnp.linspace(0.0, 1.0, vocab, dtype=jnp.float32)[None]
    yes = jnp.ones((1,), bool)
    ids = jnp.asarray(ids, jnp.int32)

    @jax.jit
    def passes(policy):
        def one(i, acc):
            state = gate.init(policy, 1)

            def body(s, t):
                tok = t[None] + (acc < 0)  # depends on the carry: XLA cannot hoist the pass out of the loop
                d = gate.evaluate(policy, s, logits)
                o = gate.check(policy, s, tok)
                if with_argmax:  # consume the mask as the loop does: mask the logits, take the argmax
                    used = ops.argmax(jnp.where(d.mask, logits, -jnp.inf))[0]
                else:  # every bit of the mask counted
                    used = jnp.sum(d.mask)
                return gate.advance(policy, s, o.token, yes, tok), used + o.token[0]

            _, out = lax.scan(body, state, ids)
            return acc + jnp.sum(out)

        return lax.fori_loop(0, n_passes, one, jnp.zeros((), jnp.int32))

    jax.block_until_ready(passes(policy))
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        jax.block_until_ready(passes(policy))
        best = min(best, time.perf_counter() - t0)
    return best / (n_passes * len(ids)) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--phrases", type=int, default=1000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args(argv)

    from models.loader import load_model

    m = load_model(args.model)
    tok = m.tokenizer
    policy = realistic_policy(args.phrases)
    compile_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        compiled = compile_policy(policy, tok, vocab_size=m.cfg.vocab_size, cache=False)
        compile_times.append(time.perf_counter() - t0)
    n_bytes = tables_bytes(compiled.arrays)

    gen = Generator(m.cfg, m.params, stop_ids=tok.stop_ids)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": SHORT_PROMPT}]))
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        plain, gated = [], []
        for _ in range(args.reps):  # interleaved, so drift on this noisy machine hits both alike
            plain.append(bench_decode(gen, ids, b, args.new, 1)[1])
            gated.append(bench_decode(gen, ids, b, args.new, 1, gate=compiled.gate, policy=compiled.arrays)[1])
        rows.append((b, statistics.median(plain) * 1e3, statistics.median(gated) * 1e3))

    fed = [*tok.encode(structure_mod.BENCH_TEXT), tok.eos_id]
    V = m.cfg.vocab_size
    chain_us = gate_us_per_token(compiled.gate, compiled.arrays, fed, V)
    chain_argmax_us = gate_us_per_token(compiled.gate, compiled.arrays, fed, V, with_argmax=True)
    per_gate = {kind: gate_us_per_token(g, a, fed, V) for kind, g, a in zip(
        compiled.kinds, _gates_of(compiled), compiled.arrays)}

    print(f"\naqjax gate benchmark: {m.cfg.name}, jax {jax.__version__}, {_layout(gen)}, "
          f"policy = JSON schema + {args.phrases} "
          f"deployment phrases + 20 agent + 20 session phrases ({len(compiled.rules)} rules)\n")
    print(f"{'decode step':<22}{'ungated ms':>12}{'gated ms':>10}{'ratio':>8}{'target':>8}")
    for b, p, g in rows:
        print(f"{'batch ' + str(b):<22}{p:>12.2f}{g:>10.2f}{g / p:>8.3f}{'<=1.02':>8}")
    print(f"\n{'gate cost per token (in the compiled loop, batch 1)':<52}{'us':>8}{'x xgrammar':>12}")
    print(f"{'aqjax: whole policy chain':<52}{chain_us:>8.2f}{chain_us / PEERS_US['xgrammar 0.2.8']:>12.2f}")
    print(f"{'aqjax: whole chain + masked argmax over V (as in loop)':<52}{chain_argmax_us:>8.2f}"
          f"{chain_argmax_us / PEERS_US['xgrammar 0.2.8']:>12.2f}")
    for kind, us in per_gate.items():
        print(f"{'aqjax: ' + kind + ' gate alone':<52}{us:>8.2f}{us / PEERS_US['xgrammar 0.2.8']:>12.2f}")
    for name, us in PEERS_US.items():
        print(f"{name + ' (host, mask fill + accept)':<52}{us:>8.2f}{us / PEERS_US['xgrammar 0.2.8']:>12.2f}")
    print(f"\npolicy compile: median {statistics.median(compile_times):.2f} s (target < 5 s); "
          f"tables {n_bytes / 1e6:.1f} MB (target < 100 MB)")
    print("Ceiling: the gate's work per step is a few table gathers and one [B, V] mask; a decode step streams "
          "538 MB of weights, so the gate can cost well under 1% of it.")
    return 0


def _gates_of(compiled):
    from gate.phrases import phrase_gate
    from gate.structure import structure_gate

    V, eos = compiled.vocab_size, compiled.eos_id
    return [phrase_gate(V) if k == "phrases" else structure_gate(V, eos) for k in compiled.kinds]


# ==============================================================================================================
# Part 2: every gate of both parts on (authority, escalation, disclosure, grounding, evidence budget on top of the
# realistic phrases + JSON policy above). Run:  python bench/gate.py part2 [--new 64] [--reps 3] [--batches 1,32]
#
# 1. Decode step time, ungated vs every gate on, at batch 1 and 32 (interleaved runs, medians; target <= 1.03x).
#    Each row is a realistic turn: a principal with tools in AUTO mode, 8 protected spans in the session, the
#    evidence trie of a 2,000-token document, a budget large enough never to end the row, escalation topics on.
# 2. Evidence-trie build time for a 2,000-token document (best of 20), and what else a turn's set-up costs.


def part2_policy(n_phrases: int) -> Policy:
    """`realistic_policy(n_phrases)` plus the document-level sections of policies/bank.yaml."""
    from gate.policy import load_policy

    bank = load_policy(os.path.join(_HERE, os.pardir, "policies", "bank.yaml")).to_dict()
    doc = realistic_policy(n_phrases).to_dict()
    doc["name"] = f"bench-part2-{n_phrases}"
    # bank's messages, but the part-1 redaction marker (one with no letters, so it cannot complete a phrase)
    doc["messages"].update({k: v for k, v in bank["messages"].items() if k != "redaction"})
    for key in ("tools", "roles", "principals", "classification", "evidence", "grounding", "escalation"):
        doc[key] = bank[key]
    doc["evidence"] = dict(doc["evidence"], base_budget=1e6, max_budget=1e9)  # never ends a row early
    return Policy.from_dict(doc)


def evidence_document(tokenizer, n_tokens: int = 2000) -> str:
    """A deterministic report-like text of at least `n_tokens` tokens, dense with figures.

    It opens with the staff's ages (every integer 0..99), so that a small integer the structure gate's schema
    asks for ("age") is grounded: otherwise the grounding and structure gates can together leave no admissible
    token (e.g. after "3," in JSON, grounding reads the comma as a thousands separator of "3,xxx") and the
    gated row ends early with a refusal, which would time a different number of steps than the ungated run.
    """
    rng = np.random.default_rng(0)
    words = ("revenue", "grew", "in", "the", "quarter", "to", "EUR", "while", "costs", "of", "branches", "staff",
             "were", "and", "margin", "reached", "percent", "compared", "with", "last", "year")
    parts = ["The", "staff", "were", " ; ".join(str(a) for a in range(100)), "years", "old."]
    text = ""
    while len(tokenizer.encode(text)) < n_tokens:
        for _ in range(50):
            parts.append(str(rng.choice(words)))
            r = rng.random()
            if r < 0.12:
                parts.append(f"{int(rng.integers(1_000, 10**8)):,}")
            elif r < 0.2:
                parts.append(f"{rng.random() * 100:.1f}")
        text = " ".join(parts) + "."
    return text


def part2_state(compiled, tokenizer, batch: int, document: str):
    """The chain's state for `batch` rows of realistic turns (see the section header)."""
    from gate import authority, disclosure, escalation, evidence, grounding

    state = list(compiled.gate.init(compiled.arrays, batch))
    spans = disclosure.default_spans(document)[:8]
    trie = grounding.build_trie([document])
    for k, kind in enumerate(compiled.kinds):
        if kind == "authority":
            state[k] = authority.begin_turn(compiled.arrays[k], state[k], principal=np.arange(batch) % 3,
                                            mode=authority.AUTO)
        elif kind == "escalation":
            state[k] = escalation.begin_turn(state[k], np.zeros((batch, 3), np.int32),
                                             np.full(batch, (1 << len(compiled.policy.escalation)) - 1))
        elif kind == "disclosure":
            state[k] = disclosure.begin_turn([[(2, s, True) for s in spans]] * batch, compiled.policy.normalization)
        elif kind == "grounding":
            state[k] = grounding.begin_turn(state[k], [trie] * batch)
        elif kind == "evidence":
            state[k] = evidence.begin_turn([1e6] * batch)
    return tuple(state)


def _decode_seconds(gen, prompts, new, gate=None, policy=None, gate_state=None) -> tuple[float, int]:
    from aqjax import decode as _decode
    from aqjax.sampling import SamplingConfig

    _, state = gen.start(prompts, SamplingConfig(), max_new_tokens=new, stop_ids=[], gate=gate, policy=policy,
                         gate_state=gate_state)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state = _decode.jit_decode_until_done(gen.params, state, policy, cfg=gen.cfg, gate=gate)
    jax.block_until_ready(state)
    return time.perf_counter() - t0, int(np.max(np.asarray(state.n_out)[: len(prompts)])) - 1


def main_part2(argv=None):
    ap = argparse.ArgumentParser(description="Part 2: every gate of both parts on, vs ungated.")
    ap.add_argument("--model", default=None)
    ap.add_argument("--phrases", type=int, default=1000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--each", action="store_true", help="also time each gate alone (where the overhead goes)")
    args = ap.parse_args(argv)

    from gate import disclosure, grounding
    from gate.policy import _gate
    from models.loader import load_model

    m = load_model(args.model)
    tok = m.tokenizer
    t0 = time.perf_counter()
    compiled = compile_policy(part2_policy(args.phrases), tok, vocab_size=m.cfg.vocab_size, cache=False)
    compile_s = time.perf_counter() - t0
    document = evidence_document(tok)
    n_doc = len(tok.encode(document))

    gen = Generator(m.cfg, m.params, stop_ids=tok.stop_ids)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": SHORT_PROMPT}]))
    rows, each = [], []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [ids] * b
        state = part2_state(compiled, tok, b, document)
        kw = dict(gate=compiled.gate, policy=compiled.arrays, gate_state=state)
        configs = {"ungated": {}, "every gate": kw}
        if args.each:
            for i, kind in enumerate(compiled.kinds):
                configs[kind] = dict(gate=_gate((kind,), compiled.vocab_size, compiled.eos_id),
                                     policy=(compiled.arrays[i],), gate_state=(state[i],))
        for name, c in configs.items():
            _, n = _decode_seconds(gen, prompts, args.new, **c)  # compile
            if n != args.new - 1:  # per-step figures over fewer steps would carry more fixed cost per step
                print(f"warning: batch {b}, {name}: the rows stopped after {n + 1} of {args.new} tokens",
                      file=sys.stderr)
        times = {name: [] for name in configs}
        for _ in range(args.reps):  # interleaved, so drift on a shared machine hits all alike
            for name, c in configs.items():
                t, n = _decode_seconds(gen, prompts, args.new, **c)
                times[name].append(t / n)
        ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        # each rep's gated / ungated pair ran back to back: the median of those ratios cancels slow drift
        paired = statistics.median(g / u for g, u in zip(times["every gate"], times["ungated"], strict=True))
        best = min(times["every gate"]) / min(times["ungated"])  # interference only ever adds time
        rows.append((b, ms["ungated"], ms["every gate"], paired, best))
        for name, v in ms.items():
            if name not in ("ungated", "every gate"):
                each.append((b, name, v, ms["ungated"]))

    def best_ms(fn, reps=20):
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    trie_ms = best_ms(lambda: grounding.build_trie([document]))
    spans = disclosure.default_spans(document)
    spans_ms = best_ms(lambda: disclosure.begin_turn([[(2, s, True) for s in spans[:8]]] * 32,
                                                     compiled.policy.normalization))
    n_numbers = len(set(grounding.number_keys(document)))

    print(f"\naqjax gate benchmark, part 2: {m.cfg.name}, jax {jax.__version__}, {_layout(gen)}; "
          f"gates: {', '.join(compiled.kinds)} "
          f"({len(compiled.rules)} rules, tables {tables_bytes(compiled.arrays) / 1e6:.1f} MB, compiled in "
          f"{compile_s:.2f} s)\n")
    print(f"{'decode step, every gate on':<30}{'ungated ms':>12}{'gated ms':>10}{'ratio':>8}{'paired':>8}{'best':>8}"
          f"{'target':>8}")
    for b, p, g, r, bst in rows:
        print(f"{'batch ' + str(b):<30}{p:>12.2f}{g:>10.2f}{g / p:>8.3f}{r:>8.3f}{bst:>8.3f}{'<=1.03':>8}")
    for b, name, g, p in each:
        print(f"{'  batch ' + str(b) + ', ' + name + ' alone':<30}{p:>12.2f}{g:>10.2f}{g / p:>8.3f}")
    print(f"\nevidence trie of a {n_doc}-token document ({n_numbers} distinct numbers): {trie_ms:.2f} ms "
          f"(best of 20)")
    print(f"disclosure spans for a batch of 32 rows x 8 spans: {spans_ms:.2f} ms")
    print(f"ratio: of the medians of {args.reps} interleaved reps; paired: the median of each rep's gated/ungated; "
          "best: of the fastest reps (what remains without interference). Ceiling: 1.000 (the gate's work hidden).")
    return 0


# ==============================================================================================================
# micro: what each part-2 gate costs per decode step, without the model. Run:  python bench/gate.py micro
# [--kinds phrases,evidence,all] [--batches 1,32] [--kernels]
#
# Per step, as the decode loop's _emit calls them: evaluate, the model's top token looked up in the mask, check of
# the fed token (or the forced one), advance with check's Outcome.seen; inside one compiled loop over the fed tokens
# of a JSON answer and prose, on random logits (a traced argument, so nothing folds into a constant), best of 7.
# Reported over the same loop without a gate. XLA:CPU pays a launch per fused kernel (a few us on a cold cache in the
# real loop), so --kernels also counts the kernels each step runs (from a profiler trace).


def _micro_run(gate, policy, state, fed, logits, passes):
    yes = jnp.ones(fed.shape[1:], bool)
    B = fed.shape[1]

    @jax.jit
    def run(policy, state, fed, logits):
        def one(i, acc):
            def body(s, x):
                t, tok = x
                # a row of logits per step, depending on the carry so that XLA cannot hoist the pass out of the loop
                lg = jnp.broadcast_to(logits[t % logits.shape[0]] + acc.astype(jnp.float32), (B, logits.shape[1]))
                top = ops.argmax(lg)
                if gate is None:
                    return s, jnp.sum(top)
                d = gate.evaluate(policy, s, lg)
                s = s if d.state is None else d.state
                used = d.mask[jnp.arange(B), top]
                token = jnp.where(d.forced >= 0, d.forced, tok)
                o = gate.check(policy, s, token)
                seen = getattr(o, "seen", None)  # getattr: also times trees from before Outcome.seen
                s = gate.advance(policy, s, o.token, yes, token if seen is None else seen)
                return s, jnp.sum(used) + o.token[0]

            _, out = lax.scan(body, state, (jnp.arange(fed.shape[0]), fed))
            return acc + (jnp.sum(out) < 0)

        return lax.fori_loop(0, passes, one, jnp.zeros((), jnp.int32))

    return run, (policy, state, fed, logits)


def _kernels_per_call(fn, args) -> int:
    """Leaf kernels one call of the jitted `fn` runs (XLA:CPU thunks from a profiler trace; loops not counted)."""
    import glob
    import gzip
    import json
    import re
    import shutil
    import tempfile

    names = set(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", fn.lower(*args).compile().as_text(), re.M))
    d = tempfile.mkdtemp()
    try:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return sum(1 for e in events if e.get("ph") == "X" and e.get("name") in names
               and not e["name"].startswith(("while", "conditional", "call")))


def main_micro(argv=None):
    ap = argparse.ArgumentParser(description="Per-gate cost of evaluate + check + advance per step, no model.")
    ap.add_argument("--model", default=None, help="where the tokenizer comes from (the default model's)")
    ap.add_argument("--phrases", type=int, default=1000)
    ap.add_argument("--kinds", default=None, help="comma list of gate kinds and/or 'all' (default: each, then all)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--kernels", action="store_true", help="also count the kernels a step runs")
    args = ap.parse_args(argv)

    from gate.policy import _gate
    from models.loader import load_model

    tok = load_model(args.model).tokenizer
    V = tok.vocab_size
    compiled = compile_policy(part2_policy(args.phrases), tok, vocab_size=V, cache=False)
    document = evidence_document(tok)
    prose = " The revenue grew in the quarter to EUR 1,234 while costs of staff were 12.5 percent."
    ids = np.asarray(tok.encode(structure_mod.BENCH_TEXT + prose)[:48], np.int32)
    kinds = args.kinds.split(",") if args.kinds else [*compiled.kinds, "all"]
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((16, V)) * 3, jnp.float32)

    print(f"\naqjax gate micro benchmark (jax {jax.__version__}): per step over the same loop without a gate, "
          f"{len(ids)} fed tokens x {args.passes} passes, best of 7")
    print(f"{'gate':<14}" + "".join(f"{'B=' + b + ' us':>12}" + (f"{'kernels':>9}" if args.kernels else "")
                                    for b in args.batches.split(",")))
    rows = {k: [] for k in kinds}
    for b in [int(x) for x in args.batches.split(",")]:
        state = part2_state(compiled, tok, b, document)
        fed = jnp.asarray(np.stack([np.roll(ids, -3 * r) for r in range(b)], 1))  # [T, B], rows a few tokens apart

        def measure(gate, policy, st, fed=fed):
            fn, fargs = _micro_run(gate, policy, st, fed, logits, args.passes)
            jax.block_until_ready(fn(*fargs))
            best = float("inf")
            for _ in range(7):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*fargs))
                best = min(best, time.perf_counter() - t0)
            n = _kernels_per_call(fn, fargs) / (args.passes * len(ids)) if args.kernels else 0.0
            return best / (args.passes * len(ids)) * 1e6, n

        base_us, base_k = measure(None, (), ())
        for kind in kinds:
            if kind == "all":
                g, p, st = compiled.gate, compiled.arrays, state
            else:
                i = compiled.kinds.index(kind)
                g, p, st = _gate((kind,), V, compiled.eos_id), (compiled.arrays[i],), (state[i],)
            us, k = measure(g, p, st)
            rows[kind].append((us - base_us, k - base_k))
    for kind, vals in rows.items():
        print(f"{kind:<14}" + "".join(f"{us:>12.1f}" + (f"{k:>9.1f}" if args.kernels else "") for us, k in vals))
    return 0


if __name__ == "__main__":
    sub = sys.argv[1:2]
    sys.exit(main_part2(sys.argv[2:]) if sub == ["part2"] else main_micro(sys.argv[2:]) if sub == ["micro"]
             else main())
