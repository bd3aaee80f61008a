"""Building and running the examples from tests (unit tests on the tiny artifact, integration on smollm2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAT_SCRIPT = ROOT / "examples/python/chat.py"


def build_greedy_binary() -> str:
    """examples/cpp built with g++ (headers fetched from Debian once into .cache/ort); skips without them."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run([str(ROOT / "examples/cpp/build.sh")], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0 and not (ROOT / ".cache/ort/root/usr/include/onnxruntime").is_dir():
        pytest.skip(f"ONNX Runtime headers could not be fetched from Debian: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def cpp_greedy(binary: str, folder: Path, ids: list[int], max_new_tokens: int) -> list[int]:
    result = subprocess.run([binary, str(folder), str(max_new_tokens), *map(str, ids)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return [int(t) for t in result.stdout.split()]


def chat_example_ids(folder: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Token ids of each reply of examples/python/chat.py, fed `prompts` as user turns on stdin."""
    result = subprocess.run([sys.executable, "-P", str(CHAT_SCRIPT), str(folder), "--ids", "--max-new-tokens",
                             str(max_new_tokens)], input="\n".join(prompts) + "\n", capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [line.removeprefix("ids: ") for line in result.stdout.splitlines() if line.startswith("ids: ")]
    return [[int(t) for t in line.split()] for line in lines]


def runtime_chat_ids(generator, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The same conversation through TextGenerator directly."""
    messages, replies = [], []
    for prompt in prompts:
        messages.append({"role": "user", "content": prompt})
        reply = generator.generate(messages=messages, max_new_tokens=max_new_tokens)
        replies.append(reply.tokens)
        messages.append({"role": "assistant", "content": reply.text})
    return replies
