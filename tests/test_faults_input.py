"""Bad content and bad arguments: values with the right shape and the wrong meaning.

Each case asserts what tests/test_faults.py asserts: exit code 2 (one QuantkitError from the Python API), one
`error:` line naming what was wrong, and nothing added, removed or changed under the test's folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    VLM_FAMILIES,
    WORDS,
    assert_fault,
    make_tokenizer,
    printable_tokenizer,
    replaced,
    run_cli,
    save_tiny_llama,
    tiny_moe,
    unchanged,
    write_image_dataset,
    write_text,
)
from safetensors.torch import load_file, save_file

from quantkit.qid.laws import PUBLISHED_LAWS

# ---------------------------------------------------------------- qid


@pytest.mark.parametrize("args, fragment", [
    (["--params", "7e9", "--bits", "3", "--tokens", "1e300"], "--tokens 1e+300 is outside the range of training tokens"),
    (["--params", "7e9", "--bits", "1e9", "--tokens", "1e12"], "--bits 1e+09 is outside the range of weight bits"),
    (["--params", "7e9", "--bits", "0.5", "--tokens", "1e12"], "--bits 0.5 is outside"),
    (["--params", "-5", "--bits", "3", "--tokens", "1e12"], "--params -5 is outside"),
    (["--params", "nan", "--bits", "3", "--tokens", "1e12"], "--params must be a finite number"),
    (["--params", "7e9", "--bits", "3", "--qid", "0"], "--qid 0 is not positive"),
    (["--params", "7e9", "--bits", "3", "--qid", "500"], "--qid 500 is outside the range of QiD"),
])
def test_qid_predict_refuses_implausible_inputs(tmp_path: Path, args: list, fragment: str) -> None:
    assert_fault(tmp_path, ["qid", "predict", *args], fragment)


def test_qid_predict_refuses_an_answer_outside_any_training_run(tmp_path: Path) -> None:
    """In-range inputs whose inverse lies beyond 1e17 tokens: the law's answer (computed here by hand) is refused."""
    law = PUBLISHED_LAWS["ouyang2024-gptq"]
    n, p, q = 1e15, 16.0, 19.0
    by_hand = math.exp((math.log(q) + law.alpha * math.log(n) + law.gamma * math.log(p) - math.log(law.k)) / law.beta)
    assert by_hand > 1e17
    line = assert_fault(tmp_path, ["qid", "predict", "--params", n, "--bits", p, "--qid", q], "gives D = ")
    assert f"{by_hand:.3g}" in line


@pytest.mark.parametrize("extra, fragment", [
    (["--bits", "5"], "--bits 5 is not a width"),
    (["--bits", ","], "--bits is empty"),
    (["--methods", "GPTQ"], "did you mean 'gptq'"),
    (["--methods", ","], "no method given"),
    (["--nsamples", "0"], "--nsamples must be at least 1"),
    (["--eval-seqlen", "1"], "--eval-seqlen must be at least 2"),
    (["--eval-tokens", "0"], "--eval-tokens must be at least 2"),
    (["--group-size", "0"], "--group-size must be -1 or at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--eval-tokens", "10", "--eval-seqlen", "16"], "--eval-tokens 10 is less than one --eval-seqlen 16 window"),
])
def test_qid_measure_checks_options_before_the_checkpoint(tmp_path: Path, extra: list, fragment: str) -> None:
    """The options are refused first: the checkpoint named does not even exist."""
    assert_fault(tmp_path, ["qid", "measure", tmp_path / "no-such-ckpt", "--eval", "x", "-o", tmp_path / "q.csv",
                            *extra], fragment)


def qid_measure(work: Path, checkpoint: object, *extra) -> list:
    return ["qid", "measure", checkpoint, *replaced([
        "--eval", work / "text.txt", "--bits", "2", "--methods", "rtn", "--eval-tokens", "64", "--eval-seqlen", "16",
        "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "16", "--tokens", "1e9", "-o", work / "q.csv"], extra),
        *extra]


def test_qid_measure_checks_a_local_checkpoint_before_the_sweep(work: Path) -> None:
    """A NaN weight failed inside the sweep (its line glued to the progress bar, q.csv created), an export was
    quantized again and measured, and a revision of a local directory was ignored: each is one line before q.csv."""
    edit_tensors(work / "model", model__layers__0__mlp__up_proj__weight=poke(float("nan"), (3, 5)))
    assert_fault(work, qid_measure(work, work / "model"), "model.layers.0.mlp.up_proj.weight (decoder layer 0) holds 1 NaN")
    assert not (work / "q.csv").exists()


@pytest.mark.parametrize("broken", ["first", "second"])
@pytest.mark.parametrize("table", ["new", "resumed", "in new folders"])
def test_qid_measure_checks_every_local_checkpoint_before_the_sweep(work: Path, broken: str, table: str) -> None:
    """Two checkpoints, one with a NaN weight: refused by name, whichever of the two it is, and the table is left as it
    was (none, the earlier run's rows byte for byte, no folder made), though the second is refused only when its
    turn comes, after the first's rows (each checkpoint's values are read once, as it loads)."""
    shutil.copytree(work / "model", work / "model2")
    edit_tensors(work / ("model" if broken == "first" else "model2"),
                 model__layers__1__self_attn__o_proj__weight=poke(float("nan"), (2, 7)))
    out = work / "a" / "b" / "q.csv" if table == "in new folders" else work / "q.csv"
    earlier = b""
    if table == "resumed":  # a row of an earlier run (a healthy copy, another width), kept by the refused run
        shutil.copytree(work / "model2" if broken == "first" else work / "model", work / "model3")
        result = run_cli(*qid_measure(work, work / "model3", "--bits", "3"))
        assert result.exit_code == 0, result.output
        earlier = out.read_bytes()
        assert earlier.count(b"\n") == 2  # header + one row
    args = qid_measure(work, work / "model", "-o", out, "--no-progress")  # the second's refusal follows cells' progress
    args[3:3] = [work / "model2"]
    assert_fault(work, args, "model.layers.1.self_attn.o_proj.weight (decoder layer 1) holds 1 NaN")
    if table == "resumed":
        assert out.read_bytes() == earlier
    else:
        assert not out.exists()
        assert not (work / "a").exists()
    if table == "new":  # with progress shown, the error is a line of its own after the bar (was glued to it)
        result = run_cli(*args[:-1])
        assert result.exit_code == 2
        assert re.split(r"[\r\n]", result.stderr.rstrip("\n"))[-1].startswith("error: "), result.stderr
        assert not out.exists()


def test_qid_measure_reads_each_checkpoints_weights_once(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The finiteness check read every tensor of a later checkpoint's safetensors file up front, then its load read
    them again; each checkpoint's headers are checked up front and its values as it loads (a broken one is still
    refused with no table left: the test above). Counted: each tensor read from either file through safetensors'
    safe_open, by any module (transformers' loader included; header reads hold no tensor)."""
    import sys

    import safetensors

    shutil.copytree(work / "model", work / "model2")
    files = {(work / name / "model.safetensors").resolve(): name for name in ("model", "model2")}
    reads = []
    real = safetensors.safe_open

    class Counted:
        def __init__(self, handle, name: str) -> None:
            self.handle, self.name = handle, name

        def __enter__(self) -> Counted:
            self.handle.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.handle.__exit__(*exc)

        def get_tensor(self, key: str):
            reads.append((self.name, key))
            return self.handle.get_tensor(key)

        def get_slice(self, key: str):
            return Sliced(self.handle.get_slice(key), (self.name, key))

        def __getattr__(self, name: str):
            return getattr(self.handle, name)

    class Sliced:  # a lazy tensor: its shape and dtype are header facts, indexing reads the values
        def __init__(self, lazy, read: tuple) -> None:
            self.lazy, self.read = lazy, read

        def __getitem__(self, index):
            reads.append(self.read)
            return self.lazy[index]

        def __getattr__(self, name: str):
            return getattr(self.lazy, name)

    def counting(path, *args, **kwargs):
        handle = real(path, *args, **kwargs)
        name = files.get(Path(path).resolve())
        return Counted(handle, name) if name else handle

    for module in list(sys.modules.values()):
        if getattr(module, "safe_open", None) is real:
            monkeypatch.setattr(module, "safe_open", counting)
    args = qid_measure(work, work / "model")
    args[3:3] = [work / "model2"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    stored = sorted(load_file(work / "model" / "model.safetensors"))
    assert sorted(reads) == sorted((name, key) for name in ("model", "model2") for key in stored), sorted(reads)
    assert (work / "q.csv").read_text().count("\n") == 3  # header + one row per checkpoint


@pytest.mark.parametrize("extra, fragment", [
    (["--nsamples", "100000"], "--nsamples 100000 x --calib-seqlen 16 needs 1600000"),
    (["--eval-seqlen", "4000", "--eval-tokens", "4000"], "and one --eval-seqlen 4000 window needs 4000"),
])
def test_qid_measure_refuses_too_little_text_before_any_cell(work: Path, extra: list, fragment: str) -> None:
    """Every cell failed on too little text and its error went into q.csv, exit 0; the run's neighbour with
    enough text measures."""
    line = assert_fault(work, qid_measure(work, work / "model", *extra), fragment)
    assert "too little text" in line and not (work / "q.csv").exists()
    result = run_cli(*qid_measure(work, work / "model"))
    assert result.exit_code == 0, result.output
    import csv

    rows = list(csv.DictReader((work / "q.csv").open()))
    assert len(rows) == 1 and not rows[0].get("error") and math.isfinite(float(rows[0]["qid"])), rows


def test_qid_measure_refuses_an_export_and_a_local_revision(made: dict, tmp_path: Path) -> None:
    shutil.copy(made["text"], tmp_path / "text.txt")
    assert_fault(tmp_path, qid_measure(tmp_path, made["exports"]["compressed-tensors"]), "already quantized")
    assert_fault(tmp_path, qid_measure(tmp_path, f"{made['model']}@step-5"), "is a local directory, which has no revisions")


@pytest.mark.parametrize("tokens, fragment", [
    (["1e9", "2e9"], "a second count for every checkpoint"),
    (["m=1e9", "m=2e9"], "a second count for m"),
])
def test_qid_measure_refuses_two_token_counts_for_one_checkpoint(tmp_path: Path, tokens: list, fragment: str) -> None:
    """Three --tokens for two checkpoints were accepted: the last bare count silently won."""
    args = ["qid", "measure", tmp_path / "no-such-ckpt", "--eval", "x", "-o", tmp_path / "q.csv"]
    assert_fault(tmp_path, [*args, *(a for t in tokens for a in ("--tokens", t))], fragment)


def test_qid_training_level_refuses_an_unknown_method(tmp_path: Path) -> None:
    """--method awq with a measured --qid printed an answer (exit 0)."""
    assert_fault(tmp_path, ["qid", "training-level", tmp_path, "--law", "ouyang2024-gptq", "--bits", "3",
                            "--qid", "0.1", "--method", "awq"], "unknown --method 'awq'")


HEADER = "model,method,bits,group_size,N,D,loss_fp,loss_q,qid,eval_text\n"


@pytest.mark.parametrize("row, fragment", [
    ("m9,gptq,4,128,-2000000,2000000000,3.0,3.1,0.1,e", "line 5, column 'N': -2000000 is not a parameter count"),
    ("m9,gptq,4,128,2000000,0,3.0,3.1,0.1,e", "line 5, column 'D': 0 is not a token count"),
    ("m9,gptq,0,128,2000000,2000000000,3.0,3.1,0.1,e", "line 5, column 'bits': 0 is not a bit width"),
    ("m9,gptq,64,128,2000000,2000000000,3.0,3.1,0.1,e", "line 5, column 'bits': 64 is not a bit width"),
    ("m9,gptq,4,0,2000000,2000000000,3.0,3.1,0.1,e", "line 5, column 'group_size': 0"),
    ("m9,gptq,4,128,2000000,2000000000,-3.0,3.1,0.1,e", "line 5, column 'loss_fp'"),
    ("m9,gptq,4,128,1e30,2000000000,3.0,3.1,0.1,e", "line 5, column 'N': 1000000000000000019884624838656 is not a parameter count (between 1 and 1e+15)"),
    ("m9,gptq,4,128,2000000,1e20,3.0,3.1,0.1,e", "line 5, column 'D': 100000000000000000000 is not a token count (between 1 and 1e+17)"),
    ("m9,gptq,4,128,2000000,2000000000,3.0,2.0,0.5,e", "line 5, column 'qid': 0.5 is not loss_q - loss_fp"),
])
def test_qid_fit_stops_at_the_row_that_is_wrong(tmp_path: Path, row: str, fragment: str) -> None:
    good = [f"m{i},gptq,4,128,{10**6 * (i + 1)},{10**9 * (i + 1)},3.0,3.1,0.1,e\n" for i in range(3)]
    (tmp_path / "q.csv").write_text(HEADER + "".join(good) + row + "\n")
    assert_fault(tmp_path, ["qid", "fit", tmp_path / "q.csv", "--bootstrap", "0"], fragment)


def test_qid_fit_resample_errors_without_qid_se(tmp_path: Path) -> None:
    """--resample errors on a table with no qid_se column: refused naming the column and the alternative, no -o file."""
    good = [f"m{i},gptq,{b},128,{10**6 * (i + 1)},{10**9 * (i + 1)},3.0,3.1,0.1,e\n" for i in range(3) for b in (2, 3)]
    (tmp_path / "q.csv").write_text(HEADER + "".join(good))
    line = assert_fault(tmp_path, ["qid", "fit", tmp_path / "q.csv", "--resample", "errors", "--bootstrap", "3",
                                   "-o", tmp_path / "fit.json"], "qid_se")
    assert "--resample points" in line


@pytest.mark.parametrize("extra, fragment", [
    (["--bits", "5"], "--bits 5 is not a width"),
    (["--bits", "99", "--qid", "0.1"], "--bits 99 is outside"),
    (["--bits", "3", "--qid", "0.1", "--qid-se", "-1"], "--qid-se must be at least 0, got -1"),
    (["--bits", "3", "--data", "x", "--nsamples", "0"], "--nsamples must be at least 1"),
])
def test_qid_training_level_options(tmp_path: Path, extra: list, fragment: str) -> None:
    assert_fault(tmp_path, ["qid", "training-level", tmp_path / "m", "--law", "ouyang2024-gptq", *extra], fragment)


# ---------------------------------------------------------------- fixtures

BASE = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "32", "--json"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama, its text and an RTN export of it (compressed-tensors, fake and gptq), shared read-only."""
    root = tmp_path_factory.mktemp("input")
    model = save_tiny_llama(root / "model")
    text = write_text(root / "text.txt")
    exports = {}
    for fmt in ("compressed-tensors", "fake", "gptq"):
        exports[fmt] = root / fmt
        result = run_cli("calibrate", model, "--calib", text, *BASE, "--format", fmt, "-o", exports[fmt])
        assert result.exit_code == 0, result.output
    return {"model": model, "text": text, "exports": exports}


def calibrate(work: Path, *extra) -> list:
    """`quantkit calibrate` of the work copy with BASE, less the BASE options `extra` gives again."""
    return ["calibrate", work / "model", "--calib", work / "text.txt", *replaced(BASE, extra), "-o", work / "out", *extra]


def edit_tensors(model: Path, **edits) -> None:
    """Apply edits {key_with_dots_as__: function(tensor) -> tensor} to model.safetensors."""
    tensors = load_file(model / "model.safetensors")
    for key, edit in edits.items():
        name = key.replace("__", ".")
        tensors[name] = edit(tensors[name].clone()).contiguous()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def poke(value: float, index=(3, 5)):
    def edit(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t
    return edit


# ---------------------------------------------------------------- weights: values, not only shapes


@pytest.mark.parametrize("key, value, fragment", [
    ("model__embed_tokens__weight", float("nan"), "model.embed_tokens.weight (the embeddings) holds 1 NaN"),
    ("model__layers__1__input_layernorm__weight", float("inf"), "(decoder layer 1) holds 1 infinite"),
    ("model__layers__0__self_attn__q_proj__weight", float("-inf"), "model.layers.0.self_attn.q_proj.weight"),
    ("lm_head__weight", float("nan"), "lm_head.weight (outside the decoder layers)"),
])
@pytest.mark.parametrize("mode", ["in-memory", "low-memory", "eval"])
def test_non_finite_weights_are_refused_by_name(work: Path, key: str, value: float, fragment: str, mode: str) -> None:
    index = (3,) if "norm" in key else (3, 5)
    edit_tensors(work / "model", **{key: poke(value, index)})
    args = {"in-memory": calibrate(work), "low-memory": calibrate(work, "--low-memory"),
            "eval": ["eval", work / "model", "--data", work / "text.txt", "--seqlen", "16"]}[mode]
    assert_fault(work, args, fragment)


def test_integer_weights_are_refused_before_loading(work: Path, no_model_load) -> None:
    edit_tensors(work / "model", model__layers__0__mlp__up_proj__weight=lambda t: (t * 100).to(torch.int32))
    line = assert_fault(work, calibrate(work), "model.layers.0.mlp.up_proj.weight (decoder layer 0) is stored as I32")
    assert "float" in line


def test_loaded_model_with_nan_is_refused_through_the_api(made: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import quantkit

    model = AutoModelForCausalLM.from_pretrained(made["model"])
    with torch.no_grad():
        model.model.norm.weight[7] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError, match=r"model\.norm\.weight .* holds 1 NaN"):
        quantkit.quantize(model, data=[made["text"].read_text()], method="rtn", group_size=32, nsamples=2, seqlen=16,
                          output_dir=tmp_path / "out", progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k], ) or k == "model.norm.weight" for k in before)
    assert torch.equal(before["model.norm.weight"].nan_to_num(), after["model.norm.weight"].nan_to_num())


# ---------------------------------------------------------------- tokenizers that do not fit the embedding


def small_tokenizer(words: int):
    """A word-level tokenizer over the first `words` of helpers.WORDS (+ <unk>, <eos>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", *WORDS[:words]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_another_models_smaller_tokenizer_is_refused(work: Path, no_model_load) -> None:
    """A 22-token tokenizer beside a 64-row embedding: every id fits, but most rows would never be read."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (work / "model" / name).unlink()
    small_tokenizer(20).save_pretrained(work / "model")
    fragment = "has 22 tokens but the model's embedding holds 64"
    assert_fault(work, calibrate(work), fragment)
    assert_fault(work, ["eval", work / "model", "--data", work / "text.txt", "--seqlen", "16"], fragment)


@pytest.mark.parametrize("which, fragment", [("printable", "has 96 tokens but the model's embedding holds 64"),
                                             ("small", "has 22 tokens but the model's embedding holds 64")])
def test_api_refuses_a_tokenizer_of_another_model(made: dict, tmp_path: Path, which: str, fragment: str) -> None:
    from transformers import AutoModelForCausalLM

    import quantkit

    tokenizer = printable_tokenizer() if which == "printable" else small_tokenizer(20)
    for model in (str(made["model"]), AutoModelForCausalLM.from_pretrained(made["model"])):
        with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError, match=fragment):
            quantkit.quantize(model, tokenizer, data=[made["text"].read_text()], method="rtn", group_size=32,
                              nsamples=2, seqlen=16, output_dir=tmp_path / "out", progress=False)


# ---------------------------------------------------------------- data whose records say what they are


CHAT = [{"messages": [{"role": "user", "content": "w1 w2 w3"}, {"role": "assistant", "content": "w4 w5"}]}] * 4
TEMPLATE = ("{% for m in messages %}{{ m.content }} <eos> {% endfor %}"
            "{% if add_generation_prompt %}w0 {% endif %}")


@pytest.mark.parametrize("name, layout", [("chat.json", "lines"), ("chat.json", "array"), ("chat.txt", "lines")])
def test_chat_records_are_chats_whatever_the_suffix(work: Path, name: str, layout: str) -> None:
    """Read as text, the records would calibrate on JSON punctuation without a word; as chats, the tokenizer's
    missing chat template is named, and with --chat-template each record is one sample of its rendered length."""
    path = work / name
    path.write_text(json.dumps(CHAT) if layout == "array" else "".join(json.dumps(r) + "\n" for r in CHAT))
    assert_fault(work, ["calibrate", work / "model", "--calib", path, *BASE, "-o", work / "out"], "no chat template")
    (work / "t.jinja").write_text(TEMPLATE)
    result = run_cli("calibrate", work / "model", "--calib", path, *BASE, "--chat-template", work / "t.jinja",
                     "-o", work / "out")
    assert result.exit_code == 0, result.output
    rendered = len("w1 w2 w3 <eos> w4 w5 <eos>".split())
    assert json.loads(result.stdout)["seqlen"] == rendered  # a conversation, not a 16-token text window


@pytest.mark.parametrize("content, fragment", [
    ('{"a": 1}\n', "holds no calibration records"),
    ('[{"a": 1}]', "holds no calibration records"),
    ("[1, 2, 3]", "holds no calibration records"),
])
def test_json_that_is_no_records_is_refused_with_the_reason(work: Path, no_model_load, content: str,
                                                             fragment: str) -> None:
    (work / "data.json").write_text(content)
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "data.json", *BASE, "-o", work / "out"],
                 fragment)


@pytest.mark.parametrize("images", ["present", "missing"])
def test_image_text_records_are_refused_for_a_text_model(work: Path, no_model_load, images: str) -> None:
    """Given to a text LM, image-text records would calibrate on their captions alone."""
    pytest.importorskip("PIL")
    data = write_image_dataset(work / "vl", n=4)
    if images == "missing":
        shutil.rmtree(work / "vl" / "img")
    for suffix in (".jsonl", ".json"):
        path = Path(data).with_suffix(suffix)
        if suffix != ".jsonl":
            shutil.copy(data, path)
        assert_fault(work, ["calibrate", work / "model", "--calib", path, *BASE, "-o", work / "out"],
                     "holds image-text records, but")


def test_chat_records_inside_a_text_source_are_refused(work: Path, no_model_load) -> None:
    (work / "corpus").mkdir()
    shutil.copy(work / "text.txt", work / "corpus" / "a.txt")
    (work / "corpus" / "b.txt").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "corpus", *BASE, "-o", work / "out"],
                 "b.txt holds chat records, not plain text")


@pytest.mark.parametrize("content", ["", "\n \n\t\n", '{"text": ""}\n{"text": "  "}\n', "[]"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_empty_calibration_files_are_refused(work: Path, no_model_load, content: str, suffix: str) -> None:
    path = work / f"data{suffix}"
    path.write_text(content)
    line = assert_fault(work, ["calibrate", work / "model", "--calib", path, *BASE, "-o", work / "out"], "data")
    assert "empty" in line or "no text" in line or "no calibration records" in line or "too little" in line, line


def test_eval_on_near_empty_text_is_refused(work: Path) -> None:
    (work / "short.txt").write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10")
    for part in ("all", "heldout"):
        line = assert_fault(work, ["eval", work / "model", "--data", work / "short.txt", "--part", part,
                                   "--seqlen", "16"], "short.txt")
        assert "too little text" in line or "no text found" in line


# ---------------------------------------------------------------- exports whose files disagree


def edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("fmt, edit, fragment", [
    ("compressed-tensors",
     lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8),
     "declares 8-bit g32 weights but quantkit.json declares 4-bit g32"),
    ("compressed-tensors", lambda d: d.pop("quantization_config"), "config.json has no quantization_config"),
    ("compressed-tensors", lambda d: d["quantization_config"].update(quant_method="gptq"), "quant_method 'gptq'"),
    ("compressed-tensors", lambda d: d["quantization_config"].update(format="bogus"),
     "declares format 'bogus' where the tensors are stored 'pack-quantized'"),
    ("compressed-tensors", lambda d: d["quantization_config"]["config_groups"]["group_0"].update(input_activations={
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}),
     "disagree on the linears' input activations (quantkit.json: weight-only)"),
    ("fake", lambda d: d.update(quantization_config={"quant_method": "gptq", "bits": 4}),
     "config.json declares a quantization_config"),
    ("gptq", lambda d: d["quantization_config"].update(checkpoint_format="gptq_v2"),
     "says checkpoint_format 'gptq_v2' but quantkit.json and the stored tensors are gptq"),
    ("gptq", lambda d: d["quantization_config"].update(format="gptq_v2"), "says format 'gptq_v2'"),
])
def test_export_whose_config_disagrees_with_its_manifest(made: dict, tmp_path: Path, fmt: str, edit,
                                                         fragment: str) -> None:
    export = tmp_path / "export"
    shutil.copytree(made["exports"][fmt], export)
    edit_json(export / "config.json", edit)
    for args in (["eval", export, "--data", made["text"], "--seqlen", "16"],
                 ["export", export, "--format", "fake", "-o", tmp_path / "again"]):
        assert_fault(tmp_path, args, fragment)


def group_0(d: dict) -> dict:
    return d["quantization_config"]["config_groups"]["group_0"]


SPARSE = {"format": "sparse-bitmask", "global_sparsity": 0.5, "sparsity_structure": "unstructured",
          "targets": ["Linear"], "ignore": []}


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: group_0(d)["weights"].update(type="float"), "group group_0 declares weights type = 'float'"),
    (lambda d: group_0(d)["weights"].update(dynamic=True), "group group_0 declares weights dynamic = True"),
    (lambda d: group_0(d)["weights"].update(actorder="weight"), "declares weights actorder = 'weight'"),
    (lambda d: group_0(d)["weights"].update(actorder="group"), "cannot read (actorder: "),
    (lambda d: group_0(d)["weights"].update(type="bogus"), "group group_0 has weights compressed-tensors cannot read"),
    (lambda d: group_0(d).update(format="dense"), "group group_0 declares format 'dense'"),
    (lambda d: group_0(d).update(output_activations={"num_bits": 8, "type": "int", "strategy": "token",
                                                     "dynamic": True}), "quantizes the linears' outputs"),
    (lambda d: d["quantization_config"].update(sparsity_config=SPARSE), "declares a sparsity_config"),
    (lambda d: d["quantization_config"].update(kv_cache_scheme={"num_bits": 8, "type": "float"}),
     "declares a kv_cache_scheme"),
    (lambda d: d["quantization_config"].update(quantization_status="frozen"), "quantization_status 'frozen'"),
])
def test_compressed_tensors_config_declaring_what_the_tensors_are_not(made: dict, tmp_path: Path, edit,
                                                                      fragment: str) -> None:
    """Battery round 7: weights type 'float', a sparsity_config, ... in config.json (what plain transformers loads
    by) beside quantkit.json's int weights: eval, export and load_quantized loaded the model without a word."""
    import quantkit

    export = tmp_path / "export"
    shutil.copytree(made["exports"]["compressed-tensors"], export)
    edit_json(export / "config.json", edit)
    for args in (["eval", export, "--data", made["text"], "--seqlen", "16"],
                 ["export", export, "--format", "fake", "-o", tmp_path / "again"]):
        line = assert_fault(tmp_path, args, fragment)
        assert "export it again" in line
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError, match=re.escape(fragment)):
        quantkit.load_quantized(export)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fake"])
def test_export_whose_tensors_disagree_with_its_manifest(made: dict, tmp_path: Path, fmt: str) -> None:
    """quantkit.json and config.json both say 8 bits; the tensors were written at 4."""
    export = tmp_path / "export"
    shutil.copytree(made["exports"][fmt], export)
    edit_json(export / "quantkit.json", lambda d: d["spec"].update(bits=8))
    if fmt == "compressed-tensors":
        edit_json(export / "config.json",
                  lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8))
    assert_fault(tmp_path, ["eval", export, "--data", made["text"], "--seqlen", "16"],
                 "stored tensors do not fit the 8-bit g32 setting")


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fake"])
@pytest.mark.parametrize("stray", ["model.layers.9.mlp.up_proj.weight", "model.norm.extra"])
def test_export_with_a_stray_tensor_is_refused_at_read(made: dict, tmp_path: Path, fmt: str, stray: str) -> None:
    """`quantkit export` copied a tensor no layer of the model holds (exit 0; eval refused it only once loaded):
    every reader refuses it by name; the same export without it converts."""
    import quantkit

    export = tmp_path / "export"
    shutil.copytree(made["exports"][fmt], export)
    result = run_cli("export", export, "--format", "fake", "-o", tmp_path / "plain")
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "plain")
    tensors = load_file(export / "model.safetensors")
    save_file({**tensors, stray: torch.zeros(4, 4)}, export / "model.safetensors", metadata={"format": "pt"})
    fragment = f"tensor {stray} does not belong to a LlamaForCausalLM model"
    for args in (["export", export, "--format", "fake", "-o", tmp_path / "again"],
                 ["eval", export, "--data", made["text"], "--seqlen", "16"]):
        assert_fault(tmp_path, args, fragment)
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError, match=re.escape(fragment)):
        quantkit.load_quantized(export)


# ---------------------------------------------------------------- eval


@pytest.mark.parametrize("offline, fragment", [
    ("0", "--tasks qk_remote reads dataset quantkit-no-such-org/no-such-data-3141 not found"),
    ("1", "--tasks qk_remote reads dataset quantkit-no-such-org/no-such-data-3141, which the cache does not hold, "
          "and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE forbid fetching it"),
])
def test_eval_tasks_with_an_unreachable_dataset_is_one_line_before_the_model(work: Path, monkeypatch, offline: str,
                                                                            fragment: str) -> None:
    """Offline (no network, or HF_HUB_OFFLINE=1): one line before the model loads, not the harness's retries or
    datasets' OfflineModeIsEnabled after it."""
    pytest.importorskip("lm_eval")
    from quantkit.eval import load

    monkeypatch.setattr(load, "load_for_eval", lambda *a: pytest.fail("the model was loaded"))
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    (work / "tasks").mkdir()
    (work / "tasks" / "qk_remote.yaml").write_text(
        "task: qk_remote\ndataset_path: quantkit-no-such-org/no-such-data-3141\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: continuation\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "metadata:\n  version: 1.0\n")
    started = time.perf_counter()
    assert_fault(work, ["eval", work / "model", "--tasks", "qk_remote", "--include-path", work / "tasks"], fragment)
    assert time.perf_counter() - started < 30


def test_calibration_part_is_in_the_report_and_the_card(made: dict, tmp_path: Path) -> None:
    result = run_cli("calibrate", made["model"], "--calib", made["text"], *BASE, "--part", "train",
                     "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["part"] == "train"
    assert json.loads((tmp_path / "out" / "quantkit_report.json").read_text())["part"] == "train"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "part: train" in card and "the train part" in card


# ---------------------------------------------------------------- the API as strict as the CLI


API_CASES = [
    ({"method": "GPTQ"}, "method (--method) must be one of 'rtn', 'gptq', 'tlq'; did you mean 'gptq'? got 'GPTQ'"),
    ({"seed": "zero"}, "seed (--seed) must be an integer, got 'zero' (str)"),
    ({"seed": -1}, "seed (--seed) must be at least 0"),
    ({"group_size": None}, "group_size (--group-size) must be an integer, got None"),
    ({"group_size": "64"}, "group_size (--group-size) must be an integer, got '64' (str)"),
    ({"group_size": 0}, "group_size (--group-size) must be -1 or at least 1, got 0"),
    ({"nsamples": 1.5}, "nsamples (--nsamples) must be an integer, got 1.5 (float)"),
    ({"nsamples": True}, "nsamples (--nsamples) must be an integer, got True (bool)"),
    ({"seqlen": 1}, "seqlen (--seqlen) must be at least 2"),
    ({"output_dir": 5}, "output_dir (-o) must be a path"),
    ({"bits": 4.0}, "bits (--bits) must be one of 2, 3, 4, 8; got 4.0 (float)"),
    ({"bits": "4"}, "did you mean 4?"),
    ({"sym": "yes"}, "sym (--sym) must be True or False, got 'yes' (str)"),
    ({"damp": "0.01"}, "damp (--damp) must be a finite number, got '0.01' (str)"),
    ({"damp": 1.0}, "damp (--damp) must be >= 0 and < 1, got 1"),
    ({"part": "HeldOut"}, "did you mean 'heldout'?"),
    ({"dtype": "fp16"}, "dtype (--dtype) must be one of 'auto', 'float32', 'float16', 'bfloat16'"),
    ({"format": "GPTQ"}, "did you mean 'gptq'?"),
    ({"smooth": "TLQ"}, "did you mean 'tlq'?"),
    ({"act_bits": "8"}, "act_bits (--act-bits) must be one of 4, 8; did you mean 8?"),
    ({"device": 0}, "device (--device) must be a non-empty string, got 0 (int)"),
    ({"nproc": "2"}, "nproc (--nproc) must be an integer"),
    ({"devices": "0,1"}, "devices (--devices) must be a list of GPU ids"),
    ({"devices": []}, "devices (--devices) is empty"),  # was taken as not given (round 11's --devices '', API side)
    ({"dist_timeout": 0}, "dist_timeout (--dist-timeout) must be > 0"),
    ({"low_memory": "yes"}, "low_memory (--low-memory) must be True or False"),
    ({"chat_template": 5}, "chat_template (--chat-template) must be a path"),
    ({"importance": {"lamda": 0.5}}, "unknown importance option 'lamda'; did you mean 'lam'?"),
    ({"importance": "fast"}, "importance must be a dict of TLQ's options"),
    ({"importance": {"lam": "0.1"}}, "importance['lam'] (--lam) must be a finite number"),
    ({"nproces": 2}, "unknown option 'nproces'; did you mean 'nproc'?"),
    ({"calib_set": "set"}, "--calib (data=) and --calib-set (calib_set=) are two sources of samples"),
    ({"private": True}, "--private (private=) makes the hub repo of --push-to-hub private"),
    ({"model": None}, "model must be a model directory, a hub id or a loaded transformers model"),
    ({"model": 123}, "got 123 (int)"),
    ({"model": "LINEAR"}, "got a torch Linear without a transformers config"),
    ({"tokenizer_or_processor": "abc"}, "tokenizer_or_processor must be a transformers tokenizer or processor"),
    ({"tokenizer_or_processor": 42}, "got 42 (int)"),
]


@pytest.mark.parametrize("changes, fragment", API_CASES, ids=[str(c) for c, _ in API_CASES])
def test_every_quantize_argument_is_checked_at_the_boundary(made: dict, tmp_path: Path, no_model_load, changes: dict,
                                                            fragment: str) -> None:
    """One QuantkitError on one line, naming the argument (and its flag), before the model loads; nothing written."""
    import quantkit

    args = dict(model=str(made["model"]), data=str(made["text"]), method="rtn", group_size=32, nsamples=2, seqlen=16,
                output_dir=tmp_path / "out", progress=False)
    args.update(changes)
    if args["model"] == "LINEAR":
        args["model"] = torch.nn.Linear(4, 4)
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError) as caught:
        quantkit.quantize(**args)
    assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_load_quantized_checks_its_argument(tmp_path: Path) -> None:
    import quantkit

    for bad in (5, None, ""):
        with pytest.raises(quantkit.QuantkitError, match=r"load_quantized\(path\) must be a path"):
            quantkit.load_quantized(bad)


# ---------------------------------------------------------------- options that contradict each other (CLI)


@pytest.fixture(scope="module")
def calibration_set(made: dict, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("set") / "set"
    result = run_cli("importance", made["model"], "--calib", made["text"], "--nsamples", "2", "--seqlen", "16",
                     "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("extra, fragment", [
    (["--calib", "TEXT"], "--calib (data=) and --calib-set (calib_set=) are two sources of samples; give one"),
    (["--nsamples", "64"], "--nsamples 64 does not apply to --calib-set"),
    (["--seqlen", "8"], "--seqlen 8 does not apply to --calib-set"),
    (["--part", "train"], "--part train does not apply to --calib-set"),
])
def test_data_options_beside_a_calibration_set_are_refused(work: Path, calibration_set: Path, no_model_load,
                                                           extra: list, fragment: str) -> None:
    """The set holds 2 samples of 16 tokens: other sample settings were silently replaced by the set's."""
    extra = [work / "text.txt" if e == "TEXT" else e for e in extra]
    assert_fault(work, ["calibrate", work / "model", "--calib-set", calibration_set, "--method", "gptq",
                        "--group-size", "32", "-o", work / "out", *extra], fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--private"], "--private (private=) makes the hub repo of --push-to-hub private"),
    (["--dist-timeout", "0"], "--dist-timeout must be above 0, got 0"),
    (["--bits", "3", "--format", "gptq_v2"], "output width 16 does not fill them"),
])
def test_contradictory_options_before_anything(work: Path, no_model_load, extra: list, fragment: str) -> None:
    assert_fault(work, calibrate(work, *extra), fragment)


def test_no_calibration_data_is_said_in_the_clis_words(work: Path, no_model_load) -> None:
    line = assert_fault(work, ["calibrate", work / "model", "--method", "gptq", "-o", work / "out"],
                        "no calibration data: gptq reads activations; give --calib PATH")
    assert "--calib-set DIR" in line and "--method rtn, which rounds each weight alone and needs none" in line


@pytest.mark.parametrize("command", ["calibrate", "importance"])
def test_offload_dir_inside_an_input_is_refused(work: Path, no_model_load, command: str) -> None:
    """Scratch files must not land in the model's directory (nor stay there when a run is killed)."""
    common = [work / "model", "--calib", work / "text.txt", "--nsamples", "2", "--seqlen", "16"]
    extra = [*BASE[BASE.index("--group-size"):], "--low-memory"] if command == "calibrate" else []
    out = work / ("out" if command == "calibrate" else "set")
    assert_fault(work, [command, *common, *extra, "--offload-dir", work / "model" / "scratch", "-o", out],
                 "is inside")


def test_export_private_without_push_is_refused(made: dict, tmp_path: Path) -> None:
    assert_fault(tmp_path, ["export", made["exports"]["fake"], "--format", "compressed-tensors", "-o", tmp_path / "x",
                            "--private"], "--private makes the hub repo of --push-to-hub private")


# ---------------------------------------------------------------- the battery's third round (benchmarks/fault_battery.py)


@pytest.mark.parametrize("command", ["calibrate", "importance"])
def test_an_already_quantized_checkpoint_is_refused_as_the_model(made: dict, tmp_path: Path, command: str) -> None:
    """An export's packed codes are no model to quantize (calibrate raised an AttributeError from the solver's
    layer; importance ran on it and wrote a set)."""
    export = made["exports"]["compressed-tensors"]
    extra = BASE[: BASE.index("--json")] if command == "calibrate" else ["--nsamples", "2", "--seqlen", "16"]
    assert_fault(tmp_path, [command, export, "--calib", made["text"], *extra, "-o", tmp_path / "out"],
                 "is already quantized (its config.json has a compressed-tensors quantization_config)")


def test_the_api_refuses_an_already_quantized_checkpoint(made: dict, tmp_path: Path) -> None:
    import quantkit

    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError, match="is already quantized"):
        quantkit.quantize(str(made["exports"]["compressed-tensors"]), data=str(made["text"]), method="rtn", nsamples=2,
                          seqlen=16, group_size=32, progress=False, output_dir=str(tmp_path / "out"))


@pytest.mark.parametrize("call, fragment", [
    (lambda q: q.Override(targets=[], bits=4), "must be a module-name pattern or a non-empty list of them"),
    (lambda q: q.Recipe(ignore=[]).overrides, None),  # an empty ignore list is no ignore at all: allowed
    (lambda q: q.Recipe.from_yaml(5), "Recipe.from_yaml(path) must be a path"),
])
def test_recipe_objects_check_their_arguments(call, fragment: str | None) -> None:
    import quantkit

    if fragment is None:
        assert call(quantkit) == ()
        return
    with pytest.raises(quantkit.QuantkitError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        call(quantkit)


@pytest.mark.parametrize("args, fragment", [
    (["eval", "MODEL", "--data", "TEXT", "--seqlen", "16", "-o", "TEXT/r.json"], "which is a file"),
    (["qid", "fit", "Q", "-o", "TEXT/fit.json"], "which is a file"),
])
def test_a_result_file_under_a_file_is_refused_before_the_work(made: dict, tmp_path: Path, args: list,
                                                               fragment: str) -> None:
    """eval scored the whole text, then failed writing its JSON with a FileExistsError."""
    text = shutil.copy(made["text"], tmp_path / "text.txt")
    (tmp_path / "q.csv").write_text(HEADER + "m,gptq,4,128,1000000,1000000000,3.0,3.1,0.1,e\n")
    names = {"MODEL": str(made["model"]), "TEXT": str(text), "Q": str(tmp_path / "q.csv")}
    args = [next((v + a[len(k):] for k, v in names.items() if a.startswith(k)), a) for a in args]
    assert_fault(tmp_path, args, fragment)


def test_qid_fit_of_a_binary_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "q.csv").write_bytes(bytes(range(256)) * 4)
    assert_fault(tmp_path, ["qid", "fit", tmp_path / "q.csv"], "is not UTF-8 text (byte 128)")


@pytest.mark.parametrize("args, fragment", [
    (["plan", "EXPORT", "--calib", "TEXT"], "is already quantized"),
    (["plan", "MODEL", "--calib", "GONE"], "gone.txt"),
    (["calibrate", "MODEL", "--method", "rtn", "--bits", "8", "--group-size", "-1", "--act-bits", "8", "--smooth",
      "uniform", "-o", "OUT"], "no calibration data: smoothing (--smooth) reads activations; give --calib PATH"),
])
def test_fourth_round_refusals(made: dict, tmp_path: Path, args: list, fragment: str) -> None:
    """A plan of a run calibrate would refuse is refused (it printed a plan of an export's packed codes, or of a
    missing --calib); a run without data names what reads activations (it said 'rtn reads activations')."""
    names = {"EXPORT": str(made["exports"]["compressed-tensors"]), "MODEL": str(made["model"]),
             "TEXT": str(made["text"]), "GONE": str(tmp_path / "gone.txt"), "OUT": str(tmp_path / "out")}
    line = assert_fault(tmp_path, [names.get(a, a) for a in args], fragment)
    assert "--method rtn, which" not in line or "gptq" in args


# ---------------------------------------------------------------- options the chosen method does not read

UNREAD = [  # (CLI flags, quantkit.quantize options, what the one line names)
    (["--method", "rtn", "--cd-sweeps", "3"], {"method": "rtn", "cd_sweeps": 3}, "--cd-sweeps (cd_sweeps=) has no effect with rtn"),
    (["--method", "rtn", "--damp", "0.5"], {"method": "rtn", "damp": 0.5}, "--damp (damp=) has no effect with rtn"),
    (["--method", "rtn", "--lam", "0.5"], {"method": "rtn", "importance": {"lam": 0.5}}, "--lam (importance="),
    (["--method", "rtn", "--all-experts"], {"method": "rtn", "expert_tokens": "all"}, "--expert-tokens (expert_tokens=) has no effect with rtn"),
    (["--method", "rtn", "--expert-tokens", "mix"], {"method": "rtn", "expert_tokens": "mix"},
     "--expert-tokens (expert_tokens=) has no effect with rtn"),
    (["--method", "gptq", "--guidance", "linear"], {"method": "gptq", "importance": {"guidance": "linear"}},
     "--guidance (importance={'guidance': ...}) has no effect with gptq"),
    (["--method", "gptq", "--importance-loss", "fisher"], {"method": "gptq", "importance": {"loss": "fisher"}},
     "--importance-loss (importance={'loss': ...}) has no effect with gptq"),
]


@pytest.mark.parametrize("flags, options, fragment", UNREAD)
def test_an_option_the_method_does_not_read_is_refused(work: Path, no_model_load, flags: list, options: dict,
                                                      fragment: str) -> None:
    import quantkit
    from quantkit.errors import QuantkitError

    result = run_cli(*calibrate(work, *flags))
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "drop it" in result.output
    assert not (work / "out").exists()
    with pytest.raises(QuantkitError, match=re.escape(fragment)):
        quantkit.quantize(str(work / "model"), data=str(work / "text.txt"), output_dir=str(work / "api"), nsamples=2,
                          seqlen=16, group_size=32, **options)
    assert not (work / "api").exists()


def test_defaults_of_unread_options_pass() -> None:
    """Options left at (or set to) their defaults are not refused, whichever method reads them."""
    from quantkit.calibrate.job import build_job
    from quantkit.importance import TLQ_DEFAULTS

    job = build_job("any/model", None, method="rtn", damp=0.01, cd_sweeps=0, expert_tokens=None, importance=TLQ_DEFAULTS)
    assert job.quantization.method.name == "rtn"
    build_job("any/model", "text.txt", method="gptq", damp=0.2, cd_sweeps=2, expert_tokens="all")


def test_chat_template_without_data_is_refused(work: Path, no_model_load) -> None:
    (work / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    result = run_cli("calibrate", work / "model", *BASE, "--chat-template", work / "t.jinja", "-o", work / "out")
    assert result.exit_code == 2, result.output
    assert "--chat-template (chat_template=) renders chat calibration records, and this rtn run reads no data" in result.output
    assert not (work / "out").exists()


def test_importance_options_with_a_calibration_set_are_refused() -> None:
    from quantkit.calibrate.job import build_job
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match=r"--lam \(importance=\{'lam': \.\.\.\}\) has no effect with --calib-set s: "
                                            "the set brings its token weights"):
        build_job("any/model", None, method="tlq", calib_set="s", importance={"lam": 0.3})


@pytest.mark.parametrize("flags", [["--all-experts"], ["--expert-tokens", "mix"]])
def test_expert_tokens_on_a_model_without_experts_is_refused_before_loading(work: Path, no_model_load, flags) -> None:
    result = run_cli(*calibrate(work, "--method", "gptq", *flags))
    assert result.exit_code == 2, result.output
    assert "--expert-tokens (expert_tokens=) has no effect on" in result.output and "llama layers have no mixture of experts" in result.output
    assert not (work / "out").exists()


def test_all_experts_beside_another_expert_tokens_is_refused(work: Path, no_model_load) -> None:
    result = run_cli(*calibrate(work, "--method", "gptq", "--all-experts", "--expert-tokens", "mix"))
    assert result.exit_code == 2, result.output
    assert "--all-experts is --expert-tokens all, and --expert-tokens mix is given too; give one" in result.output
    assert not (work / "out").exists()


# ---------------------------------------------------------------- files beside the model and the recipe


RTN_ONLY = ["--method", "rtn", "--group-size", "32", "--json"]
GPTQ = ["--method", "gptq", "--nsamples", "2", "--seqlen", "16", "--group-size", "32", "--json"]


@pytest.mark.parametrize("content, fragment", [
    (bytes(range(128, 256)) * 2, "is not UTF-8 text"),
    (b"ignore: [o_proj]\nignore: [q_proj]\n", "key 'ignore' is given twice (line 2)"),
    (b"overrides:\n  - targets: [o_proj]\n    bits: 8\n    bits: 3\n", "key 'bits' is given twice (line 4)"),
])
def test_a_recipe_that_cannot_be_read_as_written_is_refused(work: Path, no_model_load, content: bytes,
                                                           fragment: str) -> None:
    """YAML keeps the last of two equal keys: the first `ignore` would be dropped and its layers quantized."""
    from quantkit.errors import QuantkitError
    from quantkit.quant.recipe import Recipe

    (work / "r.yaml").write_bytes(content)
    line = assert_fault(work, ["calibrate", work / "model", *RTN_ONLY, "--recipe", work / "r.yaml", "-o", work / "out"],
                        fragment)
    assert "r.yaml" in line
    with pytest.raises(QuantkitError, match=fragment.split(" (")[0]):
        Recipe.from_yaml(work / "r.yaml")


def test_a_calibration_recipe_with_a_key_given_twice_is_refused(work: Path, no_model_load) -> None:
    (work / "c.yaml").write_text(f"sources:\n  - path: {work / 'text.txt'}\nsources:\n  - path: {work / 'model'}\n")
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "c.yaml", *GPTQ, "-o", work / "out"],
                 "key 'sources' is given twice")


@pytest.mark.parametrize("edit", ["garbage", "deleted"])
def test_rtn_refuses_a_tokenizer_that_does_not_load(work: Path, no_model_load, edit: str) -> None:
    """An RTN run reads no text, but its export copies the tokenizer: one that cannot load must not be copied."""
    model = work / "model"
    if edit == "garbage":
        (model / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    else:
        (model / "tokenizer.json").unlink()
    assert_fault(work, ["calibrate", model, *RTN_ONLY, "-o", work / "out"], "cannot load a tokenizer")


def test_a_broken_generation_config_is_refused_not_copied(work: Path, no_model_load) -> None:
    (work / "model" / "generation_config.json").write_text("{bad json")
    assert_fault(work, ["calibrate", work / "model", *RTN_ONLY, "-o", work / "out"],
                 "generation_config.json is not valid JSON")


@pytest.mark.parametrize("positions", [0, -1])
def test_seqlen_against_a_nonpositive_max_position_embeddings(work: Path, no_model_load, positions: int) -> None:
    edit_json(work / "model" / "config.json", lambda d: d.update(max_position_embeddings=positions))
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "text.txt", *GPTQ, "-o", work / "out"],
                 f"max_position_embeddings {positions}")


def test_a_text_record_with_empty_text_among_good_ones_is_refused(work: Path, no_model_load) -> None:
    words = (work / "text.txt").read_text().split()
    records = [{"text": " ".join(words[i * 50:(i + 1) * 50])} for i in range(5)] + [{"text": ""}] * 3
    (work / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "d.jsonl", *GPTQ, "-o", work / "out"],
                 "d.jsonl:6: field 'text' is empty")


def test_a_chat_role_outside_system_user_assistant_is_refused(work: Path, no_model_load) -> None:
    wizard = {"messages": [{"role": "wizard", "content": "w1 w2"}, {"role": "assistant", "content": "w4 w5"}]}
    (work / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*CHAT, wizard]))
    (work / "t.jinja").write_text(TEMPLATE)
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "c.jsonl", *GPTQ, "--chat-template",
                        work / "t.jinja", "-o", work / "out"], "c.jsonl:5: role 'wizard' is not one of system, user")


# ---------------------------------------------------------------- third fresh battery: config and tokenizer content


def api_quantize(model, tmp_path: Path, **options) -> None:
    """quantkit.quantize with the tests' small settings (RTN unless told), writing under tmp_path/api."""
    import quantkit

    settings = {"method": "rtn", "group_size": 32, "nsamples": 2, "seqlen": 16, "progress": False, **options}
    quantkit.quantize(model, output_dir=tmp_path / "api", **settings)


def test_a_tied_config_whose_checkpoint_stores_another_head_is_refused(work: Path) -> None:
    """tie_word_embeddings true beside a stored lm_head of other values: transformers (checked here) keeps the two
    apart, a loader that follows the config ties them; quantkit refuses by tensor name from files and from a loaded
    model, and accepts a stored head equal to the embedding (transformers ties that)."""
    from transformers import AutoModelForCausalLM

    from quantkit.errors import QuantkitError
    from quantkit.models.files import check_model_files

    edit_json(work / "model" / "config.json", lambda d: d.update(tie_word_embeddings=True))
    fragment = "lm_head.weight is stored apart from model.embed_tokens.weight with other values"
    assert_fault(work, calibrate(work), fragment)
    loaded = AutoModelForCausalLM.from_pretrained(work / "model")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    for model in (str(work / "model"), loaded):
        with unchanged(work), pytest.raises(QuantkitError, match=fragment):
            api_quantize(model, work, data=str(work / "text.txt"))
    edit_tensors(work / "model", lm_head__weight=lambda t: load_file(work / "model" / "model.safetensors")[
        "model.embed_tokens.weight"])
    check_model_files(str(work / "model"))  # equal values: one tensor, as transformers ties it


@pytest.mark.parametrize("text, share", [("zzz " * 3000, "3000 of the text's 3000 tokens (100%)"),
                                         (" ".join(["zzz", "yyy", "w1"] * 1000), "(67%)")])
def test_calibration_text_the_tokenizer_cannot_read_is_refused(work: Path, text: str, share: str) -> None:
    """Words outside the vocabulary are all one <unk> token: calibrating on them is calibrating on one token."""
    from quantkit.errors import QuantkitError

    (work / "unk.txt").write_text(text)
    fragment = f"{share} are the tokenizer's unknown token '<unk>'"
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "unk.txt", *GPTQ, "-o", work / "out"], fragment)
    for data in (str(work / "unk.txt"), [text[i:i + 400] for i in range(0, 4000, 400)]):
        with unchanged(work), pytest.raises(QuantkitError, match=re.escape("are the tokenizer's unknown token")):
            api_quantize(str(work / "model"), work, method="gptq", data=data)


def test_text_with_a_minority_of_unknown_words_is_read() -> None:
    """The limit is half: 40% unknown tokens pass (counted by hand over the word-level vocabulary)."""
    from helpers import make_tokenizer

    from quantkit.data.samples import tokenize_documents

    words = ["zzz", "w1", "w2", "yyy", "w3"] * 20
    ids = tokenize_documents([" ".join(words)], make_tokenizer())
    assert int((ids == 0).sum()) == 40 and ids.numel() == 100


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.update(rms_norm_eps=-1.0), "config field rms_norm_eps is -1.0"),
    (lambda d: d.update(rms_norm_eps=0.0), "config field rms_norm_eps is 0.0"),
    (lambda d: d.update(rms_norm_eps=float("nan")), "config field rms_norm_eps is nan"),
    (lambda d: d["rope_parameters"].update(rope_theta=-10000.0), "config field rope_parameters.rope_theta is -10000.0"),
    (lambda d: d.update(rope_parameters={"rope_type": "linear", "factor": -2.0, "rope_theta": 10000.0}),
     "config field rope_parameters.factor is -2.0"),
    (lambda d: d.update(num_key_value_heads=3), "config field num_key_value_heads is 3; it must divide"),
    (lambda d: d.update(bos_token_id=-5), "config field bos_token_id is -5; a token id is a row of the embedding"),
    (lambda d: d.update(eos_token_id=[2, -1]), "config field eos_token_id is [2, -1]; a token id is a row"),
])
def test_config_values_no_model_runs_with_are_refused_by_field(work: Path, no_model_load, edit, fragment: str) -> None:
    """transformers builds these models (negative eps and theta: NaN in every layer; RTN exported them quietly)."""
    from quantkit.errors import QuantkitError

    edit_json(work / "model" / "config.json", edit)
    assert_fault(work, ["calibrate", work / "model", *RTN_ONLY, "-o", work / "out"], fragment)
    assert_fault(work, ["eval", work / "model", "--data", work / "text.txt", "--seqlen", "16"], fragment)
    with unchanged(work), pytest.raises(QuantkitError, match=re.escape(fragment)):
        api_quantize(str(work / "model"), work)


def built_llama(**fields):
    from helpers import tiny_model

    return tiny_model("llama", 0, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, **fields)


def test_a_loaded_model_with_a_negative_norm_epsilon_is_refused(tmp_path: Path) -> None:
    from helpers import make_tokenizer

    from quantkit.errors import QuantkitError

    with unchanged(tmp_path), pytest.raises(QuantkitError, match=re.escape("config field rms_norm_eps is -1e-05")):
        api_quantize(built_llama(rms_norm_eps=-1e-5), tmp_path, tokenizer_or_processor=make_tokenizer())


def test_a_model_built_in_memory_without_a_tokenizer_is_refused_at_once(tmp_path: Path) -> None:
    """It has no files: its class name was looked up on the hub as a model id (half a minute of retries)."""
    from quantkit.errors import QuantkitError

    with unchanged(tmp_path), pytest.raises(QuantkitError, match="LlamaForCausalLM given was not loaded from files"):
        api_quantize(built_llama(), tmp_path)


@pytest.mark.parametrize("name, fragment", [
    ("NoSuchTokenizer", "tokenizer_class 'NoSuchTokenizer' is no tokenizer class of transformers"),
    (42, "tokenizer_class is 42, not a class name"),
    ("GPT2Tokenizer", "(GPT2Tokenizer) cannot read its own vocabulary: text decoded from 60 of its tokens encodes "
                      "to no tokens"),
])
def test_a_tokenizer_class_that_does_not_fit_is_refused(work: Path, no_model_load, name, fragment: str) -> None:
    """An unknown class is silently replaced by the generic tokenizer (and renamed in the export); a known one that
    does not fit tokenizer.json (GPT-2's over a word-level file) encodes every text to nothing. RTN reads no text,
    but copies the tokenizer into its export."""
    from quantkit.errors import QuantkitError

    edit_json(work / "model" / "tokenizer_config.json", lambda d: d.update(tokenizer_class=name))
    assert_fault(work, ["calibrate", work / "model", *RTN_ONLY, "-o", work / "out"], fragment)
    assert_fault(work, calibrate(work), fragment)
    with unchanged(work), pytest.raises(QuantkitError, match=re.escape(fragment)):
        api_quantize(str(work / "model"), work)


# ---------------------------------------------------------------- fifth round (battery helper): arguments and files


@pytest.mark.parametrize("args, fragment", [
    (["plan", "MODEL", "--calib", "TEXT", "--method", "rtn", "--host-mem", "1e400"], "cannot read '1e400' as an amount"),
    (["plan", "MODEL", "--calib", "TEXT", "--method", "rtn", "--gpu-mem", "inf"], "cannot read 'inf' as an amount"),
    (["qid", "fit", "TABLE", "--estimator", "huber", "--huber-delta", "nan"], "--huber-delta must be a finite number, got nan"),
    (["calibrate", "MODEL", "--method", "rtn", "--group-size", "32", "--recipe", "RECIPE", "-o", "OUT"],
     "recipe targets is [], which names no linear"),
])
def test_fifth_round_cli_values(made: dict, tmp_path: Path, args: list, fragment: str) -> None:
    """1e400 and inf overflowed int() (OverflowError), a NaN delta reached the solver (LinAlgError), and an empty
    targets list quantized every linear."""
    (tmp_path / "q.csv").write_text(HEADER + "".join(f"m{i},gptq,4,128,{10**6 * (i + 1)},{10**9 * (i + 1)},3.0,3.1,0.1,"
                                                     "e\n" for i in range(4)))
    (tmp_path / "r.yaml").write_text("targets: []\n")
    names = {"MODEL": str(made["model"]), "TEXT": str(made["text"]), "TABLE": str(tmp_path / "q.csv"),
             "RECIPE": str(tmp_path / "r.yaml"), "OUT": str(tmp_path / "out")}
    assert_fault(tmp_path, [names.get(a, a) for a in args], fragment)


@pytest.mark.parametrize("args, fragment", [
    (["plan", "MODEL", "--calib", "TEXT", "--method", "rtn", "--quantize-vision"],
     "llama models have no vision side to quantize; drop --quantize-vision"),
    (["importance", "MODEL", "--calib", "TEXT", "--nsamples", "2", "--seqlen", "16", "-o", "OUT", "--fisher-draws", "2"],
     "add --importance-loss fisher or drop --fisher-draws"),
    (["calibrate", "MODEL", "--calib", "TEXT", "--method", "rtn", "--bits", "8", "--group-size", "-1", "--act-bits", "4",
      "-o", "OUT"], "W8A4: inputs narrower than the weights"),
    (["plan", "MODEL", "--calib", "TEXT", "--method", "rtn", "--bits", "8", "--group-size", "-1", "--act-bits", "4"],
     "W8A4: inputs narrower than the weights"),
    (["qid", "fit", "TABLE", "--bootstrap", "0", "--huber-delta", "0.5"], "qid fit would ignore --huber-delta"),
    (["qid", "fit", "TABLE", "--bootstrap", "0", "--estimator", "huber", "--no-misfit"], "qid fit would ignore --no-misfit"),
    (["qid", "fit", "TABLE", "--bootstrap", "0", "--resample", "errors"], "qid fit would ignore --resample"),
    (["qid", "fit", "TABLE", "--bootstrap", "0", "--seed", "3"], "qid fit would ignore --seed"),
])
def test_seventh_round_ignored_or_contradicting_options(made: dict, tmp_path: Path, args: list, fragment: str) -> None:
    """Each exited 0 having ignored an option (calibrate refused the same where it applies), or ran W8A4, which no
    kernel runs."""
    (tmp_path / "q.csv").write_text(HEADER + "".join(f"m{i},gptq,4,128,{10**6 * (i + 1)},{10**9 * (i + 1)},3.0,3.1,0.1,"
                                                     "e\n" for i in range(4)))
    names = {"MODEL": str(made["model"]), "TEXT": str(made["text"]), "TABLE": str(tmp_path / "q.csv"),
             "OUT": str(tmp_path / "out")}
    assert_fault(tmp_path, [names.get(a, a) for a in args], fragment)


def test_qid_fit_options_the_fit_reads_still_run(made: dict, tmp_path: Path) -> None:
    """The defaults the refusals above moved to None still reach the fit: an explicit --seed 0 and --huber-delta 1e-3
    give the fit the defaults give."""
    from click.testing import CliRunner

    from quantkit.cli import main

    (tmp_path / "q.csv").write_text(HEADER + "".join(f"m{i},gptq,4,128,{10**6 * (i % 3 + 1)},{10**9 * (i + 2)},3.0,"
                                                     f"{3.0 + 0.01 * (i + 1):.2f},{0.01 * (i + 1):.2f},e\n" for i in range(6)))
    runs = [CliRunner().invoke(main, ["qid", "fit", str(tmp_path / "q.csv"), "--law", "D", "--bootstrap", "5", *extra,
                                      "--json"]) for extra in ([], ["--seed", "0"])]
    assert [r.exit_code for r in runs] == [0, 0], [r.output for r in runs]
    assert runs[0].output == runs[1].output
    huber = [CliRunner().invoke(main, ["qid", "fit", str(tmp_path / "q.csv"), "--law", "D", "--bootstrap", "0",
                                       "--estimator", "huber", *extra, "--json"]) for extra in ([], ["--huber-delta", "1e-3"])]
    assert [r.exit_code for r in huber] == [0, 0], [r.output for r in huber]
    assert huber[0].output == huber[1].output


def qid_points(n: int = 6) -> str:
    """A QiD CSV of n checkpoints (2 sizes, 3 and 4 bits) whose rows carry a qid_se, for the fits' options."""
    return HEADER.replace("qid,", "qid,qid_se,") + "".join(
        f"m{i},gptq,{3 + i // 3 % 2},128,{10**6 * (i % 2 + 1)},{10**9 * (i + 2)},3.0,{3.0 + 0.01 * (i + 1):.2f},{0.01 * (i + 1):.2f},"
        f"{0.001 * (i + 1):.3f},e\n" for i in range(n))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"bootstrap": 0, "delta": 0.5}, "qid fit would ignore --huber-delta (delta=0.5)"),
    ({"bootstrap": 3, "delta": 1e-3}, "qid fit would ignore --huber-delta (delta=0.001)"),
    ({"bootstrap": 0, "estimator": "huber", "misfit": False}, "qid fit would ignore --no-misfit (misfit=False)"),
    ({"bootstrap": 0, "estimator": "huber", "misfit": True}, "qid fit would ignore --no-misfit (misfit=True)"),
    ({"bootstrap": 0, "resample": "errors"}, "qid fit would ignore --resample (resample='errors')"),
    ({"bootstrap": 0, "resample": "points"}, "qid fit would ignore --resample (resample='points')"),
    ({"bootstrap": 0, "seed": 3}, "qid fit would ignore --seed (seed=3)"),
    ({"bootstrap": -1}, "--bootstrap (bootstrap) must be an integer >= 0, got -1"),
    ({"bootstrap": 2.5}, "--bootstrap (bootstrap) must be an integer >= 0, got 2.5"),
    ({"bootstrap": True}, "--bootstrap (bootstrap) must be an integer >= 0, got True"),
    ({"level": 1.5}, "--level (level) must be a number in (0, 1), got 1.5"),
    ({"level": "0.9"}, "--level (level) must be a number in (0, 1), got '0.9'"),
    ({"estimator": "huber", "delta": float("nan")}, "need --huber-delta > 0 (delta), a finite number, got nan"),
    ({"estimator": "huber", "delta": -1.0}, "need --huber-delta > 0 (delta), a finite number, got -1.0"),
    ({"misfit": "no"}, "misfit (--no-misfit) must be True or False, got 'no'"),
    ({"seed": "1"}, "--seed (seed) must be an integer, got '1'"),
    ({"resample": "Points"}, "unknown resampling 'Points'"),
])
@pytest.mark.parametrize("function", ["fit_table", "fit_unified", "fit_single", "compare_methods"])
def test_qid_fit_api_refuses_what_the_cli_refuses(tmp_path: Path, function: str, kwargs: dict, fragment: str) -> None:
    """The Python fits took delta / misfit / resample / seed with defaults, so an ignored one (delta with wls,
    misfit with huber, resample or seed with bootstrap 0) passed quietly, and bootstrap -1 or level 1.5 were used
    as given: each is one QuantkitError naming the argument, as `qid fit` names its option."""
    import quantkit.qid as qid
    from quantkit import QuantkitError
    from quantkit.qid.table import parse_table

    table = parse_table(qid_points(), source="q.csv")
    call = {"fit_table": lambda: qid.fit_table(table, laws=("unified",), **kwargs),
            "fit_unified": lambda: qid.fit_unified(table.rows, **kwargs),
            "fit_single": lambda: qid.fit_single(table.rows, "D", **kwargs),
            "compare_methods": lambda: qid.compare_methods({"a": table.rows, "b": table.rows}, **kwargs)}[function]
    with pytest.raises(QuantkitError) as err:
        call()
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("given", [
    {"bootstrap": 4, "seed": 0, "resample": "points"},
    {"bootstrap": 4, "misfit": True},
    {"bootstrap": 0, "estimator": "huber", "delta": 1e-3},
])
def test_qid_fit_api_arguments_given_as_their_defaults_fit_the_same(given: dict) -> None:
    """What the refusals above leave alone: each argument given with its default value where it is used gives the
    fit the call without it gives (the reference), through the API and through `qid fit`'s options."""
    import quantkit.qid as qid
    from quantkit.qid.table import parse_table

    table = parse_table(qid_points(), source="q.csv")
    base = {k: v for k, v in given.items() if k in ("bootstrap", "estimator")}
    reference = qid.fit_table(table, laws=("unified", "D"), **base)
    assert [f["law"] for f in reference["fits"]] == ["unified", "D"], reference
    assert qid.fit_table(table, laws=("unified", "D"), **given) == reference


@pytest.mark.parametrize("args, fragment", [
    (["--bootstrap", "0", "--resample", "points"], "qid fit would ignore --resample (resample='points')"),
    (["--bootstrap", "-1"], "--bootstrap must be at least 0, got -1"),
    (["--level", "1"], "--level must be below 1, got 1"),
])
def test_qid_fit_cli_refuses_before_reading_the_table(tmp_path: Path, args: list, fragment: str) -> None:
    """The options are checked before the table (which does not exist here) is read."""
    assert_fault(tmp_path, ["qid", "fit", tmp_path / "none.csv", *args], fragment)


# ---------------------------------------------------------------- eighth round (battery helper): strict's share


SURROGATE_LINES = [
    (['{"text": "w1 w2 w3 w4"}', '{"text": "w1 w2 \\ud800 w3"}'], "d.jsonl:2: field 'text' holds a lone UTF-16 surrogate "
                                                                  "(\\ud800) at character 6"),
    (['[{"text": "w1 w2"}, {"text": "w3 \\udfff w4"}]'], "d.jsonl:item 2: field 'text' holds a lone UTF-16 surrogate (\\udfff)"),
]
CHAT_SURROGATE = (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "w1 \\udc00"}]}'],
                  "d.jsonl:1: field 'messages[1].content' holds a lone UTF-16 surrogate (\\udc00) at character 3")


@pytest.mark.parametrize("command, lines, fragment", [*[("calibrate", *case) for case in [*SURROGATE_LINES, CHAT_SURROGATE]],
                                                      *[("eval", *case) for case in SURROGATE_LINES]])
def test_a_lone_surrogate_in_json_records_is_refused_by_line(work: Path, command: str, lines: list, fragment: str) -> None:
    """A JSON-escaped lone surrogate (no character; common in scraped JSONL) reached the tokenizer: "error: TypeError:
    TextEncodeInput must be Union[...]"; now one line naming file:line, the field and the character. A pair
    (\\ud83d\\ude00, one emoji) is text and is read."""
    (work / "d.jsonl").write_text("\n".join(lines) + "\n")
    args = (["calibrate", "model", "--calib", "d.jsonl", *BASE, "-o", "out"] if command == "calibrate"
            else ["eval", "model", "--data", "d.jsonl", "--seqlen", "4", "--json"])
    assert_fault(work, args, fragment)
    (work / "d.jsonl").write_text("\n".join(['{"text": "w1 w2 \\ud83d\\ude00 w3 w4 w5 w6 w7 w8 w9"}'] * 8) + "\n")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("data, fragment", [
    (["w1 w2 w3", "w1 \ud800 w2"], "data record 2: holds a lone UTF-16 surrogate (\\ud800) at character 3"),
    ([{"text": "w1 w2 \udbff"}] * 2, "data record 1: field 'text' holds a lone UTF-16 surrogate (\\udbff)"),
    ([{"messages": [{"role": "user", "content": "w1 \udc00"}]}] * 2,
     "data record 1: field 'messages[0].content' holds a lone UTF-16 surrogate (\\udc00)"),
])
def test_a_lone_surrogate_in_api_data_is_refused(work: Path, data: list, fragment: str) -> None:
    """The same through quantkit.quantize(data=[...]): a TypeError from the tokenizer before."""
    import quantkit

    with unchanged(work), pytest.raises(quantkit.QuantkitError) as err:
        api_quantize(str(work / "model"), work, data=data)
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def export_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor an export stores (its safetensors files), by name."""
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


NO_QUANTIZED_LINEAR = "pattern 'down_proj' applies to no quantized linear (model.layers.0.mlp.down_proj and 1 more stay"
NO_FP_TARGET = "sets fp_alpha 0.5, the FP target's strength, and none of its linears is solved with one"


@pytest.mark.parametrize("recipe, run, fragment", [
    ("ignore: [down_proj]\noverrides: [{targets: [down_proj], bits: 8}]", ["--method", "rtn"], NO_QUANTIZED_LINEAR),
    ("targets: [q_proj]\noverrides: [{targets: [down_proj], bits: 8}]", ["--method", "gptq"], NO_QUANTIZED_LINEAR),
    ("targets: [q_proj, down_proj]\nignore: [layers.0.mlp.down_proj, layers.1.mlp.down_proj]\n"
     "overrides: [{targets: [q_proj, down_proj], bits: 8}]", ["--method", "rtn"], NO_QUANTIZED_LINEAR),
    ("overrides: [{targets: [down_proj], fp_alpha: 0.5}]", ["--method", "rtn"], NO_FP_TARGET + " (this run has no FP"),
    ("overrides: [{targets: [down_proj], fp_alpha: 0.5}]", ["--method", "gptq", "--no-fp-target"],
     NO_FP_TARGET + " (this run has no FP target)"),
    ("overrides: [{targets: [down_proj], fp_alpha: 0.5, method: rtn}]", ["--method", "gptq", "--fp-target"],
     NO_FP_TARGET + " (their method reads no activations)"),
])
@pytest.mark.parametrize("command", ["calibrate", "plan"])
def test_recipe_overrides_that_apply_nowhere_are_refused(work: Path, command: str, recipe: str, run: list,
                                                         fragment: str) -> None:
    """An override whose linears the recipe leaves in FP, and an fp_alpha where no FP target runs, exited 0 with
    bytes equal to the run without the override (calibrate, plan and the API share the check)."""
    (work / "r.yaml").write_text(recipe + "\n")
    args = [command, "model", "--calib", "text.txt", *run, "--nsamples", "2", "--seqlen", "16", "--group-size", "32",
            "--recipe", "r.yaml", *(["-o", "out"] if command == "calibrate" else [])]
    assert_fault(work, args, fragment)


def test_recipe_overrides_that_apply_are_still_used(work: Path) -> None:
    """What the refusals above leave alone, against the run without the recipe (the reference): fp_alpha on an
    FP-target run changes layer 0's down_proj codes and nothing else of layer 0; an override next to an ignore of other linears
    applies; `targets: null` (YAML for none given) is targets left out, as `ignore: null` is: the same tensors."""
    common = ["--calib", "text.txt", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]
    recipes = {"none": None, "fp": "overrides: [{targets: [down_proj], fp_alpha: 0.5}]",
               "null": "targets: null\nignore: null", "mixed": "ignore: [q_proj]\noverrides: [{targets: [down_proj], "
               "bits: 8}]"}
    tensors = {}
    for name, recipe in recipes.items():
        extra = []
        if recipe is not None:
            (work / f"{name}.yaml").write_text(recipe + "\n")
            extra = ["--recipe", f"{name}.yaml"]
        method = ["--method", "rtn"] if name in ("null", "mixed") else ["--method", "gptq", "--fp-target"]
        result = run_cli("calibrate", "model", *common, *method, *extra, "-o", name)
        assert result.exit_code == 0, result.output
        tensors[name] = export_tensors(work / name)
    changed = sorted(k for k in tensors["none"] if not torch.equal(tensors["none"][k], tensors["fp"][k]))
    # layer 0's down_proj is its last linear solved: the rest of layer 0 is as before, later layers see its output
    layer0 = [k for k in changed if k.startswith("model.layers.0.")]
    assert layer0 and all(".mlp.down_proj." in k for k in layer0), changed
    assert "model.layers.0.self_attn.q_proj.weight" in tensors["mixed"]  # left in full precision
    rtn = run_cli("calibrate", "model", *common, "--method", "rtn", "-o", "rtn")
    assert rtn.exit_code == 0, rtn.output
    reference = export_tensors(work / "rtn")
    assert tensors["null"].keys() == reference.keys()
    assert all(torch.equal(tensors["null"][k], reference[k]) for k in reference)


@pytest.mark.parametrize("recipe, fragment", [
    ({"ignore": ["down_proj"], "overrides": [{"targets": ["down_proj"], "bits": 8}]}, NO_QUANTIZED_LINEAR),
    ({"overrides": [{"targets": ["down_proj"], "fp_alpha": 0.5}]}, NO_FP_TARGET),
])
def test_recipe_overrides_that_apply_nowhere_are_refused_by_the_api(work: Path, recipe: dict, fragment: str) -> None:
    import quantkit

    with unchanged(work), pytest.raises(quantkit.QuantkitError) as err:
        api_quantize(str(work / "model"), work, data=str(work / "text.txt"), recipe=recipe)
    assert fragment in str(err.value), str(err.value)


def test_recipe_targets_none_is_targets_left_out() -> None:
    """Recipe(targets=None) and the YAML `targets: null` were refused as 'targets is None/[]'; an empty list still is."""
    from quantkit import QuantkitError
    from quantkit.quant.recipe import Recipe

    assert Recipe(targets=None) == Recipe() == Recipe.from_dict({"targets": None})
    with pytest.raises(QuantkitError, match=r"^recipe targets is \[\], which names no linear"):
        Recipe.from_dict({"targets": []})


def test_a_model_cast_in_part_is_refused_as_mixing_dtypes(work: Path) -> None:
    """Layer 0 in bfloat16, the rest float32: "unsupported architecture 'llama': a decoder layer fails on a probe
    input: RuntimeError: expected m1 and m2 to have the same dtype"; now the line says the model mixes dtypes. Cast to
    one dtype, it runs."""
    from transformers import AutoModelForCausalLM

    import quantkit

    model = AutoModelForCausalLM.from_pretrained(work / "model")
    model.model.layers[0].to(torch.bfloat16)
    with unchanged(work), pytest.raises(quantkit.QuantkitError) as err:
        api_quantize(model, work, data=str(work / "text.txt"))
    assert "mixes dtypes across its decoder layers (model.layers.1.self_attn.q_proj.weight is float32, " \
           "model.layers.0.self_attn.q_proj.weight is bfloat16)" in str(err.value), str(err.value)
    model.to(torch.bfloat16)  # one dtype throughout
    api_quantize(model, work, data=str(work / "text.txt"))
    assert (work / "api" / "quantkit.json").is_file()


def test_a_calibration_recipe_variable_set_but_empty_is_named(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QUANTKIT_TEXT_DATA= (set, empty) made the shipped recipe's source its own folder: "directory .../calib has no
    .txt or .jsonl files"; now the line names the variable, as for one that is not set."""
    monkeypatch.setenv("QUANTKIT_TEXT_DATA", "")
    recipe = Path(__file__).resolve().parents[1] / "calib" / "text.yaml"
    assert_fault(work, ["calibrate", "model", "--calib", recipe, *RTN_ONLY, "-o", "out"],
                 "path '$QUANTKIT_TEXT_DATA' uses $QUANTKIT_TEXT_DATA, which is set but empty")


def test_a_model_quantkit_already_quantized_is_refused(made: dict, work: Path) -> None:
    """The same loaded model given to quantize twice had its 4-bit dequantized weights quantized again in place and
    exported, and a model from load_quantized likewise (the path form, an export as the model, was refused); now
    both are one QuantkitError, nothing written. A fresh load of the FP model quantizes as before."""
    from transformers import AutoModelForCausalLM

    import quantkit

    model = AutoModelForCausalLM.from_pretrained(work / "model")
    api_quantize(model, work, data=str(work / "text.txt"), bits=4)
    again = work / "again"
    again.mkdir()
    for given, fragment in ((model, "in place, rtn w4"), (quantkit.load_quantized(made["exports"]["compressed-tensors"]),
                                                         "loaded from the export")):
        with unchanged(work), pytest.raises(quantkit.QuantkitError) as err:
            api_quantize(given, again, data=str(work / "text.txt"), bits=3)
        assert f"holds weights quantkit already quantized ({fragment}" in str(err.value), str(err.value)
    api_quantize(AutoModelForCausalLM.from_pretrained(work / "model"), again, data=str(work / "text.txt"), bits=3)
    assert (again / "api" / "quantkit.json").is_file()


def test_eval_leaves_out_sources_shorter_than_a_window(work: Path) -> None:
    """Five 40-word files, each scored apart with a held-out part of 4-5 tokens: 'loss' over 15 tokens in windows of 4,
    exit 0 (one such file alone was refused). Now refused when no source holds a window; beside a source that does,
    the short ones are left out with one warning line, and the loss is that source's alone (the reference: eval of
    that file by itself)."""
    import json as json_module

    (work / "d").mkdir()
    words = (work / "text.txt").read_text().split()
    for i in range(5):
        (work / "d" / f"f{i}.txt").write_text(" ".join(words[40 * i:40 * i + 40]) + "\n")
    args = ["eval", "model", "--data", "d", "--seqlen", "16", "--part", "heldout", "--json"]
    assert_fault(work, args, "each of its 5 sources (scored apart) holds at most")
    shutil.copy(work / "text.txt", work / "d" / "long.txt")
    mixed = run_cli(*args)
    assert mixed.exit_code == 0, mixed.output
    assert [line.split(":")[0] for line in mixed.stderr.splitlines()] == ["WARNING quantkit.eval.loss"], mixed.stderr
    assert "left out 5 source(s) holding fewer than one --seqlen window (16 tokens)" in mixed.stderr
    alone = run_cli("eval", "model", "--data", "d/long.txt", "--seqlen", "16", "--part", "heldout", "--json")
    assert alone.exit_code == 0, alone.output
    got, want = (json_module.loads(r.stdout) for r in (mixed, alone))
    assert (got["loss"], got["tokens"], list(got["by_source"])) == (want["loss"], want["tokens"], ["d/long.txt"])


def test_evaluate_sources_leaves_out_sources_shorter_than_a_window(work: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The Python evaluate_sources, as eval: a 10-word source beside a long one is left out with one warning (its
    windows of a few tokens were scored), and the loss is the long one's alone; short sources only are refused."""
    from quantkit.errors import QuantkitError
    from quantkit.eval import evaluate_sources, load_for_eval

    model, tokenizer = load_for_eval(str(work / "model"))
    text = (work / "text.txt").read_text()
    short = " ".join(text.split()[:10])
    with caplog.at_level("WARNING", logger="quantkit.eval.loss"):
        got = evaluate_sources(model, tokenizer, {"short": [short], "long": [text]}, seqlen=16, progress=False)
    assert [r.getMessage() for r in caplog.records] == [
        "left out 1 source(s) holding fewer than one --seqlen window (16 tokens): short (10)"]
    want = evaluate_sources(model, tokenizer, {"long": [text]}, seqlen=16, progress=False)
    assert (got["loss"], got["tokens"], list(got["by_source"])) == (want["loss"], want["tokens"], ["long"])
    with pytest.raises(QuantkitError, match="too little text to evaluate: in the sources, each of its 2 sources"):
        evaluate_sources(model, tokenizer, {"a": [short], "b": [short]}, seqlen=16, progress=False)


def test_plan_sizes_the_export_by_the_recipe(work: Path) -> None:
    """plan (and calibrate --dry-run) sized the export with the run's --bits whatever the recipe said: an override to
    8 bits planned the 4-bit size, linears left in full precision as codes. Now each linear counts at its recipe's
    settings, against the real exports (the reference: their safetensors bytes, which the plan tracks within 20%
    here as without a recipe) and against the plan of the same run given as plain options."""
    import json as json_module

    (work / "r8.yaml").write_text("overrides: [{targets: ['re:.*'], bits: 8}]\n")
    (work / "ignore.yaml").write_text("ignore: [down_proj]\n")
    runs = {"w4": [], "w8": ["--bits", "8"], "recipe8": ["--recipe", "r8.yaml"], "ignore": ["--recipe", "ignore.yaml"]}
    planned, real = {}, {}
    for name, extra in runs.items():
        common = ["model", "--calib", "text.txt", "--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size",
                  "32", *extra]
        plan = run_cli("plan", *common, "--json")
        assert plan.exit_code == 0, plan.output
        planned[name] = json_module.loads(plan.stdout)["disk_bytes"]["export"]
        done = run_cli("calibrate", *common, "-o", name)
        assert done.exit_code == 0, done.output
        real[name] = sum(f.stat().st_size for f in (work / name).glob("*.safetensors"))
    assert planned["recipe8"] == planned["w8"] > planned["w4"], planned
    assert real["ignore"] > real["w4"] and planned["ignore"] > planned["w4"], (planned, real)
    assert all(0.8 < planned[n] / real[n] < 1.2 for n in runs), (planned, real)


@pytest.mark.parametrize("args", [
    ["eval", "model", "--data", "text.txt", "--seqlen", "16", "-o", "-"],
    ["calibrate", "model", "--calib", "text.txt", *BASE, "-o", "-"],
    ["qid", "fit", "q.csv", "--bootstrap", "0", "-o", "-"],
])
def test_output_dash_is_refused(work: Path, args: list) -> None:
    """`eval ... -o -` wrote a file named '-' into the working folder (Unix tools read '-' as stdout); each command's
    -o refuses it, before any work, pointing at --json."""
    (work / "q.csv").write_text(qid_points())
    assert_fault(work, args, "-o - would write a file or folder named '-' here, not to stdout")


def test_an_export_manifest_that_is_no_object_is_refused(made: dict, tmp_path: Path) -> None:
    import quantkit

    export = tmp_path / "ct"
    shutil.copytree(made["exports"]["compressed-tensors"], export)
    (export / "quantkit.json").write_text("[]")
    fragment = "quantkit.json holds a JSON list, not an object"
    assert_fault(tmp_path, ["eval", export, "--data", made["text"], "--seqlen", "16"], fragment)
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError, match=fragment):
        quantkit.load_quantized(export)


def text_chunks(made: dict) -> list[str]:
    text = made["text"].read_text()
    return [text[i:i + 400] for i in range(0, 4000, 400)]


@pytest.mark.parametrize("options, fragment", [
    ({"output_dir": "out\0x"}, "output_dir (-o) holds a NUL byte"),
    ({"nsamples": 2**63}, "nsamples (--nsamples) must be at most 2147483647"),
    ({"seqlen": 2**40}, "seqlen (--seqlen) must be at most 2147483647"),
    ({"reload": "no"}, "reload must be True or False"),
    ({"data": "GENERATOR"}, "with no length (a generator or streaming dataset)"),
    ({"recipe": {"overrides": [{"targets": ["q_proj"], "method": "GPTQ"}]}}, "unknown quantization method 'GPTQ'; did you mean 'gptq'?"),
    ({"recipe": {"targets": []}}, "recipe targets is [], which names no linear"),
])
def test_fifth_round_api_arguments(made: dict, tmp_path: Path, no_model_load, options: dict, fragment: str) -> None:
    """Each was a raw ValueError, OverflowError or TypeError from deep inside, or (reload, the method's case, an
    empty targets list) accepted."""
    import quantkit

    settings = {"data": text_chunks(made), "method": "gptq", "group_size": 32, "nsamples": 2, "seqlen": 16,
                "output_dir": str(tmp_path / "out"), "progress": False, **options}
    if settings["data"] == "GENERATOR":
        settings["data"] = (t for t in text_chunks(made))
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError) as caught:
        quantkit.quantize(str(made["model"]), **settings)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_model_argument_of_the_wrong_kind_is_named_on_one_line(made: dict, tmp_path: Path) -> None:
    """A (model, report) pair: the message held the model's whole multi-line repr."""
    from transformers import AutoModelForCausalLM

    import quantkit

    pair = (AutoModelForCausalLM.from_pretrained(made["model"]), {"report": 1})
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError) as caught:
        quantkit.quantize(pair, data=text_chunks(made), method="rtn", output_dir=tmp_path / "out")
    assert "got a tuple" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("where", ["whole", "layer 1"])
def test_a_model_on_the_meta_device_is_refused(made: dict, tmp_path: Path, where: str) -> None:
    """No values to quantize: NotImplementedError from deep inside the engine before."""
    from helpers import make_tokenizer
    from transformers import AutoModelForCausalLM

    import quantkit

    if where == "whole":
        config = AutoModelForCausalLM.from_pretrained(made["model"]).config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(made["model"])
        model.model.layers[1].to("meta")
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError, match="is on the meta device"):
        quantkit.quantize(model, make_tokenizer(), data=text_chunks(made), method="rtn", group_size=32,
                          output_dir=tmp_path / "out", progress=False)


def test_tlq_inside_inference_mode_is_refused_before_work(made: dict, tmp_path: Path, no_model_load) -> None:
    import quantkit

    with torch.inference_mode(), unchanged(tmp_path), pytest.raises(quantkit.QuantkitError,
                                                                    match=re.escape("torch.inference_mode() forbids")):
        quantkit.quantize(str(made["model"]), data=text_chunks(made), method="tlq", group_size=32, nsamples=2,
                          seqlen=16, output_dir=tmp_path / "out", progress=False)


def test_a_model_in_train_mode_is_calibrated_without_dropout(made: dict) -> None:
    """Dropout on during calibration changed 11 of 14 linears' codes; the reference is the same model in eval mode,
    and the model given in train mode is handed back in train mode."""
    from transformers import AutoModelForCausalLM

    import quantkit

    def run(train: bool):
        model = AutoModelForCausalLM.from_pretrained(made["model"], attention_dropout=0.5).train(train)
        torch.manual_seed(0)
        out = quantkit.quantize(model, data=text_chunks(made), method="gptq", group_size=32, nsamples=4, seqlen=16,
                                progress=False)
        return out, model.training

    (trained, mode), (reference, _) = run(True), run(False)
    assert mode is True
    assert trained.results.keys() == reference.results.keys()
    for name, result in reference.results.items():
        assert torch.equal(trained.results[name].qweight, result.qweight), name


def test_a_tokenizer_whose_ids_run_past_the_embedding_is_refused(work: Path, no_model_load) -> None:
    """62 entries (fits 64 rows by count) with ids up to 1592: an IndexError inside the embedding before."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: (i if i < 40 else 1531 + i) for i, t in enumerate(["<unk>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (work / "model" / name).unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(work / "model")
    assert_fault(work, calibrate(work), "has 62 tokens but ids up to 1592, past the model's embedding of 64 rows")


@pytest.mark.parametrize("args, fragment", [
    (["eval", "MODEL", "--data", "TEXT", "--seqlen", "16", "-o", "MODEL/config.json"], "is inside the input"),
    (["eval", "MODEL", "--data", "TEXT", "--seqlen", "16", "-o", "TEXT"], "is the input"),
    (["qid", "fit", "TABLE", "--bootstrap", "0", "-o", "TABLE"], "is the input"),
    (["qid", "training-level", "MODEL", "--law", "LAW", "--bits", "3", "--qid", "0.1", "-o", "LAW"], "is the input"),
    (["qid", "plot", "TABLE", "-o", "MODEL"], "is a model directory (it holds config.json)"),
])
def test_a_result_file_is_never_written_over_an_input(work: Path, args: list, fragment: str) -> None:
    """Each overwrote the model's config, the text, the table or the law with its results (exit 0)."""
    from quantkit.qid.laws import PUBLISHED_LAWS

    (work / "q.csv").write_text(HEADER + "".join(f"m{i},gptq,4,128,{10**6 * (i + 1)},{10**9 * (i + 1)},3.0,3.1,0.1,e\n"
                                                 for i in range(4)))
    law = PUBLISHED_LAWS["ouyang2024-gptq"]
    (work / "law.json").write_text(json.dumps({"law": "unified", "k": law.k, "alpha": law.alpha, "beta": law.beta,
                                               "gamma": law.gamma}))
    names = {"MODEL": str(work / "model"), "TEXT": str(work / "text.txt"), "TABLE": str(work / "q.csv"),
             "LAW": str(work / "law.json"), "MODEL/config.json": str(work / "model" / "config.json")}
    assert_fault(work, [names.get(a, a) for a in args], fragment)


@pytest.mark.parametrize("extra", [[], ["--low-memory"]])
def test_a_second_copy_of_the_weights_beside_model_safetensors_is_refused(work: Path, no_model_load,
                                                                          extra: list) -> None:
    """transformers reads model.safetensors alone; an old copy of it beside (no index) made the run ambiguous."""
    model = work / "model"
    shutil.copy(model / "model.safetensors", model / "model-old.safetensors")
    edit_tensors(model, model__layers__0__mlp__down_proj__weight=lambda t: t.fill_(0.5))
    assert_fault(work, ["calibrate", model, *RTN_ONLY, "-o", work / "out", *extra],
                 "holds model-old.safetensors beside model.safetensors, with the same tensors")


def test_a_calibration_set_whose_ids_run_past_the_embedding_is_refused(work: Path) -> None:
    """input_ids + 1000 in samples.safetensors: an IndexError inside the embedding before."""
    from safetensors.torch import load_file, save_file

    result = run_cli("importance", work / "model", "--calib", work / "text.txt", "--nsamples", "2", "--seqlen", "16",
                     "-o", work / "set", "--json")
    assert result.exit_code == 0, result.output
    samples = work / "set" / "samples.safetensors"
    tensors = load_file(samples)
    save_file({k: v + 1000 if k.endswith("input_ids") else v for k, v in tensors.items()}, samples)
    from quantkit.importance.calibration_set import MANIFEST_FILE, file_sha256

    edit_json(work / "set" / MANIFEST_FILE, lambda d: d["files"].update({samples.name: file_sha256(samples)}))
    assert_fault(work, ["calibrate", work / "model", "--calib-set", work / "set", "--method", "tlq", "--group-size",
                        "32", "-o", work / "out"], "sample 0's input_ids are not token ids of the model's 64-row")


def _renamed(old: str, new: str):
    return lambda state: state.update({new: state.pop(old)})


@pytest.mark.parametrize("name, edit, fragment", [
    ("weights", lambda s: s.update(lengths=torch.tensor([8, 8])), "its 'lengths' [8, 8] are not the samples' token "
                                                                  "counts [16, 16]"),
    ("weights", lambda s: s.update(lengths=torch.tensor([-1, 16])), "its 'lengths' [-1, 16] are not"),
    ("weights", lambda s: s.update(lengths=torch.tensor([16, 16, 16])), "its 'lengths' [16, 16, 16] are not"),
    ("weights", lambda s: s.update(lengths=torch.tensor([[16, 16]])), "its 'lengths' a [1, 2] tensor are not"),
    ("weights", lambda s: s.pop("lengths"), "weights.safetensors has no 'lengths'"),
    ("weights", lambda s: s.pop("weights"), "weights.safetensors has no 'weights'"),
    ("weights", lambda s: s.update(weights=s["weights"][:, :, :8].clone()),
     "'weights' is [2, 2, 8], not [2 layers, 2 samples, >= 16 tokens]"),
    ("weights", lambda s: s.update(weights=s["weights"] * 0), "'weights' of layer 0 are zero for every token"),
    ("weights", lambda s: s.update(weights=torch.cat([s["weights"][:1], s["weights"][1:] * 0])),
     "'weights' of layer 1 are zero for every token"),
    ("weights", lambda s: s["weights"].__setitem__((0, 1, 3), -1.0), "'weights' holds a negative or non-finite"),
    ("weights", lambda s: s["weights"].__setitem__((1, 0, 3), float("nan")), "'weights' holds a negative or non-finite"),
    ("weights", lambda s: s.update(weights=s["weights"] > 0), "'weights' is bool, not numbers"),
    ("weights", lambda s: s.update({"linear.0.q_proj": torch.ones(2, 8, 1)}),
     "'linear.0.q_proj' is [2, 8, 1], not [2 samples, >= 16 tokens, groups]"),
    ("weights", lambda s: s.update({"linear.5.q_proj": torch.ones(2, 16, 1)}),
     "holds 'linear.5.q_proj', not 'linear.LAYER.NAME' of a layer below 2"),
    ("samples", _renamed("0.input_ids", "a.input_ids"), "samples.safetensors holds 'a.input_ids', not a 'SAMPLE.FIELD'"),
    ("samples", _renamed("1.input_ids", "7.input_ids"), "holds 7.input_ids but the manifest counts 2 samples (0..1)"),
    ("samples", lambda s: s.update({"2.input_ids": s["0.input_ids"].clone()}), "holds 2.input_ids but the manifest"),
    ("samples", lambda s: s.pop("1.input_ids"), "sample 1 has no input_ids"),
    ("samples", lambda s: s.update({"0.input_ids": s["0.input_ids"][0].clone()}),
     "sample 0's input_ids are [16], not one row of tokens [1, T]"),
    ("samples", lambda s: s.update({"0.input_ids": s["0.input_ids"][:, :0].clone()}), "input_ids are [1, 0], not one"),
    ("samples", lambda s: s.update({"0.input_ids": s["0.input_ids"].repeat(2, 1)}), "input_ids are [2, 16], not one"),
    ("samples", lambda s: s.update({"1.input_ids": s["1.input_ids"] > 3}), "sample 1's input_ids are bool, not token"),
    ("samples", lambda s: s.update({"1.input_ids": s["1.input_ids"].float()}), "input_ids are float32, not token ids"),
    ("samples", lambda s: s.update({"0.attention_mask": torch.zeros_like(s["0.input_ids"])}),
     "holds 0.attention_mask, a field the manifest's sample_keys ['input_ids'] do not name"),
    ("samples", lambda s: s.update({"0.pixel_values": torch.zeros(1, 3, 8, 8)}), "holds 0.pixel_values, a field"),
    ("manifest", lambda d: d.update(nsamples=0), "its manifest counts 0 samples"),
    ("manifest", lambda d: d.update(nsamples="2"), "its manifest counts '2' samples"),
    ("manifest", lambda d: d.update(nsamples=1), "holds 1.input_ids but the manifest counts 1 samples (0..0)"),
    ("manifest", lambda d: d.update(sample_keys="input_ids"), "sample_keys ('input_ids') is not a list of field"),
    ("manifest", lambda d: d.update(weights_fingerprint={}), "its weights_fingerprint is not a table of values (empty)"),
])
def test_a_calibration_set_whose_content_was_edited_is_refused(work: Path, calibration_set: Path, name: str, edit,
                                                               fragment: str) -> None:
    """A set whose files were edited with their sha256 renewed in the manifest (the integrity check passes, the
    content is wrong) failed deep in the run ('ValueError: token weights of shape (16,) do not give 32 tokens',
    'KeyError: lengths', 'IndexError', ...) or calibrated on it (all-zero weights, fields no run reads): one line
    naming the set and what is wrong, in memory, streamed (--low-memory) and through the API, nothing written."""
    from transformers import AutoModelForCausalLM

    import quantkit
    from quantkit.importance.calibration_set import MANIFEST_FILE, file_sha256

    setdir = work / "set"
    shutil.copytree(calibration_set, setdir)
    if name == "manifest":
        edit_json(setdir / MANIFEST_FILE, edit)
    else:
        path = setdir / f"{name}.safetensors"
        state = load_file(path)
        edit(state)
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        edit_json(setdir / MANIFEST_FILE, lambda d: d["files"].update({path.name: file_sha256(path)}))
    tlq = ["--method", "tlq", "--group-size", "32"]
    for extra in ([], ["--low-memory"]):
        line = assert_fault(work, ["calibrate", work / "model", "--calib-set", setdir, *tlq, *extra, "-o", work / "out"],
                            fragment)
        assert f"calibration set {setdir} is corrupt: " in line and line.endswith("remake it with `quantkit importance`")
    loaded = AutoModelForCausalLM.from_pretrained(work / "model")
    with unchanged(work), pytest.raises(quantkit.QuantkitError, match=re.escape(fragment)):
        quantkit.quantize(loaded, calib_set=str(setdir), method="tlq", group_size=32, output_dir=str(work / "api"))


@pytest.mark.parametrize("name, edit", [
    ("weights", lambda s: s.update(weights=s["weights"].half())),
    ("weights", lambda s: s.update(weights=(s["weights"] * 4).round().long())),
    ("weights", lambda s: s.update(lengths=s["lengths"].double())),
    ("samples", lambda s: s.update({"0.input_ids": s["0.input_ids"].int(), "1.input_ids": s["1.input_ids"].int()})),
], ids=["weights float16", "weights int64", "lengths float64", "input_ids int32"])
def test_a_calibration_set_stored_in_other_number_types_calibrates_on_the_same_values(
        work: Path, calibration_set: Path, name: str, edit) -> None:
    """The content check takes numbers of any real type where their values are right: the export equals the one of
    a run on the set with its values cast back to the types quantkit writes (float32 weights, int64 ids/lengths)."""
    from safetensors.torch import load_file, save_file

    from quantkit.importance.calibration_set import MANIFEST_FILE, file_sha256

    outs = []
    for kind in ("edited", "reference"):
        setdir = work / f"set-{kind}"
        shutil.copytree(calibration_set, setdir)
        path = setdir / f"{name}.safetensors"
        state = load_file(path)
        edit(state)
        if kind == "reference":  # the edited values, in the types quantkit writes
            state = {k: v.long() if k == "lengths" or k.endswith("input_ids") else v.float() if k == "weights" else v
                     for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        edit_json(setdir / MANIFEST_FILE, lambda d, p=path: d["files"].update({p.name: file_sha256(p)}))
        result = run_cli("calibrate", work / "model", "--calib-set", setdir, "--method", "tlq", "--group-size", "32",
                         "-o", work / f"out-{kind}")
        assert result.exit_code == 0, result.output
        outs.append(load_file(work / f"out-{kind}" / "model.safetensors"))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_a_pytorch_bin_that_does_not_unpickle_is_one_line(work: Path) -> None:
    model = work / "model"
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"garbage" * 100)
    assert_fault(work, ["calibrate", model, *RTN_ONLY, "-o", work / "out"], "cannot load the weights of")


@pytest.mark.parametrize("offload", ["out", "out/scratch"])
def test_an_offload_dir_that_overlaps_the_output_is_refused_before_work(work: Path, no_model_load, offload: str) -> None:
    """--offload-dir = -o ran the whole calibration, then refused and left out.partial behind."""
    assert_fault(work, ["calibrate", work / "model", *GPTQ, "--calib", work / "text.txt", "--low-memory",
                        "--offload-dir", work / offload, "-o", work / "out"], "overlap")


@pytest.mark.parametrize("damage, fragment", [
    ("image_token_id", "marks images with '<|image_pad|>' (id 6) but config.json's image_token_id is 40"),
    ("word tokenizer", "has no token '<|image_pad|>', the processor's image placeholder"),
])
def test_a_processor_whose_image_token_the_model_does_not_read_is_refused(tmp_path: Path, no_model_load,
                                                                         damage: str, fragment: str) -> None:
    """A ValueError from the model's forward before ("Image features and image tokens do not match")."""
    pytest.importorskip("PIL")
    from helpers import make_tokenizer, save_vlm

    vlm = tmp_path / "vlm"
    model, processor = save_vlm("qwen2_vl", vlm)
    if damage == "image_token_id":
        edit_json(vlm / "config.json", lambda d: d.update(image_token_id=40))
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            (vlm / name).unlink(missing_ok=True)
        make_tokenizer().save_pretrained(vlm)
    data = write_image_dataset(tmp_path / "vl", n=4)
    assert_fault(tmp_path, ["calibrate", vlm, "--calib", data, "--method", "rtn", "--nsamples", "2", "--seqlen", "256",
                            "--group-size", "32", "-o", tmp_path / "out"], fragment)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_every_vlm_family_saved_with_its_processor_passes_the_image_token_check(tmp_path: Path, family: str) -> None:
    """Fault battery round 10 'gemma3:' (REFUSED_VALID): every Gemma 3 was refused ("marks images with
    '<start_of_image>' (id 43) but config.json's image_token_id is 44"): Gemma 3's processor.image_token is the
    begin-of-image marker, which it expands to the tokenizer's image token (the id config.json names, as in
    google/gemma-3). The check now compares the id the image features replace (the vision mask's), and still
    refuses a config naming the marker instead."""
    pytest.importorskip("PIL")
    from helpers import save_vlm

    from quantkit.data.checks import model_for_data

    vlm = tmp_path / "vlm"
    model, processor = save_vlm(family, vlm)
    data = write_image_dataset(tmp_path / "vl", n=4)
    model_for_data(str(vlm), data)
    if family != "gemma3":
        return
    result = run_cli("calibrate", vlm, "--calib", data, "--method", "rtn", "--nsamples", "2", "--seqlen", "256",
                     "--group-size", "32", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    import quantkit

    quantkit.quantize(model, processor, data, method="rtn", group_size=32, nsamples=2, seqlen=256,
                      output_dir=tmp_path / "api", reload=False)  # the loaded model and processor objects
    marker = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    soft = processor.tokenizer.image_token_id
    assert marker != soft == model.config.image_token_id
    edit_json(vlm / "config.json", lambda d: d.update({k: marker for k in ("image_token_id", "image_token_index") if k in d}))
    assert_fault(tmp_path, ["calibrate", vlm, "--calib", data, "--method", "rtn", "--nsamples", "2", "--seqlen", "256",
                            "--group-size", "32", "-o", tmp_path / "out2"],
                 f"marks images with '<image_soft_token>' (id {soft}) but config.json's image_token_id is {marker}")


def test_an_export_with_a_non_finite_full_precision_tensor_is_refused(made: dict, tmp_path: Path) -> None:
    """eval printed "loss nan nats" (exit 0)."""
    import quantkit

    export = tmp_path / "ct"
    shutil.copytree(made["exports"]["compressed-tensors"], export)
    edit_tensors(export, model__norm__weight=poke(float("nan"), (3,)))
    fragment = "model.norm.weight (outside the decoder layers) holds 1 NaN"
    assert_fault(tmp_path, ["eval", export, "--data", made["text"], "--seqlen", "16"], fragment)
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError, match=re.escape(fragment)):
        quantkit.load_quantized(export)


def test_an_export_whose_codes_are_stored_as_floats_is_refused(made: dict, tmp_path: Path) -> None:
    """weight_packed rewritten as float32 (same values): eval and `export --format fake` accepted it."""
    export = tmp_path / "ct"
    shutil.copytree(made["exports"]["compressed-tensors"], export)
    edit_tensors(export, model__layers__0__mlp__up_proj__weight_packed=lambda t: t.float())
    fragment = "tensor model.layers.0.mlp.up_proj.weight_packed is stored as torch.float32"
    assert_fault(tmp_path, ["eval", export, "--data", made["text"], "--seqlen", "16"], fragment)
    assert_fault(tmp_path, ["export", export, "--format", "fake", "-o", tmp_path / "fake"], fragment)


@pytest.mark.parametrize("damage, fragment", [
    ("empty text", "data.jsonl:2: field 'text' is empty"),
    ("400x1 image", "the processor cannot take this record's image (400x1 px)"),
    ("text part without text", "data.jsonl:2: a text part of the user message has no 'text' string ({'type': 'text'})"),
    ("content a number", "data.jsonl:2: the user message's content must be a string or a list of parts"),
])
def test_image_text_records_the_vlm_cannot_read_are_refused(tmp_path: Path, damage: str, fragment: str) -> None:
    """An empty caption calibrated on the image alone; a 400x1 image was a ValueError from the processor; a text
    part without its text calibrated on the image and the answer (exit 0)."""
    pytest.importorskip("PIL")
    from helpers import save_vlm
    from PIL import Image

    vlm = tmp_path / "vlm"
    model, processor = save_vlm("qwen2_vl", vlm)
    data = Path(write_image_dataset(tmp_path / "vl", n=4))
    records = [json.loads(line) for line in data.read_text().splitlines()]
    if damage == "empty text":
        records[1]["text"] = ""
    elif damage in ("text part without text", "content a number"):
        records[1].pop("text")
        records[1]["messages"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text"}] if damage[0] == "t"
                                   else 7}, {"role": "assistant", "content": "red"}]
    else:
        for i in range(4):
            Image.new("RGB", (400, 1), (200, 0, 0)).save(tmp_path / "vl" / "img" / f"{i}.png")
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert_fault(tmp_path, ["calibrate", vlm, "--calib", data, "--method", "rtn", "--nsamples", "2", "--seqlen", "256",
                            "--group-size", "32", "-o", tmp_path / "out"], fragment)


@pytest.mark.parametrize("command", ["eval", "calibrate"])
@pytest.mark.parametrize("sources, fragment", [
    ("text.txt,text.txt", "text.txt is named twice in the data source; it would count twice"),
    ("d,d/a.txt", "d/a.txt is named by 'd' and by 'd/a.txt' in the data source"),
    ("d/a.txt,./d/b.txt,d/../d/a.txt", "d/../d/a.txt is named by 'd/a.txt' and by 'd/../d/a.txt'"),
])
def test_a_data_file_named_twice_is_refused(work: Path, command: str, sources: str, fragment: str) -> None:
    """`eval --data text.txt,text.txt` scored 4.1777 where `--data text.txt` scored 4.1812 (the file counted twice
    in the mean); calibrate drew from it twice as often. Refused, whichever way it is named twice."""
    (work / "d").mkdir()
    write_text(work / "d" / "a.txt", seed=3)
    write_text(work / "d" / "b.txt", seed=4)
    tail = ["--seqlen", "16"] if command == "eval" else ["--seqlen", "16", "--nsamples", "2", *RTN_ONLY, "-o", work / "out"]
    assert_fault(work, [command, work / "model", "--data" if command == "eval" else "--calib", sources, *tail], fragment)


@pytest.mark.parametrize("command", ["calibrate", "importance"])
def test_linear_guidance_on_a_mixture_of_experts_is_refused(tmp_path: Path, command: str) -> None:
    """TLQ --guidance linear on mixtral (qwen3_moe, gpt_oss) was 'IndexError: too many indices': an expert
    projection's output gradient holds only its routed tokens' rows. Refused in one line, naming the layer."""
    from helpers import save_tiny_causal_lm

    model = save_tiny_causal_lm(tmp_path, "mixtral")
    text = write_text(tmp_path / "text.txt")
    tail = ["--method", "tlq", "--group-size", "32"] if command == "calibrate" else []
    assert_fault(tmp_path, [command, model, "--calib", text, "--nsamples", "2", "--seqlen", "16", *tail, "--guidance",
                            "linear", "-o", tmp_path / "out"],
                 "--guidance linear (importance guidance='linear') weighs each linear's own tokens, which the routed "
                 "experts of layer 0 (mixtral, a mixture of experts) do not have; use --guidance layer")


def test_a_closed_pil_image_in_api_records_is_one_line(tmp_path: Path) -> None:
    """An image closed after loading failed in PIL ('ValueError: Operation on closed image'): one QuantkitError
    naming the record; the same records with the image open calibrate."""
    pytest.importorskip("PIL")
    from helpers import build_vlm
    from PIL import Image

    import quantkit

    model, processor = build_vlm("qwen2_vl")
    data = Path(write_image_dataset(tmp_path / "vl", n=2))
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for record in records:
        record["image"] = Image.open(data.parent / record["image"])
        record["image"].load()
    records[1]["image"].close()
    options = {"method": "rtn", "nsamples": 2, "seqlen": 256, "group_size": 32}
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError, match=r"data record 2: its PIL image cannot be "
                                                                           r"read \(Operation on closed image\)"):
        quantkit.quantize(model, processor, data=records, output_dir=str(tmp_path / "out"), **options)
    records[1]["image"] = Image.open(data.parent / json.loads(data.read_text().splitlines()[1])["image"])
    quantkit.quantize(model, processor, data=records, **options)


@pytest.mark.parametrize("name, fragment", [
    ("tokenizer", "unknown option 'tokenizer'; did you mean 'tokenizer_or_processor'?"),
    ("processor", "unknown option 'processor'; did you mean 'tokenizer_or_processor'?"),
    ("dataset", "unknown option 'dataset'; did you mean 'data'?"),
])
def test_quantize_points_other_toolkits_names_of_its_arguments_to_them(work: Path, name: str, fragment: str) -> None:
    """quantize(M, data=T, tokenizer=None) (a natural name) was "TypeError: build_job() got multiple values for
    argument 'tokenizer'"; dataset= was refused without a hint toward data=."""
    import quantkit

    with unchanged(work), pytest.raises(quantkit.QuantkitError, match=re.escape(fragment)):
        quantkit.quantize(str(work / "model"), data=str(work / "text.txt"), method="rtn", group_size=32,
                          output_dir=str(work / "out"), **{name: None})


def test_part_with_image_text_records_is_refused(tmp_path: Path, no_model_load) -> None:
    """--part heldout was ignored for image-text records (chat records already refused it)."""
    pytest.importorskip("PIL")
    from helpers import save_vlm

    model, processor = save_vlm("qwen2_vl", tmp_path / "vlm")
    data = write_image_dataset(tmp_path / "vl", n=4)
    assert_fault(tmp_path, ["calibrate", tmp_path / "vlm", "--calib", data, "--part", "heldout", "--method", "rtn",
                            "--nsamples", "2", "--seqlen", "256", "--group-size", "32", "-o", tmp_path / "out"],
                 "--part heldout splits text files; the image-text records of")


@pytest.mark.parametrize("extra, fragment", [
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--recipe", "RECIPE"], "pattern 'nothing_here' matches no linear"),
    (["IMAGES"], "holds image-text records, but"),
])
def test_plan_refuses_what_calibrate_refuses(work: Path, no_model_load, extra: list, fragment: str) -> None:
    """Each was planned (exit 0): a plan of a run calibrate refuses is no plan."""
    (work / "r.yaml").write_text("targets: [nothing_here]\n")
    calib = ["--calib", work / "text.txt"]
    if extra == ["IMAGES"]:
        pytest.importorskip("PIL")
        calib, extra = ["--calib", write_image_dataset(work / "vl", n=2)], []
    extra = [str(work / "r.yaml") if a == "RECIPE" else a for a in extra]
    assert_fault(work, ["plan", work / "model", *calib, "--method", "rtn", "--group-size", "32", *extra], fragment)


def test_demo_refuses_too_little_text_before_evaluating(work: Path) -> None:
    """The refusal came after the FP model's evaluation had been shown."""
    with unchanged(work):
        result = run_cli("demo", "--model", work / "model", "--data", work / "text.txt", "--seqlen", "16",
                         "--nsamples", "1000", "-o", work / "d")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: too little text"), lines


def test_importance_per_modality_needs_image_text_data(work: Path) -> None:
    """--per-modality on text data was ignored (exit 0): there are no image tokens to normalise apart."""
    assert_fault(work, ["importance", work / "model", "--calib", work / "text.txt", "--nsamples", "2", "--seqlen", "16",
                        "--per-modality", "-o", work / "set"], "holds no image-text records")


def test_offload_dir_needs_low_memory(work: Path, no_model_load) -> None:
    """--offload-dir alone switched --low-memory on unasked (and the battery read it as ignored): refused, CLI and API."""
    line = assert_fault(work, calibrate(work, "--offload-dir", work / "scratch"), "add --low-memory")
    assert "--offload-dir" in line
    import quantkit

    with unchanged(work), pytest.raises(quantkit.QuantkitError, match="add --low-memory"):
        quantkit.quantize(str(work / "model"), data=str(work / "text.txt"), method="rtn", group_size=32, nsamples=2,
                          seqlen=16, offload_dir=str(work / "scratch"), output_dir=str(work / "api"))


def test_offload_dir_with_low_memory_runs(work: Path) -> None:
    """The valid neighbour of the case above: with --low-memory the same run exports and removes its scratch folder."""
    result = run_cli(*calibrate(work, "--low-memory", "--offload-dir", work / "scratch"))
    assert result.exit_code == 0, result.output
    assert (work / "out" / "model.safetensors").is_file() and not (work / "scratch").exists()


def test_plan_refuses_a_config_the_headers_contradict(work: Path, no_model_load) -> None:
    """config.json hidden_size 48 over weights stored at 32 was planned (exit 0); calibrate refuses it. The
    unedited model still plans."""
    args = ["plan", work / "model", "--calib", work / "text.txt", "--method", "rtn", "--group-size", "32", "--seqlen",
            "16", "--json"]  # a --seqlen the 64-position model holds: calibrate refuses the default 512
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    edit_json(work / "model" / "config.json", lambda d: d.update(hidden_size=48))
    line = assert_fault(work, args, "in the safetensors headers but config.json makes it")
    stored = load_file(work / "model" / "model.safetensors")
    match = re.search(r"tensor (\S+) is \[(\d+), (\d+)\] in the safetensors headers but config.json makes it "
                      r"\[(\d+), (\d+)\]", line)
    assert match, line
    assert list(stored[match[1]].shape) == [int(match[2]), int(match[3])]
    assert {int(match[3]), int(match[5])} == {32, 48} or {int(match[2]), int(match[4])} == {32, 48}, line


def test_a_calibration_set_made_on_another_model_of_the_same_config_is_refused(work: Path, calibration_set: Path) -> None:
    """The set recorded a config hash only, so a set made on another model with the same config (seed 3) was used
    (exit 0): its weights fingerprint tells them apart in memory, under --low-memory and through the API; the set
    made on this model still calibrates, and a set without a fingerprint (older quantkit) runs with a warning."""
    from transformers import AutoModelForCausalLM

    import quantkit

    save_tiny_llama(work / "other", seed=3)
    result = run_cli("importance", work / "other", "--calib", work / "text.txt", "--nsamples", "2", "--seqlen", "16",
                     "-o", work / "other-set", "--json")
    assert result.exit_code == 0, result.output
    tlq = ["--method", "tlq", "--group-size", "32"]
    for extra in ([], ["--low-memory"]):
        line = assert_fault(work, ["calibrate", work / "model", "--calib-set", work / "other-set", *tlq, *extra,
                                   "-o", work / "out"], f"was made on {work / 'other'}, whose weights are not those of")
        assert "rebuild the set with `quantkit importance` on" in line and str(work / "model") in line
    loaded = AutoModelForCausalLM.from_pretrained(work / "model")
    with unchanged(work), pytest.raises(quantkit.QuantkitError, match="whose weights are not those of"):
        quantkit.quantize(loaded, calib_set=str(work / "other-set"), method="tlq", group_size=32,
                          output_dir=str(work / "api"))
    result = run_cli("calibrate", work / "model", "--calib-set", calibration_set, *tlq, "-o", work / "out")
    assert result.exit_code == 0, result.output
    old = work / "old-set"
    shutil.copytree(calibration_set, old)
    edit_json(old / "manifest.json", lambda d: d.pop("weights_fingerprint"))
    result = run_cli("calibrate", work / "model", "--calib-set", old, *tlq, "-o", work / "out-old")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "predates weights fingerprints" in line]
    assert len(warned) == 1 and "is not checked" in warned[0], result.stderr


@pytest.fixture
def frozen(immutable):
    """A folder made (where missing) and frozen with chattr +i: nothing can be created in it, even by root."""

    def freeze(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        return immutable(folder)

    return freeze


def test_an_immutable_output_or_work_area_is_refused_before_work(work: Path, no_model_load, frozen) -> None:
    """--overwrite of an immutable folder, qid plot into one and a --resume over an immutable OUT.partial failed
    with "Operation not permitted" (a generic error, after the work)."""
    frozen(work / "ro")
    assert_fault(work, calibrate(work)[:-2] + ["-o", work / "ro", "--overwrite"], "cannot write output")
    (work / "q.csv").write_text("model,method,bits,group_size,N,D,loss_fp,loss_q,qid,eval_text\n"
                                "m,gptq,4,128,1000000,1000000000,3.0,3.1,0.1,e\n")
    assert_fault(work, ["qid", "plot", work / "q.csv", "-o", work / "ro"], "cannot write -o")
    frozen(work / "out.partial")
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "text.txt", *GPTQ, "--low-memory", "--resume",
                        "-o", work / "out"], "cannot write the work area")


def test_an_output_name_too_long_for_the_file_system_is_refused(work: Path) -> None:
    """-o with a 300-character name failed with "File name too long" after the work; 200 characters still run."""
    long = "x" * 300
    assert_fault(work, calibrate(work)[:-2] + ["-o", work / long], "choose a shorter name")
    assert_fault(work, ["eval", work / "model", "--data", work / "text.txt", "--seqlen", "16", "-o", work / long],
                 "choose a shorter name")
    result = run_cli(*calibrate(work)[:-2], "-o", work / ("y" * 200))
    assert result.exit_code == 0, result.output


def test_an_added_token_past_the_embedding_is_refused(work: Path, no_model_load) -> None:
    """tokenizer.json adding "zz" with id 500 beside a 64-row embedding was accepted (transformers gives it a free
    id the model never learnt for it); the tokenizer without that entry is the model's own and calibrates."""
    path = work / "model" / "tokenizer.json"
    edit_json(path, lambda d: d["added_tokens"].append({"id": 500, "content": "zz", "single_word": False,
                                                        "lstrip": False, "rstrip": False, "normalized": False,
                                                        "special": False}))
    (work / "d.txt").write_text(" ".join(["zz", *WORDS * 40]))
    assert_fault(work, ["calibrate", work / "model", "--calib", work / "d.txt", *BASE, "-o", work / "out"],
                 "adds token 'zz' with id 500, past the model's embedding of 64 rows")


@pytest.mark.parametrize("flag", ["--recipe", "--chat-template"])
def test_an_output_holding_the_recipe_or_template_is_refused(work: Path, no_model_load, flag: str) -> None:
    """-o FOLDER --overwrite deleted the --recipe / --chat-template read from inside FOLDER (exit 0)."""
    (work / "rd").mkdir()
    (work / "rd" / "r.yaml").write_text("ignore: [o_proj]\n")
    (work / "rd" / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    given = work / "rd" / ("r.yaml" if flag == "--recipe" else "t.jinja")
    data = work / "text.txt"
    if flag == "--chat-template":
        data = work / "c.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in CHAT * 20))
    assert_fault(work, ["calibrate", work / "model", "--calib", data, *BASE, flag, given, "-o", work / "rd",
                        "--overwrite"], f"holds the input {given}")


def test_qid_fit_output_inside_a_model_directory_is_refused(work: Path) -> None:
    """qid fit q.csv -o M/config.json overwrote the model's config (exit 0); beside the model it is written."""
    good = [f"m{i},gptq,4,128,1000000,{10**9 * (i + 1)},3.0,{3.0 + 0.1 * (i + 1):.1f},{0.1 * (i + 1):.1f},e\n"
            for i in range(4)]
    (work / "q.csv").write_text(HEADER + "".join(good))
    assert_fault(work, ["qid", "fit", work / "q.csv", "--bootstrap", "0", "-o", work / "model" / "config.json"],
                 "a model directory (it holds config.json)")
    result = run_cli("qid", "fit", work / "q.csv", "--bootstrap", "0", "--law", "D", "-o", work / "fit.json")
    assert result.exit_code == 0, result.output
    assert json.loads((work / "fit.json").read_text())["csv"] == str(work / "q.csv")


@pytest.mark.parametrize("family, field, value, fragment", [
    ("qwen3_moe", "num_experts", 8, "config.json sets num_experts = 8 and num_local_experts = 4, two names of one"),
    ("mixtral", "num_experts_per_tok", 0, "config field num_experts_per_tok is 0; a size must be positive"),
])
def test_moe_configs_that_contradict_or_route_nothing_are_refused(tmp_path: Path, family: str, field: str, value: int,
                                                                  fragment: str) -> None:
    """Both ran to exit 0: 8 experts named beside the 4 transformers built from num_local_experts, and routing
    to no expert at all. The unedited model calibrates."""
    from helpers import save_tiny_causal_lm

    model = save_tiny_causal_lm(tmp_path, family)
    text = write_text(tmp_path / "text.txt")
    args = ["calibrate", model, "--calib", text, *BASE, "-o", tmp_path / "out"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "out")
    edit_json(model / "config.json", lambda d: d.update({field: value}))
    assert_fault(tmp_path, args, fragment)


def test_plan_refuses_a_layer_count_the_weights_contradict(work: Path, no_model_load) -> None:
    """config.json num_hidden_layers 3 over 2 stored layers was planned; calibrate refuses it."""
    edit_json(work / "model" / "config.json", lambda d: d.update(num_hidden_layers=3))
    assert_fault(work, ["plan", work / "model", "--calib", work / "text.txt", "--method", "rtn", "--group-size", "32"],
                 "names 3 decoder layers but the checkpoint holds 2")


@pytest.mark.parametrize("fmt", ["fake", "compressed-tensors"])
def test_export_with_a_stray_qparam_or_an_ignored_quantized_linear_is_refused(made: dict, tmp_path: Path,
                                                                             fmt: str) -> None:
    """fake: quantkit_qparams.safetensors with a scale of no quantized linear; compressed-tensors: config.json
    ignoring a linear that quantkit.json quantizes. Both converted with exit 0."""
    export = tmp_path / "export"
    shutil.copytree(made["exports"][fmt], export)
    if fmt == "fake":
        sidecar = export / "quantkit_qparams.safetensors"
        save_file({**load_file(sidecar), "model.layers.7.mlp.up_proj.scale": torch.ones(4)}, sidecar)
        fragment = "tensor model.layers.7.mlp.up_proj.scale belongs to no quantized linear"
    else:
        edit_json(export / "config.json", lambda d: d["quantization_config"].update(
            ignore=["lm_head", "model.layers.0.self_attn.q_proj"]))
        fragment = "ignores 'model.layers.0.self_attn.q_proj', which quantkit.json lists as quantized"
    other = "compressed-tensors" if fmt == "fake" else "fake"
    assert_fault(tmp_path, ["export", export, "--format", other, "-o", tmp_path / "x"], fragment)


def test_demo_refuses_a_format_that_cannot_store_the_model_before_the_first_step(work: Path) -> None:
    """gptq_v2 at 3 bits cannot pack the 16-wide k/v projections: the demo ran rtn-w4 and gptq-w4 first and failed
    at rtn-w3 after three progress lines. Now one line before any; with compressed-tensors the demo runs."""
    args = ["demo", "--model", work / "model", "--data", work / "text.txt", "--seqlen", "16", "--nsamples", "2"]
    with unchanged(work):
        result = run_cli(*args, "-o", work / "d")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "packs 3-bit codes into whole int32 words" in lines[0], lines
    result = run_cli(*args, "--format", "compressed-tensors", "-o", work / "d")
    assert result.exit_code == 0, result.output
    assert (work / "d" / "results.json").is_file()


@pytest.mark.parametrize("extra, fragment", [
    (["--power", "inf"], "--power must be a finite number, got inf"),  # calibrate's line
    (["--floor-fraction", "0.3"], "--floor-fraction 0.3 (floor_fraction=) sets how many of the tokens --top-fraction"),
])
def test_importance_options_that_do_nothing_or_overflow_are_refused(work: Path, no_model_load, extra: list,
                                                                    fragment: str) -> None:
    """--power inf made every weight inf or 0 and --floor-fraction alone was ignored, both with exit 0."""
    assert_fault(work, ["importance", work / "model", "--calib", work / "text.txt", "--nsamples", "2", "--seqlen", "16",
                        *extra, "-o", work / "set"], fragment)


def test_quantize_lm_head_beside_a_recipe_that_ignores_it_is_refused(work: Path, no_model_load) -> None:
    """--quantize-lm-head with a recipe ignoring lm_head exported the head in FP, exit 0."""
    (work / "r.yaml").write_text("ignore: [lm_head]\n")
    assert_fault(work, calibrate(work, "--quantize-lm-head", "--recipe", work / "r.yaml"),
                 "--quantize-lm-head (lm_head=True) quantizes lm_head, and the recipe leaves it in full precision")


def test_a_sliding_window_of_no_tokens_is_refused_where_layers_slide() -> None:
    """gemma3_text with sliding_window 0 builds, and its sliding layers attend to nothing; configs whose layers do
    not slide keep 0 as a placeholder (qwen2_moe's default) and pass."""
    from transformers import AutoConfig

    from quantkit.errors import QuantkitError
    from quantkit.models.checks import check_config_values

    sliding = AutoConfig.for_model("gemma3_text", num_hidden_layers=6)
    assert "sliding_attention" in sliding.layer_types
    check_config_values(sliding, "m")
    sliding.sliding_window = 0
    with pytest.raises(QuantkitError, match=re.escape("config field sliding_window is 0; its sliding-window layers")):
        check_config_values(sliding, "m")
    placeholder = AutoConfig.for_model("qwen2_moe", sliding_window=0, use_sliding_window=False)
    check_config_values(placeholder, "m")


# ---------------------------------------------------------------- exports read back (battery round 8)


def readers_refuse(tmp_path: Path, export: Path, text: Path, fragment: str) -> None:
    """eval, `export --format fake` and load_quantized each refuse the export in one line naming `fragment`."""
    import quantkit

    for args in (["eval", export, "--data", text, "--seqlen", "16"],
                 ["export", export, "--format", "fake", "-o", tmp_path / "again"]):
        assert_fault(tmp_path, args, fragment)
    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError) as caught:
        quantkit.load_quantized(export)
    assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fake"])
def test_an_export_whose_config_lies_about_a_stored_shape_is_refused(made: dict, tmp_path: Path, fmt: str) -> None:
    """config.json vocab_size 80 over 64 stored rows: eval and load_quantized raised RuntimeError tracebacks, `export
    --format fake` copied the lie on (exit 0). The stored rows are read here from the file itself."""
    export = tmp_path / "export"
    shutil.copytree(made["exports"][fmt], export)
    rows = load_file(export / "model.safetensors")["model.embed_tokens.weight"].shape
    edit_json(export / "config.json", lambda d: d.update(vocab_size=rows[0] + 16))
    readers_refuse(tmp_path, export, made["text"], f"is {list(rows)} in the export but config.json makes it "
                                                   f"{[rows[0] + 16, rows[1]]} (config.json's vocab_size = {rows[0] + 16})")


def test_a_model_whose_config_lies_about_a_stored_shape_names_the_field(work: Path, no_model_load) -> None:
    """The model side of the same check names the config field too."""
    edit_json(work / "model" / "config.json", lambda d: d.update(vocab_size=80))
    assert_fault(work, calibrate(work), "in model.safetensors but config.json makes it [80, 32] (config.json's "
                                        "vocab_size = 80); config.json does not match the weights")


def sharded_copy(made: dict, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the compressed-tensors export in several shards (`quantkit export --max-shard-size`)."""
    out = tmp_path / "sh"
    result = run_cli("export", made["exports"]["compressed-tensors"], "--format", "compressed-tensors",
                     "--max-shard-size", "20KB", "-o", out)
    assert result.exit_code == 0, result.output
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    return out, shards


def test_a_sharded_export_holding_a_tensor_twice_is_refused(made: dict, tmp_path: Path) -> None:
    """A weight_scale of the first shard also stored (zeros) in the last, the index naming the first: load_quantized
    and `export --format fake` took the zeros, eval the right copy (three readers, two models)."""
    import quantkit

    out, shards = sharded_copy(made, tmp_path)
    first, last = load_file(shards[0]), load_file(shards[-1])
    reference = quantkit.load_quantized(out).state_dict()  # the untouched shards load (the check is no blanket refusal)
    plain = quantkit.load_quantized(made["exports"]["compressed-tensors"]).state_dict()
    assert all(torch.equal(reference[k], plain[k]) for k in plain)
    key = next(k for k in sorted(first) if k.endswith("weight_scale"))
    save_file({**last, key: torch.zeros_like(first[key])}, shards[-1], metadata={"format": "pt"})
    readers_refuse(tmp_path, out, made["text"], f"tensor {key} is stored twice, in {shards[0].name} and in "
                                                f"{shards[-1].name} (model.safetensors.index.json names {shards[0].name})")


def test_a_sharded_model_holding_a_tensor_twice_is_refused(work: Path, no_model_load) -> None:
    """The model reader refuses the same layout (transformers reads the index's copy, a reader of every shard the
    last one)."""
    tensors = load_file(work / "model" / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, work / "model" / fname, metadata={"format": "pt"})
    (work / "model" / "model.safetensors").unlink()
    (work / "model" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    dup = names[0]
    save_file({**{k: tensors[k] for k in halves["model-00002-of-00002.safetensors"]}, dup: torch.zeros_like(tensors[dup])},
              work / "model" / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    assert_fault(work, calibrate(work), f"tensor {dup} is stored twice, in model-00001-of-00002.safetensors and in "
                                        "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("targets, left_out", [
    (["re:.*q_proj$"], "model.layers.0.mlp.down_proj"),
    (["model.layers.0.self_attn.q_proj"], "model.layers.0.mlp.down_proj"),
    ([r"re:^model\.layers\.0\."], "model.layers.1.mlp.down_proj"),
])
def test_config_groups_that_leave_a_quantized_linear_out_are_refused(made: dict, tmp_path: Path, targets: list,
                                                                     left_out: str) -> None:
    """config_groups narrowed to some linears while every linear is packed: eval, export and load_quantized went on
    (transformers would load the others as dense weights). The linear left out is found here by matching the targets
    by hand against quantkit.json's list; a target list covering every linear by pattern still loads."""
    import quantkit

    export = tmp_path / "ct"
    shutil.copytree(made["exports"]["compressed-tensors"], export)
    modules = json.loads((export / "quantkit.json").read_text())["quantized_modules"]
    covered = [m for m in modules if any(re.match(t[3:], m) if t.startswith("re:") else t == m for t in targets)]
    assert sorted(set(modules) - set(covered))[0] == left_out  # the first linear no target covers, by name
    edit_json(export / "config.json", lambda d: group_0(d).update(targets=[r"re:^model\.layers\.\d+\."]))
    quantkit.load_quantized(export)
    edit_json(export / "config.json", lambda d: group_0(d).update(targets=targets))
    readers_refuse(tmp_path, export, made["text"], f"no config group of config.json's quantization_config targets "
                                                   f"{left_out}, which quantkit.json lists as quantized")


def test_a_config_group_target_that_is_no_regular_expression_is_refused(made: dict, tmp_path: Path) -> None:
    """Targets are matched by compressed-tensors' own matcher; a "re:" target it cannot compile is one line."""
    export = tmp_path / "ct"
    shutil.copytree(made["exports"]["compressed-tensors"], export)
    edit_json(export / "config.json", lambda d: group_0(d).update(targets=["re:(unclosed"]))
    readers_refuse(tmp_path, export, made["text"], "config.json's quantization_config targets a pattern of "
                                                   "['re:(unclosed'] that is no regular expression")


def test_load_quantized_takes_a_dtype(made: dict) -> None:
    """load_quantized(path, dtype=torch.float16) raised TypeError; it now loads the model in that dtype. Reference:
    plain transformers loading the fake export (dense dequantized weights) in float16, and the compressed-tensors
    export of the same run gives the same tensors."""
    from transformers import AutoModelForCausalLM

    import quantkit

    for dtype in (torch.float16, "bfloat16"):
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        plain = AutoModelForCausalLM.from_pretrained(made["exports"]["fake"], dtype=torch_dtype).state_dict()
        for fmt in ("fake", "compressed-tensors"):
            loaded = quantkit.load_quantized(made["exports"][fmt], dtype=dtype).state_dict()
            assert loaded.keys() == plain.keys()
            for key, tensor in plain.items():
                assert loaded[key].dtype == torch_dtype and torch.equal(loaded[key], tensor), (fmt, key)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"device_map": "auto"}, "load_quantized() has no argument 'device_map'; it takes path and dtype"),
    ({"torch_dtype": torch.float16}, "load_quantized() has no argument 'torch_dtype'; did you mean 'dtype'?"),
    ({"dtype": torch.int8}, "load_quantized(dtype=) must be torch.float32, torch.float16 or torch.bfloat16"),
    ({"dtype": "Float16"}, "did you mean torch.float16? got 'Float16' (str)"),
    ({"dtype": 16}, "got 16 (int)"),
])
def test_load_quantized_refuses_arguments_it_does_not_take(made: dict, tmp_path: Path, kwargs: dict,
                                                           fragment: str) -> None:
    """from_pretrained's keywords raised TypeError "unexpected keyword argument"."""
    import quantkit

    with unchanged(tmp_path), pytest.raises(quantkit.QuantkitError) as caught:
        quantkit.load_quantized(made["exports"]["compressed-tensors"], **kwargs)
    assert fragment in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize("edit", [
    lambda q: q.update(dynamic={r"-:.*mlp\.down_proj$": {}}),
    lambda q: q.update(modules_to_not_convert=["model.layers.0.mlp.down_proj"]),
    lambda q: q.update(modules_in_block_to_quantize=[["self_attn.q_proj", "self_attn.k_proj"]]),
    lambda q: q.update(block_name_to_quantize="model.decoder.layers"),
])
def test_a_gptq_config_that_leaves_a_quantized_linear_dense_is_refused(made: dict, tmp_path: Path, edit) -> None:
    """The GPTQ form of narrowed targets: a "-:" dynamic rule, modules_to_not_convert, a shorter
    modules_in_block_to_quantize or another block name over down_proj's packed tensors loaded without a word."""
    export = tmp_path / "gptq"
    shutil.copytree(made["exports"]["gptq"], export)
    edit_json(export / "config.json", lambda d: edit(d["quantization_config"]))
    readers_refuse(tmp_path, export, made["text"], "config.json's quantization_config gives model.layers.0.mlp.down_proj "
                                                   "no quantization (a dense weight), where quantkit.json stores it 4-bit g32")


MIXED_SYM = {"sym": [], "asym": ["--asym"], "sym, q_proj asym": ["--recipe", "overrides: [{targets: [q_proj], sym: false}]"],
             "asym, down_proj sym": ["--asym", "--recipe", "overrides: [{targets: [down_proj], sym: true}]"]}


def with_recipe(work: Path, extra: list) -> list:
    """`extra` with a recipe's YAML text (after --recipe) written to work/r.yaml and given as that path."""
    if "--recipe" not in extra:
        return extra
    i = extra.index("--recipe") + 1
    (work / "r.yaml").write_text(extra[i] + "\n")
    return [*extra[:i], work / "r.yaml", *extra[i + 1 :]]


@pytest.mark.parametrize("extra", MIXED_SYM.values(), ids=MIXED_SYM.keys())
def test_the_printed_load_call_and_the_card_load_the_export(work: Path, extra: list) -> None:
    """An asymmetric compressed-tensors export printed (and its card gave) a plain from_pretrained call, which fails in
    transformers (the packed zero points do not fit its compressed modules); one mixing symmetric and asymmetric
    linears (a recipe's sym) loaded in no call of transformers 5.25, and its card named load_quantized only. Both
    calls are now run as printed: same logits as load_quantized (itself checked against dense references in
    test_export) and as the export's fake (dense) form in plain transformers."""
    import transformers

    import quantkit

    out = work / "out"
    result = run_cli(*[a for a in calibrate(work, *with_recipe(work, extra)) if a != "--json"])  # the summary's lines
    assert result.exit_code == 0, result.output
    line = result.stdout.strip().splitlines()[-1]
    call = re.fullmatch(r"load: (AutoModelForCausalLM\.from_pretrained\(.*\)), or quantkit\.load_quantized\(.*\)", line)
    assert call, line
    card = (out / "README.md").read_text()
    code = card[card.index("```python\n", card.index("## Load it")) + 10:].split("```")[0]
    ids = torch.arange(2, 18)[None]
    reference = quantkit.load_quantized(out)(ids).logits
    names = {"AutoModelForCausalLM": transformers.AutoModelForCausalLM,
             "CompressedTensorsConfig": transformers.CompressedTensorsConfig}  # transformers' names load lazily
    printed = eval(call[1], names)  # noqa: S307 - the line the run printed, run as a user would
    scope = {}
    exec(code.replace("THIS_REPO_OR_DIR", str(out)), scope)  # noqa: S102 - the card's code block, as written
    for model in (printed, scope["model"]):
        assert torch.allclose(model(ids).logits, reference, atol=1e-5), line
    assert run_cli("export", out, "--format", "fake", "-o", work / "fake").exit_code == 0
    dense = transformers.AutoModelForCausalLM.from_pretrained(work / "fake")(ids).logits
    assert (dense - reference).abs().max() <= 1e-3 * reference.abs().max()


# ---------------------------------------------------------------- qid (battery round 8)


def exact_rows(eval_texts=("e",), group_size: int = 128) -> str:
    """A fit table of exact ouyang2024-gptq QiDs on a 3 N x 3 D x 2 P grid, its rows cycling through `eval_texts`."""
    law = PUBLISHED_LAWS["ouyang2024-gptq"]
    rows = []
    for i, (n, d, p) in enumerate((n, d, p) for n in (1e6, 4e6, 1.6e7) for d in (1e9, 4e9, 1.6e10) for p in (2, 3)):
        q = law.qid(n, d, p)
        rows.append(f"m{i},gptq,{p},{group_size},{int(n)},{int(d)},3.0,{3.0 + q!r},{q!r},"
                    f"{eval_texts[i % len(eval_texts)]}\n")
    return HEADER + "".join(rows)


def test_qid_fit_refuses_rows_of_two_eval_texts(tmp_path: Path) -> None:
    """Rows measured on two eval texts were pooled into one law (exit 0); refused naming both texts and a line of
    each. The same rows on one text fit (the table itself is sound)."""
    (tmp_path / "q.csv").write_text(exact_rows(("e",)))
    assert run_cli("qid", "fit", tmp_path / "q.csv", "--bootstrap", "0").exit_code == 0
    (tmp_path / "q.csv").write_text(exact_rows(("e", "other")))
    assert_fault(tmp_path, ["qid", "fit", tmp_path / "q.csv", "--bootstrap", "0"],
                 "the rows were measured on 2 eval texts ('e' at line 2, 'other' at line 3); QiD on different texts")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_qid_fit_reads_a_table_with_a_byte_order_mark(tmp_path: Path, newline: str) -> None:
    """A spreadsheet's "CSV UTF-8" starts with a byte-order mark: the first column read as '\\ufeffmodel' and every
    fit point's model was null. Reference: the published law the exact rows were made from, and the CSV's models."""
    law = PUBLISHED_LAWS["ouyang2024-gptq"]
    (tmp_path / "q.csv").write_bytes(("\ufeff" + exact_rows()).replace("\n", newline).encode("utf-8"))
    result = run_cli("qid", "fit", tmp_path / "q.csv", "--bootstrap", "0", "--law", "unified", "--json")
    assert result.exit_code == 0, result.output
    [fit] = json.loads(result.stdout)["fits"]
    for name in ("k", "alpha", "beta", "gamma"):
        assert fit["params"][name]["value"] == pytest.approx(getattr(law, name), rel=1e-9)
    assert [r["model"] for r in fit["residuals"]] == [f"m{i}" for i in range(18)]


def test_qid_measure_appends_to_a_table_with_a_byte_order_mark(tmp_path: Path) -> None:
    """A table re-saved by a spreadsheet (a byte-order mark before the header) was refused as having other columns."""
    from quantkit.qid.table import COLUMNS, TableWriter

    path = tmp_path / "m.csv"
    path.write_bytes(("\ufeff" + ",".join(COLUMNS) + "\n").encode("utf-8"))
    TableWriter(path).close()
    assert path.read_bytes() == ("\ufeff" + ",".join(COLUMNS) + "\n").encode("utf-8")


def test_qid_fit_refuses_a_column_named_twice(tmp_path: Path) -> None:
    """A header naming N twice read the second N column only (exit 0); refused naming the column."""
    rows = [line.split(",") for line in exact_rows().splitlines()]
    (tmp_path / "q.csv").write_text("".join(",".join(r[:5] + r[4:]) + "\n" for r in rows))
    assert_fault(tmp_path, ["qid", "fit", tmp_path / "q.csv", "--bootstrap", "0"],
                 "q.csv's header names column 'N' twice")


def test_qid_predict_refuses_draws_that_are_no_list(tmp_path: Path) -> None:
    """A fit JSON whose draws' alpha is a number (where `qid fit -o` writes a list) gave a TypeError traceback."""
    (tmp_path / "q.csv").write_text(exact_rows())
    fit = tmp_path / "f.json"
    assert run_cli("qid", "fit", tmp_path / "q.csv", "--bootstrap", "3", "--law", "unified", "-o", fit).exit_code == 0
    args = ["qid", "predict", "--params", "2e6", "--tokens", "2e9", "--bits", "3", "--law", fit]
    assert run_cli(*args).exit_code == 0
    doc = json.loads(fit.read_text())
    doc["fits"][0]["draws"]["alpha"] = -0.5
    fit.write_text(json.dumps(doc))
    assert_fault(tmp_path, args, "the draws' 'alpha' is -0.5, not a list of finite numbers")


def test_qid_training_level_refuses_a_law_fitted_at_another_group_size(tmp_path: Path) -> None:
    """A fit of group-size-128 rows, then --group-size 32 (with a measured --qid, so no model is needed): exit 0
    before; refused naming both sizes. The fit's own group size is taken."""
    (tmp_path / "q.csv").write_text(exact_rows())
    fit = tmp_path / "f.json"
    result = run_cli("qid", "fit", tmp_path / "q.csv", "--bootstrap", "0", "-o", fit)
    assert result.exit_code == 0, result.output
    assert {tuple(f["group_size"]) for f in json.loads(fit.read_text())["fits"]} == {(128,)}
    model = save_tiny_llama(tmp_path / "m")
    args = ["qid", "training-level", model, "--law", fit, "--bits", "3", "--qid", "0.05", "--json"]
    assert run_cli(*args, "--group-size", "128").exit_code == 0
    assert_fault(tmp_path, [*args, "--group-size", "32"],
                 f"--group-size 32 is not the group size the law in {fit} was fitted on (128)")


def test_qid_measure_measures_a_checkpoint_given_twice_once(work: Path) -> None:
    """`qid measure M M` (and M under a second spelling, and --bits 4,4) wrote two rows of one cell; one row now, equal
    to a run that names it once."""
    once, twice = work / "once.csv", work / "twice.csv"
    common = ["--eval", work / "text.txt", "--eval-tokens", "64", "--eval-seqlen", "16", "--nsamples", "2",
              "--calib-seqlen", "16", "--group-size", "32", "--methods", "rtn", "--tokens", "1e9"]
    result = run_cli("qid", "measure", work / "model", *common, "--bits", "4", "-o", once)
    assert result.exit_code == 0, result.output
    result = run_cli("qid", "measure", work / "model", f"{work / 'model'}/", work / "model", *common, "--bits", "4,4",
                     "-o", twice)
    assert result.exit_code == 0, result.output
    import csv

    [row_once], [row_twice] = (list(csv.DictReader(path.open())) for path in (once, twice))
    assert {k: v for k, v in row_twice.items() if k != "seconds"} == {k: v for k, v in row_once.items() if k != "seconds"}


@pytest.mark.parametrize("existing", [False, True], ids=["new CSV", "CSV with a row"])
def test_qid_measure_into_a_csv_another_measure_writes_is_refused(work: Path, existing: bool) -> None:
    """Fault battery round 10 'two qid measure into one CSV': two measures started together both found the cell
    missing and both appended it (the fit then counted it twice). A measure now holds the CSV (flock) from reading
    its finished cells to its last row; while another process holds it, a second is refused in one line and the
    CSV is as it was (a new one not made)."""
    import fcntl

    csv_path = work / "c.csv"
    args = ["qid", "measure", work / "model", "--eval", work / "text.txt", "--eval-tokens", "64", "--eval-seqlen", "16",
            "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "32", "--tokens", "1e9", "--methods", "rtn",
            "-o", csv_path]
    if existing:
        assert run_cli(*args, "--bits", "4").exit_code == 0
    before = csv_path.read_bytes() if existing else None
    holder = os.open(csv_path, os.O_RDWR | os.O_CREAT)  # another measure, as the kernel sees it
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        line = assert_fault(work, [*args, "--bits", "3"], f"{csv_path} is being written by another quantkit qid measure")
        assert "wait for it to end" in line
    finally:
        os.close(holder)
    assert (csv_path.read_bytes() if existing else csv_path.stat().st_size) == (before if existing else 0)
    if not existing:
        csv_path.unlink()
    result = run_cli(*args, "--bits", "3")  # the lock went with its holder
    assert result.exit_code == 0, result.output
    rows = [line for line in csv_path.read_text().splitlines()[1:] if line.strip()]
    assert len(rows) == (2 if existing else 1)


@pytest.mark.parametrize("args, fragment", [
    (["calibrate", "MODEL", "--calib", "OTHER", "--calib", "TEXT", "--method", "rtn", "-o", "OUT"],
     "--calib is given twice ('OTHER', then 'TEXT') and only one value is read; give it once"),
    (["eval", "MODEL", "--data", "OTHER", "--data", "TEXT", "--seqlen", "16"], "--data is given twice"),
    (["qid", "measure", "MODEL", "--eval", "TEXT", "--bits", "4", "--bits", "3", "-o", "OUT"],
     "--bits is given twice ('4', then '3')"),
    (["calibrate", "MODEL", "--calib", "TEXT", "--bits", "4", "--bits=3", "-o", "OUT"], "--bits is given twice"),
    (["calibrate", "MODEL", "--calib", "TEXT", "--format", "fake", "--format", "gptq", "-o", "OUT"],
     "--format is given twice ('fake', then 'gptq')"),
    (["calibrate", "MODEL", "--calib", "TEXT", "-o", "A", "--out", "OUT"], "-o and --out (one option) are both given"),
    (["calibrate", "MODEL", "--calib", "TEXT", "-oA", "-o", "OUT"], "-o is given twice ('A', then 'OUT')"),
    (["calibrate", "MODEL", "--calib", "TEXT", "--act-order", "--no-act-order", "-o", "OUT"],
     "--act-order and --no-act-order are both given; give one of them"),
    (["export", "MODEL", "--format", "fake", "-o", "A", "-o", "OUT"], "-o is given twice"),
])
def test_an_option_that_takes_one_value_given_twice_is_refused(work: Path, args: list, fragment: str) -> None:
    """click kept the last of them silently (--calib a --calib b calibrated on b alone): refused in one line before
    anything is read, by the CLI's command layer for every command."""
    names = {"MODEL": work / "model", "TEXT": work / "text.txt", "OTHER": work / "other.txt", "OUT": work / "out",
             "A": work / "a"}
    write_text(work / "other.txt", seed=9)
    for name, path in names.items():
        fragment = fragment.replace(f"'{name}'", repr(str(path)))
    assert_fault(work, [f"-o{names['A']}" if a == "-oA" else names.get(a, a) for a in args], fragment)


def test_options_documented_as_repeatable_and_one_flag_twice_pass(work: Path) -> None:
    """--tokens (documented as repeatable) twice and one flag twice are no conflict; an option's value that looks
    like an option (--eval's value "--calib") is a value, and after "--" every word is an argument, as click parses."""
    from quantkit.cli import main
    from quantkit.cli_options import repeated_option

    measure = main.get_command(None, "qid").get_command(None, "measure")
    assert repeated_option(measure, ["M", "--tokens", "M=1e9", "--tokens", "N=2e9", "--no-progress", "--no-progress",
                                     "-o", "x"], None) is None
    assert repeated_option(measure, ["M", "--eval", "--calib", "--calib", "c", "-o", "x"], None) is None
    assert repeated_option(measure, ["M", "-o", "x", "--", "-o", "y"], None) is None
    assert repeated_option(measure, ["M", "-o", "x", "-o", "y"], None).startswith("-o is given twice")


def _parser_without_make_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """click 9.0 is to parse without the parser make_parser returns: click's own parse still works here."""
    import click

    real = click.Command.make_parser

    def make_parser(self, ctx):
        if sys._getframe(1).f_globals.get("__name__") != "click.core":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute 'make_parser'")
        return real(self, ctx)

    monkeypatch.setattr(click.Command, "make_parser", make_parser)


def _parser_whose_order_lists_each_option_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import click

    parser_type = type(click.Command("c").make_parser(click.Context(click.Command("c"))))
    parse = parser_type.parse_args

    def first_of_each(self, args):
        values, rest, order = parse(self, args)
        return values, rest, list(dict.fromkeys(order))

    monkeypatch.setattr(parser_type, "parse_args", first_of_each)


@pytest.mark.parametrize("change", [_parser_without_make_parser, _parser_whose_order_lists_each_option_once])
def test_a_click_whose_parser_answers_otherwise_is_refused_in_one_line(work: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       change) -> None:
    """repeated_option reads arguments with the parser click's Command.make_parser returns (click 8.4.2 to 8.5.1:
    the same class; deprecated since 8.2, to go in 9.0; no public call says where each occurrence came). A click
    without it gave 'AttributeError: ... (--debug shows the traceback)' on every command, and one whose order list
    kept one entry per option let `--calib a --calib b` through (b alone read). Both now get one line naming click
    and the version to install; the lock's and the floor's click pass the same probe (the tests above)."""
    import quantkit.cli_options as cli_options

    change(monkeypatch)
    cli_options._parser_answers.cache_clear()
    try:
        write_text(work / "other.txt", seed=9)
        line = assert_fault(work, ["calibrate", work / "model", "--calib", work / "other.txt", "--calib",
                                   work / "text.txt", "--method", "rtn", "-o", work / "out"], "install click>=8.4.2,<9")
        assert line.startswith("error: click ") and "option given twice" in line, line
    finally:
        monkeypatch.undo()
        cli_options._parser_answers.cache_clear()
    assert cli_options._parser_answers()


def test_qid_predict_and_training_level_refuse_bits_the_fit_never_measured(tmp_path: Path) -> None:
    """A law fitted on 2- and 3-bit rows predicted a QiD at 8 bits (exit 0). Widths inside the fitted ones are
    answered; the one outside is refused by both commands, naming the widths fitted."""
    (tmp_path / "q.csv").write_text(exact_rows())
    fit = tmp_path / "f.json"
    assert run_cli("qid", "fit", tmp_path / "q.csv", "--bootstrap", "0", "-o", fit).exit_code == 0
    ask = ["qid", "predict", "--law", fit, "--params", "4e6", "--tokens", "4e9"]
    for inside in ("2", "2.5", "3"):
        result = run_cli(*ask, "--bits", inside)
        assert result.exit_code == 0, result.output
    fragment = f"--bits 8 is outside the widths the law in {fit} was fitted on (2, 3)"
    assert_fault(tmp_path, [*ask, "--bits", "8"], fragment)
    model = save_tiny_llama(tmp_path / "m")
    assert_fault(tmp_path, ["qid", "training-level", model, "--law", fit, "--bits", "8", "--qid", "0.05"], fragment)


def test_a_gptq_export_whose_checkpoint_names_differ_from_the_models_reads_back() -> None:
    """The GPTQ read check matched the config's rules against the model's names (ergo's checkpoint stores attn.wo
    for the model's self_attn.o_proj) and refused quantkit's own export; the writer's config (the reference) is
    read with the checkpoint names it was written with."""
    from quantkit.export.common import ExportPlan, Setting
    from quantkit.export.formats.gptq import GPTQFormat

    base, other = Setting(4, 32, True, False), Setting(2, 16, False, False)
    settings = {f"model.layers.{i}.attn.{n}": (other if n == "wo" and i == 0 else base)
                for i in range(2) for n in ("wq", "wo")}
    names = {k: k.replace("attn.wo", "self_attn.o_proj").replace("attn.wq", "self_attn.q_proj") for k in settings}
    fmt = GPTQFormat(2)
    config = fmt.quantization_config(ExportPlan(settings=settings, model_names=tuple(sorted(names.items()))))
    fmt.check_declared(config, settings, "x", names)


def writing_to(args: list, out: Path) -> list:
    """A command's `args` with its -o value replaced by `out`."""
    i = args.index("-o") + 1
    return [*args[:i], out, *args[i + 1 :]]


def test_an_export_mixing_symmetric_and_asymmetric_linears_is_stored_asymmetric(work: Path) -> None:
    """The symmetric linears of a mixed export are stored asymmetric with zero points of 0 on compressed-tensors'
    grid (unpacked here by hand: 8, our midpoint), so config.json declares one scheme; quantkit.json keeps them
    symmetric, and the same run in low memory writes the same bytes."""
    extra = with_recipe(work, MIXED_SYM["sym, q_proj asym"])
    assert run_cli(*calibrate(work, *extra)).exit_code == 0
    groups = json.loads((work / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [(g["targets"], g["weights"]["symmetric"]) for g in groups.values()] == [(["Linear"], False)]
    manifest = json.loads((work / "out" / "quantkit.json").read_text())
    assert manifest["spec"]["sym"] is True
    assert {n: s["sym"] for n, s in manifest["module_specs"].items()} == \
        {f"model.layers.{i}.self_attn.q_proj": False for i in range(2)}
    zero_point = load_file(work / "out" / "model.safetensors")["model.layers.1.mlp.down_proj.weight_zero_point"]
    nibbles = torch.stack([(zero_point >> (4 * k)) & 15 for k in range(8)], dim=1).flatten(0, 1)
    assert zero_point.shape == (32 // 8, 2) and bool((nibbles == 8).all())
    streamed = work / "streamed"
    assert run_cli(*writing_to(calibrate(work, *extra), streamed), "--low-memory").exit_code == 0
    assert (streamed / "model.safetensors").read_bytes() == (work / "out" / "model.safetensors").read_bytes()


def test_a_mixed_export_in_the_earlier_layout_still_reads(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export quantkit wrote before mixed exports were stored asymmetric (a config group per symmetry, no zero
    points for the symmetric linears) reads back to the same model as today's."""
    import quantkit
    from quantkit.export.formats.compressed_tensors import CompressedTensorsFormat

    extra = with_recipe(work, MIXED_SYM["sym, q_proj asym"])
    assert run_cli(*calibrate(work, *extra)).exit_code == 0
    earlier = work / "earlier"
    with monkeypatch.context() as patch:  # the writer as it was: each linear stored as solved
        patch.setattr(CompressedTensorsFormat, "stored_settings", lambda self, settings: settings)
        assert run_cli(*writing_to(calibrate(work, *extra), earlier)).exit_code == 0
    groups = json.loads((earlier / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["symmetric"] for g in groups.values()) == [False, True]
    ids = torch.arange(2, 18)[None]
    assert torch.equal(quantkit.load_quantized(earlier)(ids).logits, quantkit.load_quantized(work / "out")(ids).logits)


def test_a_symmetric_linears_zero_point_other_than_0_is_refused(work: Path) -> None:
    """transformers reads a mixed export's symmetric linears through their zero points, quantkit by quantkit.json's
    sym: a zero point other than 0 would make them load different models."""
    extra = with_recipe(work, MIXED_SYM["sym, q_proj asym"])
    assert run_cli(*calibrate(work, *extra)).exit_code == 0
    edit_tensors(work / "out", model__layers__0__mlp__up_proj__weight_zero_point=lambda t: t + 1)
    readers_refuse(work, work / "out", work / "text.txt", "model.layers.0.mlp.up_proj's stored tensors do not fit the "
                                                          "4-bit g32 setting quantkit.json gives it (model.layers.0."
                                                          "mlp.up_proj: a symmetric result must have every zero equal to 8)")


def test_the_load_line_of_asymmetric_linears_of_several_widths_is_what_transformers_does(work: Path) -> None:
    """transformers 5.25 decompresses an asymmetric export with one config group's scheme for every linear: the line
    printed from_pretrained(..., CompressedTensorsConfig(dequantize=True)) for one whose down_proj is 8-bit, and it
    loaded another model (logits 8% off). The line and the card now give that call where the installed transformers
    loads load_quantized's model with it, and load_quantized with the reason where it does not (checked both ways)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import quantkit

    extra = with_recipe(work, ["--asym", "--recipe", "overrides: [{targets: [down_proj], bits: 8}]"])
    result = run_cli(*[a for a in calibrate(work, *extra) if a != "--json"])
    assert result.exit_code == 0, result.output
    line, card = result.stdout.strip().splitlines()[-1], (work / "out" / "README.md").read_text()
    ids = torch.arange(2, 18)[None]
    reference = quantkit.load_quantized(work / "out")(ids).logits
    try:
        got = AutoModelForCausalLM.from_pretrained(
            work / "out", quantization_config=CompressedTensorsConfig(dequantize=True))(ids).logits
        loads = bool((got - reference).abs().max() <= 1e-3 * reference.abs().max())
    except Exception:  # noqa: BLE001 - whatever this transformers raises on it (5.25: RuntimeError)
        loads = False
    if loads:
        assert "CompressedTensorsConfig(dequantize=True)" in line and "CompressedTensorsConfig(dequantize=True)" in card
    else:
        assert line.startswith(f"load: quantkit.load_quantized('{work / 'out'}') (transformers ") and \
            "several widths or group sizes" in line and "--format fake" in line
        assert "from_pretrained" not in card and 'quantkit.load_quantized("DIR")' in card


def test_quantize_output_dir_under_the_home_folder(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize(output_dir="~/qk9") wrote a folder literally named '~' in the working folder; ~ is the home folder, as
    the shell reads it (the model and data paths were already read so). Reference: the CLI's export to the expanded
    path, byte for byte."""
    import quantkit

    monkeypatch.setenv("HOME", str(work / "home"))
    (work / "home").mkdir()
    done = quantkit.quantize("~/../model", data="~/../text.txt", output_dir="~/qk9", method="rtn", nsamples=2,
                             seqlen=16, group_size=32)
    assert not (work / "~").exists() and Path(done.output_dir) == work / "home" / "qk9"
    assert run_cli(*calibrate(work)).exit_code == 0
    assert (work / "home" / "qk9" / "model.safetensors").read_bytes() == (work / "out" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("bits", [8, 4])
def test_the_load_line_of_moe_experts_is_what_transformers_does(tmp_path: Path, bits: int) -> None:
    """A Mixtral W8A8 export (experts stored int-quantized) printed a plain from_pretrained call, which fails in
    transformers 5.21 and 5.25 (its MoE conversion decompresses packed and fp8 experts only); W4A8 experts are packed
    and load. The line and the card give the call exactly where plain transformers loads the export."""
    from transformers import AutoModelForCausalLM

    tiny_moe("mixtral").save_pretrained(tmp_path / "moe")
    make_tokenizer().save_pretrained(tmp_path / "moe")
    out = tmp_path / "out"
    result = run_cli("calibrate", tmp_path / "moe", "--calib", write_text(tmp_path / "t.txt"), "--method", "rtn",
                     "--nsamples", "2", "--seqlen", "16", "--bits", str(bits), "--group-size", "-1", "--act-bits", "8",
                     "-o", out)
    assert result.exit_code == 0, result.output
    line, card = result.stdout.strip().splitlines()[-1], (out / "README.md").read_text()
    try:
        AutoModelForCausalLM.from_pretrained(out)(torch.arange(2, 18)[None])
        loads = True
    except Exception:  # noqa: BLE001 - whatever this transformers raises on it (5.21, 5.25: RuntimeError)
        loads = False
    if loads:
        assert line.startswith(f"load: AutoModelForCausalLM.from_pretrained('{out}')") and "from_pretrained(" in card
    else:
        assert line.startswith(f"load: quantkit.load_quantized('{out}') (transformers ") and \
            "loads no MoE experts stored int-quantized" in line and "vLLM serves it" in line
        assert "from_pretrained" not in card and 'quantkit.load_quantized("DIR")' in card
