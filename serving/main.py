"""Runs the server: `python -m serving.main [--config FILE] [--host H] [--port P] [--slots N] ...`.

The process has uvicorn's event loop in the main thread, the engine thread, the persistence thread and, at
startup, a loader thread (serving/service.py describes them). The server answers (503) while the model loads
and compiles.

SIGTERM (or Ctrl-C) drains: new requests get 503, running ones finish (up to `drain_timeout` seconds), the
audit log and the session store are flushed, then the process exits. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import uvicorn

from aqjax import compile_cache
from serving.api import create_app
from serving.config import ConfigError, load_config
from serving.governance import hash_key
from serving.service import Service

log = logging.getLogger("aqjax.serving")


class _DrainingServer(uvicorn.Server):
    """uvicorn, except that the first exit signal drains the service before the server stops."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        self.service.begin_drain()
        log.info("signal %s: draining (new requests get 503)", sig)

        def drain():
            ok = self.service.drain(self.service.config.drain_timeout)
            log.info("drained (%s); stopping", "all requests finished" if ok else "timed out")
            self.should_exit = True

        threading.Thread(target=drain, name="aqjax-drain", daemon=True).start()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.main", description="aqjax's OpenAI-compatible, governed server")
    p.add_argument("--config", help="TOML config file (see serving/config.py; configs/server.toml is an example)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--model", help="GGUF / HF / orbax path, or 'mock' (default: SmolLM2-135M-Instruct)")
    p.add_argument("--model-name", help="the name clients pass as `model`")
    p.add_argument("--policy", help="deployment policy YAML")
    p.add_argument("--state-dir", help="where sessions.sqlite3 and audit.jsonl live")
    p.add_argument("--slots", type=int, help="requests decoded together")
    p.add_argument("--max-len", type=int, help="context per slot (prompt + completion tokens)")
    p.add_argument("--chunk-steps", type=int, help="decode steps per compiled call")
    p.add_argument("--prefill-chunk", type=int, help="largest prompt piece prefilled in one call (power of two)")
    p.add_argument("--prefill-budget", type=int, help="prompt tokens prefilled between two decode chunks")
    p.add_argument("--min-active-slots", type=int, help="smallest slot prefix a decode chunk runs over")
    p.add_argument("--max-queue", type=int, help="requests that may wait for a slot (beyond: 429)")
    p.add_argument("--speculative", choices=["none", "lookup", "feature", "hybrid"],
                   help="speculative decoding in decode chunks over few slots: prompt lookup, the feature draft "
                        "head, or both (default none)")
    p.add_argument("--feature-draft", metavar="DIR",
                   help="the feature draft for --speculative feature / hybrid (default: its training script's cache)")
    p.add_argument("--draft-k", type=int, help="draft tokens per speculative step (default 4)")
    p.add_argument("--speculative-rows", type=int, help="the most slots a speculative chunk runs over (default 1)")
    p.add_argument("--default-max-tokens", type=int, help="completion budget when a request gives none")
    p.add_argument("--drain-timeout", type=float, help="seconds SIGTERM waits for running requests")
    p.add_argument("--no-gate", action="store_true", help="run without the gate (no policy, audit or sessions)")
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead of at startup")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="keep compiled programs here for the next start (default: $AQJAX_CACHE/xla)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, keep nothing")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p.add_argument("--hash-key", metavar="KEY", help="print the sha256 to put in [[keys]] for KEY, and exit")
    return p


def config_from_args(args: argparse.Namespace):
    cfg = load_config(args.config)
    changes = dict(host=args.host, port=args.port, model=args.model, model_name=args.model_name, policy=args.policy,
                   state_dir=args.state_dir, slots=args.slots, max_len=args.max_len, chunk_steps=args.chunk_steps,
                   prefill_chunk=args.prefill_chunk, prefill_budget=args.prefill_budget,
                   min_active_slots=args.min_active_slots, max_queue=args.max_queue, speculative=args.speculative,
                   draft_k=args.draft_k, speculative_rows=args.speculative_rows, feature_draft=args.feature_draft,
                   default_max_tokens=args.default_max_tokens, drain_timeout=args.drain_timeout)
    if args.no_gate:
        changes["governed"] = False
    if args.no_warmup:
        changes["warmup"] = False
    if args.compile_cache is not None and args.no_compile_cache:
        raise ConfigError("--compile-cache and --no-compile-cache exclude each other")
    if args.compile_cache is not None:
        changes["compile_cache"] = os.path.abspath(os.path.expanduser(args.compile_cache))
    if args.no_compile_cache:
        changes["compile_cache"] = ""
    return cfg.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hash_key is not None:
        print(hash_key(args.hash_key))
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.compile_cache:  # before anything compiles: the warm-up loads what an earlier start compiled
        compile_cache.enable(None if cfg.compile_cache == "auto" else cfg.compile_cache)
    if len(cfg.keys) == 0:
        log.warning("no API keys configured: every request will get 401 (add [[keys]] to the config)")
    service = Service(cfg)
    app = create_app(service)
    server = _DrainingServer(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=args.log_level.lower(),
                                            timeout_graceful_shutdown=cfg.drain_timeout), service)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
