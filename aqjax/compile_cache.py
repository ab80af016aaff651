"""A persistent cache of compiled XLA programs, shared by the CLI, the server and the test suite.

Compiling dominates start-up on a CPU: the server's warm-up compiles a few dozen programs (one per shape
bucket) and takes tens of seconds, and about 80% of the test suite's time is XLA's backend compiler. JAX can
keep each compiled executable on disk, keyed by the program's HLO, the compile options, the backend and the
jax / jaxlib versions, so a later process that builds the same program loads it instead of compiling it. A
changed program, flag or version is a different key: a stale entry is never used, only left behind, and the
cache evicts least-recently-used entries beyond `max_bytes`.

`enable()` turns it on for this process (before the first compilation it should serve); the default folder is
`$AQJAX_CACHE/xla` (`models.download.cache_dir`). Failing to create the folder or to write an entry is not an
error: the program is simply compiled, as without a cache.
"""

from __future__ import annotations

import logging
import os
import pathlib

__all__ = ["default_dir", "enable"]

log = logging.getLogger("aqjax.compile_cache")


def default_dir() -> pathlib.Path:
    """`$AQJAX_CACHE/xla` (default `~/.cache/aqjax/xla`)."""
    from models.download import cache_dir

    return cache_dir() / "xla"


def enable(directory: str | os.PathLike | None = None, *, max_bytes: int = 4 << 30,
           min_compile_secs: float = 0.25) -> pathlib.Path | None:
    """Keeps compiled programs in `directory` (default `default_dir()`) for later processes.

    Args:
      directory: the cache folder (created if missing).
      max_bytes: the cache's size bound (least recently used entries go first); -1 for no bound.
      min_compile_secs: programs that compiled faster than this are not worth a file.

    Returns:
      The folder in use, or None when it cannot be created (a warning says why; nothing else changes).
    """
    import jax

    path = pathlib.Path(directory if directory is not None else default_dir()).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compile cache disabled: cannot create %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        import filelock  # noqa: F401  (jax bounds the cache's size under a file lock)
    except ImportError:
        log.warning("compile cache size unbounded: the filelock package is missing")
        max_bytes = -1
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    return path
