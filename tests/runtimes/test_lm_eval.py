"""lm-evaluation-harness on an artifact: the adapter's scores against the runtime's own logits, lm-eval's
tokenization convention, rolling windows against the perplexity path, greedy generation, and the CLI on a
local task (offline: the task's data is a jsonl file in tests/data/lm_eval_tasks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import assert_one_line_error, run_cli

pytest.importorskip("lm_eval")  # the `eval` extra (in `dev`)

ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = Path("tests/data/lm_eval_tasks")  # relative: the task's data_files are, to the repo root
TASK = "edgecompress_tiny_mc"
PAIRS = [("the sky is", " blue"), ("the sky is", " red green"), ("a cat sat on", " mat and dog ran far away"),
         ("why", " is the sea blue because air scatters light"), ("", "the dog")]


def _instances(request_type: str, arguments: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=request_type, doc={}, arguments=args, idx=0) for args in arguments]


@pytest.fixture(scope="module")
def artifact_lm(tiny_llama_artifact):
    from edgecompress.runtimes.lm_eval_model import ArtifactLM

    folder, _ = tiny_llama_artifact
    return ArtifactLM(folder, batch_size=3)  # 5 requests: one padded batch of 3, one of 2


def _full_logprobs(lm, ids: list[int]) -> np.ndarray:
    """Log-softmax of the runtime's logits for the whole sequence, one unpadded prefill."""
    decoder = lm.decoder
    batch = np.asarray([ids], dtype=np.int64)
    logits, _ = decoder.forward(batch, np.ones_like(batch), np.arange(len(ids))[None], decoder.empty_cache(1))
    scores = logits[0].astype(np.float64)
    peak = scores.max(-1, keepdims=True)
    return scores - peak - np.log(np.exp(scores - peak).sum(-1, keepdims=True))


def _reference(lm, context: str, continuation: str) -> tuple[float, bool]:
    tokenizer = lm.backend_tokenizer
    context_ids = tokenizer.encode(context).ids if context else [lm.prefix_token_id]
    continuation_ids = tokenizer.encode(continuation).ids
    logprobs = _full_logprobs(lm, context_ids + continuation_ids)
    rows = logprobs[len(context_ids) - 1 : -1]  # position t predicts token t + 1
    picked = rows[np.arange(len(continuation_ids)), continuation_ids]
    return float(picked.sum()), bool((rows.argmax(-1) == continuation_ids).all())


def test_loglikelihood_matches_the_runtimes_full_sequence_logits(artifact_lm):
    answers = artifact_lm.loglikelihood(_instances("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, answers):
        expected, expected_greedy = _reference(artifact_lm, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
        assert logprob < 0


def test_is_greedy_for_the_greedy_continuation_only(artifact_lm):
    context = "the sky is"
    prompt = artifact_lm.tok_encode(context)
    greedy_ids = artifact_lm.decoder.greedy(prompt, 4)
    other = (greedy_ids[-1] + 7) % 40 + 3  # any in-vocabulary word but the argmax
    tokenizer = artifact_lm.backend_tokenizer
    greedy_text = " " + tokenizer.decode(greedy_ids)
    other_text = " " + tokenizer.decode(greedy_ids[:-1] + [other])
    assert tokenizer.encode(context + greedy_text).ids == prompt + greedy_ids  # the words round-trip
    (_, is_greedy), (_, is_not) = artifact_lm.loglikelihood(_instances("loglikelihood", [(context, greedy_text),
                                                                                      (context, other_text)]))
    assert is_greedy and not is_not


def test_context_is_truncated_from_the_left(tiny_llama_artifact):
    from edgecompress.runtimes.lm_eval_model import ArtifactLM

    folder, _ = tiny_llama_artifact
    short = ArtifactLM(folder, max_length=6)
    context, continuation = "the sky is blue because air scatters short light", " waves"
    (logprob, _), = short.loglikelihood(_instances("loglikelihood", [(context, continuation)]))
    ids = short.tok_encode(context + continuation)
    kept = ids[-7:]  # max_length inputs + the predicted last token
    assert logprob == pytest.approx(float(_full_logprobs(short, kept[:-1])[-1, kept[-1]]), abs=1e-4)


def test_a_trailing_space_moves_into_the_continuation(artifact_lm, monkeypatch):
    """lm-eval's convention on a byte-level BPE, where ' blue' and 'blue' are different tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the sky is blue", "the sky is red", "blue sky"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    monkeypatch.setattr(artifact_lm, "backend_tokenizer", bpe)
    context_ids, continuation_ids = artifact_lm._encode_pair("the sky is ", "blue")
    assert context_ids == bpe.encode("the sky is").ids
    assert context_ids + continuation_ids == bpe.encode("the sky is blue").ids
    assert bpe.decode(continuation_ids) == " blue"


def test_rolling_loglikelihood_equals_the_perplexity_paths_nll(artifact_lm, tiny_llama_artifact):
    from edgecompress.runtimes.perplexity import perplexity
    from edgecompress.runtimes.text_sources import TextSource

    folder, _ = tiny_llama_artifact
    document = "the sky is blue because air scatters short light waves more than long ones . a cat sat on mat"
    (total,) = artifact_lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(document,)]))
    # The perplexity path scores one window of the prefix token + the document: the same predictions.
    prefix = artifact_lm.backend_tokenizer.id_to_token(artifact_lm.prefix_token_id)
    n_tokens = len(artifact_lm.tok_encode(document))
    result = perplexity(folder, TextSource(f"{prefix} {document}", "document", "user"), seq_len=n_tokens + 1)
    assert result["windows"] == 1 and result["tokens_scored"] == n_tokens
    assert -total == pytest.approx(result["mean_nll"] * n_tokens, rel=1e-5)


def test_rolling_windows_score_every_token_once(tiny_llama_artifact):
    from edgecompress.runtimes.lm_eval_model import ArtifactLM
    from edgecompress.runtimes.perplexity import next_token_nll

    folder, _ = tiny_llama_artifact
    lm = ArtifactLM(folder, max_length=5, batch_size=2)
    document = "the sky is blue because air scatters short light waves more than long ones"
    ids = lm.tok_encode(document)
    (total,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(document,)]))
    # lm-eval's disjoint windows of 5 predictions: [prefix, t0..t3] -> t0..t4, then [t4..t8] -> t5..t9, and the
    # last window keeps a full context: [t8..t12] -> t10..t13. In s = [prefix] + ids, ids[a:b] are predicted by
    # the window s[b-5 : b] (the first: s[0:5]).
    s, expected = [lm.prefix_token_id] + ids, 0.0
    for a in range(0, len(ids), 5):
        b = min(a + 5, len(ids))
        window = np.asarray([s[max(0, b - 5) : b + 1]], dtype=np.int64)
        nll = next_token_nll(_full_logprobs(lm, window[0].tolist())[None], window)[0]  # causal: the last input unused
        expected -= float(nll[-(b - a):].sum())
    assert total == pytest.approx(expected, abs=1e-4)


def test_generate_until_stops_before_the_stop_string(artifact_lm):
    context = "the sky is"
    greedy_ids = artifact_lm.decoder.greedy(artifact_lm.tok_encode(context), 6)
    words = artifact_lm.tok_decode(greedy_ids).split()
    stop = words[2]
    expected = " ".join(words[: words.index(stop)])
    texts = artifact_lm.generate_until(_instances("generate_until", [(context, {"until": [stop], "max_gen_toks": 6}),
                                                                     (context, {"until": [], "max_gen_toks": 2})]))
    assert texts[0].strip() == expected
    assert texts[1] == artifact_lm.tok_decode(greedy_ids[:2])


def test_cli_runs_a_local_task_and_writes_the_results(tiny_llama_artifact, tmp_path, monkeypatch):
    from edgecompress.runtimes.lm_eval_model import ArtifactLM

    folder, _ = tiny_llama_artifact
    output = tmp_path / "results.json"
    argv = ["edgecompress", "eval", str(folder), "--tasks", TASK, "--include-path", str(TASKS_DIR), "--batch-size", "4",
            "--output", str(output)]
    code = (f"import sys\nsys.argv = {argv!r}\nimport edgecompress.cli as cli\n"
            "try:\n    cli.app()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('heavy:', sorted({'torch', 'transformers'} & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert TASK in result.stdout and "acc" in result.stdout and str(output) in result.stdout
    assert "heavy: []" in result.stdout  # the whole run, lm-eval included, stays torch-free
    results = json.loads(output.read_text())
    accuracy = results["results"][TASK]["acc,none"]
    assert results["n-samples"][TASK]["effective"] == 6 and results["config"]["artifact"] == str(folder)
    # The accuracy is the argmax of our loglikelihoods over each document's choices.
    monkeypatch.chdir(ROOT)
    docs = [json.loads(line) for line in (TASKS_DIR / f"{TASK}.jsonl").read_text().splitlines()]
    lm = ArtifactLM(folder)
    correct = 0
    for doc in docs:
        scores = lm.loglikelihood(_instances("loglikelihood", [(doc["question"], " " + c) for c in doc["choices"]]))
        correct += int(np.argmax([logprob for logprob, _ in scores]) == doc["label"])
    assert accuracy == pytest.approx(correct / len(docs))
    assert not (folder / "lm_eval.json").exists()  # --output was given


def test_an_unknown_task_is_one_line_and_writes_nothing(tiny_llama_artifact, tmp_path):
    folder, _ = tiny_llama_artifact
    before = sorted(p.name for p in folder.iterdir())
    result = run_cli("eval", str(folder), "--tasks", f"{TASK},arc_eazy", "--include-path", str(TASKS_DIR), cwd=ROOT)
    assert result.returncode == 2
    assert_one_line_error(result, "unknown lm-eval task: arc_eazy (did you mean arc_easy")
    assert "--include-path" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


def test_bad_artifact_and_settings_are_one_line_errors(tiny_llama_artifact, tmp_path):
    from edgecompress import api
    from edgecompress.errors import EdgeCompressError

    folder, _ = tiny_llama_artifact
    assert_one_line_error(run_cli("eval", str(tmp_path / "missing"), "--tasks", TASK), "is not an artifact folder")
    with pytest.raises(EdgeCompressError, match="has no report.json"):
        api.evaluate_tasks(tmp_path, TASK)
    with pytest.raises(EdgeCompressError, match="--num-fewshot"):
        api.evaluate_tasks(folder, TASK, num_fewshot=-1)
    with pytest.raises(EdgeCompressError, match="is not a folder"):
        api.evaluate_tasks(folder, TASK, include_path=tmp_path / "nope")
    with pytest.raises(EdgeCompressError, match="its folder is missing"):
        api.evaluate_tasks(folder, TASK, output=tmp_path / "no" / "results.json")
    assert_one_line_error(run_cli("eval", str(folder), "--num-fewshot", "1"), "go with --tasks")


def test_without_lm_eval_the_user_is_told_what_to_install(tiny_llama_artifact, monkeypatch):
    import builtins

    from edgecompress import api
    from edgecompress.errors import EdgeCompressError

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    folder, _ = tiny_llama_artifact
    with pytest.raises(EdgeCompressError, match=r"pip install 'edgecompress\[eval\]'") as caught:
        api.evaluate_tasks(folder, TASK)
    assert caught.value.exit_code == 2


def test_eval_help_documents_the_task_options():
    text = run_cli("eval", "--help").stdout
    for option in ("--tasks", "--num-fewshot", "--include-path", "--output", "--limit", "--batch-size"):
        assert option in text
