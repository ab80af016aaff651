"""Command-line chat generation: `python -m aqjax.generate "prompt"` streams an answer from the default model.

Examples:
  python -m aqjax.generate "List three facts about the Moon."
  python -m aqjax.generate --temperature 0.7 --top-p 0.9 --seed 1 --max-tokens 200 "Write a haiku."
  python -m aqjax.generate --model ./smollm2-orbax --system "Answer tersely." "What is RoPE?"
  python -m aqjax.generate --policy policies/default.yaml --audit --audit-log audit.jsonl "Tell me a secret."
  python -m aqjax.generate --speculative lookup --draft-k 6 "Summarize: ..."   # same greedy tokens, faster

Speculative decoding (`--speculative`): "lookup" drafts from n-gram matches in the prompt and the answer so far
(best when the answer copies its input), "self" from the target's first layers, "draft" from a small draft model
trained by `scripts/train_draft.py` (`--draft DIR`, default the cache folder that script writes), "feature" from
a draft head on the target's own hidden states trained by `scripts/train_feature_drafter.py` (`--draft DIR`,
default the cache folder that script writes), "hybrid" from lookup where it matches and that head elsewhere.
Output follows
the same (gated) distribution as without it; greedy output is token for token the same.
"""

from __future__ import annotations

import argparse
import sys
import time

from aqjax.engine import Generator, RequestError
from aqjax.sampling import SamplingConfig, SamplingError
from aqjax.speculative import MAX_DRAFT_K, SPECULATIVE_KINDS, speculative_generator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aqjax.generate", description="Stream a chat answer.")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", default=None, help="GGUF file, HF dir or aqjax orbax dir (default: SmolLM2-135M)")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=8, help="decode steps per compiled call (streaming granularity)")
    p.add_argument("--stats", action="store_true", help="print timing to stderr")
    p.add_argument("--policy", default=None, help="govern generation with this policy file (YAML)")
    p.add_argument("--audit", action="store_true", help="print the turn's audit record to stderr (with --policy)")
    p.add_argument("--audit-log", default=None, help="append the audit record to this hash-chained JSONL file")
    p.add_argument("--speculative", default="none", choices=SPECULATIVE_KINDS,
                   help="speculative decoding drafter (default: none)")
    p.add_argument("--draft-k", type=int, default=4, help=f"draft tokens per speculative step (1..{MAX_DRAFT_K})")
    p.add_argument("--draft", default=None, help="draft folder for --speculative draft, feature or hybrid")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled programs here for the next run (default: $AQJAX_CACHE/xla)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, keep nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  min_p=args.min_p, seed=args.seed)
    except SamplingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_tokens < 0:
        print("error: --max-tokens must be >= 0", file=sys.stderr)
        return 2
    if not 1 <= args.draft_k <= MAX_DRAFT_K:
        print(f"error: --draft-k must be in [1, {MAX_DRAFT_K}], got {args.draft_k}", file=sys.stderr)
        return 2
    if (args.audit or args.audit_log) and not args.policy:
        print("error: --audit and --audit-log need --policy", file=sys.stderr)
        return 2
    if args.draft and args.speculative not in ("draft", "feature", "hybrid"):
        print("error: --draft needs --speculative draft, feature or hybrid", file=sys.stderr)
        return 2

    if args.compile_cache and args.no_compile_cache:
        print("error: --compile-cache and --no-compile-cache exclude each other", file=sys.stderr)
        return 2
    if not args.no_compile_cache:
        from aqjax import compile_cache

        compile_cache.enable(args.compile_cache)

    from models.errors import ModelFileError
    from models.loader import load_model
    from models.tokenizer import StreamDecoder, TokenizerError

    t0 = time.perf_counter()
    try:
        model = load_model(args.model, packed=True)
    except (ModelFileError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = model.tokenizer
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    try:
        prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    gen = Generator(model.cfg, model.params, stop_ids=tok.stop_ids, chunk_size=args.chunk)
    try:
        gen = speculative_generator(gen, args.speculative, args.draft_k,
                                    **({"draft" if args.speculative == "draft" else "feature": args.draft}
                                       if args.draft else {}))
        # a missing or mismatched draft fails here, before any output
        if args.speculative in ("self", "draft"):
            gen.draft_model(args.speculative)
        elif args.speculative in ("feature", "hybrid"):
            gen.feature_draft()
    except (RequestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stream, audit_log = None, None
    if args.policy:
        from gate.audit import AuditError, AuditLog
        from gate.policy import PolicyError, compile_policy, load_policy
        from gate.turn import governed_stream

        try:
            compiled = compile_policy(load_policy(args.policy), tok, vocab_size=model.cfg.vocab_size)
            audit_log = AuditLog(args.audit_log) if args.audit_log else None
        except (PolicyError, AuditError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        stream = governed_stream(gen, tok, compiled, prompt_ids, sampling, args.max_tokens, audit=audit_log,
                                 chunk_size=args.chunk)
    else:
        stream = (new[0] for new, _ in gen.stream([prompt_ids], sampling, args.max_tokens))
    t_load = time.perf_counter() - t0

    decoder = StreamDecoder(tok)
    n_tokens, t_first, finish, turn = 0, None, None, None
    t1 = time.perf_counter()
    try:
        for item in stream:
            if not isinstance(item, list):
                turn = item  # the governed turn's result comes last
                continue
            if t_first is None:
                t_first = time.perf_counter() - t1
            n_tokens += len(item)
            sys.stdout.write(decoder.push(item))
            sys.stdout.flush()
    except RequestError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(decoder.flush() + "\n")
    if turn is not None:
        finish = turn.finish_reason
        print(f"[verdict {turn.verdict}, confidence {turn.confidence:.2f}, finish {turn.finish_reason}, "
              f"{len(turn.events)} gate events" + (f", {turn.structure_report}" if turn.structure_report else "")
              + "]", file=sys.stderr)
        if args.audit:
            import json

            record = turn.record.to_dict() if turn.record is not None else {"events": list(turn.events)}
            print(json.dumps(record, indent=1, ensure_ascii=False), file=sys.stderr)
        if audit_log is not None:
            audit_log.close()
    total = time.perf_counter() - t1
    if args.stats:
        rate = (n_tokens - 1) / (total - t_first) if n_tokens > 1 and total > t_first else float("nan")
        print(f"[load {t_load:.1f}s, prompt {len(prompt_ids)} tokens, first token {t_first:.2f}s "
              f"(includes compile), {n_tokens} tokens, {rate:.1f} tok/s after the first, finish={finish}]",
              file=sys.stderr)
        stats = getattr(gen, "last_stats", None)
        if stats is not None:
            print(f"[speculative {args.speculative}, k={args.draft_k}: {stats.tokens_per_step:.2f} tokens per target "
                  f"step, {stats.acceptance:.0%} of drafts accepted]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
