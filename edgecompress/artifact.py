"""The artifact folder: staged next to its destination and renamed into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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


# A build's hidden folders beside OUT: `.OUT.partial-*` (the artifact being written, and its work
# folders `.OUT.partial-*.<name>-*`) and `.OUT.old-*` (the replaced artifact). Each has an owner file
# beside it, `<folder>.owner`, naming the process; a build killed with SIGKILL cannot remove them, so
# the next build into OUT (or `edgecompress clean OUT`) removes those whose process is gone.
OWNER_SUFFIX = ".owner"


def _hidden_prefixes(out: Path) -> tuple[str, ...]:
    return (f".{out.name}.partial-", f".{out.name}.old-")


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat, counted after the command name
    except (OSError, IndexError):
        return None


def _make_owned_folder(prefix: str, parent: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
    Path(f"{folder}{OWNER_SUFFIX}").write_text(json.dumps(owner))
    return folder


def _remove_owned_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    Path(f"{folder}{OWNER_SUFFIX}").unlink(missing_ok=True)


def _owner_alive(owner_file: Path) -> bool | None:
    """True/False for an owner on this host; None when it cannot be known (no file, another host)."""
    try:
        owner = json.loads(owner_file.read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    start = owner.get("start")
    return start is None or _process_start(pid) in (None, start)


def _leftovers(out: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Beside `out`: hidden build folders whose owner is gone, those of unknown owner (live ones left out),
    and owner files whose folder is gone (a build killed between the two removals)."""
    gone, unknown, orphans = [], [], []
    if not out.parent.is_dir():
        return gone, unknown, orphans
    for entry in sorted(out.parent.iterdir()):
        if not entry.name.startswith(_hidden_prefixes(out)):
            continue
        if entry.name.endswith(OWNER_SUFFIX):
            if not Path(str(entry)[: -len(OWNER_SUFFIX)]).exists() and _owner_alive(entry) is False:
                orphans.append(entry)
            continue
        alive = _owner_alive(Path(f"{entry}{OWNER_SUFFIX}"))
        if alive is False:
            gone.append(entry)
        elif alive is None:
            unknown.append(entry)
    return gone, unknown, orphans


def remove_leftovers(out: Path, include_unknown: bool = False) -> tuple[list[Path], list[Path]]:
    """Remove the folders killed builds into `out` left beside it (and, if asked, those of unknown owner);
    returns (folders removed, folders of unknown owner kept)."""
    gone, unknown, orphans = _leftovers(out.absolute())
    removed, kept = (gone + unknown, []) if include_unknown else (gone, unknown)
    for folder in removed:
        _remove_owned_folder(folder)
    for owner_file in orphans:
        owner_file.unlink(missing_ok=True)
    return removed, kept


@contextmanager
def staged_folder(out: Path, force: bool, say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on any failure it vanishes.

    Leftovers of killed builds into `out` go first (`say` gets one line naming them)."""
    out = out.absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        removed, _ = remove_leftovers(out)
        if removed and say is not None:
            say(f"removed {len(removed)} folder(s) left beside '{out}' by an earlier build that was killed: "
                + ", ".join(folder.name for folder in removed))
        staging = _make_owned_folder(f".{out.name}.partial-", out.parent)
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
            retired = _make_owned_folder(f".{out.name}.old-", out.parent)
            os.replace(out, retired / "old")
            os.replace(staging, out)
            _remove_owned_folder(retired)
        else:
            os.replace(staging, out)
        Path(f"{staging}{OWNER_SUFFIX}").unlink(missing_ok=True)
    except BaseException:  # KeyboardInterrupt included: an interrupted build leaves nothing behind
        _remove_owned_folder(staging)
        raise


@contextmanager
def work_folder(beside: Path, name: str) -> Iterator[Path]:
    """A hidden folder next to `beside` (same filesystem) that is removed however the build ends.

    Named after `beside` (`.OUT.partial-XXXX.fp32-YYYY`), so a killed build's leftovers are found."""
    folder = _make_owned_folder(f"{beside.name}.{name}-", beside.parent)
    try:
        yield folder
    finally:
        _remove_owned_folder(folder)


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
