"""Fetch the files DBD needs but does not ship: the CIFAR-10 batches and the Blended trigger.

usage:
    python -m data.download cifar10 DIR [--url URL] [--md5 MD5] [--quiet]
    python -m data.download trigger hello_kitty [--dest PATH] [--url URL] [--md5 MD5] [--force]

Every download goes to a temporary folder beside its destination and is checked against a
known md5 before anything is unpacked or moved into place, so an interrupted or tampered
download never leaves a half-written dataset or trigger behind. `--url` accepts file:// URLs,
which is how to install a copy fetched by hand on another machine. The md5 and the unpacking
are torchvision's (`calculate_md5`, `extract_archive`); the archive's members are checked here
first, since torchvision unpacks whatever an archive holds.

The functions raise `DownloadError`; only `main()` turns it into a one-line message and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from data.cifar import TEST_FILES, TRAIN_FILES
from utils.errors import one_line
from utils.paths import REPO_ROOT

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
# The batches the loader reads (data.cifar); a folder holding them all is complete.
_BATCHES = (*TRAIN_FILES, *TEST_FILES)

# name -> (url, md5, default destination relative to REPO_ROOT)
TRIGGERS = {
    "hello_kitty": (
        "https://raw.githubusercontent.com/SCLBD/DBD/main/data/trigger/hello_kitty.png",
        "e1755dedc392c14ba7ab3ab518f40f35",
        "data/trigger/hello_kitty.png",
    ),
}

_CHUNK = 1 << 20
_TIMEOUT_S = 60


class DownloadError(Exception):
    """A download, checksum or unpacking step failed; the message says what to do about it."""



def _md5(path) -> str:
    """torchvision's md5 of a file, imported only when a file is checked: the import brings
    torch, which takes seconds, and ``--help`` or a bad argument should not wait for it."""
    from torchvision.datasets.utils import calculate_md5

    return calculate_md5(path)

def _say(message: str) -> None:
    print(message, flush=True)


def _fetch(url: str, dest: Path, progress: bool, manual_hint: str) -> None:
    """Stream `url` into the new file `dest`.

    Not torchvision's download_url, which (0.29) fails on file:// URLs with an AttributeError,
    has no timeout, always draws a progress bar and retries a failed https:// URL over http://.
    """
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            # A progress bar only helps a person watching a terminal; in logs it is noise.
            with tqdm(
                total=int(length) if length and length.isdigit() else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=url.rstrip("/").rsplit("/", 1)[-1] or "download",
                disable=not (progress and sys.stderr.isatty()),
                leave=False,
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.URLError as e:  # also HTTPError, and file:// paths that do not exist
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"could not download {url} ({reason}); if this machine has no network, {manual_hint}"
        ) from e
    except ValueError as e:  # malformed or unsupported URL
        raise DownloadError(
            f"cannot download {url!r}: {e}; give a full http(s):// or file:// URL"
        ) from e
    except (OSError, http.client.HTTPException) as e:  # timeouts, dropped connections, full disk
        raise DownloadError(f"download of {url} failed ({e}); retry, or {manual_hint}") from e


def _check_md5(path: Path, expected: str | None, url: str) -> None:
    if expected is None:
        return
    actual = _md5(path)
    if actual != expected.lower():
        raise DownloadError(
            f"md5 mismatch for {url}: got {actual}, expected {expected}; the file is corrupt or "
            "not the one expected, so nothing was installed (retry, or check --url/--md5)"
        )


@contextlib.contextmanager
def _verified_download(
    url: str, md5: str | None, dest: Path, progress: bool, manual_hint: str
) -> Iterator[Path]:
    """Download `url` into a new temporary folder beside `dest` and yield the file, named like
    `dest`, once its md5 is checked. The folder goes away afterwards, whatever happened; being
    on the destination's file system, the caller's os.replace() into place is atomic."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DownloadError(f"cannot write in {dest.parent} ({e}); choose a writable folder") from e
    try:
        path = Path(work) / dest.name
        _say(f"downloading {url}")
        _fetch(url, path, progress, manual_hint)
        _check_md5(path, md5, url)
        yield path
    finally:
        shutil.rmtree(work, ignore_errors=True)  # our own temporary folder, nothing of the user's


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why `member` must not be unpacked, or None when it is a plain file or folder inside."""
    name = member.name
    path = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in path.parts:
        return "a '..' component"
    if member.issym() or member.islnk():
        return "a link"  # the official archive has none; a link could point outside DIR
    if not (member.isfile() or member.isdir()):
        return "a special file"
    return None


def _safe_extract(archive: Path, into: Path, url: str) -> None:
    """Unpack the .tar.gz `archive` into `into` after refusing any unsafe member."""
    try:
        # torchvision's extract_archive unpacks every member as it is, so check them first.
        # Listing the members reads the whole archive, so a truncated one fails before unpacking.
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                problem = _member_problem(member)
                if problem is not None:
                    raise DownloadError(
                        f"refusing to unpack {url}: member {member.name!r} has {problem}; "
                        "the archive is not a genuine CIFAR-10 release"
                    )
        from torchvision.datasets.utils import extract_archive  # torch: seconds to import

        extract_archive(archive, into)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DownloadError(
            f"could not unpack {url} ({e}); the archive is corrupt or truncated, download it again"
        ) from e


def cifar10_complete(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return all((folder / name).is_file() for name in _BATCHES)


def download_cifar10(
    dest_dir: str | os.PathLike,
    url: str = CIFAR10_URL,
    md5: str | None = CIFAR10_MD5,
    progress: bool = True,
) -> Path:
    """Make sure `dest_dir/cifar-10-batches-py/` holds the CIFAR-10 python batches.

    Downloads and unpacks the archive only when some batch is missing. `md5=None` skips the
    checksum (e.g. for a rebuilt copy whose sums differ from the official release).
    Returns the batches folder. Raises DownloadError on any failure, leaving no partial folder.
    """
    dest_dir = Path(dest_dir).expanduser()
    batches = dest_dir / CIFAR10_FOLDER
    if cifar10_complete(batches):
        _say(f"CIFAR-10 is already at {batches}")
        return batches

    manual_hint = (
        f"download {CIFAR10_URL} by hand and unpack it in {dest_dir} "
        f"(tar -xzf cifar-10-python.tar.gz -C {dest_dir}) so that {batches} exists"
    )
    # The archive's name tells extract_archive its format.
    archive_dest = dest_dir / "cifar-10-python.tar.gz"
    with _verified_download(url, md5, archive_dest, progress, manual_hint) as archive:
        # Unpack beside the destination and move into place only when complete, so a failure
        # never leaves a half-filled batches folder that a later run would trust.
        _safe_extract(archive, archive.parent / "unpacked", url)
        unpacked = archive.parent / "unpacked" / CIFAR10_FOLDER
        missing = [n for n in _BATCHES if not (unpacked / n).is_file()]
        if missing:
            raise DownloadError(
                f"{url} does not contain {CIFAR10_FOLDER}/{', '.join(missing)}; "
                "it is not the CIFAR-10 python archive"
            )
        try:
            if batches.is_dir():  # an earlier, incomplete copy: refresh the archive's files only
                for path in unpacked.iterdir():
                    os.replace(path, batches / path.name)
            else:
                os.replace(unpacked, batches)
        except OSError as e:
            raise DownloadError(f"could not install CIFAR-10 into {batches} ({e})") from e

    _say(f"CIFAR-10 is ready at {batches}")
    return batches


def _trigger_entry(name: str) -> tuple[str, str, str]:
    if name not in TRIGGERS:
        raise DownloadError(f"unknown trigger {name!r}; known triggers: {', '.join(TRIGGERS)}")
    return TRIGGERS[name]


def default_trigger_path(name: str) -> Path:
    return REPO_ROOT / _trigger_entry(name)[2]


def download_trigger(
    name: str,
    dest: str | os.PathLike | None = None,
    url: str | None = None,
    md5: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Fetch trigger image `name` to `dest` (default: its place under data/trigger/).

    An existing file with the right md5 is kept as is; a different existing file is replaced
    only with `force=True`. Returns the path of the trigger. Raises DownloadError on failure.
    """
    default_url, default_md5, default_dest = _trigger_entry(name)
    dest = Path(dest).expanduser() if dest is not None else REPO_ROOT / default_dest
    url = url or default_url
    md5 = md5 or default_md5

    if dest.exists():
        if not dest.is_file():
            raise DownloadError(f"{dest} exists and is not a file; remove it or pass --dest")
        have = _md5(dest)
        if have == md5.lower():
            _say(f"trigger {name} is already at {dest}")
            return dest
        if not force:
            raise DownloadError(
                f"{dest} exists with md5 {have}, not the expected {md5}; "
                "pass --force to replace it, or --dest to write elsewhere"
            )

    manual_hint = f"download {default_url} by hand and save it as {dest}"
    with _verified_download(url, md5, dest, progress, manual_hint) as tmp:
        try:
            os.replace(tmp, dest)  # atomic: `dest` is the old file or the new one, never half
        except OSError as e:
            raise DownloadError(f"could not write {dest} ({e})") from e
    _say(f"trigger {name} saved to {dest}")
    return dest


class _Parser(argparse.ArgumentParser):
    """Reports usage mistakes as one `error:` line and exit 1, like every other failure."""

    def error(self, message: str):
        raise DownloadError(f"{message} (see python -m data.download --help)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m data.download",
        description="Download CIFAR-10 or a trigger image, verify its md5 and install it.",
        epilog=(
            "examples:\n"
            "  python -m data.download cifar10 datasets\n"
            "  python -m data.download trigger hello_kitty\n"
            "  python -m data.download cifar10 datasets --url file:///mnt/usb/cifar-10-python.tar.gz"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", metavar="{cifar10,trigger}", help="what to download")
    parser.add_argument(
        "target",
        metavar="DIR|NAME",
        help="cifar10: folder to unpack into; trigger: trigger name (hello_kitty)",
    )
    parser.add_argument("--url", help="download from here instead (http(s):// or file://)")
    parser.add_argument("--md5", help="expected md5 of the download instead of the official one")
    parser.add_argument("--dest", help="trigger only: where to write it")
    parser.add_argument(
        "--force", action="store_true", help="trigger only: replace a differing existing file"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _build_parser().parse_args(argv)
        progress = not args.quiet
        if args.what == "cifar10":
            if args.dest is not None or args.force:
                raise DownloadError("--dest and --force apply to triggers only; cifar10 takes DIR")
            download_cifar10(
                args.target,
                url=args.url or CIFAR10_URL,
                md5=args.md5 or CIFAR10_MD5,
                progress=progress,
            )
        elif args.what == "trigger":
            download_trigger(
                args.target,
                dest=args.dest,
                url=args.url,
                md5=args.md5,
                force=args.force,
                progress=progress,
            )
        else:
            raise DownloadError(
                f"unknown dataset {args.what!r}; choose 'cifar10' (python -m data.download "
                "cifar10 DIR) or 'trigger' (python -m data.download trigger hello_kitty)"
            )
    except DownloadError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(
            "error: interrupted; nothing partial was installed, run the command again",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
