"""The artifact folder: staged next to its destination and renamed into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgecompress.contract import DATA_FILE, MODEL_FILE, REPORT_FILE
from edgecompress.errors import EdgeCompressError
from edgecompress.runtimes.artifact_files import sha256_file


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing OUT (unless force) or an unwritable parent before any work starts."""
    if out.exists() and not force:
        raise EdgeCompressError(f"output '{out}' already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise EdgeCompressError(f"output '{out}' exists and is not a folder")
    parent = _existing_parent(out)
    try:  # a real probe: permission bits say nothing about read-only mounts or pseudo-filesystems
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as exc:
        raise EdgeCompressError(f"output '{out}' is not writable ({exc.strerror} in '{parent}')") from None


def _existing_parent(out: Path) -> Path:
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


@contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on any failure it vanishes."""
    out = out.absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
    except OSError as exc:
        raise EdgeCompressError(f"output '{out}' is not writable: {exc.strerror}") from None
    try:
        yield staging
        if out.exists():
            if not force:
                raise EdgeCompressError(f"output '{out}' appeared during the build; not overwriting it")
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, retired / "old")
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:  # KeyboardInterrupt included: an interrupted build leaves nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def work_folder(beside: Path, name: str) -> Iterator[Path]:
    """A hidden folder next to `beside` (same filesystem) that is removed however the build ends."""
    folder = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=beside.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def copy_sidecar_files(source: Path, destination: Path) -> None:
    """Everything of an artifact folder but its model files (small: configs, tokenizer, plan)."""
    for entry in source.iterdir():
        if entry.name in (MODEL_FILE, DATA_FILE):
            continue
        if entry.is_dir():
            shutil.copytree(entry, destination / entry.name)
        else:
            shutil.copy2(entry, destination / entry.name)


def manifest(folder: Path, exclude: tuple[str, ...] = (REPORT_FILE,)) -> dict[str, dict]:
    """sha256 and size of every file, so an app can check what it loads."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in exclude:
            rel = path.relative_to(folder).as_posix()
            entries[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return entries
