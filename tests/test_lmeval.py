"""`quantkit eval --tasks` through lm-evaluation-harness, offline: two tasks defined here over local JSONL files,
their metrics checked against log-likelihoods from a plain transformers forward."""

from __future__ import annotations

import copy
import json
import math
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_model

from quantkit.errors import QuantkitError

WORDS = [f"w{i}" for i in range(60)]
VOCAB = {t: i for i, t in enumerate(["<unk>", "<eos>", *WORDS])}
MC_DOCS = [
    {"question": "w1 w2 w3", "choices": ["w4", "w5 w6", "w7 w8 w9"], "answer": 1},
    {"question": "w10 w11", "choices": ["w12 w13", "w14"], "answer": 0},
    {"question": "w20 w21 w22 w23", "choices": ["w24", "w25", "w26 w27 w28 w29"], "answer": 2},
    {"question": "w30", "choices": ["w31 w32", "w33 w34 w35", "w36"], "answer": 2},
    {"question": "w40 w41 w42", "choices": ["w43", "w44 w45"], "answer": 1},
    {"question": "w50 w51", "choices": ["w52 w53 w54", "w55", "w56 w57"], "answer": 0},
]
# The harness joins a log-likelihood task's context and continuation as they are: the space is the data's.
LL_DOCS = [
    {"context": "w1 w2 w3 w4", "continuation": " w5 w6"},
    {"context": "w7 w8", "continuation": " w9"},
    {"context": "w10 w11 w12", "continuation": " w13 w14 w15"},
    {"context": "w3 w3 w3", "continuation": " w3 w3"},
]


def word_tokenizer():
    """One token per word of WORDS (ids 2..61), <unk> 0, <eos> 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def ids(text: str) -> list[int]:
    """The word tokenizer's ids, computed without it."""
    return [VOCAB[w] for w in text.split()]


def context_model():
    model = tiny_model("llama", seed=0, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so the answers depend on the context
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


@torch.no_grad()
def loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) summed over the continuation's tokens, and whether each is the argmax."""
    context_ids, cont_ids = ids(context), ids(continuation)
    full = torch.tensor([context_ids + cont_ids])
    logp = torch.log_softmax(model(input_ids=full).logits[0].double(), dim=-1)
    positions = range(len(context_ids) - 1, len(context_ids) + len(cont_ids) - 1)
    total = sum(float(logp[p, t]) for p, t in zip(positions, cont_ids))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(positions, cont_ids))
    return total, greedy


def reference_metrics(model) -> dict:
    """acc and acc_norm (log-likelihood per character) of the choice task, perplexity and acc of the other."""
    acc = acc_norm = 0
    for doc in MC_DOCS:
        lls = [loglikelihood(model, doc["question"], choice)[0] for choice in doc["choices"]]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == doc["answer"]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]  # the choice text, without the space before it
        acc_norm += max(range(len(norm)), key=lambda i: norm[i]) == doc["answer"]
    found = [loglikelihood(model, d["context"], d["continuation"]) for d in LL_DOCS]
    return {
        "acc": acc / len(MC_DOCS), "acc_norm": acc_norm / len(MC_DOCS),
        "perplexity": math.exp(-sum(ll for ll, _ in found) / len(found)),
        "greedy": sum(g for _, g in found) / len(found),
    }


def write_tasks(root: Path) -> Path:
    """Two lm-eval task YAMLs over local JSONL files: a multiple-choice task and a log-likelihood task."""
    tasks = root / "tasks"
    tasks.mkdir()
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "ll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in LL_DOCS))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (tasks / "qk_choice.yaml").write_text(
        "task: qk_choice\n" + common
        + f"dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n  cache_dir: {root / 'cache'}\n"
        + "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_target: answer\ndoc_to_choice: choices\n"
        + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (tasks / "qk_loglik.yaml").write_text(
        "task: qk_loglik\n" + common
        + f"dataset_kwargs:\n  data_files:\n    test: {root / 'll.jsonl'}\n  cache_dir: {root / 'cache'}\n"
        + "output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: continuation\n"
        + "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        + "  - metric: acc\n"
    )
    return tasks


@pytest.fixture()
def offline(monkeypatch) -> list:
    """Offline settings for the hub and datasets, and a record of every attempt to open a network connection."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    attempts: list = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network disabled in this test")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def assert_metrics(found: dict, reference: dict) -> None:
    choice, loglik = found["tasks"]["qk_choice"], found["tasks"]["qk_loglik"]
    assert choice["acc,none"] == pytest.approx(reference["acc"])
    assert choice["acc_norm,none"] == pytest.approx(reference["acc_norm"])
    assert loglik["perplexity,none"] == pytest.approx(reference["perplexity"], rel=1e-4)
    assert loglik["acc,none"] == pytest.approx(reference["greedy"])


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    out = tmp_path / "model"
    context_model().save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return out


def test_tasks_on_a_plain_model_match_a_transformers_forward(model_dir, tmp_path, offline) -> None:
    pytest.importorskip("lm_eval")
    from quantkit.cli import main

    reference = reference_metrics(context_model())
    assert 0 < reference["acc"] < 1 and reference["acc"] != reference["acc_norm"]  # the task can tell answers apart
    tasks = write_tasks(tmp_path)
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--tasks", "qk_choice,qk_loglik", "--include-path",
                                       str(tasks), "--device", "cpu", "-o", str(tmp_path / "res.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "res.json").read_text())
    assert_metrics(written, reference)
    assert "qk_choice" in result.stdout and "acc_norm" in result.stdout and "perplexity" in result.stdout
    assert offline == []


@pytest.mark.parametrize("fmt", ["gptq_v2", "compressed-tensors", "fake"])
def test_tasks_on_a_quantkit_export_evaluate_its_quantized_weights(model_dir, tmp_path, offline, fmt) -> None:
    pytest.importorskip("lm_eval")
    from quantkit.cli import main
    from quantkit.engine import calibrate_model
    from quantkit.export import save_quantized
    from quantkit.quant.spec import QuantSpec

    quantized = copy.deepcopy(context_model())
    samples = [{"input_ids": torch.tensor([ids(" ".join(WORDS[:40]))])}]
    cal = calibrate_model(quantized, samples, QuantSpec(bits=4, group_size=32), method="rtn", progress=False)
    out = save_quantized(quantized, cal.results, tmp_path / "q", fmt=fmt, source=str(model_dir))
    reference = reference_metrics(quantized)
    assert abs(reference["perplexity"] / reference_metrics(context_model())["perplexity"] - 1) > 1e-3
    tasks = write_tasks(tmp_path)
    result = CliRunner().invoke(main, ["eval", str(out), "--tasks", "qk_choice,qk_loglik", "--include-path",
                                       str(tasks), "--json"])
    assert result.exit_code == 0, result.output
    assert_metrics(json.loads(result.stdout.strip().splitlines()[-1]), reference)
    assert offline == []


def test_data_and_tasks_together_and_errors(model_dir, tmp_path, offline) -> None:
    pytest.importorskip("lm_eval")
    from quantkit.cli import main

    tasks = write_tasks(tmp_path)
    (tmp_path / "t.txt").write_text(" ".join(WORDS))
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(tmp_path / "t.txt"), "--part", "all",
                                       "--seqlen", "16", "--tasks", "qk_loglik", "--include-path", str(tasks), "--json"])
    assert result.exit_code == 0, result.output
    both = json.loads(result.stdout.strip().splitlines()[-1])
    assert both["tokens"] == 59 - 3 and "qk_loglik" in both["tasks"]  # 60 words, 4 windows of 16: 4 unscored
    for args, message in [
        (["--tasks", " , "], "--tasks names no task"),
        (["--data", str(tmp_path / "t.txt"), "--limit", "3"], "give --tasks"),
        ([], "nothing to evaluate"),
        (["--tasks", "qk_loglik", "--include-path", str(tmp_path / "none")], "is not a directory of task YAML files"),
        (["--tasks", "qk_loglik", "--device", "cuda:7"], "--device cuda:7"),
    ]:
        result = CliRunner().invoke(main, ["eval", str(model_dir), *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1


@pytest.mark.slow  # an unknown name is looked up among the harness's thousands of built-in tasks
def test_unknown_task_fails_before_the_model_loads(model_dir, tmp_path, monkeypatch) -> None:
    pytest.importorskip("lm_eval")
    from quantkit.cli import main
    from quantkit.eval import load

    monkeypatch.setattr(load, "load_for_eval", lambda *a: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--tasks", "qk_loglik,no_such_task_qk",
                                       "--include-path", str(write_tasks(tmp_path))])
    assert result.exit_code == 2 and "unknown lm-evaluation-harness task 'no_such_task_qk'" in result.output


def test_missing_harness_names_the_extra(monkeypatch, model_dir) -> None:
    from quantkit.cli import main
    from quantkit.eval.harness import import_harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(QuantkitError, match=r"pip install quantkit\[lmeval\]"):
        import_harness()
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--tasks", "hellaswag"])
    assert result.exit_code == 2 and "pip install quantkit[lmeval]" in result.output and result.output.count("\n") == 1


@pytest.mark.parametrize(("edit", "words"), [
    (lambda tasks, root: (root / "ll.jsonl").write_text(""), "the task's data yields no documents"),
    (lambda tasks, root: (root / "ll.jsonl").write_text("{not json\n"), "DatasetGenerationError"),
    (lambda tasks, root: _yaml_edit(tasks, "output_type: loglikelihood", "output_type: bogus"), "bogus"),
    (lambda tasks, root: _yaml_edit(tasks, "test_split: test", "test_split: validation"), "'validation'"),
    (lambda tasks, root: _yaml_edit(tasks, "metric: perplexity\n    aggregation: perplexity\n    higher_is_better: "
                                    "false\n  - metric: acc\n", "metric: nosuchmetric\n    aggregation: mean\n    higher_is_better: true\n"),
     "yielded no metric"),
])
def test_a_broken_task_of_ones_own_is_one_line_naming_its_yaml(model_dir, tmp_path, offline, edit, words) -> None:
    """Round 15: a task YAML or data of one's own that the harness cannot run gave its exception with --debug's hint
    (StopIteration for empty data, KeyError 'validation' for a missing split...), and a metric no harness knows gave
    exit 0 with no metric, after datasets' progress lines. Now one line naming the task's YAML and the cause."""
    pytest.importorskip("lm_eval")
    from quantkit.cli import main

    tasks = write_tasks(tmp_path)
    edit(tasks, tmp_path)
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--tasks", "qk_loglik", "--include-path", str(tasks)])
    # the harness's progress bars (a run refused after its requests began) are progress, not error lines
    lines = [line for line in result.stderr.splitlines() if line.strip() and not re.match(r"^[^|]*\d+%\|.*\|", line)]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0] and str(tasks / "qk_loglik.yaml") in lines[0] and "--debug" not in lines[0], lines[0]


def _yaml_edit(tasks: Path, old: str, new: str) -> None:
    path = tasks / "qk_loglik.yaml"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
