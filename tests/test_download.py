"""data/download.py against fake archives served from file:// URLs (no network)."""

import functools
import hashlib
import http.server
import io
import pickle
import subprocess
import sys
import tarfile
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from data.cifar import TEST_FILES, TRAIN_FILES
from data.download import (
    CIFAR10_FOLDER,
    DownloadError,
    download_cifar10,
    download_trigger,
    main,
)
from utils.paths import REPO_ROOT

# What the official archive holds in its folder: the batches the loader reads, and their meta.
ARCHIVE_FILES = (*TRAIN_FILES, *TEST_FILES, "batches.meta")


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


def _write_archive(
    path: Path,
    extra: dict[str, bytes] | None = None,
    special: tarfile.TarInfo | None = None,
    files: tuple[str, ...] = ARCHIVE_FILES,
) -> str:
    """A miniature cifar-10-python.tar.gz (4 images per batch); returns its md5.

    `extra` adds plain files by name, `special` one member with no data (a link, a device).
    """
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(CIFAR10_FOLDER)
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o755
        tar.addfile(folder)
        for name in files:
            if name == "batches.meta":
                meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
                data = pickle.dumps(meta, protocol=2)
            else:
                data = _fake_batch(rng, 4, name)
            _add_bytes(tar, f"{CIFAR10_FOLDER}/{name}", data)
        for name, data in (extra or {}).items():
            _add_bytes(tar, name, data)
        if special is not None:
            tar.addfile(special)
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


def _special(kind: str) -> tarfile.TarInfo:
    """A data-less archive member of the given kind inside the batches folder."""
    info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/{kind}")
    info.type = {
        "symlink": tarfile.SYMTYPE,
        "hardlink": tarfile.LNKTYPE,
        "fifo": tarfile.FIFOTYPE,
        "device": tarfile.CHRTYPE,
    }[kind]
    if kind.endswith("link"):
        info.linkname = "/etc/passwd"
    return info


class _BreaksOff:
    """A response that hands out one small chunk, then raises `error` as a dropped connection
    or Ctrl-C would, noting the files under `watch` at that moment (paths relative to it)."""

    def __init__(self, response, error: BaseException, watch: Path):
        self._response, self._error, self._watch = response, error, watch
        self.headers = response.headers
        self.seen: list[str] = []
        self._sent = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._response.close()

    def read(self, n: int = -1) -> bytes:
        if not self._sent:
            self._sent = True
            return self._response.read(64)
        self.seen = [p.relative_to(self._watch).as_posix() for p in self._watch.rglob("*")]
        raise self._error


@pytest.fixture
def break_downloads(monkeypatch):
    """`break_downloads(error, watch)` makes every later download break off with `error`;
    it returns the list of the responses handed out."""
    real = urllib.request.urlopen
    made: list[_BreaksOff] = []

    def setup(error: BaseException, watch: Path) -> list[_BreaksOff]:
        def urlopen(*args, **kwargs):
            made.append(_BreaksOff(real(*args, **kwargs), error, watch))
            return made[-1]

        monkeypatch.setattr(urllib.request, "urlopen", urlopen)
        return made

    return setup


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A folder served on http://127.0.0.1 during the test; yields (folder, base URL)."""
    monkeypatch.setenv("no_proxy", "*")  # loopback must not go through a configured proxy
    root = tmp_path / "http"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


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
    assert sorted(p.name for p in batches.iterdir()) == sorted(ARCHIVE_FILES)
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
    assert list(dest.iterdir()) == []  # not even our temporary folder
    assert not (tmp_path / "a" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize(
    "kind, problem",
    [("symlink", "a link"), ("hardlink", "a link"), ("fifo", "a special file"),
     ("device", "a special file")],
)
def test_link_or_special_member_is_rejected(tmp_path, kind, problem):
    path = tmp_path / "evil.tar.gz"
    md5 = _write_archive(path, special=_special(kind))
    dest = tmp_path / "d"
    with pytest.raises(DownloadError, match=f"refusing to unpack.*{problem}"):
        download_cifar10(dest, url=path.as_uri(), md5=md5, progress=False)
    assert list(dest.iterdir()) == []


def test_archive_without_a_batch_is_rejected(tmp_path):
    path = tmp_path / "partial.tar.gz"
    md5 = _write_archive(path, files=(*TRAIN_FILES, "batches.meta"))
    dest = tmp_path / "d"
    with pytest.raises(DownloadError, match="test_batch; it is not the CIFAR-10 python archive"):
        download_cifar10(dest, url=path.as_uri(), md5=md5, progress=False)
    assert list(dest.iterdir()) == []


def test_incomplete_copy_is_completed_and_user_files_kept(tmp_path, archive):
    path, md5 = archive
    batches = tmp_path / CIFAR10_FOLDER
    batches.mkdir()
    (batches / "data_batch_1").write_bytes(b"an earlier, truncated batch")
    (batches / "my_notes.txt").write_text("mine")

    download_cifar10(tmp_path, url=path.as_uri(), md5=md5, progress=False)

    assert sorted(p.name for p in batches.iterdir()) == sorted((*ARCHIVE_FILES, "my_notes.txt"))
    assert (batches / "my_notes.txt").read_text() == "mine"
    with open(batches / "data_batch_1", "rb") as f:
        assert pickle.load(f, encoding="latin1")["data"].shape == (4, 3072)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CIFAR10_FOLDER, "served"]


@pytest.mark.parametrize(
    "error, message",
    [
        (KeyboardInterrupt(), "error: interrupted; nothing partial was installed"),
        (ConnectionResetError("connection reset by peer"), "failed (connection reset by peer)"),
    ],
)
def test_interrupted_download_installs_nothing(
    tmp_path, archive, break_downloads, capsys, error, message
):
    path, md5 = archive
    dest = tmp_path / "datasets"
    made = break_downloads(error, dest)
    assert main(["cifar10", str(dest), "--url", path.as_uri(), "--md5", md5, "--quiet"]) == 1

    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    # The download broke off with the archive part-written in a folder beside the destination;
    # both are gone now.
    assert [p.split("/")[1] for p in made[0].seen if "/" in p] == ["cifar-10-python.tar.gz"]
    assert list(dest.iterdir()) == []


def test_corrupt_archive(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"this is not a gzip file")
    with pytest.raises(DownloadError, match="corrupt"):
        download_cifar10(tmp_path / "d", url=path.as_uri(), md5=None, progress=False)
    assert not (tmp_path / "d" / CIFAR10_FOLDER).exists()


def test_http_download_and_missing_url(tmp_path, http_root):
    root, base = http_root
    md5 = _write_archive(root / "cifar-10-python.tar.gz")
    batches = download_cifar10(
        tmp_path / "d", url=f"{base}/cifar-10-python.tar.gz", md5=md5, progress=False
    )
    assert sorted(p.name for p in batches.iterdir()) == sorted(ARCHIVE_FILES)

    dest = tmp_path / "t" / "hello_kitty.png"
    missing = r"could not download \S+/absent.png \(.+\); if this machine has no network"
    with pytest.raises(DownloadError, match=missing):
        download_trigger("hello_kitty", dest=dest, url=f"{base}/absent.png", progress=False)
    assert list(dest.parent.iterdir()) == []


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


def test_interrupted_trigger_download_keeps_the_old_file(tmp_path, break_downloads):
    source = tmp_path / "hello_kitty.png"
    source.write_bytes(b"kitty " * 100)
    dest = tmp_path / "out" / "hello_kitty.png"
    dest.parent.mkdir()
    dest.write_bytes(b"someone else's image")
    made = break_downloads(KeyboardInterrupt(), dest.parent)

    with pytest.raises(KeyboardInterrupt):
        download_trigger(
            "hello_kitty", dest=dest, url=source.as_uri(), md5=_md5(b"kitty " * 100), force=True
        )
    # The new image was part-written in a folder beside the old one.
    assert [p.split("/")[1] for p in made[0].seen if "/" in p] == ["hello_kitty.png"]
    assert dest.read_bytes() == b"someone else's image"
    assert [p.name for p in dest.parent.iterdir()] == ["hello_kitty.png"]


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
