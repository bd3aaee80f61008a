"""The Python API: one function per CLI verb. The CLI only parses arguments and prints results."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from inspect import Parameter, Signature
from typing import Any, get_type_hints

from edgecompress import contract, options
from edgecompress.targets import profiles
from edgecompress.errors import EdgeCompressError, first_line
from edgecompress.progress import Progress


def build(model: str | None = None, target: str | None = None, out: str | Path | None = None, *,
          progress: Progress | None = None, **options_: Any) -> dict[str, Any]:
    """Export MODEL for TARGET into OUT, verify it, and return the build report (also in OUT/report.json).

    The keyword options are options.BuildOptions' and CompressOptions' fields (each with its help text there;
    `help(edgecompress.build)` lists them with their defaults). With `ratio` (fraction of all parameters to
    remove) or a saved `plan`, the model is compressed: PyTorch decides the plan (`method`, calibrated on
    `calibration`: a file, an hf: spec, `self[:N]`, or None for $EDGECOMPRESS_DATA, then the datasets library,
    then self-generated text), graph passes apply it to the export, and verification compares against PyTorch
    with the same plan applied. `weights` and `fuse` are applied after that verification and checked against the
    fp32 export; None takes the target's default. The artifact must fit `max_memory_gb` with a KV cache of
    `context` tokens; without `ratio` or `plan`, a model that does not fit is compressed with `method` at the
    smallest ratio that fits, and the report's `memory` shows the arithmetic.
    """
    return _pipeline().build(options.build_options(model=model, target=target, out=out, **options_), progress)


def _pipeline():
    """The build pipeline, imported on use: a runtime-only install (edgecompress-runtime) has none."""
    try:
        from edgecompress import pipeline
    except ImportError as missing:
        if not (missing.name or "").startswith("edgecompress"):
            raise
        raise EdgeCompressError("build needs the compiler: this is the runtime-only install (edgecompress-runtime); "
                                "build on a machine with `pip install edgecompress`, then copy the artifact here") from None
    return pipeline


def _build_signature() -> Signature:
    """build's signature as help() shows it: the three positional fields, every other option keyword-only."""
    hints = {**get_type_hints(options.CompressOptions), **get_type_hints(options.BuildOptions)}
    positional = ("model", "target", "out")
    parameters = [
        Parameter(entry.name, Parameter.POSITIONAL_OR_KEYWORD if entry.name in positional else Parameter.KEYWORD_ONLY,
                  default=entry.default, annotation=hints[entry.name])
        for entry in options.build_option_fields()
    ]
    parameters.append(Parameter("progress", Parameter.KEYWORD_ONLY, default=None, annotation=Progress | None))
    return Signature(parameters, return_annotation=dict[str, Any])


build.__signature__ = _build_signature()


def targets() -> list[dict[str, Any]]:
    """Every bundled target profile, as JSON-ready dicts."""
    return [profile.describe() for profile in profiles.all_profiles()]


def clean(out: str | Path, unknown_owner: bool = False) -> dict[str, list[str]]:
    """Remove the hidden folders that killed builds into OUT left beside it (`.OUT.partial-*`, `.OUT.old-*`).

    Only those whose process is gone (recorded pid and host); `unknown_owner` also removes folders with no
    owner record (made by an edgecompress before 0.1.0's owner files, or on another host)."""
    from edgecompress import artifact

    removed, unknown = artifact.remove_leftovers(Path(out), include_unknown=unknown_owner)
    return {"removed": [str(entry) for entry in removed], "unknown_owner": [str(entry) for entry in unknown]}


def inspect(out: str | Path) -> dict[str, Any]:
    """What an artifact holds: graph size, parameters, layers, I/O, opset, custom ops, how it was built, and what
    the device needs to run it. Reads the graph's structure only (runtimes' protobuf reader: no onnx package,
    no weights read), so a runtime-only install inspects too."""
    from edgecompress.runtimes.profiler.onnx_graph import ELEMENT_NAMES, read_graph

    folder = Path(out)
    model_file = folder / contract.MODEL_FILE if folder.is_dir() else folder
    if not model_file.is_file():
        raise EdgeCompressError(f"'{out}' is not an edgecompress artifact (no {contract.MODEL_FILE})")
    folder = model_file.parent
    graph = read_graph(model_file)
    op_counts = Counter(node.op_type for node in graph.nodes)
    standard = {"", "ai.onnx"}
    custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.nodes if n.domain not in standard})
    report = _read_json(folder / contract.REPORT_FILE)
    genai = _read_json(folder / contract.GENAI_CONFIG_FILE)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}

    def values(table: dict) -> list[dict[str, Any]]:
        return [{"name": name, "dtype": ELEMENT_NAMES.get(elem, str(elem)), "shape": [0 if d is None else d for d in dims]}
                for name, (elem, dims) in table.items()]

    return {
        "path": str(folder),
        "files": files,
        "size_bytes": sum(files.values()),
        "nodes": len(graph.nodes),
        "op_counts": dict(op_counts.most_common()),
        "parameters": sum(_numel(init.dims) for init in graph.initializers.values()),
        "initializers": len(graph.initializers),
        "layers": genai.get("model", {}).get("decoder", {}).get("num_hidden_layers"),
        "opset": graph.opsets,
        "custom_ops": custom,
        "inputs": values(graph.inputs),
        "outputs": values(graph.outputs),
        "producer": graph.producer,
        "build": {
            "source": report.get("source"),
            "target": report.get("target", {}).get("name"),
            "exporter": report.get("export", {}).get("exporter"),
            "created": report.get("created"),
            "edgecompress": report.get("edgecompress"),
            "verification_passed": report.get("verification", {}).get("passed"),
        },
        "requirements": report.get("requirements"),
    }


def _numel(dims) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise EdgeCompressError(f"'{path}' is not valid JSON: {exc}") from None


# --- runtime verbs: torch-free, they only run onnxruntime on an existing artifact ---------------


def check_runnable(out) -> Path:
    """The artifact folder, checked against this machine's onnxruntime before anything imports it (none, or one
    too old: one line naming what to install)."""
    from edgecompress.runtimes.artifact_files import artifact_folder
    from edgecompress.runtimes.onnxruntime_install import check

    folder = artifact_folder(out)
    check(folder)
    return folder


def eval(  # noqa: A001 - the verb is `edgecompress eval`
    out: str | Path,
    data: str | Path | None = None,
    *,
    limit: int | None = None,
    seq_len: int = 512,
    batch_size: int = 1,
    threads: int | None = None,
    reference: str | Path | None = None,
) -> dict[str, Any]:
    """Perplexity of the artifact OUT via onnxruntime, on `data` (a text file or an hf: spec; None:
    $EDGECOMPRESS_DATA's wiki.test.raw, then WikiText-2's test split through the datasets library).

    With `reference` (e.g. the dense artifact), the same windows are scored on it too and the result
    holds its perplexity and the ratio."""
    check_runnable(out)
    from edgecompress.runtimes.artifact_files import artifact_folder
    from edgecompress.runtimes.perplexity import evaluation_text, perplexity

    artifact_folder(out)
    if reference is not None:  # a wrong reference fails before the long run, not after it
        artifact_folder(reference)
    text = evaluation_text(data)  # read once for both artifacts
    result = perplexity(out, text, seq_len=seq_len, limit=limit, batch_size=batch_size, threads=threads)
    if reference is not None:
        dense = perplexity(reference, text, seq_len=seq_len, limit=limit, batch_size=batch_size, threads=threads)
        if dense["windows_sha256"] != result["windows_sha256"]:
            raise EdgeCompressError("the reference scored different token windows (a different tokenizer?); no ratio")
        result["reference"] = {"artifact": dense["artifact"], "perplexity": dense["perplexity"]}
        result["ratio_to_reference"] = result["perplexity"] / dense["perplexity"]
    return result


LM_EVAL_FILE = "lm_eval.json"  # the results of `eval --tasks`, written into the artifact folder by default
LM_EVAL_INSTALL_HINT = "pip install 'edgecompress[eval]'"


def evaluate_tasks(
    out: str | Path,
    tasks: str | list[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    batch_size: int = 1,
    output: str | Path | None = None,
    threads: int | None = None,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """lm-evaluation-harness `tasks` (names, a comma-separated string, YAML paths or globs: arc_easy, piqa, ...)
    scored on the artifact OUT through onnxruntime; `include_path`: a folder of local task YAMLs.

    Writes lm-eval's results JSON to `output` (default OUT/lm_eval.json) and returns a summary with one row
    per (task, metric, value, stderr). Needs the `eval` extra (lm-eval); nothing is written on bad input."""
    from edgecompress.runtimes.artifact_files import artifact_folder, verify_manifest

    folder = artifact_folder(out)
    verify_manifest(folder, hashes=False)  # a wrong folder fails now, not after lm-eval's task index is read
    check_runnable(folder)
    names = [name.strip() for name in (tasks.split(",") if isinstance(tasks, str) else tasks) if name.strip()]
    if not names:
        raise EdgeCompressError("--tasks names no task (e.g. --tasks arc_easy,piqa)")
    _check_task_settings(limit, num_fewshot, batch_size, include_path)
    destination = Path(output) if output is not None else folder / LM_EVAL_FILE
    if not destination.parent.is_dir() or not os.access(destination.parent, os.W_OK):
        raise EdgeCompressError(f"cannot write the results to '{destination}': its folder is missing or read-only")
    try:
        import lm_eval  # noqa: F401 - the optional dependency, checked before anything runs
    except ImportError as exc:
        raise EdgeCompressError(f"--tasks needs lm-evaluation-harness ({first_line(exc)}): "
                                f"{LM_EVAL_INSTALL_HINT}") from None
    from edgecompress.runtimes.lm_eval_tasks import run_tasks

    return run_tasks(folder, names, limit=limit, num_fewshot=num_fewshot,
                     include_path=None if include_path is None else str(include_path), batch_size=batch_size,
                     output=destination, threads=threads, providers=providers)


def _check_task_settings(limit, num_fewshot, batch_size, include_path) -> None:
    if limit is not None and limit <= 0:
        raise EdgeCompressError("--limit must be at least 1 example per task")
    if num_fewshot is not None and num_fewshot < 0:
        raise EdgeCompressError("--num-fewshot must be 0 or more")
    if batch_size < 1:
        raise EdgeCompressError("--batch-size must be at least 1")
    if include_path is not None and not Path(include_path).is_dir():
        raise EdgeCompressError(f"--include-path '{include_path}' is not a folder")


def generate(
    out: str | Path,
    prompt: str = "",
    *,
    max_new_tokens: int = 128,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    chat: bool = False,
    system: str | None = None,
    messages: list[dict] | None = None,
    on_text=None,
    threads: int | None = None,
    providers: list[str] | None = None,
    on_warning=None,
) -> dict[str, Any]:
    """Generate text from the artifact OUT; `on_text` receives each piece as it completes, `on_warning`
    each warning before generation starts (the target's provider missing here, ...).

    Greedy unless a temperature > 0 (or top-k, top-p, seed) asks for sampling. The result holds the token
    ids (the eos id included when reached), the text, why it stopped and timings."""
    check_runnable(out)
    from edgecompress.runtimes.generate import TextGenerator
    from edgecompress.runtimes.sampling import SamplingSettings

    if temperature is None:  # asking for top-k, top-p or a seed means sampling, at temperature 1
        temperature = 1.0 if (top_k or top_p is not None or seed is not None) else 0.0
    sampling = SamplingSettings(
        temperature=temperature,
        top_k=top_k if top_k is not None else 0,
        top_p=top_p if top_p is not None else 1.0,
        seed=seed,
    )
    generator = TextGenerator(out, providers=providers, threads=threads)
    for warning in generator.warnings:
        if on_warning is not None:
            on_warning(warning)
    result = generator.generate(prompt, max_new_tokens, sampling, chat=chat, system=system, messages=messages,
                                on_text=on_text)
    return {**result.as_dict(), "warnings": generator.warnings}


def profile(
    out: str | Path,
    *,
    n_prompt: list[int] | None = None,
    n_gen: list[int] | None = None,
    depth: list[int] | None = None,
    batch: list[int] | None = None,
    pg: list[tuple[int, int]] | None = None,
    repetitions: int = 5,
    warmup: int = 1,
    ep: str | None = None,
    threads: int | None = None,
    io_binding: bool | None = None,
    spinning: bool = True,
    ops: bool = True,
    ops_steps: int = 8,
    target: str | None = None,
    memory: bool = True,
    sample_ms: float = 10.0,
    seed: int = 0,
    prompt_text: str | Path | None = None,
    output: str | Path | None = None,
    compare: str | Path | None = None,
    progress=None,
) -> dict[str, Any]:
    """Latency profile of the artifact OUT through onnxruntime, llama-bench style (`pp512`, `tg128`,
    `pp512+tg128` with `pg`, `@ dN` with `depth`): TTFT/ITL/TPOT/e2e statistics, throughputs, memory,
    a separate per-op/per-role pass (`ops`), and roofline estimates for `target` (default: the target
    OUT was built for). `output`: a folder for profile.{json,md,csv,png} and ort_trace.json;
    `compare`: a baseline profile.json for Δ % per test. Returns the profile.json dict."""
    check_runnable(out)
    from edgecompress.runtimes.profiler import ProfileSettings, profile_artifact

    settings = ProfileSettings(
        n_prompt=[512] if n_prompt is None else list(n_prompt), n_gen=[128] if n_gen is None else list(n_gen),
        depth=[0] if depth is None else list(depth), batch=[1] if batch is None else list(batch),
        pg=list(pg or []), repetitions=repetitions, warmup=warmup, ep=ep, threads=threads, io_binding=io_binding,
        spinning=spinning, ops=ops, ops_steps=ops_steps, target=target, memory=memory, sample_ms=sample_ms,
        seed=seed, prompt_text=None if prompt_text is None else str(prompt_text),
    )
    return profile_artifact(out, settings, out=output, compare_to=compare, progress=progress)
