"""What a profile measures: the test shapes (llama-bench's names) and the run settings, checked up front.

Tests, as llama-bench makes them from its lists (every prompt length, every generation length, at
every depth and batch):

- `pp512`: a timed prefill of 512 tokens (TTFT: the first token's logits on the host).
- `tg128`: 128 timed single-token decode steps (ITL per step).
- `pp512+tg128` (`--pg 512,128`): one request: a prefill, then decode steps until 128 tokens are
  generated, the prefill's token included (vLLM's output length), so it has 127 ITLs and
  TPOT = (e2e − TTFT) / (128 − 1).
- ` @ d512` on any of them: 512 tokens prefilled untimed first, so the timed work sees a 512-token cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgecompress.runtimes.errors import ArtifactRuntimeError

EP_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class Shape:
    n_prompt: int
    n_gen: int
    n_depth: int = 0
    batch: int = 1

    @property
    def name(self) -> str:
        parts = ([f"pp{self.n_prompt}"] if self.n_prompt else []) + ([f"tg{self.n_gen}"] if self.n_gen else [])
        return "+".join(parts) + (f" @ d{self.n_depth}" if self.n_depth else "")

    @property
    def key(self) -> str:
        """Unique per row: the name, plus the batch when it is not 1."""
        return self.name + (f" b{self.batch}" if self.batch != 1 else "")

    @property
    def decode_steps(self) -> int:
        """Timed decode calls: a request's first token comes from its prefill."""
        return self.n_gen - 1 if self.n_prompt and self.n_gen else self.n_gen

    @property
    def tokens(self) -> int:
        """Context positions the test fills: depth, prompt, and every decode step's input."""
        return self.n_depth + self.n_prompt + self.decode_steps


@dataclass
class ProfileSettings:
    n_prompt: list[int] = field(default_factory=lambda: [512])
    n_gen: list[int] = field(default_factory=lambda: [128])
    depth: list[int] = field(default_factory=lambda: [0])
    batch: list[int] = field(default_factory=lambda: [1])
    pg: list[tuple[int, int]] = field(default_factory=list)
    repetitions: int = 5
    warmup: int = 1
    ep: str | None = None  # cpu | cuda | tensorrt | a provider name; None: the artifact's target's
    threads: int | None = None  # None: onnxruntime's default (one per physical core)
    io_binding: bool | None = None  # None: on for GPU providers
    spinning: bool = True  # onnxruntime's intra-op threads spin between runs (its default)
    ops: bool = True
    ops_steps: int = 8
    target: str | None = None  # None: the target the artifact was built for
    memory: bool = True
    sample_ms: float = 10.0
    seed: int = 0
    prompt_text: str | None = None  # a text file whose tokens replace the random ids
    shapes: list[Shape] | None = None  # an explicit test list instead of the lists' cross product

    def tests(self) -> list[Shape]:
        if self.shapes is not None:
            return list(dict.fromkeys(self.shapes))
        shapes = []
        for batch in self.batch:
            for depth in self.depth:
                shapes += [Shape(p, 0, depth, batch) for p in self.n_prompt if p > 0]
                shapes += [Shape(0, n, depth, batch) for n in self.n_gen if n > 0]
                shapes += [Shape(p, n, depth, batch) for p, n in self.pg]
        return list(dict.fromkeys(shapes))  # one row per shape, in order

    def validate(self) -> None:
        for name in ("n_prompt", "n_gen", "depth"):
            if any(value < 0 for value in getattr(self, name)):
                raise ArtifactRuntimeError(f"--{name.replace('_', '-')} values must be >= 0")
        if not self.batch or any(b < 1 for b in self.batch):
            raise ArtifactRuntimeError("--batch values must be >= 1")
        if any(p < 1 or n < 1 for p, n in self.pg):
            raise ArtifactRuntimeError("--pg takes PROMPT,GEN with both >= 1")
        if self.repetitions < 1:
            raise ArtifactRuntimeError("--repetitions must be at least 1")
        if self.warmup < 0 or self.ops_steps < 1 or self.sample_ms <= 0:
            raise ArtifactRuntimeError("--warmup must be >= 0, --ops-steps >= 1 and --sample-ms > 0")
        if self.threads is not None and self.threads < 1:
            raise ArtifactRuntimeError("--threads must be at least 1")
        if any(s.n_prompt < 0 or s.n_gen < 0 or s.n_depth < 0 or s.batch < 1 for s in self.shapes or []):
            raise ArtifactRuntimeError("test shapes need n_prompt, n_gen, n_depth >= 0 and batch >= 1")
        if not self.tests() or any(not (s.n_prompt or s.n_gen) for s in self.tests()):
            raise ArtifactRuntimeError("nothing to measure: every --n-prompt and --n-gen is 0 and no --pg")

    def provider(self, artifact_providers: list[str], available: list[str]) -> str:
        """The execution provider to run: --ep, else the artifact's target's first; one that this
        onnxruntime lacks is refused (never a silent fallback that would time another device)."""
        wanted = EP_NAMES.get(self.ep.lower(), self.ep) if self.ep else (artifact_providers or ["CPUExecutionProvider"])[0]
        if wanted not in available:
            origin = "--ep" if self.ep else "the artifact's target"
            raise ArtifactRuntimeError(
                f"execution provider {wanted} ({origin}) is not available in this onnxruntime "
                f"(available: {', '.join(available)}); pass --ep cpu or install the matching onnxruntime"
            )
        return wanted


def parse_list(text: str | list | None, option: str) -> list[int]:
    """'512', '128,256' or 'first-last*mult'/'first-last+step' (llama-bench ranges) -> ints."""
    if text is None:
        return []
    if isinstance(text, list):
        return [int(v) for v in text]
    values: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                values += _range(part)
            elif part:
                values.append(int(part))
    except ValueError:
        raise ArtifactRuntimeError(f"{option} takes integers, comma lists or ranges like 128-512*2, not '{text}'") from None
    return values


def _range(part: str) -> list[int]:
    first, rest = part.split("-", 1)
    step_kind, step = ("*", rest.split("*")[1]) if "*" in rest else ("+", rest.split("+")[1] if "+" in rest else "1")
    last = int(rest.split(step_kind)[0]) if step_kind in rest else int(rest)
    value, step_value, out = int(first), int(step), []
    if step_value < (2 if step_kind == "*" else 1) or value < (1 if step_kind == "*" else 0):
        raise ValueError(part)
    while value <= last:
        out.append(value)
        value = value * step_value if step_kind == "*" else value + step_value
    return out


def parse_pg(values: list[str] | None) -> list[tuple[int, int]]:
    pairs = []
    for value in values or []:
        parts = parse_list(value, "--pg")
        if len(parts) != 2:
            raise ArtifactRuntimeError(f"--pg takes PROMPT,GEN (like llama-bench's -pg), not '{value}'")
        pairs.append((parts[0], parts[1]))
    return pairs
