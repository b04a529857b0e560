"""model_hash: the same value as always, served from a fingerprinted cache without reading weights."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from tailseed.pipeline import models
from tailseed.pipeline.models import EMBEDDED_MODEL, model_hash

WEIGHTS = (".safetensors", ".bin")


def reference_hash(folder: Path) -> str:
    """The uncached algorithm, as it was before the cache: outputs made with it must stay valid."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHTS and p.is_file())
    for p in files:
        digest.update(str(p.relative_to(folder)).encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("TAILSEED_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A fake pipeline folder: small weight files in subfolders, plus a config that is not hashed."""
    folder = tmp_path / "model"
    for rel, size in [
        ("unet/diffusion_pytorch_model.safetensors", 3000),
        ("vae/diffusion_pytorch_model.safetensors", 2000),
        ("text_encoder/pytorch_model.bin", 1500),
    ]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(os.urandom(size))
    (folder / "unet" / "config.json").write_text("{}")
    return folder


def cache_entries(cache_dir: Path) -> dict:
    return json.loads((cache_dir / "model_hashes.json").read_text())["entries"]


def set_cached_hash(cache_dir: Path, folder: Path, value: str) -> None:
    path = cache_dir / "model_hashes.json"
    data = json.loads(path.read_text())
    data["entries"][str(folder.resolve())]["hash"] = value
    path.write_text(json.dumps(data))


def rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    """Replace a file's bytes but give it back its old mtime, so only the size can tell."""
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


FAKE = "0123456789abcdef"


def test_same_hash_as_uncached_and_cached(cache_dir, model_dir):
    expected = reference_hash(model_dir)
    assert model_hash(model_dir) == expected
    entry = cache_entries(cache_dir)[str(model_dir.resolve())]
    assert entry["hash"] == expected
    assert [row[0] for row in entry["files"]] == [
        "text_encoder/pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert model_hash(model_dir) == expected


def test_embedded_model_hash_is_unchanged(cache_dir):
    assert model_hash(EMBEDDED_MODEL) == reference_hash(EMBEDDED_MODEL)


def test_hit_reads_no_weight_file(cache_dir, model_dir, monkeypatch):
    expected = model_hash(model_dir)
    opened = []
    real_open = io.open

    def spying_open(file, *args, **kwargs):
        if str(file).endswith(WEIGHTS):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", spying_open)
    assert model_hash(model_dir) == expected
    assert opened == []
    (model_dir / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"new")
    opened.clear()
    model_hash(model_dir)
    assert len(opened) == 3, "the spy must see a miss read the weights"


def test_hit_is_served_from_the_cache(cache_dir, model_dir):
    """A tampered hash with a matching fingerprint comes back as is: the weights were not hashed."""
    model_hash(model_dir)
    set_cached_hash(cache_dir, model_dir, FAKE)
    assert model_hash(model_dir) == FAKE


def test_new_bytes_and_mtime_rehash(cache_dir, model_dir):
    before = model_hash(model_dir)
    set_cached_hash(cache_dir, model_dir, FAKE)
    weights = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    st = weights.stat()
    weights.write_bytes(os.urandom(st.st_size))  # same size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = model_hash(model_dir)
    assert after == reference_hash(model_dir) != before
    assert cache_entries(cache_dir)[str(model_dir.resolve())]["hash"] == after


def test_new_size_rehashes(cache_dir, model_dir):
    model_hash(model_dir)
    set_cached_hash(cache_dir, model_dir, FAKE)
    weights = model_dir / "text_encoder" / "pytorch_model.bin"
    rewrite_keeping_mtime(weights, weights.read_bytes() + b"x")
    assert model_hash(model_dir) == reference_hash(model_dir)


def test_touched_file_rehashes_to_the_same_value(cache_dir, model_dir):
    expected = model_hash(model_dir)
    set_cached_hash(cache_dir, model_dir, FAKE)
    weights = model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))
    assert model_hash(model_dir) == expected


@pytest.mark.parametrize("change", ["add", "remove", "rename"])
def test_file_set_change_rehashes(cache_dir, model_dir, change):
    model_hash(model_dir)
    set_cached_hash(cache_dir, model_dir, FAKE)
    weights = model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    if change == "add":
        (model_dir / "vae" / "extra.bin").write_bytes(b"more")
    elif change == "remove":
        weights.unlink()
    else:
        weights.rename(weights.with_name("renamed.safetensors"))
    assert model_hash(model_dir) == reference_hash(model_dir)


def test_hub_snapshot_symlinks_are_resolved(cache_dir, tmp_path):
    """A hub cache snapshot links into blobs/; re-pointing a link to a blob of the same size and
    mtime is still a miss."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    for name in ("aaa", "bbb"):
        (blobs / name).write_bytes(os.urandom(1000))
        os.utime(blobs / name, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    snapshot = tmp_path / "hub" / "snapshots" / "rev"
    link = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(Path("../../../blobs/aaa"))
    assert link.read_bytes() == (blobs / "aaa").read_bytes()

    first = model_hash(snapshot)
    assert first == reference_hash(snapshot)
    row = cache_entries(cache_dir)[str(snapshot.resolve())]["files"][0]
    assert row[1:] == [str((blobs / "aaa").resolve()), 1000, 1_700_000_000_000_000_000]

    link.unlink()
    link.symlink_to(Path("../../../blobs/bbb"))
    second = model_hash(snapshot)
    assert second == reference_hash(snapshot) != first


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe garbage", b"[]", b'{"version": 1, "entries": []}', b""],
)
def test_corrupt_cache_is_rebuilt(cache_dir, model_dir, content, capsys):
    cache_dir.mkdir()
    (cache_dir / "model_hashes.json").write_bytes(content)
    expected = reference_hash(model_dir)
    assert model_hash(model_dir) == expected
    assert cache_entries(cache_dir)[str(model_dir.resolve())]["hash"] == expected
    assert capsys.readouterr() == ("", "")


def test_read_only_cache_dir(cache_dir, model_dir, capsys):
    cache_dir.mkdir()
    cache_dir.chmod(0o500)  # root can still write here; the next test covers that case
    try:
        assert model_hash(model_dir) == reference_hash(model_dir)
        assert model_hash(model_dir) == reference_hash(model_dir)
        assert {p.name for p in cache_dir.iterdir()} <= {"model_hashes.json"}  # no temp left
    finally:
        cache_dir.chmod(0o700)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("blocker", ["dir_is_a_file", "cache_is_a_dir"])
def test_unusable_cache_location(cache_dir, model_dir, blocker, capsys, recwarn):
    """Cannot be read or written even by root: the hash is still right, silently."""
    if blocker == "dir_is_a_file":
        cache_dir.write_text("not a folder")
    else:
        (cache_dir / "model_hashes.json").mkdir(parents=True)
    expected = reference_hash(model_dir)
    assert model_hash(model_dir) == expected
    assert model_hash(model_dir) == expected
    if blocker == "cache_is_a_dir":
        assert [p.name for p in cache_dir.iterdir()] == ["model_hashes.json"]
    assert capsys.readouterr() == ("", "")
    assert len(recwarn) == 0


def test_entries_of_deleted_folders_are_dropped(cache_dir, model_dir, tmp_path):
    other = tmp_path / "other"
    (other / "unet").mkdir(parents=True)
    (other / "unet" / "w.bin").write_bytes(b"w")
    model_hash(other)
    model_hash(model_dir)
    assert set(cache_entries(cache_dir)) == {str(other.resolve()), str(model_dir.resolve())}
    (other / "unet" / "w.bin").unlink()
    (other / "unet").rmdir()
    other.rmdir()
    (model_dir / "unet" / "more.bin").write_bytes(b"m")  # a miss rewrites the cache
    model_hash(model_dir)
    assert set(cache_entries(cache_dir)) == {str(model_dir.resolve())}


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("TAILSEED_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models._hash_cache_file() == tmp_path / ".cache" / "tailseed" / "model_hashes.json"
