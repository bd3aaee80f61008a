"""The built wheel (not the editable install) ships every module and data file, under edgecompress.

Builds offline (`pip wheel --no-deps --no-build-isolation --no-index`) from a copy of the build
inputs (the top-level files and the source folders) in a temporary folder: nothing is written into
the repo (no build/, no *.egg-info), and no stale build/ folder can hide a missing file. The
expected contents come from walking the copied tree, never from a list: a module added anywhere
under edgecompress/, passes/, runtimes/, kernels/ or targets/ that the build misses fails this test.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from edgecompress.folder_names import FOLDERS as NAMESPACED

REPO = Path(__file__).resolve().parents[1]
# Repo folder -> its path inside the wheel.
SOURCE_ROOTS = {
    "edgecompress": "edgecompress",
    "passes": "edgecompress/passes",
    "runtimes": "edgecompress/runtimes",
    "kernels": "edgecompress/kernels",
    "targets": "edgecompress/targets",
}
KERNEL_DATA = ("so", "cubin", "ptx", "json")  # non-Python files kernels/ ships as package data
# Inside the copied folders: never build inputs (a stale egg-info would even feed setuptools). Hidden
# entries (lock and stamp files) are build bookkeeping; setuptools' globs skip them too.
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")


def copy_build_inputs(repo: Path, dest: Path) -> None:
    """The top-level files (pyproject.toml, setup.py, README.md, ...) and the source folders only:
    no .venv, .git, out/, build/ or dist/ (and no stale build/lib that could hide a missing file)."""
    dest.mkdir(parents=True)
    for path in repo.iterdir():
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    for folder in SOURCE_ROOTS:
        shutil.copytree(repo / folder, dest / folder, ignore=COPY_IGNORE)


def _walk(folder: Path, pattern: str):
    return sorted(p for p in folder.rglob(pattern) if "__pycache__" not in p.parts)


def expected_entries(src: Path) -> dict[str, str]:
    """Wheel path -> source path, for every .py module, every targets TOML and kernels data file."""
    expected = {}
    for folder, inside in SOURCE_ROOTS.items():
        for path in _walk(src / folder, "*.py"):
            expected[f"{inside}/{path.relative_to(src / folder).as_posix()}"] = str(path)
    for path in _walk(src / "targets", "*.toml"):
        expected[f"edgecompress/targets/{path.relative_to(src / 'targets').as_posix()}"] = str(path)
    for ext in KERNEL_DATA:
        for path in _walk(src / "kernels", f"*.{ext}"):
            expected[f"edgecompress/kernels/{path.relative_to(src / 'kernels').as_posix()}"] = str(path)
    return expected


def wheel_problems(names: list[str], src: Path) -> list[str]:
    """Everything wrong with a wheel's file list, as readable lines (empty: the wheel is right)."""
    problems = []
    present = set(names)
    for entry, source in sorted(expected_entries(src).items()):
        if entry not in present:
            problems.append(f"missing {entry} (from {source})")
    for name in sorted(present):
        top = name.split("/", 1)[0]
        if top in NAMESPACED:
            problems.append(f"top-level {top}/ in the wheel: {name}")
        elif top != "edgecompress" and not top.endswith(".dist-info"):
            problems.append(f"unexpected top-level entry in the wheel: {name}")
    return problems


def _add_probes(src: Path) -> None:
    """Future layout, in the copy only: nested subpackages and kernel binaries must ship too."""
    for package in ("edgecompress/_wheel_probe/deep", "passes/_wheel_probe/deep", "runtimes/_wheel_probe"):
        root, *parts = package.split("/")
        folder = src / root
        for part in parts:  # every level is a package (has an __init__.py)
            folder = folder / part
            folder.mkdir(exist_ok=True)
            (folder / "__init__.py").write_text('"""Probe package (test_wheel)."""\n')
        (folder / "module.py").write_text("VALUE = 1\n")
    (src / "kernels" / "prebuilt").mkdir(exist_ok=True)  # a data folder, not a package
    for ext in KERNEL_DATA:
        (src / "kernels" / f"_wheel_probe.{ext}").write_bytes(b"probe")
        (src / "kernels" / "prebuilt" / f"_wheel_probe.{ext}").write_bytes(b"probe")


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    # --no-build-isolation builds with this environment's setuptools (the dev extra has it);
    # setuptools >= 70.1 has bdist_wheel built in, older ones need the wheel package as well.
    hint = f"{sys.executable} -m pip install 'setuptools>=68' wheel (both are in the dev extra)"
    assert importlib.util.find_spec("setuptools"), f"setuptools is needed to build the wheel: {hint}"
    version = tuple(int(x) for x in re.findall(r"\d+", metadata.version("setuptools"))[:2])
    assert version >= (68, 0), f"setuptools {version} is too old: {hint}"
    if version < (70, 1):
        assert importlib.util.find_spec("wheel"), f"the wheel package is needed: {hint}"
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    copy_build_inputs(REPO, src)
    _add_probes(src)
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "--no-cache-dir", "--disable-pip-version-check", "-q", "-w", str(out), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    wheels = sorted(out.glob("edgecompress-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {[w.name for w in out.iterdir()]}"
    with zipfile.ZipFile(wheels[0]) as archive:
        names = archive.namelist()
        entry_points = next(
            (archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), ""
        )
    return src, names, entry_points


def test_wheel_ships_every_module_under_edgecompress(built_wheel):
    src, names, _ = built_wheel
    expected = expected_entries(src)
    # The walk itself must see the real tree (and the probes), or the check below proves nothing.
    assert "edgecompress/attribution/__init__.py" in expected
    assert "edgecompress/passes/_wheel_probe/deep/module.py" in expected
    assert "edgecompress/kernels/prebuilt/_wheel_probe.cubin" in expected
    assert any(e.startswith("edgecompress/targets/") and e.endswith(".toml") for e in expected)
    problems = wheel_problems(names, src)
    assert not problems, "the wheel is wrong:\n" + "\n".join(problems)


def test_wheel_has_the_console_script(built_wheel):
    _, _, entry_points = built_wheel
    assert "edgecompress = edgecompress.cli:main" in entry_points.replace("  ", " ")


def test_the_check_catches_a_missing_module_and_a_top_level_leak(built_wheel):
    src, names, _ = built_wheel
    dropped = "edgecompress/attribution/__init__.py"
    broken = [n for n in names if n != dropped] + ["passes/__init__.py", "tests/__init__.py"]
    problems = wheel_problems(broken, src)
    assert any(p.startswith(f"missing {dropped}") for p in problems), problems
    assert any("top-level passes/" in p for p in problems), problems
    assert any("tests/__init__.py" in p for p in problems), problems
