"""Downstream tasks of lm-evaluation-harness on an artifact: task names, the run, the results file.

Imports lm_eval (and through it the datasets library) at the top: the caller imports this module only
when tasks are asked for, after checking that lm-eval is installed.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import time
from pathlib import Path

import lm_eval
import onnxruntime as ort
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

from edgecompress.errors import first_line
from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.lm_eval_model import ArtifactLM

GLOB_CHARACTERS = set("*?[")


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool = True) -> TaskManager:
    """lm-eval's index of its bundled task YAMLs (with `include_defaults`) and `include_path`'s; kept per
    process, as indexing the bundled ones reads thousands of files (about 10 s)."""
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager_for(names: list[str], include_path: str | None) -> TaskManager:
    """The local folder's index alone when every name is a plain task there (no group or tag, which may
    name bundled tasks); otherwise lm-eval's full index. A local task wins over a bundled one of the same
    name in the full index too, so both give the same tasks."""
    if include_path is not None:
        local = task_manager(include_path, include_defaults=False)
        if all(name in local.all_subtasks for name in names):
            return local
    return task_manager(include_path)


@contextlib.contextmanager
def onnxruntime_env_info(providers: list[str]):
    """lm-eval records torch's environment in its results (importing torch and running pip and nvidia-smi:
    seconds); the scores here come from onnxruntime, so the results record that instead."""
    from lm_eval import evaluator

    original = getattr(evaluator, "add_env_info", None)

    def add_env_info(storage: dict) -> None:
        storage.update({"pretty_env_info": f"onnxruntime {ort.__version__} ({', '.join(providers)}), scored by "
                        "edgecompress.runtimes (no torch)", "transformers_version": "N/A (not used)",
                        "lm_eval_version": lm_eval.__version__, "upper_git_hash": None})

    if original is not None:
        evaluator.add_env_info = add_env_info
    try:
        yield
    finally:
        if original is not None:
            evaluator.add_env_info = original


def resolve_tasks(names: list[str], manager: TaskManager) -> list[str]:
    """Task, group and tag names, YAML paths, and glob patterns (arc_*) expanded; unknown ones refused."""
    resolved, unknown = [], []
    for name in names:
        if GLOB_CHARACTERS & set(name):
            matched = manager.match_tasks([name])
            resolved += matched
            unknown += [] if matched else [name]
        elif name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            resolved.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ArtifactRuntimeError(unknown_tasks_message(unknown, manager.all_tasks))
    return list(dict.fromkeys(resolved))  # once each, in the order asked


def unknown_tasks_message(unknown: list[str], known: list[str]) -> str:
    close = difflib.get_close_matches(unknown[0], known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}{hint}; `lm-eval ls tasks` "
            f"lists them, and --include-path DIR adds local task YAMLs")


def run_tasks(folder: Path, tasks: list[str], *, limit=None, num_fewshot: int | None = None,
              include_path: str | None = None, batch_size: int = 1, output: Path, **generator_kwargs) -> dict:
    """Evaluate `tasks` on the artifact `folder`, write lm-eval's results JSON to `output` and return a summary:
    one row per (task, metric) with its stderr, the output path, timings and warnings."""
    manager = task_manager_for(tasks, include_path)
    names = resolve_tasks(tasks, manager)  # before loading the model: a typo costs nothing
    started = time.perf_counter()
    model = ArtifactLM(folder, batch_size=batch_size, **generator_kwargs)
    load_s = time.perf_counter() - started
    try:
        with onnxruntime_env_info(model.decoder.session.get_providers()):
            results = lm_eval.simple_evaluate(
                model=model, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                batch_size=batch_size, log_samples=False,
                torch_random_seed=None,  # our model has no torch: do not import it only to seed it
            )
    except OSError as exc:  # a dataset that cannot be fetched (offline, no cache) or a missing local file
        raise ArtifactRuntimeError(f"lm-eval could not load the tasks' data: {first_line(exc)}") from exc
    seconds = {"load": round(load_s, 3), "evaluate": round(time.perf_counter() - started - load_s, 3)}
    rows = result_rows(results)
    results["edgecompress"] = {"artifact": str(folder), "tasks": names, "rows": rows, "seconds": seconds,
                               "warnings": model.warnings, "lm_eval": lm_eval.__version__}
    write_json(output, results)
    return {"artifact": str(folder), "tasks": names, "rows": rows, "output": str(output), "seconds": seconds,
            "warnings": model.warnings, "n_samples": results.get("n-samples", {})}


def result_rows(results: dict) -> list[dict]:
    """(task, metric, value, stderr) for every metric lm-eval reports, groups included, tasks in its order."""
    rows = []
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue  # "alias", "samples", and the stderr entries read below
                if any(row["task"] == task and row["metric"] == metric for row in rows):
                    continue  # a group appears in both sections
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                rows.append({"task": task, "metric": metric, "filter": filter_name, "value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def write_json(path: Path, results: dict) -> None:
    """Written beside the target first, then renamed: an interrupted run leaves no half file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    os.replace(partial, path)
