"""The `edgecompress` command: a thin typer layer over edgecompress.api.

Errors the user can act on print as one line on stderr with a non-zero exit; `-v` adds the traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from inspect import Parameter, Signature, signature
from typing import Any, Callable, Optional, get_type_hints

import typer
from rich.console import Console
from rich.progress import Progress as RichProgress
from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.markup import escape

from edgecompress import contract, options
from edgecompress.errors import EdgeCompressError
from edgecompress.progress import Progress

app = typer.Typer(
    name="edgecompress",
    help="ONNX/edge deployment compiler for transformer LLMs: export, verify and compress decoder models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)

VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show library logs and full tracebacks.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Print only errors and the final artifact path.")


def _quiet_libraries(verbose: bool) -> None:
    """Third-party chatter (exporter warnings, tqdm bars) only with -v."""
    if verbose:
        logging.basicConfig(level=logging.INFO)
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion draws its own bar
    # Read when those libraries are imported (later, lazily): the Hub client's offline retries and
    # the datasets library's notices stay out of the one-line output.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration", "torch._dynamo",
                 "torch.export", "onnxscript", "transformers", "datasets", "huggingface_hub", "lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_transformers(verbose: bool) -> None:
    """transformers' own progress bars (loading weights): only `build` imports transformers, so only it
    pays for this import; the runtime verbs stay torch- and transformers-free."""
    if verbose:
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def handle_errors(func: Callable) -> Callable:
    """Library chatter off and one line and an exit code for user errors; the traceback only with -v."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", False)
        _quiet_libraries(verbose)
        try:
            return func(*args, **kwargs)
        except EdgeCompressError as exc:
            if verbose:
                err_console.print_exception()
            # escape: messages name TOML tables ([verify.float16]), which rich would take for markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None

    return wrapper


class RichStages(Progress):
    """A spinner and elapsed time per pipeline stage."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = RichProgress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[stage]:<7}[/]"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=err_console,
            disable=quiet,
            transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "RichStages":
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def stage_started(self, name: str) -> None:
        self.tasks[name] = self.bar.add_task("", total=1, stage=name)

    def stage_note(self, name: str, message: str) -> None:
        self.bar.update(self.tasks[name], description=message)

    def stage_finished(self, name: str, seconds: float) -> None:
        self.bar.update(self.tasks[name], completed=1, description=f"[green]done[/] in {seconds:.1f} s")

    def warning(self, message: str) -> None:  # also in report.json's "warnings"
        if not self.quiet:
            self.bar.console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _build_parameters() -> list[Parameter]:
    """One typer parameter per build option field (options.py holds each one's default, help and flags)."""
    hints = {**get_type_hints(options.CompressOptions), **get_type_hints(options.BuildOptions)}
    parameters = []
    for entry in options.build_option_fields():
        meta = entry.metadata
        if not meta["cli"]:
            continue
        text = meta["help"]() if callable(meta["help"]) else meta["help"]
        if meta["cli"] == "argument":
            info = typer.Argument(entry.default, help=text, show_default=meta["show_default"])
        else:
            info = typer.Option(entry.default, *meta["flags"], help=text, show_default=meta["show_default"])
        parameters.append(Parameter(entry.name, Parameter.POSITIONAL_OR_KEYWORD, default=info,
                                    annotation=hints[entry.name]))
    return parameters


def _takes_build_options(command: Callable) -> Callable:
    """The command's parameters: every build option, then its own (-v, -q); typer reads this signature."""
    own = [p for p in signature(command).parameters.values() if p.kind != Parameter.VAR_KEYWORD]
    parameters = _build_parameters() + own
    command.__signature__ = Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return command


@app.command()
@handle_errors
@_takes_build_options
def build(verbose: bool = VerboseOpt, quiet: bool = QuietOpt, **chosen: Any) -> None:
    """Export MODEL to ONNX with a KV cache, optionally compress it, verify it against PyTorch, and
    write the artifact folder."""
    from edgecompress import api

    _quiet_transformers(verbose)
    with RichStages(quiet) as stages:
        report = api.build(progress=stages, **chosen)
    if quiet:
        out_console.print(report["path"], highlight=False)
        return
    _print_build_summary(report)


def _print_build_summary(report: dict[str, Any]) -> None:
    verification = report["verification"]
    worst = max((c["max_abs_diff"] for c in verification["checks"] if "max_abs_diff" in c), default=0.0)
    greedy = verification["greedy"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("artifact", report["path"])
    table.add_row("size", f"{report['size_bytes'] / 1e6:.1f} MB ({len(report['files'])} files)")
    table.add_row("model", f"{report['model']['model_type']}, {report['model']['num_layers']} layers, "
                  f"{report['model']['parameters']:,} parameters")
    compression = report.get("compression")
    if compression:
        accounting = compression.get("params", {})
        table.add_row("compression", f"{compression.get('method')}: {_plan_layers(compression)}; "
                      f"achieved ratio {accounting.get('achieved_ratio', float('nan')):.4f}")
    table.add_row("parity", f"{'[green]passed[/]' if verification['passed'] else '[red]FAILED[/]'}: "
                  f"max |Δlogit| {worst:.2e} (prefill, decode, padded batch)")
    evaluation = report.get("evaluation") or {}
    if "perplexity" in evaluation:
        settings = evaluation.get("settings", {})
        table.add_row("perplexity", f"{evaluation['perplexity']:.2f} ({settings.get('data', '?')}, "
                      f"{evaluation.get('windows', '?')} x {settings.get('seq_len', '?')} tokens)")
    elif "skipped" in evaluation:
        table.add_row("perplexity", f"skipped: {evaluation['skipped']}")
    table.add_row("greedy", f"{len(greedy['onnxruntime'])} tokens identical to PyTorch: {greedy['identical']}")
    optimized = verification.get("optimized")
    if optimized:
        table.add_row("weights", _optimized_summary(report["weights"], optimized, evaluation))
    memory = report.get("memory")
    if memory:
        table.add_row("memory", _memory_summary(memory, report["target"]["name"]))
    table.add_row("time", f"{report['total_seconds']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    out_console.print(table)


def _memory_summary(memory: dict[str, Any], target: str) -> str:
    need = memory["artifact"]
    line = (f"weights {need['weights_gb']:.3f} + KV {need['kv_cache_gb']:.3f} ({memory['context']} tokens) + workspace "
            f"{need['workspace_gb']:.3f} = {need['total_gb']:.3f} GB")
    if memory["budget_gb"] is None:
        return line + " (no budget)"
    line += f" {'≤' if memory['fits'] else '[red]>[/]'} {memory['budget_gb']:g} GB ({memory['budget_source']})"
    if memory.get("picked_ratio") is not None:
        line += f"; dense {memory['dense_estimate']['total_gb']:.3f} GB did not fit: ratio {memory['picked_ratio']:.2f} picked"
    return line


def _optimized_summary(formats: dict[str, Any], optimized: dict[str, Any], evaluation: dict[str, Any]) -> str:
    kind = formats["weights"] + (", fused" if formats["fuse"] else "")
    comparisons = [c for c in optimized["checks"] if "mean_kl" in c or "max_abs_diff" in c]
    if formats["weights"] == "fp32":
        worst = max((c["max_abs_diff"] for c in comparisons), default=0.0)
        line = f"{kind}: max |Δlogit| {worst:.2e} vs the fp32 export"
    else:
        kl = max((c["mean_kl"] for c in comparisons), default=0.0)
        top1 = min((c["top1_agreement"] for c in comparisons), default=1.0)
        line = f"{kind}: mean KL ≤ {kl:.3g}, top-1 agreement ≥ {top1:.2f} vs the fp32 export"
    if "ratio_to_fp32" in evaluation:
        line += f"; perplexity {evaluation['ratio_to_fp32']:.4f}x the fp32 export's {evaluation['fp32_export']['perplexity']:.2f}"
    return line


def _plan_layers(compression: dict[str, Any]) -> str:
    actions: dict[str, list[int]] = {}
    for layer in compression.get("layers", []):
        actions.setdefault(layer["action"], []).append(layer["index"])
    return ", ".join(f"{action} {indices}" for action, indices in actions.items() if action != "keep") or "no change"


@app.command()
@handle_errors
def inspect(
    out: Path = typer.Argument(..., help=f"Artifact folder (or its {contract.MODEL_FILE})."),
    as_json: bool = typer.Option(False, "--json", help="Print the full description as JSON."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Describe an artifact: graph size, parameters, layers, I/O, opset, custom ops, how it was built."""
    from edgecompress import api

    info = api.inspect(out)
    if as_json:
        out_console.print_json(json.dumps(info))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("path", info["path"])
    table.add_row("size", f"{info['size_bytes'] / 1e6:.1f} MB in {len(info['files'])} files")
    table.add_row("graph", f"{info['nodes']} nodes, {info['initializers']} initializers, "
                  f"{info['parameters']:,} parameters")
    table.add_row("layers", str(info["layers"]))
    table.add_row("opset", ", ".join(f"{d} {v}" for d, v in info["opset"].items()))
    table.add_row("custom ops", ", ".join(info["custom_ops"]) or "none")
    top_ops = list(info["op_counts"].items())[:8]
    table.add_row("top ops", ", ".join(f"{op}×{n}" for op, n in top_ops))
    for kind in ("inputs", "outputs"):
        values = info[kind]
        shown = [v for v in values if not contract.is_kv_name(v["name"])]
        kv = len(values) - len(shown)
        text = "; ".join(f"{v['name']} {v['dtype']}{v['shape']}" for v in shown)
        table.add_row(kind, text + (f"; + {kv} KV tensors" if kv else ""))
    build_info = info["build"]
    if build_info.get("source"):
        table.add_row("built", f"from {build_info['source']['spec']} for {build_info['target']} by edgecompress "
                      f"{build_info['edgecompress']} on {build_info['created']}")
        table.add_row("exporter", str(build_info["exporter"]))
        table.add_row("verified", str(build_info["verification_passed"]))
    needs = info.get("requirements")
    if needs:
        library = needs["custom_op_library"]
        table.add_row("needs", f"{needs['onnxruntime']} >= {needs['min_version']}, {needs['execution_provider']}"
                      + (f", {library['file']} (onnxruntime C API {library['ort_api_version']}, cubins for sm "
                         f"{', '.join(map(str, library['cuda_sms'])) or 'none'})" if library else ""))
    out_console.print(table)


@app.command()
@handle_errors
def clean(
    out: Path = typer.Argument(..., help="The OUT a killed build was writing."),
    unknown_owner: bool = typer.Option(False, "--unknown-owner",
                                       help="Also remove leftover folders with no owner record."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Remove the hidden folders (.OUT.partial-*, .OUT.old-*) that killed builds into OUT left beside it."""
    from edgecompress import api

    result = api.clean(out, unknown_owner)
    removed, unknown = result["removed"], result["unknown_owner"]
    if not quiet:
        line = (f"removed {len(removed)} leftover folder(s) of killed builds beside '{out}'" if removed
                else f"nothing left beside '{out}' by killed builds")
        if unknown:
            line += f"; {len(unknown)} with no owner record kept (--unknown-owner removes them)"
        out_console.print(escape(line), highlight=False, soft_wrap=True)


@app.command("targets")
@handle_errors
def list_targets(
    as_json: bool = typer.Option(False, "--json", help="Print the profiles as JSON."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """List the target profiles with their key numbers."""
    from edgecompress import api

    profiles = api.targets()
    if as_json:
        out_console.print_json(json.dumps(profiles))
        return
    table = Table("target", "arch", "dtype", "memory / budget", "bandwidth", "peak (dense)", "power mode", "sources")
    for p in profiles:
        name = p["name"] + "".join(f"\n= {alias}" for alias in p["aliases"])
        peak, budget = p["peak_tflops"], p["budget_gb"]
        table.add_row(
            name, p["arch"] or "?", p["dtype"], f"{_number(p['memory_gb'], 'GB')} / {_number(budget, 'GB')}",
            _number(p["memory_bandwidth_gbs"], "GB/s"), _number(peak, f"TFLOPS {p['dtype'].replace('float', 'fp')}"),
            p["expected_power_mode"] or "", "; ".join(p["sources"]),
        )
    out_console.print(table)
    out_console.print("Every number's source is in a comment beside it in the profile file; `--json` prints every field.",
                      highlight=False)


def _number(value, unit: str) -> str:
    return "?" if value is None else f"{value} {unit}"


@app.command("eval")
@handle_errors
def eval_artifact(
    out: Path = typer.Argument(..., help="Artifact folder."),
    data: Optional[str] = typer.Option(
        None, "--data", help="Text to score: a file or hf:DATASET[:CONFIG]:SPLIT[:FIELD]. Default: "
        "$EDGECOMPRESS_DATA/wiki.test.raw, else WikiText-2 test through the datasets library.", show_default=False,
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N windows (with --tasks: the "
                                        "first N examples of each task).", show_default=False),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per non-overlapping window."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows (or, with --tasks, requests) per onnxruntime call."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads.", show_default=False),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="Also score this artifact (e.g. the dense build) on the same windows.",
        show_default=False,
    ),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", help="lm-evaluation-harness tasks instead of perplexity, comma-separated (arc_easy,piqa; "
        "needs the eval extra). --limit is then examples per task.", show_default=False,
    ),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples (with --tasks; "
                                              "default: each task's).", show_default=False),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="A folder of local lm-eval task "
                                                "YAMLs (with --tasks).", show_default=False),
    output: Optional[Path] = typer.Option(None, "--output", help="Where --tasks writes lm-eval's results JSON "
                                          "(default: OUT/lm_eval.json).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the result and its settings as JSON."),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Perplexity of an artifact through onnxruntime (non-overlapping windows, mean next-token NLL), or
    lm-evaluation-harness tasks with --tasks."""
    from edgecompress import api

    if tasks is not None:
        if data is not None or reference is not None:
            raise EdgeCompressError("--data and --reference are for perplexity; --tasks reads each task's own data")
        _eval_tasks(out, tasks, limit=limit, num_fewshot=num_fewshot, include_path=include_path,
                    batch_size=batch_size, output=output, threads=threads, as_json=as_json, quiet=quiet)
        return
    if num_fewshot is not None or include_path is not None or output is not None:
        raise EdgeCompressError("--num-fewshot, --include-path and --output go with --tasks")
    result = api.eval(out, data, limit=limit, seq_len=seq_len, batch_size=batch_size, threads=threads,
                      reference=reference)
    _print_perplexity(result, as_json, quiet)


def _print_perplexity(result: dict[str, Any], as_json: bool, quiet: bool) -> None:
    for warning in result.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if as_json:
        out_console.print_json(json.dumps(result))
        return
    if quiet:
        out_console.print(f"{result['perplexity']:.4f}", highlight=False)
        return
    settings = result["settings"]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("perplexity", f"{result['perplexity']:.4f} (mean NLL {result['mean_nll']:.5f})")
    table.add_row("windows", f"{result['windows']} of {result['windows_available']} × {settings['seq_len']} tokens, "
                  f"{result['tokens_scored']:,} tokens scored")
    if "reference" in result:
        table.add_row("reference", f"{result['reference']['perplexity']:.4f} ({result['reference']['artifact']}); "
                      f"ratio {result['ratio_to_reference']:.4f}")
    table.add_row("data", settings["data"])
    table.add_row("time", f"{result['seconds']['evaluate']:.1f} s ({result['tokens_per_second']:.0f} tokens/s)")
    out_console.print(table)


def _eval_tasks(out: Path, tasks: str, *, as_json: bool, quiet: bool, **settings: Any) -> None:
    """`eval --tasks`: lm-eval's tasks on the artifact, a table of (task, metric, value, stderr)."""
    from edgecompress import api

    with (err_console.status(f"lm-eval: {tasks}", spinner="dots") if not quiet else _NoStatus()):
        result = api.evaluate_tasks(out, tasks, **settings)
    for warning in result["warnings"]:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if as_json:
        out_console.print_json(json.dumps(result))
        return
    if quiet:
        out_console.print(result["output"], highlight=False)
        return
    table = Table("task", "metric", "value", "stderr", box=None, pad_edge=False)
    for row in result["rows"]:
        stderr = "" if row["stderr"] is None else f"± {row['stderr']:.4f}"
        table.add_row(row["task"], row["metric"] + ("" if row["filter"] == "none" else f" ({row['filter']})"),
                      f"{row['value']:.4f}", stderr)
    out_console.print(table)
    out_console.print(f"results: {result['output']} ({result['seconds']['evaluate']:.1f} s)", highlight=False)


@app.command()
@handle_errors
def generate(
    out: Path = typer.Argument(..., help="Artifact folder."),
    prompt: str = typer.Argument("", help="Prompt text (may be empty)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", help="Sampling temperature (default: greedy; 1 when --top-k/--top-p/--seed is given).",
        show_default=False
    ),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens.", show_default=False),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass.", show_default=False),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling.", show_default=False),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the artifact's chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat).", show_default=False),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads.", show_default=False),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Generate text from an artifact with onnxruntime (KV cache), streaming tokens as they are produced."""
    from edgecompress import api

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = api.generate(
        out, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        chat=chat, system=system, on_text=write, threads=threads,
        on_warning=lambda warning: err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False),
    )
    sys.stdout.write("\n")
    if not quiet:
        err_console.print(
            f"[dim]{len(result['tokens'])} tokens ({result['stopped']}), prompt {result['prompt_tokens']} tokens, "
            f"prefill {result['prefill_seconds']:.2f} s, decode {result['decode_tokens_per_second']:.1f} tokens/s[/]",
            highlight=False,
        )


PROFILE_FORMATS = ("md", "json", "csv")


# Long only because typer declares every option in the signature; the work is api.profile's.
@app.command()
@handle_errors
def profile(
    out: Path = typer.Argument(..., help="Artifact folder."),
    n_prompt: str = typer.Option("512", "--n-prompt", "-p", help="Prompt lengths of the pp tests: 512, a list "
                                 "(128,512) or a range (128-1024*2); 0 for none."),
    n_gen: str = typer.Option("128", "--n-gen", "-n", help="Decode steps of the tg tests (list or range); 0 for none."),
    depth: str = typer.Option("0", "--depth", "-d", help="Tokens prefilled untimed before every test (list): "
                              "`-d 512` gives `tg128 @ d512`."),
    batch: str = typer.Option("1", "--batch", "-b", help="Batch sizes (list)."),
    pg: Optional[list[str]] = typer.Option(None, "--pg", help="A whole request PROMPT,GEN (pp512+tg128: TTFT, "
                                           "ITL, TPOT, e2e); repeatable.", show_default=False),
    repetitions: int = typer.Option(5, "--repetitions", "-r", help="Timed repetitions of every test (interleaved)."),
    warmup: int = typer.Option(1, "--warmup", "-w", help="Warm-up requests at the largest shape (dropped)."),
    ep: Optional[str] = typer.Option(None, "--ep", "-e", help="cpu, cuda, tensorrt or a provider name (default: "
                                     "the artifact's target's).", show_default=False),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="onnxruntime intra-op threads (default: "
                                          "onnxruntime's, one per physical core).", show_default=False),
    io_binding: Optional[bool] = typer.Option(None, "--io-binding/--no-io-binding", help="KV cache as OrtValues "
                                              "bound in place (default: on for GPU providers).", show_default=False),
    spin: bool = typer.Option(True, "--spin/--no-spin", help="Let onnxruntime's threads spin between runs."),
    ops: bool = typer.Option(True, "--ops/--no-ops", help="Per-op and per-role time from a separate profiling pass."),
    ops_steps: int = typer.Option(8, "--ops-steps", help="Decode steps in the profiling pass."),
    target: Optional[str] = typer.Option(None, "--target", help="Roofline target (name or .toml; default: the "
                                         "artifact's).", show_default=False),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Host peak RSS per phase; NVML/tegrastats when present."),
    sample_ms: float = typer.Option(10.0, "--sample-ms", help="NVML/tegrastats sampling interval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompt token ids."),
    prompt_text: Optional[Path] = typer.Option(None, "--prompt-text", help="Take prompt tokens from this text "
                                               "file instead of random ids.", show_default=False),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write profile.{json,md,csv,png} and "
                                          "ort_trace.json into this folder.", show_default=False),
    fmt: str = typer.Option("md", "--format", help="What to print: md, json or csv."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="A baseline profile.json: Δ % per matching test.",
                                           show_default=False),
    verbose: bool = VerboseOpt,
    quiet: bool = QuietOpt,
) -> None:
    """On-device latency profile of an artifact (llama-bench tests, vLLM/MLPerf metrics, memory, per-op time,
    roofline estimates)."""
    from edgecompress import api

    api.check_runnable(out)  # before the profiler's modules import onnxruntime
    from edgecompress.runtimes.profiler.settings import parse_list, parse_pg

    if fmt not in PROFILE_FORMATS:
        raise EdgeCompressError(f"--format must be one of {', '.join(PROFILE_FORMATS)}, not '{fmt}'")
    with (err_console.status("profiling", spinner="dots") if not quiet else _NoStatus()) as status:
        result = api.profile(
            out, n_prompt=parse_list(n_prompt, "--n-prompt"), n_gen=parse_list(n_gen, "--n-gen"),
            depth=parse_list(depth, "--depth"), batch=parse_list(batch, "--batch"), pg=parse_pg(pg),
            repetitions=repetitions, warmup=warmup, ep=ep, threads=threads, io_binding=io_binding, spinning=spin,
            ops=ops, ops_steps=ops_steps, target=target, memory=memory, sample_ms=sample_ms, seed=seed,
            prompt_text=prompt_text, output=output, compare=compare,
            progress=(lambda message: status.update(message)) if status else None,
        )
    if quiet:
        if output is not None:
            out_console.print(str(output), highlight=False)
        return
    from edgecompress.runtimes.profiler import render

    sys.stdout.write(render(result, fmt))
    sys.stdout.flush()


class _NoStatus:
    """No spinner with -q."""

    def __enter__(self):
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def main() -> None:
    from edgecompress.runtimes.onnxruntime_install import both_edgecompress_distributions

    clash = both_edgecompress_distributions()
    if clash:
        err_console.print(f"[bold yellow]warning:[/] {escape(clash)}", highlight=False, soft_wrap=True)
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
