"""profile.png: decode latency vs position, TTFT vs prompt length, time by role, the roofline point.

matplotlib is optional at run time (a device may not have it): without it there is no picture and
the result says so in one note.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROLE_COLORS = {"embed": "#8c564b", "attn_proj": "#1f77b4", "attn_core": "#aec7e8", "attn_out": "#17becf",
               "mlp": "#ff7f0e", "low_rank": "#d62728", "norm": "#2ca02c", "rope": "#98df8a", "lm_head": "#9467bd",
               "custom_op": "#e377c2", "memcpy": "#7f7f7f", "other": "#c7c7c7"}


def plot_profile(result: dict, path: Path) -> str | None:
    """Write the four panels to `path`; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no profile.png (pip install matplotlib)"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _decode_vs_position(axes[0][0], result)
    _ttft_vs_prompt(axes[0][1], result)
    _by_role(axes[1][0], result)
    _roofline_point(axes[1][1], result)
    fig.suptitle(f"{result['artifact']['name']} on {result['settings']['ep']} "
                 f"({result['device']['host']['cpu']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _decode_vs_position(ax, result: dict) -> None:
    for row in result["tests"]:
        itl = row.get("itl_ms")
        if not itl:
            continue
        steps = np.asarray(itl["samples"], dtype=float)  # [rep][step]
        first = row["n_depth"] + row["n_prompt"]
        ax.plot(first + np.arange(steps.shape[1]), steps.mean(axis=0), label=row["key"], lw=1)
    ax.set(title="decode latency vs position (mean over repetitions)", xlabel="context position", ylabel="ITL ms")
    if ax.lines:
        ax.legend(fontsize=7)


def _ttft_vs_prompt(ax, result: dict) -> None:
    rows = sorted((r for r in result["tests"] if r.get("ttft_ms")), key=lambda r: r["n_prompt"])
    if rows:
        x = [r["n_prompt"] for r in rows]
        mean = np.asarray([r["ttft_ms"]["mean"] for r in rows])
        low = mean - [r["ttft_ms"]["min"] for r in rows]
        high = np.asarray([r["ttft_ms"]["max"] for r in rows]) - mean
        ax.errorbar(x, mean, yerr=[low, high], marker="o", capsize=3)
    ax.set(title="TTFT vs prompt length (mean, min-max)", xlabel="prompt tokens", ylabel="TTFT ms")


def _by_role(ax, result: dict) -> None:
    ops = result.get("ops")
    if not ops:
        ax.set_title("time by role (no op profile: --no-ops)")
        return
    phases = ("prefill", "decode")
    for index, phase in enumerate(phases):
        total = sum(r["ms"] for r in ops[phase]["by_role"]) or 1.0
        bottom = 0.0
        for row in ops[phase]["by_role"]:
            share = 100 * row["ms"] / total
            ax.bar(index, share, bottom=bottom, color=ROLE_COLORS.get(row["role"], "#333"), label=row["role"])
            bottom += share
    ax.set_xticks(range(len(phases)), [f"{p}\n{ops[p]['kernels_ms']:.2f} ms/run" for p in phases])
    ax.set(title="kernel time by role (% of the run's kernels)", ylabel="%")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per role across both bars
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))


def _roofline_point(ax, result: dict) -> None:
    roof = result["roofline"]
    bw, peak = roof.get("bw_gbs"), roof.get("peak_tflops")
    intensity = np.logspace(-1, 4, 100)
    if bw and peak:
        ax.loglog(intensity, np.minimum(intensity * bw, peak * 1e3), "k-", lw=1, label=f"{roof['target']} roofline")
    for phase, marker in (("decode", "o"), ("prefill", "s")):
        point = roof.get(phase)
        if not point:
            continue
        ai = point["intensity_flop_per_byte"]
        if point.get("measured_ms"):
            achieved = point["flops"] / (point["measured_ms"] * 1e-3) / 1e9
            ax.loglog([ai], [achieved], marker, label=f"{phase} measured")
        if point.get("est_ms"):
            estimated = point["flops"] / (point["est_ms"] * 1e-3) / 1e9
            ax.loglog([ai], [estimated], marker, mfc="none", label=f"{phase} estimated")
    ax.set(title=f"roofline (estimated: {roof['target']}, {roof['bw_source']} bandwidth)",
           xlabel="FLOP/byte", ylabel="GFLOP/s")
    ax.legend(fontsize=7)
