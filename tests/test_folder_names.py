"""The repo's top-level folders never shadow an installed distribution of the same name (issue 23).

Run the way a user's Python runs in a clone: from the repo root with the working folder on sys.path
(no -P, PYTHONSAFEPATH unset), where `import kernels` used to find our kernels/ and transformers broke.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from edgecompress.folder_names import FOLDERS

REPO = Path(__file__).resolve().parents[1]


def run_in_clone(code: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, **extra_env},
                          capture_output=True, text=True, timeout=300)


def test_setup_py_installs_the_same_folders():
    tree = ast.parse((REPO / "setup.py").read_text())
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "NAMESPACED"}
    assert assigned["NAMESPACED"] == FOLDERS
    assert all((REPO / folder / "__init__.py").is_file() for folder in FOLDERS)


def test_folder_names_resolve_to_installed_distributions_from_the_clone():
    provided = metadata.packages_distributions()
    code = (
        "import importlib, json, sys\n"
        "assert sys.path[0] in ('', '" + str(REPO) + "'), sys.path[:2]  # the clone is on sys.path\n"
        "found = {}\n"
        "for name in " + repr(FOLDERS) + ":\n"
        "    try:\n"
        "        found[name] = importlib.import_module(name).__file__\n"
        "    except ModuleNotFoundError as error:\n"
        "        found[name] = 'missing: ' + str(error)\n"
        "print(json.dumps(found))\n"
    )
    result = run_in_clone(code)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    for name in FOLDERS:
        if name in provided:  # e.g. `kernels`, which transformers >= 5.25 requires
            assert found[name] and not found[name].startswith("missing"), (name, found[name])
            assert (REPO / name) not in Path(found[name]).resolve().parents, (name, found[name], provided[name])
        else:
            assert found[name].startswith("missing") and f"edgecompress.{name}" in found[name], found[name]


def test_transformers_imports_its_kernels_from_the_clone():
    result = run_in_clone("import transformers\nimport transformers.integrations.hub_kernels\n"
                          "import edgecompress.kernels, edgecompress.passes, edgecompress.runtimes\n"
                          "print(edgecompress.kernels.register.__module__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "edgecompress.kernels.library"


def test_a_shadowed_name_loads_the_distribution_and_not_ours(tmp_path):
    """Independent of what is installed today: a fake distribution named like each folder wins."""
    site = tmp_path / "site"
    for name in FOLDERS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\nfrom .sub import VALUE\n")
        (site / name / "sub.py").write_text("VALUE = 7\n")
    code = ("import importlib, json\n"
            f"mods = [importlib.import_module(n) for n in {FOLDERS!r}]\n"
            "import edgecompress.passes as ours\n"
            "print(json.dumps([[m.WHO, m.VALUE] for m in mods] + [ours.SplitLowRankPass.__module__]))")
    result = run_in_clone(code, PYTHONPATH=str(site))  # after the clone on sys.path, as site-packages is
    assert result.returncode == 0, result.stderr[-2000:]
    *loaded, ours = json.loads(result.stdout)
    assert loaded == [[f"installed {name}", 7] for name in FOLDERS]
    assert ours == "edgecompress.passes.split_low_rank"
