"""The base-spectrum cache: reuse across models of one base, verification, atomicity, caps, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import ftaudit.audit as audit_module
import ftaudit.cache as cache_module
from ftaudit.cache import PENDING, SpectrumCache, tensor_key
from ftaudit.cli import main
from ftaudit.spectral import base_basis
from tests.invoke import tmpfs_in_a_user_namespace
from tests.models import llama_like, low_rank_update, small_update, write_model


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    base = llama_like()
    return {
        "base": write_model(tmp_path / "base", base),
        "a": write_model(tmp_path / "a", low_rank_update(base)),
        "b": write_model(tmp_path / "b", small_update(base)),
    }


def audit(model: Path, base: Path, *extra: object, debug: bool = True) -> tuple[int, str, dict]:
    out = model.parent / f"{model.name}.json"
    args = ["check", str(model), "--base", str(base), "--json", str(out), *map(str, extra)]
    result = CliRunner().invoke(main, args + ["--debug"] * debug)
    return result.exit_code, result.stderr, json.loads(out.read_text()) if out.exists() else {}


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/*.safetensors"))


def test_second_model_on_the_same_base_reuses_every_base_spectrum(models, tmp_path):
    cache_dir = Path(os.environ["FTAUDIT_CACHE"])
    code, stderr, cold = audit(models["a"], models["base"])
    assert code == 1 and "0 hits, 14 misses" in stderr and len(entries(cache_dir)) == 14
    code, stderr, _ = audit(models["b"], models["base"])
    assert code == 0 and "14 hits, 0 misses" in stderr
    code, stderr, warm = audit(models["a"], models["base"])
    assert "14 hits" in stderr
    assert cold["matrices"] == warm["matrices"]
    code, stderr, _ = audit(models["a"], models["base"], "--no-cache")
    assert "cache" not in stderr


def test_a_tall_base_is_stored_as_its_smaller_right_vectors(models):
    cache_dir = Path(os.environ["FTAUDIT_CACHE"])
    _, _, cold = audit(models["a"], models["base"])
    held = []
    for path in entries(cache_dir):
        tensors = load_file(path)
        assert set(tensors) in ({"U", "S"}, {"V", "S"})
        held.append(("V" if "V" in tensors else "U", tuple(tensors.get("V", tensors.get("U")).shape)))
    # Per layer: 4 attention matrices (32 × 32) and down (32 × 48) hold U (32 × 32); gate and up
    # (48 × 32, tall) hold V (32 × 32) instead of U (48 × 32).
    assert sorted(held) == [("U", (32, 32))] * 10 + [("V", (32, 32))] * 4
    _, _, warm = audit(models["a"], models["base"])
    assert warm["matrices"] == cold["matrices"]


def test_corrupt_entries_are_detected_and_recomputed(models):
    cache_dir = Path(os.environ["FTAUDIT_CACHE"])
    _, _, cold = audit(models["a"], models["base"])
    victims = entries(cache_dir)[:3]
    blob = bytearray(victims[0].read_bytes())
    blob[-5] ^= 0xFF  # a flipped bit in the payload
    victims[0].write_bytes(bytes(blob))
    victims[1].write_bytes(victims[1].read_bytes()[:100])  # truncated
    victims[2].write_bytes(b"garbage")
    code, stderr, warm = audit(models["a"], models["base"])
    assert stderr.count("is corrupt; recomputing it") == 3 and "11 hits, 3 misses" in stderr
    assert warm["matrices"] == cold["matrices"]
    assert "0 misses" in audit(models["a"], models["base"])[1]


def test_unwritable_cache_warns_once_and_the_audit_goes_on(models, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("FTAUDIT_CACHE", str(blocker / "spectra"))
    code, stderr, report = audit(models["a"], models["base"])
    assert code == 1 and stderr.count("is not writable") == 1 and report["summary"]["matrices_analysed"] == 14


def on_dev_full(mkstemp: Callable[..., tuple[int, str]]) -> Callable[..., tuple[int, str]]:
    """`mkstemp` whose file descriptor writes to /dev/full: the kernel fails every write with ENOSPC."""

    def full(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, path = mkstemp(*args, **kwargs)
        device = os.open("/dev/full", os.O_WRONLY)
        os.dup2(device, fd)
        os.close(device)
        return fd, path

    return full


def assert_audited_without_the_cache(got: tuple[int, str, dict], uncached: tuple[int, str, dict], cache: Path) -> None:
    """The audit's exit code and report are the uncached ones, with one warning naming the full disk."""
    (code, stderr, report), (expected_code, _, expected) = got, uncached
    assert code == expected_code and {**report, "created_at": 0} == {**expected, "created_at": 0}
    assert stderr.splitlines() == [
        f"ftaudit: WARNING: cache {cache} is not writable (No space left on device); going on without it"
    ]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_warns_once_leaves_no_partial_file_and_the_audit_goes_on(models, monkeypatch):
    cache_dir = Path(os.environ["FTAUDIT_CACHE"])
    uncached = audit(models["a"], models["base"], "--no-cache", debug=False)
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", on_dev_full(tempfile.mkstemp))
        full = audit(models["a"], models["base"], debug=False)
    assert_audited_without_the_cache(full, uncached, cache_dir)
    assert not [p for p in cache_dir.rglob("*") if p.is_file()]
    code, stderr, report = audit(models["a"], models["base"])
    assert code == uncached[0] and "0 hits, 14 misses" in stderr and len(entries(cache_dir)) == 14
    assert report["matrices"] == uncached[2]["matrices"]


def test_a_filesystem_that_fills_up_keeps_the_complete_entries_only(models, tmp_path, monkeypatch):
    mount, kept = tmp_path / "tmpfs", tmp_path / "kept"
    mount.mkdir()
    if not tmpfs_in_a_user_namespace(mount):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    uncached = audit(models["a"], models["base"], "--no-cache", debug=False)
    # 32 KiB hold four entries (4.5-6.5 KB, two pages each); the fifth write fails part way with ENOSPC.
    script = ('mount -t tmpfs -o size=32k tmpfs "$FTAUDIT_CACHE" && "$@"; status=$?; '
              'cp -R "$FTAUDIT_CACHE" "$KEPT"; exit $status')
    out = tmp_path / "full.json"
    proc = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script, "sh", sys.executable, "-m", "ftaudit", "check", str(models["a"]),
         "--base", str(models["base"]), "--json", str(out)],
        env={**os.environ, "FTAUDIT_CACHE": str(mount), "KEPT": str(kept)}, capture_output=True, text=True, timeout=300,
    )
    assert_audited_without_the_cache((proc.returncode, proc.stderr, json.loads(out.read_text())), uncached, mount)
    assert not list(kept.rglob(".tmp-*")) and 0 < len(entries(kept)) < 14
    fitted = len(entries(kept))
    monkeypatch.setenv("FTAUDIT_CACHE", str(kept))
    code, stderr, report = audit(models["a"], models["base"])
    assert f"{fitted} hits, {14 - fitted} misses" in stderr and "corrupt" not in stderr
    assert code == uncached[0] and report["matrices"] == uncached[2]["matrices"] and len(entries(kept)) == 14


def _entry_size(tmp_path: Path) -> int:
    with SpectrumCache(tmp_path / "probe") as probe:
        probe.get_or_compute("probe", lambda: base_basis(torch.randn(64, 128, dtype=torch.float64)))
    return entries(tmp_path / "probe")[0].stat().st_size


def _bases(count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 128, generator=g) for _ in range(count)]


def test_size_cap_evicts_the_least_recently_used_entries_of_earlier_audits(tmp_path):
    cap = 3 * _entry_size(tmp_path)
    keys = []
    for w in _bases(5):  # five audits of one base matrix each
        keys.append(tensor_key(w))
        with SpectrumCache(tmp_path / "capped", max_bytes=cap) as cache:
            cache.get_or_compute(keys[-1], lambda w=w: base_basis(w.double()))
    assert {p.stem for p in entries(tmp_path / "capped")} == set(keys[2:])


def test_an_audit_larger_than_the_cap_keeps_what_fits_and_the_next_one_hits_it(tmp_path, caplog):
    cap, bases = 3 * _entry_size(tmp_path), _bases(5)
    for run in range(2):
        with SpectrumCache(tmp_path / "capped", max_bytes=cap) as cache:
            for w in bases:
                cache.get_or_compute(tensor_key(w), lambda w=w: base_basis(w.double()))
        assert {p.stem for p in entries(tmp_path / "capped")} == {tensor_key(w) for w in bases[:3]}
        # Evicting its own entries, each audit would have missed every one of them.
        assert (cache.hits, cache.misses) == ((0, 5) if run == 0 else (3, 2))
    assert [r.message.count("is full") for r in caplog.records] == [1, 1]


def test_the_cap_is_set_on_the_command_line_or_in_the_environment(models, monkeypatch):
    cache_dir = Path(os.environ["FTAUDIT_CACHE"])
    code, _, _ = audit(models["a"], models["base"], "--cache-size", 1e-9)  # about one byte: nothing is kept
    assert code == 1 and entries(cache_dir) == []
    monkeypatch.setenv("FTAUDIT_CACHE_SIZE", "1")
    code, _, _ = audit(models["a"], models["base"])
    assert code == 1 and len(entries(cache_dir)) == 14
    for bad in ("0", "-2", "lots"):
        result = CliRunner().invoke(main, ["check", str(models["a"]), "--base", str(models["base"]), "--cache-size", bad])
        assert result.exit_code == 2 and "--cache-size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_cap_of_more_bytes_than_a_number_holds_keeps_everything(models, monkeypatch, how):
    cache_dir = Path(os.environ["FTAUDIT_CACHE"])
    huge = "1e300"  # finite in GiB, but no float as a number of bytes
    if how == "environment":
        monkeypatch.setenv("FTAUDIT_CACHE_SIZE", huge)
    code, stderr, report = audit(models["b"], models["base"], *(["--cache-size", huge] if how == "option" else []),
                                 debug=False)
    assert (code, stderr) == (0, "")
    assert report["summary"]["matrices_analysed"] == 14 and len(entries(cache_dir)) == 14


def test_keys_follow_the_stored_bytes_not_the_name():
    w = torch.randn(8, 8)
    assert tensor_key(w) == tensor_key(w.clone())
    assert tensor_key(w) != tensor_key(w.to(torch.bfloat16))
    changed = w.clone()
    changed[0, 0] += 1e-3
    assert tensor_key(w) != tensor_key(changed)


def test_concurrent_audits_never_corrupt_the_cache(models):
    cmd = [sys.executable, "-m", "ftaudit", "check", str(models["a"]), "--base", str(models["base"]), "--quiet"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 1 and "corrupt" not in err
    code, stderr, _ = audit(models["a"], models["base"])
    assert "14 hits, 0 misses" in stderr and "corrupt" not in stderr
    assert not list(Path(os.environ["FTAUDIT_CACHE"]).glob("*/.tmp-*"))


def test_base_tensors_are_hashed_by_the_reader_ahead_of_their_analysis(models, monkeypatch):
    threads: list[str] = []

    def recorded(w):
        threads.append(threading.current_thread().name)
        return tensor_key(w)

    monkeypatch.setattr(audit_module, "tensor_key", recorded)
    code, stderr, _ = audit(models["a"], models["base"])
    assert code == 1 and "0 hits, 14 misses" in stderr
    assert len(threads) == 14 and all(name.startswith("ftaudit-read") for name in threads)


def test_entries_are_written_in_the_background_and_are_on_disk_when_the_audit_returns(models, monkeypatch):
    threads: list[str] = []
    write = SpectrumCache._write

    def recorded(self, key, basis):
        threads.append(threading.current_thread().name)
        write(self, key, basis)

    monkeypatch.setattr(SpectrumCache, "_write", recorded)
    code, stderr, _ = audit(models["a"], models["base"])
    assert code == 1 and "0 hits, 14 misses" in stderr
    assert threads == ["ftaudit-cache"] * 14 and len(entries(Path(os.environ["FTAUDIT_CACHE"]))) == 14


def test_put_waits_while_entries_are_queued_and_get_answers_them_before_they_are_written(tmp_path, monkeypatch):
    release = threading.Event()
    write = SpectrumCache._write

    def held(self, key, basis):
        release.wait(timeout=60)
        write(self, key, basis)

    monkeypatch.setattr(SpectrumCache, "_write", held)
    bases = {f"k{i}": base_basis(w.double()) for i, w in enumerate(_bases(PENDING + 2))}
    cache, put = SpectrumCache(tmp_path), []

    def put_all() -> None:
        for key, basis in bases.items():
            cache.put(key, basis)
            put.append(key)

    putter = threading.Thread(target=put_all)
    putter.start()
    putter.join(timeout=1.0)
    # One entry being written and PENDING queued: the next put waits, so memory stays bounded.
    assert putter.is_alive() and put == list(bases)[: PENDING + 1] and entries(tmp_path) == []
    assert all(cache.get(key) is bases[key] for key in put) and (cache.hits, cache.misses) == (PENDING + 1, 0)
    release.set()
    putter.join(timeout=60)
    cache.flush()
    assert {p.stem for p in entries(tmp_path)} == set(bases)
    assert all(torch.equal(SpectrumCache(tmp_path).get(key).vectors, basis.vectors) for key, basis in bases.items())


def test_the_writer_lets_go_of_a_basis_once_it_is_written(tmp_path):
    basis = base_basis(_bases(1)[0].double())
    vectors = weakref.ref(basis.vectors)
    with SpectrumCache(tmp_path) as cache:
        cache.put("k0", basis)
    del basis
    # Held until the next put, it would sit beside the next base's decomposition, the peak of memory.
    assert vectors() is None and len(entries(tmp_path)) == 1


def test_the_writer_thread_ends_once_nothing_is_pending_and_a_later_put_starts_another(tmp_path):
    def writers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "ftaudit-cache"]

    for i, w in enumerate(_bases(3)):  # three audits in one long-lived process
        with SpectrumCache(tmp_path / str(i)) as cache:
            cache.put("k0", base_basis(w.double()))
        for thread in writers():
            thread.join(timeout=10)
        assert writers() == [] and len(entries(tmp_path / str(i))) == 1


def test_what_the_writer_fails_with_is_raised_by_flush(tmp_path, monkeypatch):
    def broken(basis):
        raise RuntimeError("cannot serialise")

    monkeypatch.setattr(cache_module, "_payload", broken)
    cache = SpectrumCache(tmp_path)
    cache.put("k0", base_basis(_bases(1)[0].double()))
    with pytest.raises(RuntimeError, match="cannot serialise"):
        cache.flush()
    assert entries(tmp_path) == [] and cache.get("k0") is None


@pytest.mark.parametrize("shape", [(1536, 384), (384, 1536), (384, 384)])
def test_a_cached_basis_gives_bitwise_the_products_of_a_fresh_one(tmp_path, shape):
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(*shape, generator=g) / 20).to(torch.bfloat16)
    fresh = base_basis(w)
    with SpectrumCache(tmp_path) as cache:
        cache.put(tensor_key(w), fresh)
    cached = SpectrumCache(tmp_path).get(tensor_key(w))
    assert cached is not None and cached.right == fresh.right
    x = torch.randn(shape[0], 10, dtype=torch.float64, generator=g)
    y = torch.randn(min(shape), 10, dtype=torch.float64, generator=g)
    assert torch.equal(cached.transposed_times(w, x), fresh.transposed_times(w, x))
    assert torch.equal(cached.times(w, y), fresh.times(w, y))
    assert torch.equal(cached.top(w, 10), fresh.top(w, 10))


def test_eviction_removes_only_the_caches_own_entries(tmp_path):
    """FTAUDIT_CACHE set to a folder that also holds models: the cap never costs them a file."""
    cap, (first, second) = _entry_size(tmp_path), _bases(2)
    folder = tmp_path / "models"
    mine = [write_model(folder / "llama", llama_like(layers=1)) / "model.safetensors",
            write_model(folder / "ab", llama_like(layers=1, seed=1)) / "model.safetensors"]
    for w in (first, second):  # two audits: the second evicts the first's entry
        with SpectrumCache(folder, max_bytes=cap) as cache:
            cache.get_or_compute(tensor_key(w), lambda w=w: base_basis(w.double()))
    assert all(path.exists() for path in mine)
    assert [p.stem for p in folder.glob("*/*.safetensors") if p not in mine] == [tensor_key(second)]
