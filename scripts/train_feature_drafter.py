"""Trains the feature drafter (`aqjax.drafters.feature_drafter`) on the target's own text and hidden states.

Usage:  python scripts/train_feature_drafter.py [--model PATH] [--out DIR] [--corpus FILE] [--prompts 1743]
                                               [--steps 1500] [--unroll 4] [--blocks 2] [--json out.json]

No external data: the target writes the training text itself.
  1. Corpus: the target answers built-in chat prompts (topics x tasks, plus code), then `--grounded` prompts
     that ask it to summarize / extract from its own longest answers; greedy, at batch 64. Cached as an .npz
     (`--corpus`, default `<aqjax cache>/corpus-<model>.npz`): regenerated when missing. The prompts of
     bench/speculative.py's chat workload and of `HELD_OUT` are not among them.
  2. Features: one teacher-forced target pass over every sequence keeps the final (normed) hidden state at
     every answer position: the input the drafter sees at run time after each verification.
  3. Training (optax AdamW, warmup + cosine): from the true hidden state h_t and the next `--unroll` tokens,
     the net is unrolled on its own predictions as at run time (draft j reads the feature it predicted at
     j - 1), with, at every unrolled position, the cross-entropy of the token the target wrote next (the
     target's greedy choice: the data are greedy) under the target's head restricted to the `--head-vocab`
     most frequent answer tokens, plus the normalized squared error against the true hidden state.
  4. Saved with orbax (`aqjax.drafters.save_feature_draft`, default `<aqjax cache>/feature-draft-<model>`,
     not in the repository). The record (manifest -> meta) holds the data size, every phase's time, the
     held-out per-depth accuracy, and the acceptance of greedy speculative decoding on held-out prompts.

Use it with `SpeculativeGenerator(gen, "feature")`, `python -m aqjax.generate --speculative feature` or
`python bench/speculative.py --drafters feature`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from aqjax.cache import KVCache  # noqa: E402
from aqjax.drafters import (  # noqa: E402
    FeatureDraft,
    cache_path,
    default_feature_dir,
    feature_step,
    init_feature_net,
    save_feature_draft,
)
from aqjax.engine import Generator  # noqa: E402
from aqjax.sampling import SamplingConfig  # noqa: E402
from models.llama import forward  # noqa: E402

TOPICS = (
    "the water cycle|photosynthesis|the French Revolution|how vaccines work|black holes|machine learning|"
    "the history of jazz|climate change|healthy sleep habits|baking bread|the stock market|volcanoes|"
    "the human heart|electric cars|coral reefs|the printing press|honey bees|the internet|renewable energy|"
    "the Great Wall of China|recycling|earthquakes|the immune system|ancient Egypt|public libraries|"
    "time management|the Moon landing|rainforests|chess|urban gardening|the solar system|saving money|"
    "the ocean tides|dinosaurs|the Renaissance|coffee|the Olympic Games|quantum computing|democracy|"
    "the human brain|glaciers|the Industrial Revolution|meditation|penguins|solar panels|the Amazon river|"
    "blockchain|nutrition|the piano|mountains|deserts|wind turbines|the Roman alphabet|origami|"
    "castles in Europe|tea ceremonies|the theory of evolution|antibiotics|smartphones|video games|football|"
    "gardening vegetables|the Eiffel Tower|photography|chocolate|the moon's phases|hurricanes|DNA|"
    "the periodic table|artificial intelligence|wolves|elephants|the Silk Road|pyramids|social media|"
    "remote work|job interviews|writing a resume|first aid|dogs as pets|cats|birds migration|"
    "the speed of light|gravity|magnets|batteries|the postal service|trains|ships and sailing|the camera|"
    "mathematics|prime numbers|poetry|Shakespeare|the violin|opera|museums|cheese making|bread yeast|"
    "wine regions|the Arctic|the Sahara|rivers|lakes|forests|composting|running a marathon|yoga|swimming|"
    "tennis|basketball|kindness|friendship|habits|stress management|budgeting|credit cards|inflation|taxes|"
    "the United Nations|human rights|newspapers|podcasts|3D printing|robots|self-driving cars|"
    "space telescopes|Mars|satellites|weather forecasting|clouds|snow|lightning"
).split("|")
TASKS = [
    "Explain {} in simple terms.", "Write a short essay about {}.", "Give me five facts about {}.",
    "What are the advantages and disadvantages of {}?", "Describe {} to a ten-year-old.",
    "Write a short blog post about {}.", "Tell me about {}.", "What is the history of {}?",
    "Why is {} important?", "Write a short story that involves {}.", "Give me some tips related to {}.",
    "How does {} work?", "What are common misconceptions about {}?",
]
TOPICS_2 = (
    "the Nile|tigers|sharks|whales|octopuses|ants|spiders|mushrooms|tomatoes|potatoes|apples|pizza|sushi|soup|"
    "knitting|woodworking|watercolor painting|sculpture|film making|cartoons|comic books|the Vikings|the Aztecs|"
    "the Maya|ancient Greece|the Ottoman Empire|the Cold War|World War I|the telephone|the telegraph|radio|"
    "television|electricity|nuclear power|hydropower|geothermal energy|plastic pollution|air pollution|"
    "water purification|deforestation|endangered species|national parks|fishing|farming|irrigation|soil|"
    "rocks and minerals|diamonds|gold|banks|the economy|supply and demand|entrepreneurship|marketing|"
    "customer service|teamwork|leadership|negotiation|email etiquette|note taking|studying for exams|"
    "reading books|grammar|punctuation|fractions|geometry|algebra|statistics|probability|computers|"
    "operating systems|databases|cybersecurity|passwords|cloud computing|programming|open source software|"
    "search engines|keyboards|the human skeleton|muscles|the lungs|the kidneys|the eyes|hearing|dreams|memory|"
    "emotions|happiness|exercise|walking|dancing|music theory|the guitar|drums|orchestras|theater|the circus|"
    "magic tricks|board games|puzzles|card games|toys|birthdays|weddings|holidays|New Year celebrations|"
    "gift giving|cooking pasta|baking cookies|breakfast|vegetarian diets|vitamins|drinking water|salt|spices|"
    "bridges|skyscrapers|tunnels|roads|maps|compasses|clocks|calendars|the seasons|autumn leaves|spring flowers|"
    "summer heat|winter storms|rain|fog|tornadoes|tsunamis|caves|islands|beaches|coral atolls|the deep sea"
).split("|")
TASKS_2 = [
    "Can you explain {}?", "Write a poem about {}.", "List some interesting facts about {}.",
    "What would happen without {}?", "Summarize what you know about {}.", "Write a short dialogue about {}.",
    "What are the main ideas behind {}?", "Give a step-by-step explanation of {}.", "What are the benefits of {}?",
    "Write an introduction for a presentation about {}.", "What questions do people often ask about {}?",
]
# Input-grounded prompts over the target's own longer answers (the corpus's chat part): extraction and summaries,
# where the target copies from its input as on bench/speculative.py's grounded workload (whose text is not used).
GROUNDED = [
    "Summarize the following text:\n\n{}", "List the main points of the following text:\n\n{}",
    "Extract the key facts from this text:\n\n{}", "Rewrite the following text in simpler words:\n\n{}",
    "What does the following text say? Answer briefly.\n\n{}", "Write a title and a one-paragraph summary for "
    "this text:\n\n{}",
]
CODE = [f"Write a Python function that {x}." for x in (
    "reverses a string", "computes Fibonacci numbers", "counts the words in a text", "checks if a number is prime",
    "finds the maximum of a list", "reads a CSV file", "removes duplicates from a list",
    "computes the factorial of a number", "flattens a nested list", "validates an email address",
    "converts Celsius to Fahrenheit", "computes the average of a list", "sorts a list of dictionaries by a key",
    "finds the longest word in a sentence")]
# Held out: acceptance is measured on prompts the drafter never saw (nor did bench/speculative.py's chat rows).
HELD_OUT = [
    "Explain how a rainbow forms.", "Write a short story about a lighthouse keeper.",
    "What are good habits for learning a new language?", "Write a Python function that merges two sorted lists.",
    "Give me three tips for public speaking.", "Describe the life cycle of a butterfly.",
    "What is the difference between weather and climate?", "How do submarines dive and surface?",
]


def prompts() -> list[str]:
    """The corpus prompts: two shuffled sets (the first, topics x tasks + code, then a second one)."""
    first = [t.format(x) for x in TOPICS for t in TASKS] + CODE
    np.random.default_rng(0).shuffle(first)
    second = [t.format(x) for x in TOPICS_2 for t in TASKS_2]
    np.random.default_rng(1).shuffle(second)
    return first + second


def chat(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def grounded_prompts(tok, flat, lengths, starts, n: int) -> list[str]:
    """Up to n input-grounded prompts over the corpus's longest answers (deterministic)."""
    seqs = np.split(flat, np.cumsum(lengths)[:-1])
    answers = [tok.decode(s[st:].tolist(), skip_special=True).strip() for s, st in zip(seqs, starts, strict=True)]
    order = np.argsort([-len(a) for a in answers], kind="stable")[:n]
    return [GROUNDED[i % len(GROUNDED)].format(answers[j]) for i, j in enumerate(sorted(order))]


def make_corpus(gen: Generator, tok, texts, *, new_tokens: int, batch: int):
    """Greedy answers: (flat tokens, sequence lengths, answer starts)."""
    seqs, starts, t0 = [], [], time.perf_counter()
    for i in range(0, len(texts), batch):
        ids = [chat(tok, t) for t in texts[i:i + batch]]
        for p, r in zip(ids, gen.generate(ids, SamplingConfig(), max_new_tokens=new_tokens), strict=True):
            seqs.append(p + r.tokens)
            starts.append(len(p))
        n = sum(len(s) - st for s, st in zip(seqs, starts, strict=True))
        print(f"[corpus] {len(seqs)}/{len(texts)} prompts, {n} answer tokens, {time.perf_counter() - t0:.0f} s",
              flush=True)
    return (np.concatenate([np.asarray(s, np.int32) for s in seqs]), np.asarray([len(s) for s in seqs]),
            np.asarray(starts))


def hidden_states(gen: Generator, seqs, starts, *, batch: int = 8):
    """Per sequence, the target's final hidden states at positions start-1 .. len-1 (teacher forcing)."""
    cfg = gen.cfg

    @jax.jit
    def run(params, toks):
        B, T = toks.shape
        h, _ = forward(params, toks, KVCache.init(cfg, B, T, params["embed"].dtype), cfg=cfg)
        return h.astype(jnp.float32)

    order = np.argsort([len(s) for s in seqs])
    out = [None] * len(seqs)
    for i in range(0, len(seqs), batch):
        idx = order[i:i + batch]
        T = -(-max(len(seqs[j]) for j in idx) // 64) * 64
        toks = np.zeros((batch, T), np.int32)
        for r, j in enumerate(idx):
            toks[r, :len(seqs[j])] = seqs[j]
        h = np.asarray(run(gen.params, jnp.asarray(toks)))
        for r, j in enumerate(idx):
            out[j] = h[r, starts[j] - 1:len(seqs[j])]
    return out


def choose_vocab(answers, vocab_size: int, size: int, stop_ids) -> np.ndarray:
    counts = np.bincount(np.concatenate(answers), minlength=vocab_size)
    chosen = [int(i) for i in np.argsort(-counts, kind="stable")[:size] if counts[i] > 0]
    chosen += [int(s) for s in stop_ids if s not in chosen]
    return np.asarray(sorted(chosen[:size]), np.int32)


def flatten(hs, seqs, starts, unroll: int):
    """Flat arrays over every sequence's positions start-1 .. len-1: hidden H[N, D], token S[N] at that
    position, and the example starts i whose unroll + 1 following positions lie in the same sequence."""
    H = np.concatenate(hs)
    S = np.concatenate([np.asarray(s[st - 1:], np.int32) for s, st in zip(seqs, starts, strict=True)])
    ok, off = [], 0
    for h in hs:
        n = len(h)
        ok.append(off + np.arange(max(0, n - unroll - 1)))
        off += n
    return H, S, np.concatenate(ok)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="target model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=None, help="output dir (default: <aqjax cache>/feature-draft-<model>)")
    ap.add_argument("--corpus", default=None, help="corpus .npz (default: <aqjax cache>/corpus-<model>.npz)")
    ap.add_argument("--prompts", type=int, default=None, help="corpus prompts when generating (default: all)")
    ap.add_argument("--grounded", type=int, default=512, help="input-grounded prompts over the corpus's answers")
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--head-vocab", type=int, default=8192)
    ap.add_argument("--unroll", type=int, default=4, help="draft positions trained on their own predictions")
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the training record here")
    args = ap.parse_args(argv)

    from models.loader import load_model

    t_all = time.perf_counter()
    m = load_model(args.model)
    tok, cfg = m.tokenizer, m.cfg
    gen = Generator(cfg, m.params, stop_ids=tok.stop_ids)
    corpus = args.corpus or f"{cache_path(cfg, 'corpus')}.npz"
    record: dict = {"kind": "feature", "target": cfg.name, "blocks": args.blocks, "hidden": args.hidden,
                    "head_vocab": args.head_vocab, "unroll": args.unroll, "steps": args.steps, "batch": args.batch,
                    "lr": args.lr, "feature_weight": args.feature_weight}

    t0 = time.perf_counter()
    if os.path.exists(corpus):
        z = np.load(corpus)
        flat, lengths, starts = z["tokens"], z["lengths"], z["starts"]
        print(f"[corpus] {corpus}: {len(lengths)} sequences", flush=True)
    else:
        texts = prompts()[: args.prompts]
        flat, lengths, starts = make_corpus(gen, tok, texts, new_tokens=args.new_tokens, batch=args.gen_batch)
        g = grounded_prompts(tok, flat, lengths, starts, args.grounded)
        f2, l2, s2 = make_corpus(gen, tok, g, new_tokens=args.new_tokens, batch=args.gen_batch // 2)
        flat, lengths, starts = np.concatenate([flat, f2]), np.concatenate([lengths, l2]), np.concatenate([starts, s2])
        os.makedirs(os.path.dirname(os.path.abspath(corpus)), exist_ok=True)
        np.savez(corpus, tokens=flat, lengths=lengths, starts=starts)
        record["time_corpus_s"] = round(time.perf_counter() - t0, 1)
    seqs = np.split(flat, np.cumsum(lengths)[:-1])
    record["corpus_sequences"] = len(seqs)
    record["corpus_answer_tokens"] = int(sum(len(s) - st for s, st in zip(seqs, starts, strict=True)))

    t0 = time.perf_counter()
    hs = hidden_states(gen, seqs, starts)
    record["time_features_s"] = round(time.perf_counter() - t0, 1)
    print(f"[features] {record['corpus_answer_tokens']} answer positions in {record['time_features_s']} s",
          flush=True)

    rng = np.random.default_rng(args.seed)
    held = rng.random(len(seqs)) < 0.05  # 5% of sequences: held-out accuracy during training
    vocab_ids = choose_vocab([s[st:] for s, st, h in zip(seqs, starts, held, strict=True) if not h],
                             cfg.vocab_size, args.head_vocab, tok.stop_ids)
    col_of = np.full((cfg.vocab_size,), -1, np.int32)
    col_of[vocab_ids] = np.arange(len(vocab_ids))
    K = args.unroll
    Htr, Str, ok_tr = flatten([h for h, x in zip(hs, held, strict=True) if not x],
                              [s for s, x in zip(seqs, held, strict=True) if not x],
                              [s for s, x in zip(starts, held, strict=True) if not x], K)
    Hev, Sev, ok_ev = flatten([h for h, x in zip(hs, held, strict=True) if x],
                              [s for s, x in zip(seqs, held, strict=True) if x],
                              [s for s, x in zip(starts, held, strict=True) if x], K)
    coverage = float(np.mean(col_of[Str[1:]] >= 0))
    record["head_vocab_coverage"] = round(coverage, 4)
    print(f"[data] {len(ok_tr)} training / {len(ok_ev)} held-out examples; head vocabulary covers "
          f"{coverage:.3f} of answer tokens", flush=True)

    tp = gen.params
    head = (jnp.asarray(tp["embed"])[vocab_ids].T if cfg.tie_embeddings else jnp.asarray(tp["lm_head"])[:, vocab_ids])
    head = head.astype(jnp.float32)
    embed = jnp.asarray(tp["embed"])
    net = init_feature_net(jax.random.key(args.seed), cfg.d_model, blocks=args.blocks, hidden=args.hidden,
                           final_norm=tp["final_norm"])
    h_scale = float(np.mean(Htr[: 100_000] ** 2))
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20), args.steps, args.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = opt.init(net)
    Hd, Sd, Cd = jnp.asarray(Htr), jnp.asarray(Str), jnp.asarray(col_of)

    def unrolled(w, H, S, i):
        """Per example start i: logits-derived (ce, correct) and feature error at each of the K positions."""
        f = H[i]
        ces, hits, errs = [], [], []
        for j in range(1, K + 1):
            f = feature_step(w, f, embed[S[i + j]].astype(jnp.float32))
            logp = jax.nn.log_softmax(jnp.dot(f, head), axis=-1)
            col = Cd[S[i + j + 1]]
            ces.append(jnp.where(col >= 0, -jnp.take_along_axis(logp, jnp.maximum(col, 0)[:, None], 1)[:, 0], 0.0))
            hits.append((jnp.argmax(logp, axis=-1) == col) & (col >= 0))
            errs.append(jnp.mean((f - H[i + j]) ** 2, axis=-1) / h_scale)
        return jnp.stack(ces, 1), jnp.stack(hits, 1), jnp.stack(errs, 1)

    def loss_fn(w, i):
        ce, hit, err = unrolled(w, Hd, Sd, i)
        return jnp.mean(ce) + args.feature_weight * jnp.mean(err), (jnp.mean(hit, 0), jnp.mean(err))

    @jax.jit
    def train_step(w, s, i):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(w, i)
        upd, s = opt.update(g, s, w)
        return optax.apply_updates(w, upd), s, loss, aux

    Hev_d, Sev_d = jnp.asarray(Hev), jnp.asarray(Sev)

    @jax.jit
    def eval_hits(w, i):
        _, hit, _ = unrolled(w, Hev_d, Sev_d, i)
        return hit

    def held_out():
        n = len(ok_ev)
        pad = np.resize(ok_ev, -(-n // 1024) * 1024)  # whole chunks of 1024 (one compiled shape)
        hits = np.concatenate([np.asarray(eval_hits(net, jnp.asarray(pad[a:a + 1024])))
                               for a in range(0, len(pad), 1024)])[:n]
        # greedy chain: draft j is accepted when it and every earlier one match the target's token
        return hits.mean(0), np.cumprod(hits, axis=1).sum(1).mean()

    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        idx = jnp.asarray(rng.choice(ok_tr, args.batch))
        net, opt_state, loss, (acc, err) = train_step(net, opt_state, idx)
        losses.append(float(loss))
        if step % 100 == 0 or step == args.steps - 1:
            acc_ev, chain = held_out()
            print(f"[train] step {step:5d}  loss {np.mean(losses[-100:]):.3f}  feature err {float(err):.3f}  "
                  f"held-out accuracy by depth {' '.join(f'{a:.2f}' for a in acc_ev)}  accepted/window {chain:.2f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    record["time_train_s"] = round(time.perf_counter() - t0, 1)
    record["final_loss"] = round(float(np.mean(losses[-100:])), 4)
    acc_ev, chain = held_out()
    record["heldout_accuracy_by_depth"] = [round(float(a), 4) for a in acc_ev]
    record["heldout_accepted_per_window"] = round(float(chain), 3)

    fd = FeatureDraft(net=net, vocab_ids=vocab_ids, d_model=cfg.d_model, meta=record)
    from aqjax.speculative import SpeculativeGenerator

    t0 = time.perf_counter()
    sg = SpeculativeGenerator(gen, "feature", feature=fd, draft_k=K)
    _, stats = sg.generate([chat(tok, q) for q in HELD_OUT], max_new_tokens=args.eval_tokens, return_stats=True)
    record["eval_acceptance"] = round(stats.acceptance, 4)
    record["eval_tokens_per_step"] = round(stats.tokens_per_step, 3)
    record["time_eval_s"] = round(time.perf_counter() - t0, 1)
    record["time_total_s"] = round(time.perf_counter() - t_all, 1)
    print(f"[eval] held-out prompts, greedy, k={K}: acceptance {stats.acceptance:.3f}, "
          f"{stats.tokens_per_step:.2f} tokens per target forward", flush=True)

    path = save_feature_draft(args.out or default_feature_dir(cfg), FeatureDraft(
        net=net, vocab_ids=vocab_ids, d_model=cfg.d_model, meta=record), target_cfg=cfg)
    print(f"[saved] {path}  (total {record['time_total_s']} s)")
    print(json.dumps(record, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
