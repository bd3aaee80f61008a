"""Build edgecompress-runtime: the device-side install (run, evaluate, profile and inspect an artifact).

    python packaging/runtime_wheel.py [--out dist]          (`make runtime-wheel`)

The runtime is a second distribution built from this repository, the way onnxruntime-genai and
onnxruntime-genai-cuda are one import package in two distributions: `edgecompress-runtime` provides the
`edgecompress` package with only the modules the runtime verbs load (RUNTIME_MODULES below: the runtimes,
the target profiles, the custom-op library and its loader, and the torch-free CLI, API and option tables),
and depends on numpy, tokenizers, jinja2, typer and rich only. It names no onnxruntime distribution: the
device brings its own (onnxruntime, onnxruntime-gpu, a Jetson wheel), which a dependency on `onnxruntime`
would clash with. A build machine installs `edgecompress`, which holds the runtime too; the two are
alternatives, never installed side by side (the CLI warns in one line when both are).

The files are copied into a staged project in a temporary folder (package folders renamed as the main wheel
installs them: runtimes/ -> edgecompress/runtimes/), which pip turns into a wheel offline.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "edgecompress-runtime"
DEPENDENCIES = ["numpy>=1.26", "tokenizers>=0.20", "jinja2>=3", "typer>=0.12", "rich>=13"]
# What a runtime-only install holds: repo path (glob) -> installed path under site-packages.
RUNTIME_MODULES = {
    "edgecompress": ["__init__.py", "errors.py", "contract.py", "folder_names.py", "progress.py", "cli.py",
                     "api.py", "options.py", "methods.py", "structures.py", "custom_ops.py"],
    "runtimes": ["**/*.py"],
    "targets": ["**/*.py", "**/*.toml"],
    # The loader, the NumPy reference, the library's sources (it builds where g++ is) and the built library.
    "kernels": ["__init__.py", "library.py", "reference.py", "fetch_ort_headers.sh", "csrc/*.cc", "csrc/*.h",
                "build/*.so", "build/*.json"],
}


def version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)


def stage(into: Path) -> list[str]:
    """Copy the runtime's files into a fresh project folder; returns their installed paths."""
    shutil.rmtree(into, ignore_errors=True)
    package = into / "edgecompress"
    copied = []
    for folder, patterns in RUNTIME_MODULES.items():
        source = ROOT / folder
        target = package if folder == "edgecompress" else package / folder
        for pattern in patterns:
            for path in sorted(source.glob(pattern)):
                if "__pycache__" in path.parts or not path.is_file():
                    continue
                destination = target / path.relative_to(source)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, destination)
                copied.append(destination.relative_to(into).as_posix())
    (into / "pyproject.toml").write_text(_pyproject())
    shutil.copy2(ROOT / "README.md", into / "README.md")
    return copied


def _pyproject() -> str:
    dependencies = ",\n    ".join(f'"{dep}"' for dep in DEPENDENCIES)
    return f'''[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "{NAME}"
version = "{version()}"
description = "Run, evaluate and profile edgecompress artifacts with the onnxruntime already on the device."
readme = "README.md"
requires-python = ">=3.10"
dependencies = [
    {dependencies},
]

[project.optional-dependencies]
eval = ["lm-eval==0.4.13"]

[project.scripts]
edgecompress = "edgecompress.cli:main"

[tool.setuptools.packages.find]
include = ["edgecompress*"]

[tool.setuptools.package-data]
"*" = ["*.toml", "**/*.toml", "*.sh", "csrc/*.cc", "csrc/*.h", "build/*.so", "build/*.json"]
'''


def build(out: Path, python: str = sys.executable) -> Path:
    """Stage the project in a temporary folder (nothing is written into the checkout) and build the wheel."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{NAME.replace('-', '_')}-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="edgecompress-runtime-") as scratch:
        project = Path(scratch) / "project"
        stage(project)
        done = subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                               "--no-index", "-w", str(out), str(project)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building {NAME} failed: {done.stderr.strip().splitlines()[-1:]}")
    return next(out.glob(f"{NAME.replace('-', '_')}-*.whl"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the wheel goes (default dist/)")
    args = parser.parse_args(argv)
    wheel = build(args.out)
    print(f"{wheel} ({wheel.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
