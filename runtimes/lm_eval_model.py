"""An lm-evaluation-harness model over an artifact folder: downstream tasks scored by onnxruntime.

`ArtifactLM` is an `lm_eval` `TemplateLM`, so lm-eval's own code turns (context, continuation) pairs
into tokens exactly as its Hugging Face model does (the context's trailing spaces move into the
continuation, the whole string is encoded and split at len(encode(context)), an empty context becomes
the prefix token). The artifact is loaded by the runtime's `TextGenerator` (manifest check, providers,
tokenizer, eos/bos ids, context length); scoring runs the graph with numpy and onnxruntime only.
lm_eval is imported here at the top: import this module only when lm-eval is wanted.
"""

from __future__ import annotations

import logging

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.generate import TextGenerator
from edgecompress.runtimes.sampling import SamplingSettings

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's HF model's fallback when the artifact records no context length
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model's default for generate_until


class ArtifactLM(TemplateLM):
    """lm-eval's `loglikelihood`, `loglikelihood_rolling` and `generate_until` on an artifact.

    `batch_size`: requests per onnxruntime call (sorted by length, right-padded); `max_length`: tokens of
    context (default: the artifact's context length); the rest is TextGenerator's (providers, threads)."""

    backend = "causal"

    def __init__(self, artifact, batch_size: int = 1, max_length: int | None = None, **generator_kwargs):
        super().__init__()
        if int(batch_size) < 1:
            raise ArtifactRuntimeError("the batch size must be at least 1")
        self.generator = TextGenerator(artifact, **generator_kwargs)
        self.backend_tokenizer = self.generator.tokenizer  # not `tokenizer`: lm-eval reads that as an HF one
        self.decoder = self.generator.decoder
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or self.generator.context_length or DEFAULT_MAX_LENGTH)
        self.warnings: list[str] = list(self.generator.warnings)
        if not self.generator.eos_ids:
            raise ArtifactRuntimeError(f"'{self.generator.folder}' names no eos_token_id in its genai_config.json")

    # --- what lm-eval asks of a model ----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.generator.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's HF model: the BOS token conditions an empty context, else EOS.
        bos = self.generator.bos_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    def get_model_info(self) -> dict:
        """Recorded in the results JSON's `config` by lm-eval."""
        session = self.decoder.session
        return {"artifact": str(self.generator.folder), "providers": session.get_providers(),
                "max_length": self.max_length, "batch_size": self.batch_size}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # lm-eval's HF convention: the tokenizer's own special tokens unless told, none when the string
        # already starts with the BOS text (few-shot prompts may carry it).
        if add_special_tokens is None:
            bos_text = self.backend_tokenizer.id_to_token(self.prefix_token_id)
            add_special_tokens = not (bos_text and string.startswith(bos_text))
        return self.backend_tokenizer.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.backend_tokenizer.decode(ids, skip_special_tokens=True)

    # --- scoring -----------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        # lm-eval's own tokenization (TemplateLM); its progress bar off: it would print through the CLI's spinner.
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per request.

        `requests`: ((context, continuation) or None, context ids, continuation ids). Longest first, so a
        batch pads little; the answers come back in the requests' order."""
        rows = [self._scored_row(context_ids, continuation_ids) for _, context_ids, continuation_ids in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        answers: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for index, answer in zip(batch, self._score_batch([rows[i] for i in batch])):
                answers[index] = answer
                strings = requests[index][0]
                if strings is not None:  # rolling windows have no strings to cache under
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def _scored_row(self, context_ids: list[int], continuation_ids: list[int]) -> tuple[list[int], list[int]]:
        """The model input (context truncated from the left to max_length) and the tokens it must predict."""
        if not continuation_ids:
            raise ArtifactRuntimeError("lm-eval asked to score an empty continuation")
        if len(continuation_ids) > self.max_length:
            raise ArtifactRuntimeError(f"a continuation of {len(continuation_ids)} tokens does not fit the "
                                       f"{self.max_length}-token context")
        # The last token is only predicted, never fed; the input keeps the last max_length tokens.
        whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1):]
        return whole[:-1], list(continuation_ids)

    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One fresh prefill of right-padded inputs (causal: padding never changes earlier positions)."""
        width = max(len(ids) for ids, _ in rows)
        input_ids = np.full((len(rows), width), self.eot_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for row, (ids, _) in enumerate(rows):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), input_ids.shape)
        logits, _ = self.decoder.forward(input_ids, mask, positions, self.decoder.empty_cache(len(rows)))
        answers = []
        for row, (ids, targets) in enumerate(rows):
            scores = logits[row, len(ids) - len(targets) : len(ids)]  # the positions predicting `targets`
            answers.append(continuation_score(scores, targets))
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string (perplexity tasks): lm-eval's disjoint windows of max_length
        predicted tokens, the first conditioned on the prefix token, each later one on the token before it."""
        windows, owners = [], []
        for owner, (string,) in enumerate(request.args for request in requests):
            pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                       prefix_token=self.prefix_token_id,
                                                       max_seq_len=self.max_length, context_len=1)
            for context_ids, continuation_ids in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context_ids, continuation_ids))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy text for each (context, gen_kwargs), cut before the first `until` string."""
        outputs = []
        for context, gen_kwargs in (request.args for request in requests):
            until, max_gen_toks = self._generation_settings(dict(gen_kwargs or {}))
            text = self._generate_one(context, until, max_gen_toks)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 1.0) or 0.0) > 0:
            message = "generate_until decodes greedily here; the task's do_sample/temperature are ignored"
            if message not in self.warnings:
                self.warnings.append(message)
                logger.warning(message)
        return [stop for stop in until if stop], max_gen_toks

    def _generate_one(self, context: str, until: list[str], max_gen_toks: int) -> str:
        # Room for the generated tokens: the context is truncated from the left, as lm-eval's HF model does.
        room = max(1, self.max_length - max_gen_toks)
        prompt_ids = self.tok_encode(context)[-room:]
        generated: list[int] = []
        text = ""
        for token in self.generator.stream_tokens(prompt_ids, max_gen_toks, SamplingSettings()):
            if token in self.generator.eos_ids:
                break
            generated.append(token)
            text = self.tok_decode(generated)
            if any(stop in text for stop in until):
                break
        return cut_at_stops(text, until)


def continuation_score(scores: np.ndarray, targets: list[int]) -> tuple[float, bool]:
    """Sum of log-softmax(scores)[t, targets[t]] (float64) and whether every target is the argmax."""
    scores = np.asarray(scores, dtype=np.float64)
    peak = scores.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(scores - peak).sum(axis=-1)) + peak[:, 0]
    picked = scores[np.arange(len(targets)), targets]
    greedy = bool((scores.argmax(axis=-1) == np.asarray(targets)).all())
    return float((picked - log_norm).sum()), greedy


def cut_at_stops(text: str, until: list[str]) -> str:
    """The text before the earliest stop string (lm-eval splits at each stop in turn: the same result)."""
    for stop in until:
        text = text.split(stop)[0]
    return text
