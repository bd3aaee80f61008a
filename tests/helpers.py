"""Helpers several test modules share: the CLI in a subprocess, its one-line errors, random calibration
sets, a word-level tokenizer, and op counts of a built artifact."""

from __future__ import annotations

import collections
import os
import subprocess
import sys


def run_cli(*args: str, cwd=None, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -P -m edgecompress.cli ARGS` (-P: the working folder stays off sys.path); `env` replaces
    the environment when given."""
    return subprocess.run([sys.executable, "-P", "-m", "edgecompress.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    assert fragment in result.stderr.replace("\n", " ")


def environment_without_data(**extra: str) -> dict[str, str]:
    """This process's environment minus EDGECOMPRESS_DATA, offline for the Hugging Face libraries."""
    env = {key: value for key, value in os.environ.items() if key != "EDGECOMPRESS_DATA"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def random_calibration(n: int = 2, length: int = 12, seed: int = 0, vocab: int = 96):
    """A CalibrationSet of random token ids (for the bare tiny models of tests.tiny_models)."""
    import torch

    from edgecompress.calibrate import CalibrationSet

    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, "random tokens", "0" * 64, seed)


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over `words` ([UNK] = 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def artifact_ops(folder) -> collections.Counter:
    """(domain, op type) -> count of an artifact's graph, the default domain as "ai.onnx"."""
    import onnx

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return collections.Counter((node.domain or "ai.onnx", node.op_type) for node in proto.graph.node)


def require_wikitext() -> None:
    """Skip, with the reason, when WikiText-2 is nowhere: EDGECOMPRESS_DATA unset (CI sets it) and no
    cached `datasets` copy. The reference perplexities are WikiText-2 numbers."""
    from edgecompress.runtimes import text_sources

    for role in (text_sources.CALIBRATION, text_sources.EVALUATION):
        found = text_sources.resolve(None, role)
        if isinstance(found, text_sources.NoText):
            import pytest

            pytest.skip(f"WikiText-2 {role} text not found: {found.reason}")


def custom_ops_library():
    """The path of our built custom-op library (built here when it is not yet); a skip with the reason when
    it cannot be built on this machine."""
    import pytest

    from edgecompress.custom_ops import LibraryMissingError, library_file

    try:
        return library_file()
    except LibraryMissingError as missing:
        try:
            from edgecompress.kernels import library

            library.build_library()
            return library_file()
        except Exception as error:  # noqa: BLE001 - why it cannot be built is the skip's reason
            pytest.skip(f"the custom-op library is not built ({missing}) and cannot be built here: {error}")
