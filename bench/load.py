"""Times loading the default model from its Q4_1 GGUF (parse + dequantize) against an orbax checkpoint of it.

    python bench/load.py [--gguf PATH] [--orbax DIR] [--repeats 5] [--dtype float32 bfloat16]

Two measurements per dtype, each the median wall time of --repeats runs after one untimed warm-up (JAX and orbax
start-up, page cache), the two sources interleaved run by run so a change in the machine's load hits both:

  ready    `load_model(src, packed=True)`: params in the compute layout the engine runs on (what the CLI and the
           server call). The GGUF is parsed, dequantized and packed; the checkpoint stores that layout already.
  layout   `load_gguf` / `load_orbax`: params in the canonical layout (the checkpoint unpacks).

Without --orbax, the GGUF is first converted into a temporary orbax checkpoint (not timed).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import jax  # noqa: E402

from models.convert import DTYPES, convert, load_orbax  # noqa: E402
from models.download import default_model_path  # noqa: E402
from models.gguf import load_gguf  # noqa: E402
from models.loader import load_model  # noqa: E402


def _interleaved(fns: dict, repeats: int) -> tuple[float, ...]:
    """Median seconds of each fn (until its arrays are ready), the runs interleaved across fns."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return tuple(statistics.median(times[k]) for k in fns)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=pathlib.Path, default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--orbax", type=pathlib.Path, default=None, help="existing aqjax checkpoint dir of the same model")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    gguf_path = args.gguf or default_model_path()
    with tempfile.TemporaryDirectory(prefix="aqjax-bench-") as tmp:
        orbax_dir = args.orbax
        if orbax_dir is None:
            orbax_dir = pathlib.Path(tmp) / "ckpt"
            convert(gguf_path, orbax_dir, dtype=DTYPES["float32"])
        rows = []
        for name in args.dtype:
            dt = DTYPES[name]
            rows.append((name,) + _interleaved({
                "ready_gguf": lambda dt=dt: load_model(gguf_path, dt, packed=True).params,
                "ready_orbax": lambda dt=dt: load_model(orbax_dir, dt, packed=True).params,
                "gguf": lambda dt=dt: load_gguf(gguf_path, dt)[1],
                "orbax": lambda dt=dt: load_orbax(orbax_dir, dt)[1],
            }, args.repeats))

    print(f"model: {gguf_path} ({gguf_path.stat().st_size / 2**20:.0f} MiB); orbax checkpoint saved as float32")
    print(f"median of {args.repeats} after one warm-up; jax {jax.__version__} on {jax.devices()[0].platform}")
    t_ref = _reference_dequant_seconds(gguf_path)
    print()
    print(f"{'dtype':<9} {'ready: gguf (s)':>15} {'orbax (s)':>10} {'gguf/orbax':>11}   {'layout: gguf (s)':>16}"
          f" {'orbax (s)':>10} {'gguf/orbax':>11}   {'gguf-py dequant (s)':>19}")
    for name, r_g, r_o, t_g, t_o in rows:
        print(f"{name:<9} {r_g:>15.3f} {r_o:>10.3f} {r_g / r_o:>10.2f}x   {t_g:>16.3f} {t_o:>10.3f} {t_g / t_o:>10.2f}x"
              f"   {t_ref:>19.3f}")
    print("\nready = params in the engine's compute layout (load_model(..., packed=True)): the GGUF is dequantized and")
    print("packed, the checkpoint is restored as stored. layout = canonical params (the checkpoint unpacks). aqjax's")
    print("dequantizers are threaded numpy, ~memory speed, on a Q4_1 file 5.7x smaller than the float32 checkpoint;")
    print("gguf-py's reference dequantizer (one run, float32 only) is what dequantizing costs without them.")
    print("Ceiling: both write 538 MB of fresh float32 memory; on this VM first-touch page faults (~0.2 s per 538 MB)")
    print("dominate, reading at memory bandwidth would take ~0.05 s.")


def _reference_dequant_seconds(path) -> float:
    """Seconds for the gguf package to parse the file and dequantize every tensor to float32 (one run)."""
    import gguf

    t0 = time.perf_counter()
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        gguf.quants.dequantize(t.data, t.tensor_type)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
