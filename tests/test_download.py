"""data/download.py against fake archives served from file:// URLs (no network)."""

import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data.download import (
    CIFAR10_FILES,
    CIFAR10_FOLDER,
    DownloadError,
    download_cifar10,
    download_trigger,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _fake_batch(rng: np.random.Generator, n: int, label: str) -> bytes:
    batch = {
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "labels": rng.integers(0, 10, size=n).tolist(),
        "batch_label": label,
        "filenames": [f"img_{i}.png" for i in range(n)],
    }
    return pickle.dumps(batch, protocol=2)


def _write_archive(path: Path, extra: dict[str, bytes] | None = None) -> str:
    """A miniature cifar-10-python.tar.gz (4 images per batch); returns its md5."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(CIFAR10_FOLDER)
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o755
        tar.addfile(folder)
        for name in CIFAR10_FILES:
            if name == "batches.meta":
                meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
                data = pickle.dumps(meta, protocol=2)
            else:
                data = _fake_batch(rng, 4, name)
            _add_bytes(tar, f"{CIFAR10_FOLDER}/{name}", data)
        for name, data in (extra or {}).items():
            _add_bytes(tar, name, data)
    return _md5(path.read_bytes())


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data.download", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _assert_one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "served" / "cifar-10-python.tar.gz"
    path.parent.mkdir()
    return path, _write_archive(path)


def test_download_and_unpack(tmp_path, archive):
    path, md5 = archive
    dest = tmp_path / "datasets"
    batches = download_cifar10(dest, url=path.as_uri(), md5=md5, progress=True)

    assert batches == dest / CIFAR10_FOLDER
    assert sorted(p.name for p in batches.iterdir()) == sorted(CIFAR10_FILES)
    with open(batches / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    assert batch["data"].shape == (4, 3072) and batch["data"].dtype == np.uint8
    # Only the batches folder remains: the temporary archive and unpack folder are gone.
    assert [p.name for p in dest.iterdir()] == [CIFAR10_FOLDER]
    assert path.exists(), "the source archive is not ours to delete"


def test_existing_batches_are_not_downloaded_again(tmp_path, archive):
    path, md5 = archive
    download_cifar10(tmp_path, url=path.as_uri(), md5=md5, progress=False)
    # A URL that cannot be fetched proves nothing is downloaded the second time.
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    assert download_cifar10(tmp_path, url=missing, progress=False) == tmp_path / CIFAR10_FOLDER


def test_md5_mismatch_installs_nothing(tmp_path, archive):
    path, _ = archive
    dest = tmp_path / "datasets"
    with pytest.raises(DownloadError, match="md5 mismatch"):
        download_cifar10(dest, url=path.as_uri(), md5="0" * 32, progress=False)
    assert not (dest / CIFAR10_FOLDER).exists()
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("bad_name", ["../escaped", f"{CIFAR10_FOLDER}/../../escaped", "/tmp/abs"])
def test_unsafe_member_is_rejected(tmp_path, bad_name):
    path = tmp_path / "evil.tar.gz"
    md5 = _write_archive(path, extra={bad_name: b"gotcha"})
    dest = tmp_path / "a" / "b"
    with pytest.raises(DownloadError, match="refusing to unpack"):
        download_cifar10(dest, url=path.as_uri(), md5=md5, progress=False)
    assert not (dest / CIFAR10_FOLDER).exists()
    assert not (tmp_path / "a" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()


def test_corrupt_archive(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"this is not a gzip file")
    with pytest.raises(DownloadError, match="corrupt"):
        download_cifar10(tmp_path / "d", url=path.as_uri(), md5=None, progress=False)
    assert not (tmp_path / "d" / CIFAR10_FOLDER).exists()


def test_cli_missing_file_url(tmp_path):
    url = (tmp_path / "absent.tar.gz").as_uri()
    line = _assert_one_error_line(_run_cli("cifar10", str(tmp_path / "d"), "--url", url))
    assert url in line
    assert not (tmp_path / "d" / CIFAR10_FOLDER).exists()


def test_cli_unknown_dataset(tmp_path):
    line = _assert_one_error_line(_run_cli("mnist", str(tmp_path)))
    assert "mnist" in line


def test_cli_cifar10_success(tmp_path, archive):
    path, md5 = archive
    result = _run_cli("cifar10", str(tmp_path / "d"), "--url", path.as_uri(), "--md5", md5)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d" / CIFAR10_FOLDER / "test_batch").is_file()


def test_trigger_download_and_overwrite_rules(tmp_path):
    image = b"\x89PNG\r\n\x1a\n fake trigger bytes"
    source = tmp_path / "hello_kitty.png"
    source.write_bytes(image)
    md5 = _md5(image)
    dest = tmp_path / "out" / "trigger.png"

    assert download_trigger("hello_kitty", dest=dest, url=source.as_uri(), md5=md5) == dest
    assert dest.read_bytes() == image
    assert sorted(p.name for p in dest.parent.iterdir()) == ["trigger.png"]

    # Same content already there: kept, even though the URL is now unreachable.
    download_trigger("hello_kitty", dest=dest, url=(tmp_path / "gone").as_uri(), md5=md5)

    dest.write_bytes(b"someone else's image")
    with pytest.raises(DownloadError, match="--force"):
        download_trigger("hello_kitty", dest=dest, url=source.as_uri(), md5=md5)
    assert dest.read_bytes() == b"someone else's image"

    download_trigger("hello_kitty", dest=dest, url=source.as_uri(), md5=md5, force=True)
    assert dest.read_bytes() == image


def test_trigger_md5_mismatch_leaves_no_file(tmp_path):
    source = tmp_path / "hello_kitty.png"
    source.write_bytes(b"tampered")
    dest = tmp_path / "out" / "hello_kitty.png"
    with pytest.raises(DownloadError, match="md5 mismatch"):
        download_trigger("hello_kitty", dest=dest, url=source.as_uri(), md5="0" * 32)
    assert list(dest.parent.iterdir()) == []


def test_cli_trigger(tmp_path):
    source = tmp_path / "hello_kitty.png"
    source.write_bytes(b"kitty")
    dest = tmp_path / "hello_kitty.png.copy"
    common = ("trigger", "hello_kitty", "--dest", str(dest), "--url", source.as_uri())
    ok = _run_cli(*common, "--md5", _md5(b"kitty"))
    assert ok.returncode == 0, ok.stderr
    assert dest.read_bytes() == b"kitty"

    dest.write_bytes(b"different")
    _assert_one_error_line(_run_cli(*common, "--md5", _md5(b"kitty")))
    assert dest.read_bytes() == b"different"
    _assert_one_error_line(_run_cli("trigger", "grumpy_cat", "--dest", str(dest)))
