"""The persistent compile cache: a second process loads what the first compiled; a bad folder changes nothing."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one program (a scan, so it is a real compilation) and reports the cache's hits and misses.
SCRIPT = r"""
import collections, json, sys
import jax, jax.numpy as jnp
from aqjax import compile_cache
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: events.update([name]))
used = compile_cache.enable(sys.argv[1], min_compile_secs=0.0)
def f(x):
    return jax.lax.scan(lambda c, y: (jnp.tanh(c @ y), c.sum()), x, jnp.stack([x] * 3))
out = jax.jit(f)(jnp.eye(8) * float(sys.argv[2]))
print(json.dumps({"used": None if used is None else str(used), "value": float(out[0].sum()),
                  "hits": events["/jax/compilation_cache/cache_hits"],
                  "misses": events["/jax/compilation_cache/cache_misses"]}))
"""


def _run(directory, scale=1.0):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(directory), str(scale)], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_compiled_program(tmp_path):
    first = _run(tmp_path / "xla")
    assert first["used"] == str(tmp_path / "xla") and first["misses"] >= 1 and first["hits"] == 0
    assert any((tmp_path / "xla").iterdir())
    second = _run(tmp_path / "xla")
    assert second["hits"] >= 1 and second["misses"] == 0
    assert second["value"] == first["value"]
    # a different input value is the same program: served from the cache, computing the new value
    third = _run(tmp_path / "xla", scale=2.0)
    assert third["hits"] >= 1 and third["value"] != first["value"]


def test_a_folder_that_cannot_be_made_leaves_compilation_alone(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = _run(blocker / "xla")
    assert res["used"] is None and res["hits"] == 0
    assert res["value"] == _run(tmp_path / "ok")["value"]
