"""Roofline estimates for an artifact on any target, with nothing run: a prediction, labelled so.

Uses the same graph accounting as a profile's roofline (roofline.py), so the prediction for a device
one does not have and the estimate next to a measurement on the device agree by construction.
"""

from __future__ import annotations

import numpy as np

from edgecompress.targets import profiles
from edgecompress.runtimes.profiler import roofline
from edgecompress.runtimes.profiler.artifact import open_artifact
from edgecompress.runtimes.profiler.settings import ProfileSettings, Shape


def predict(artifact, target: str, tests: list[Shape] | ProfileSettings) -> dict:
    """{"label", "target", bandwidth and peak used, per-test prefill/decode estimates} for `artifact`."""
    item = open_artifact(artifact)
    shapes = tests.tests() if isinstance(tests, ProfileSettings) else list(tests)
    profile = profiles.load_profile(target)
    layout = item.layout()
    dtype = np.dtype(layout.dtype).name
    cost = roofline.graph_cost(item.graph, layout.num_layers, layout.kv_heads, item.heads or layout.kv_heads,
                               layout.head_dim, np.dtype(layout.dtype).itemsize)
    peak, peak_dtype = roofline.peak_for(profile, dtype)
    bw = profile.memory_bandwidth_gbs
    return {
        "label": f"prediction for {profile.name}: estimated from the graph and the profile's peaks, not measured",
        "artifact": str(item.folder),
        "target": profile.name,
        "bw_gbs": bw,
        "bw_source": "profile",
        "peak_tflops": peak,
        "dtype": peak_dtype,
        "bw_efficiency": profile.bw_efficiency,
        "compute_efficiency": profile.compute_efficiency,
        "weight_bytes": cost.weight_bytes,
        "tests": [{"test": shape.key, **roofline.shape_estimates(shape, cost, bw, peak, profile)} for shape in shapes],
    }
