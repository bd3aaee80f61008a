"""A fused artifact's KV cache written in place (contract.SHARED_KV_BUFFER): our generation, the profiler's loop and
onnxruntime-genai drive it, and all give the tokens of a cache copied every step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecompress import api, contract
from edgecompress.runtimes.decoder import OrtDecoder
from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.generate import TextGenerator
from edgecompress.runtimes.kv_steps import NumpySteps, SharedSteps, make_steps

PROMPTS = ["why is the sky blue", "cat sat on mat", "dog ran far away from home"]


@pytest.fixture(scope="module")
def fused_artifact(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "fused"
    report = api.build(str(tiny_llama_dir), "cpu-x86", out, fuse=True, eval_limit=0)
    return out, report


def test_the_fused_build_shares_its_cache_and_rotates_inside_attention(fused_artifact):
    out, report = fused_artifact
    fusion = report["export"]["optimize"]["fusion"]
    assert fusion["FuseGroupQueryAttentionPass"]["rotary_inside"] == 3
    assert fusion["ShareKvBufferPass"]["shared"] and "RotaryEmbedding" not in fusion["missing"]
    assert json.loads((out / contract.GENAI_CONFIG_FILE).read_text())["search"]["past_present_share_buffer"] is True
    optimized = report["verification"]["optimized"]
    assert optimized["passed"] and optimized["greedy"]["kv_cache_in_place"] == optimized["greedy"]["optimized"]
    assert any(check["check"].startswith("greedy tokens with the KV cache written in place") and check["passed"]
               for check in optimized["checks"])
    assert OrtDecoder(out).shares_kv_buffer


def test_an_unfused_artifact_keeps_a_copied_cache(tiny_llama_artifact):
    folder = tiny_llama_artifact[0]
    decoder = OrtDecoder(folder)
    assert not decoder.shares_kv_buffer
    assert json.loads((folder / contract.GENAI_CONFIG_FILE).read_text())["search"]["past_present_share_buffer"] is False
    assert isinstance(make_steps(decoder, capacity=32), NumpySteps)
    with pytest.raises(ArtifactRuntimeError, match="cannot be shared"):
        SharedSteps(decoder, 32)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_in_place_steps_give_the_copied_caches_logits(fused_artifact, prompt):
    generator = TextGenerator(fused_artifact[0])
    ids = generator.encode(prompt)
    shared, copied = SharedSteps(generator.decoder, len(ids) + 7), NumpySteps(generator.decoder)
    token = None
    for _ in range(8):
        feed = ids if token is None else [token]
        ours, theirs = shared(feed), copied(feed)
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
        token = int(np.argmax(ours))
    with pytest.raises(ArtifactRuntimeError, match="holds"):
        shared([token])  # one more than the buffer was made for


def test_generation_uses_the_shared_buffer_and_matches_greedy(fused_artifact):
    generator = TextGenerator(fused_artifact[0])
    assert isinstance(make_steps(generator.decoder, capacity=16), SharedSteps)
    for prompt in PROMPTS:
        ids = generator.encode(prompt)
        tokens = list(generator.stream_tokens(ids, 12))
        reference = generator.decoder.greedy(ids, len(tokens), tuple(generator.eos_ids))
        assert tokens == reference


def test_onnxruntime_genai_drives_the_shared_buffer(fused_artifact):
    pytest.importorskip("onnxruntime_genai")
    from tests.runtimes.genai_reference import genai_greedy, without_eos

    generator = TextGenerator(fused_artifact[0])
    for prompt in PROMPTS:
        ids = generator.encode(prompt, chat=True)
        ours = list(generator.stream_tokens(ids, 16))
        theirs, _ = genai_greedy(fused_artifact[0], ids, 16)
        assert without_eos(ours, generator.eos_ids) == theirs


def test_the_profilers_loop_writes_in_place(fused_artifact):
    from edgecompress.runtimes.profiler.loop import Runner
    from edgecompress.runtimes.session import create_session

    session = create_session(fused_artifact[0])
    shared, copied = Runner(session, io_binding=False), Runner(session, io_binding=False)
    copied.shared = False  # the same session driven with a growing, copied cache
    ids = np.random.default_rng(0).integers(3, 60, (1, 10))
    tokens = []
    for runner in (shared, copied):
        runner.reset(1, capacity=16)
        steps = [runner.step(ids)]
        for _ in range(6):
            steps.append(runner.step(steps[-1].tokens[:, None]))
        tokens.append(np.concatenate([step.tokens for step in steps]))
    assert shared.buffers is not None and copied.buffers is None and shared.length == 16
    np.testing.assert_array_equal(tokens[0], tokens[1])
    # The prompt ran unbound (logits_to_keep: one row) and its cache was copied into the buffers once.
    assert shared.last_only and shared._hosts[0][:, :, :16].any() and not shared._hosts[0][:, :, 16:].any()
