"""Package discovery only; all metadata lives in pyproject.toml.

Every package under edgecompress/ keeps its name, and every package under each of the top-level
folders passes/, runtimes/, kernels/ and targets/ installs under edgecompress.<folder>[.<sub>...]:
never as a top-level `passes`, `runtimes`, ... in site-packages. Nothing is listed by hand, so new
subpackages ship without editing this file (a folder needs an __init__.py to be a package).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# repo folder -> edgecompress.<folder>; the same tuple as edgecompress.folder_names.FOLDERS (setup.py
# imports nothing of ours; tests/test_wheel.py fails when the two disagree).
NAMESPACED = ("passes", "runtimes", "kernels", "targets")


def _packages_under(folder: str, prefix: str) -> list[str]:
    """`prefix` plus every package found under ROOT/folder, renamed below `prefix`."""
    return [prefix] + [f"{prefix}.{name}" for name in find_packages(where=str(ROOT / folder))]


packages = _packages_under("edgecompress", "edgecompress")
# Relative paths: setuptools wants package_dir relative to the project root (it runs from there).
package_dir = {"edgecompress": "edgecompress"}
for folder in NAMESPACED:
    packages += _packages_under(folder, f"edgecompress.{folder}")
    package_dir[f"edgecompress.{folder}"] = folder

# edgecompress/passes/ (say) would be shadowed by the top-level passes/ folder: refuse to build.
clashes = sorted({name for name in packages if packages.count(name) > 1})
if clashes:
    raise SystemExit(f"packages found twice (edgecompress/<folder> and <folder>/): {clashes}")

setup(packages=packages, package_dir=package_dir)
