"""A battery of bad inputs and faults across the CLI, the Python API, qid, eval, export, importance and demo.

Every case is input that must be refused. Each runs in a fresh copy of a tiny model, its text and two exports
(the CLI in-process through click's CliRunner, the API as a call), and is classified:

- clean: exit code 2 with exactly one `error: ...` line on stderr (the API: one QuantkitError with a one-line
  message), and nothing added, removed or changed in the case's folder;
- traceback: any other exception (a generic one the CLI could only wrap, "--debug shows the traceback", counts
  here too), or another exit code;
- quiet: the run succeeded: a wrong input gave a result;
- noisy: refused, but with more than one line on stderr (tqdm's progress bars do not count), or the `error:` line
  not at a line's start;
- left_behind: refused cleanly, but files were added, removed or changed (a refused `--resume` may move its own
  OUT.partial on);
- hang: still running after HANG_SECONDS;
- accepted: an input a right run may take (round 5 marks these with a check), taken, and its result checked right
  (the export loads with finite weights and logits, codes equal a reference run's, a fit is finite...); a
  success whose check fails is quiet.

    OMP_NUM_THREADS=1 python benchmarks/fault_battery.py [--rounds 5] [-k SUBSTRING] [-o benchmarks/results/fault_battery.json]

prints the counts (overall and per area) and every case that is not clean as one JSON object. The cases are not
the ones issue #22 lists: the issue's list is in tests/test_faults_input.py; this is a broader, fresh set. Rounds
1-4 were written by the helper that fixed what they found; round 5 (`--rounds 5`) by another helper, as the fresh
battery issue #22's target asks for.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models and tokenizers the tests build

from common import emit, environment  # noqa: E402
from helpers import (  # noqa: E402
    WORDS,
    printable_tokenizer,
    run_cli,
    save_tiny_llama,
    write_image_dataset,
    write_text,
)

RTN = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]
CHAT = [{"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}] * 4
QID_HEADER = "model,method,bits,group_size,N,D,loss_fp,loss_q,qid,eval_text\n"


@dataclass
class Case:
    area: str
    name: str
    run: Callable[[Path], object]  # returns a click Result (CLI) or the API's value; raises for the API
    setup: Callable[[Path], None] | None = None
    api: bool = False
    # For an input a right run may accept: (folder, result) -> None when the result is right, else what is wrong
    # (a success without a check is quiet).
    check: Callable[[Path, object], str | None] | None = None


# ---------------------------------------------------------------- building the shared folder


def build_base(root: Path) -> Path:
    """model/, text.txt, ct/ (compressed-tensors W4 export), fake/ (fake W3 export), q.csv (a QiD table)."""
    save_tiny_llama(root / "model")
    write_text(root / "text.txt")
    for name, extra in (("ct", []), ("fake", ["--bits", "3", "--format", "fake"])):
        result = run_cli("calibrate", root / "model", "--calib", root / "text.txt", *RTN, *extra, "-o", root / name,
                         "--json")
        assert result.exit_code == 0, result.output
    (root / "q.csv").write_text(QID_HEADER + build_qid_rows())
    return root


def tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if "__pycache__" in p.parts:
            continue
        name = str(p.relative_to(root))
        if p.is_symlink():
            out[name] = f"link to {os.readlink(p)}"
        elif p.is_dir():
            out[name] = "dir"
        elif p.is_file():
            out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:  # a named pipe or socket: never read
            out[name] = "special"
    return out


# ---------------------------------------------------------------- edits the cases make


def tensors(**edits: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    """A setup editing model.safetensors: {key with __ for dots: tensor -> tensor}."""
    def setup(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(w / "model" / "model.safetensors")
        for key, edit in edits.items():
            name = key.replace("__", ".")
            state[name] = edit(state[name].clone()).contiguous()
        save_file(state, w / "model" / "model.safetensors", metadata={"format": "pt"})
    return setup


def at(value: float, index=(0, 0)) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t
    return edit


def json_edit(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = w / rel
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    return setup


def write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        for s in setups:
            s(w)
    return setup


def swap_tokenizer(tokenizer_fn: Callable[[], object]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (w / "model" / name).unlink(missing_ok=True)
        tokenizer_fn().save_pretrained(w / "model")
    return setup


def word_tokenizer(words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", *WORDS[:words]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def image_records(missing: bool) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        write_image_dataset(w / "vl", n=4)
        if missing:
            shutil.rmtree(w / "vl" / "img")
    return setup


# ---------------------------------------------------------------- the cases


class Cases(list):
    """A round's cases and the ways of writing one: a CLI call (args of the case folder), a `quantkit calibrate`
    of a model on data (RTN unless `method`) with extra options, or an API call."""

    def add(self, area: str, name: str, run: Callable[[Path], object], setup=None, check=None, api: bool = False) -> None:
        self.append(Case(area, name, run, setup, api=api, check=check))

    def cli(self, area: str, name: str, args: Callable[[Path], list], setup=None, check=None) -> None:
        self.add(area, name, lambda w, a=args: run_cli(*a(w)), setup, check)

    def cal(self, area: str, name: str, *extra, data: str = "text.txt", setup=None, model: str = "model",
            method: list[str] = RTN, check=None) -> None:
        self.add(area, name, lambda w, e=extra, d=data, m=model, me=method: run_cli(
            "calibrate", w / m, "--calib", w / d, *me, *e, "-o", w / "out"), setup, check)

    def api(self, name: str, call: Callable[[Path], object], setup=None, check=None) -> None:
        self.add("api", name, call, setup, check, api=True)


def quantize(w: Path, **kw):
    """quantkit.quantize of the case's model on its text (RTN, 2 x 16 tokens, group 32) into out/, `kw` on top."""
    import quantkit

    args = dict(model=str(w / "model"), data=str(w / "text.txt"), method="rtn", group_size=32, nsamples=2,
                seqlen=16, progress=False, output_dir=str(w / "out"))
    args.update(kw)
    return quantkit.quantize(**args)


def ev(*extra, target: str = "model") -> Callable[[Path], list]:
    """`quantkit eval TARGET EXTRA...` args."""
    return lambda w: ["eval", w / target, *extra]


def imp(*extra, data: str = "text.txt", model: str = "model") -> Callable[[Path], list]:
    """`quantkit importance` args (2 x 16 tokens into set/)."""
    return lambda w: ["importance", w / model, "--calib", w / data, "--nsamples", "2", "--seqlen", "16", "-o", w / "set",
                      *extra]


def first_round() -> list[Case]:
    """The first round (fresh, not the issue's list)."""
    out = Cases()
    cli, cal, api = out.cli, out.cal, out.api

    # model files: values, dtypes, tokenizers, configs
    nan = float("nan")
    cal("model", "NaN in a down_proj weight", setup=tensors(model__layers__1__mlp__down_proj__weight=at(nan)))
    cal("model", "inf in the embedding, low memory", "--low-memory",
        setup=tensors(model__embed_tokens__weight=at(float("inf"), (5, 1))))
    cal("model", "NaN in the final norm", setup=tensors(model__norm__weight=at(nan, (3,))))
    cal("model", "-inf in lm_head, TLQ", "--method", "tlq", setup=tensors(lm_head__weight=at(float("-inf"))))
    cal("model", "int8 norm weight", setup=tensors(model__layers__0__post_attention_layernorm__weight=lambda t: t.to(torch.int8)))
    cal("model", "uint8 q_proj weight", setup=tensors(model__layers__0__self_attn__q_proj__weight=lambda t: (t * 50 + 100).to(torch.uint8)))
    cal("model", "int64 embedding", setup=tensors(model__embed_tokens__weight=lambda t: t.long()))
    cal("model", "10-token tokenizer beside a 64-row embedding", setup=swap_tokenizer(lambda: word_tokenizer(8)))
    cal("model", "96-token tokenizer beside a 64-row embedding", setup=swap_tokenizer(printable_tokenizer))
    cal("model", "tokenizer.json not JSON", setup=both(lambda w: (w / "model" / "tokenizer_config.json").unlink(),
                                                       write("model/tokenizer.json", "{broken")))
    cal("model", "config without model_type", setup=json_edit("model/config.json", lambda d: d.pop("model_type")))
    cal("model", "config with 0 decoder layers", setup=json_edit("model/config.json", lambda d: d.update(num_hidden_layers=0)))
    cal("model", "config hidden size 48", setup=json_edit("model/config.json", lambda d: d.update(hidden_size=48)))
    cal("model", "config vocab 70", setup=json_edit("model/config.json", lambda d: d.update(vocab_size=70)))
    cal("model", "extra tensor in the file", setup=lambda w: _add_tensor(w, "model.layers.5.mlp.up_proj.weight"))
    cli("model", "model path is a file", lambda w: ["calibrate", w / "text.txt", "--calib", w / "text.txt", *RTN, "-o", w / "out"])
    cli("model", "empty model directory", lambda w: ["calibrate", w / "nothing", "--calib", w / "text.txt", *RTN, "-o", w / "out"],
        setup=lambda w: (w / "nothing").mkdir())
    cli("model", "unsupported architecture", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", w / "out"],
        setup=json_edit("model/config.json", lambda d: d.update(model_type="bert", architectures=["BertModel"])))

    # data
    cal("data", "empty .txt", data="d.txt", setup=write("d.txt", ""))
    cal("data", "whitespace .txt", data="d.txt", setup=write("d.txt", " \n\t \n"))
    cal("data", "JSONL of empty texts", data="d.jsonl", setup=write("d.jsonl", '{"text": ""}\n{"text": " "}\n'))
    cal("data", ".json with one empty array", data="d.json", setup=write("d.json", "[]"))
    cal("data", ".json of a dict, not records", data="d.json", setup=write("d.json", '{"rows": [1, 2]}'))
    cal("data", ".json lines without a known field", data="d.json", setup=write("d.json", '{"body": "w1"}\n'))
    cal("data", "chat records in .json, no template", data="d.json",
        setup=write("d.json", "".join(json.dumps(r) + "\n" for r in CHAT)))
    cal("data", "chat records as a .txt JSON array, no template", data="d.txt", setup=write("d.txt", json.dumps(CHAT)))
    cal("data", "chat file inside a text directory", data="dir",
        setup=both(write("dir/a.txt", "w1 w2 " * 400), write("dir/b.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT))))
    cal("data", "image-text records for a text model", data="vl/data.jsonl", setup=image_records(False))
    cal("data", "image-text records with missing images", data="vl/data.jsonl", setup=image_records(True))
    cal("data", "image-text records in .json for a text model", data="vl/data.json",
        setup=both(image_records(False), lambda w: shutil.copy(w / "vl" / "data.jsonl", w / "vl" / "data.json")))
    cal("data", "JSONL with a number as text", data="d.jsonl", setup=write("d.jsonl", '{"text": 5}\n'))
    cal("data", "JSONL with a broken line", data="d.jsonl", setup=write("d.jsonl", '{"text": "w1"}\n{"text": w2}\n'))
    cal("data", "latin-1 bytes", data="d.txt", setup=write("d.txt", b"w1 w2 caf\xe9 " * 300))
    cal("data", "directory without text files", data="dir", setup=write("dir/a.bin", b"\x00\x01"))
    cal("data", "glob matching nothing", data="*.nothing")
    cal("data", "too little text", "--nsamples", "200")
    cal("data", "held-out part of a short file", "--part", "heldout", data="d.txt", setup=write("d.txt", "w1 w2 w3 " * 20))
    cal("data", "recipe with an unknown kind", data="r.yaml", setup=write("r.yaml", "kind: audio\nsources:\n  - path: text.txt\n"))
    cal("data", "recipe naming a missing file", data="r.yaml", setup=write("r.yaml", "kind: text\nsources:\n  - path: gone.txt\n"))
    cal("data", "recipe with a negative weight", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n  - path: text.txt\n    weight: -1\n"))
    cal("data", "image recipe for a text model", data="r.yaml",
        setup=both(image_records(False), write("r.yaml", "kind: image-caption\nsources:\n  - path: vl/data.jsonl\n")))
    cal("data", "--chat-template with plain text", "--chat-template", "t.jinja", setup=write("t.jinja", "{{ messages }}"))
    cal("data", "--chat-template that is not Jinja", "--chat-template", "t.jinja", data="d.jsonl",
        setup=both(write("t.jinja", "{% for %}"), write("d.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT))))
    cal("data", "--calib-set that is no set", "--calib-set", "text.txt")
    cal("data", "hf: dataset that does not exist", data="hf:quantkit-no-such-org/no-such-data-3141")
    # RTN without --calib was here: RTN reads no data and runs without it now (its export is the same bytes)
    cli("data", "GPTQ without --calib", lambda w: ["calibrate", w / "model", *RTN, "--method", "gptq", "-o", w / "out"])

    # calibrate options
    for flag, value in [("--bits", "5"), ("--bits", "0"), ("--group-size", "0"), ("--group-size", "7"),
                        ("--group-size", "-2"), ("--nsamples", "0"), ("--nsamples", "-3"), ("--seqlen", "1"),
                        ("--seqlen", "128"), ("--damp", "1.5"), ("--damp", "-0.1"), ("--cd-sweeps", "-1"),
                        ("--device", "cuda"), ("--device", "tpu"), ("--nproc", "0"), ("--devices", "a,b"),
                        ("--dist-timeout", "0"), ("--lam", "2"), ("--power", "-1"), ("--row-groups", "0"),
                        ("--fisher-draws", "0")]:
        cal("options", f"{flag} {value}", flag, value)
    cal("options", "--act-bits 8 with group size 32", "--act-bits", "8", "--bits", "8")
    cal("options", "--static-groups with --no-act-order", "--static-groups", "--no-act-order")
    cal("options", "compressed-tensors with dynamic groups", "--method", "gptq", "--dynamic-groups", "--format",
        "compressed-tensors")
    cal("options", "--fp-target with rtn", "--fp-target")
    cal("options", "--smooth tlq with gptq", "--method", "gptq", "--smooth", "tlq", "--act-bits", "8", "--bits", "8",
        "--group-size", "-1")
    cal("options", "--quantize-lm-head in gptq_v2", "--quantize-lm-head", "--format", "gptq_v2")
    cal("options", "--quantize-vision on a text model", "--quantize-vision")
    cal("options", "--offload-dir is a file", "--low-memory", "--offload-dir", "text.txt")
    cal("options", "--calib beside --calib-set", "--calib-set", "set", setup=lambda w: _make_set(w))
    out.append(Case("options", "--nsamples/--seqlen beside a --calib-set of 2 x 16",
                    lambda w: run_cli("calibrate", w / "model", "--calib-set", w / "set", "--method", "rtn",
                                      "--group-size", "32", "--nsamples", "64", "--seqlen", "8", "-o", w / "out"),
                    lambda w: _make_set(w)))
    cal("options", "--recipe naming no linear", "--recipe", "r.yaml",
        setup=write("r.yaml", "targets: ['re:.*nothing_here.*']\n"))
    cal("options", "--recipe file missing", "--recipe", "gone.yaml")
    cal("options", "--push-to-hub with a bad repo id", "--push-to-hub", "not a repo")
    cal("options", "--private without --push-to-hub", "--private")
    cli("options", "output is the model", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", w / "model", "--overwrite"])
    cli("options", "output inside the model", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", w / "model" / "q"])
    cli("options", "output exists", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", w / "ct"])
    cli("options", "output is a file", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", w / "text.txt", "--overwrite"])

    # the Python API
    for name, kw in [
        ("method='GPTQ'", dict(method="GPTQ")), ("method='awq'", dict(method="awq")), ("seed='zero'", dict(seed="zero")),
        ("seed=1.5", dict(seed=1.5)), ("model=None", dict(model=None)), ("model=123", dict(model=123)),
        ("group_size=None", dict(group_size=None)), ("group_size='64'", dict(group_size="64")),
        ("group_size=7", dict(group_size=7)), ("nsamples=1.5", dict(nsamples=1.5)), ("nsamples=True", dict(nsamples=True)),
        ("nsamples=0", dict(nsamples=0)), ("seqlen='16'", dict(seqlen="16")), ("seqlen=100", dict(seqlen=100)),
        ("output_dir=5", dict(output_dir=5)), ("bits='4'", dict(bits="4")), ("bits=5", dict(bits=5)),
        ("bits=4.0", dict(bits=4.0)), ("sym='yes'", dict(sym="yes")), ("act_order=None", dict(act_order=None)),
        ("damp='0.01'", dict(damp="0.01")), ("damp=2", dict(damp=2.0)), ("part='HeldOut'", dict(part="HeldOut")),
        ("part='test'", dict(part="test")), ("device=0", dict(device=0)), ("device='gpu'", dict(device="gpu")),
        ("smooth='TLQ'", dict(smooth="TLQ")), ("format='GPTQ'", dict(format="GPTQ")), ("format='awq'", dict(format="awq")),
        ("dtype='fp16'", dict(dtype="fp16")), ("act_bits=16", dict(act_bits=16)), ("act_bits='8'", dict(act_bits="8")),
        ("cd_sweeps=-1", dict(cd_sweeps=-1)), ("overwrite='yes'", dict(overwrite="yes")),
        ("progress='no'", dict(progress="no")), ("fp_target=1", dict(fp_target=1)),
        ("tokenizer as a string", dict(tokenizer_or_processor="not-a-tokenizer")),
        ("tokenizer=42", dict(tokenizer_or_processor=42)),
        ("a tokenizer of 96 tokens for 64 rows", dict(tokenizer_or_processor="PRINTABLE")),
        ("data=42", dict(data=42)), ("data=[]", dict(data=[])), ("data=[1, 2]", dict(data=[1, 2])),
        ("data=['', '  ']", dict(data=["", "  "])), ("data of three one-word texts", dict(data=["w1", "w2", "w3"])),
        ("data={'text': ...}", dict(data={"text": "w1 w2"})),
        ("unknown option bogus=1", dict(bogus=1)), ("misspelt option nproces=2", dict(nproces=2)),
        ("misspelt importance option", dict(method="tlq", importance={"lamda": 0.5})),
        ("importance='fast'", dict(method="tlq", importance="fast")),
        ("recipe={'bogus': 1}", dict(recipe={"bogus": 1})), ("recipe=3", dict(recipe=3)),
        ("push_to_hub='not a repo'", dict(push_to_hub="not a repo")), ("nproc='2'", dict(nproc="2")),
        ("low_memory='yes'", dict(low_memory="yes")), ("chat_template=5", dict(chat_template=5)),
    ]:
        def call(w: Path, kw=kw):
            if kw.get("tokenizer_or_processor") == "PRINTABLE":
                kw = dict(kw, tokenizer_or_processor=printable_tokenizer())
            return quantize(w, **kw)
        api(name, call)

    def loaded(w: Path, poison: bool = False, linear: bool = False, **kw):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(w / "model")
        if poison:
            with torch.no_grad():
                model.model.layers[0].input_layernorm.weight[0] = float("nan")
        return quantize(w, model=torch.nn.Linear(4, 4) if linear else model, data=["w1 w2 w3 " * 40], **kw)

    api("a loaded model with a NaN norm", lambda w: loaded(w, poison=True))
    api("a bare nn.Linear as the model", lambda w: loaded(w, linear=True))
    api("a loaded model with another model's tokenizer", lambda w: loaded(w, tokenizer_or_processor=word_tokenizer(8)))

    def load_quantized(w: Path, target):
        import quantkit

        return quantkit.load_quantized(target(w) if callable(target) else target)

    api("load_quantized of a missing path", lambda w: load_quantized(w, lambda w: w / "gone"))
    api("load_quantized(5)", lambda w: load_quantized(w, 5))
    api("load_quantized(None)", lambda w: load_quantized(w, None))
    api("load_quantized of a text file", lambda w: load_quantized(w, lambda w: w / "text.txt"))
    api("load_quantized of an export whose config says 8 bits", lambda w: load_quantized(w, lambda w: w / "ct"),
        setup=json_edit("ct/config.json", lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8)))
    api("Recipe with an unknown field", lambda w: __import__("quantkit").Recipe.from_dict({"targetz": ["x"]}))

    # qid
    for args in (["--tokens", "1e300"], ["--bits", "1e9"], ["--params", "0"], ["--qid", "-1"], ["--qid", "50"],
                 ["--params", "inf"], ["--tokens", "1e12", "--law", "gone.json"], ["--tokens", "1e12", "--law", "Ouyang2024-GPTQ"]):
        base = {"--params": "7e9", "--bits": "3"}
        flags = dict(zip(args[::2], args[1::2]))
        merged = {**base, **flags}
        if "--tokens" not in merged and "--qid" not in merged:
            merged["--tokens"] = "1e12"
        cli("qid", f"predict {' '.join(args)}", lambda w, m=merged: ["qid", "predict", *[x for kv in m.items() for x in kv]])
    for extra in (["--bits", "5"], ["--bits", "16"], ["--methods", "GPTQ"], ["--methods", "awq"], ["--eval-seqlen", "0"],
                  ["--nsamples", "0"], ["--group-size", "0"], ["--eval-tokens", "-5"]):
        cli("qid", f"measure {' '.join(extra)}", lambda w, e=extra: ["qid", "measure", w / "model", "--eval", w / "text.txt",
                                                                      "--tokens", "1e9", "-o", w / "m.csv", *e])
    for name, row in [("negative N", "m9,gptq,4,128,-5,1000000000,3.0,3.1,0.1,e"), ("zero D", "m9,gptq,4,128,5000000,0,3.0,3.1,0.1,e"),
                      ("bits 99", "m9,gptq,99,128,5000000,1000000000,3.0,3.1,0.1,e"),
                      ("group size 0", "m9,gptq,4,0,5000000,1000000000,3.0,3.1,0.1,e"),
                      ("loss -3", "m9,gptq,4,128,5000000,1000000000,-3,3.1,0.1,e"),
                      ("QiD 'nan'", "m9,gptq,4,128,5000000,1000000000,3.0,3.1,nan,e")]:
        cli("qid", f"fit with a row of {name}", lambda w: ["qid", "fit", w / "q.csv", "--bootstrap", "0"],
            setup=lambda w, r=row: (w / "q.csv").write_text((w / "q.csv").read_text() + r + "\n"))
    cli("qid", "fit of an empty table", lambda w: ["qid", "fit", w / "e.csv"], setup=write("e.csv", QID_HEADER))
    cli("qid", "fit --level 1.5", lambda w: ["qid", "fit", w / "q.csv", "--level", "1.5"])
    cli("qid", "fit --bootstrap -1", lambda w: ["qid", "fit", w / "q.csv", "--bootstrap", "-1"])
    cli("qid", "plot --format gif", lambda w: ["qid", "plot", w / "q.csv", "--format", "gif", "-o", w / "figs"])
    cli("qid", "training-level --bits 5", lambda w: ["qid", "training-level", w / "model", "--law", "ouyang2024-gptq",
                                                     "--bits", "5", "--data", w / "text.txt"])
    cli("qid", "training-level --qid-se -1", lambda w: ["qid", "training-level", w / "model", "--law", "ouyang2024-gptq",
                                                        "--bits", "3", "--qid", "0.1", "--qid-se", "-1"])

    # eval
    cli("eval", "export whose config says 8 bits", ev("--data", "text.txt", "--seqlen", "16", target="ct"),
        setup=json_edit("ct/config.json", lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8)))
    cli("eval", "export whose manifest says 8 bits", ev("--data", "text.txt", "--seqlen", "16", target="ct"),
        setup=both(json_edit("ct/quantkit.json", lambda d: d["spec"].update(bits=8)),
                   json_edit("ct/config.json", lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(num_bits=8))))
    cli("eval", "export without quantization_config", ev("--data", "text.txt", "--seqlen", "16", target="ct"),
        setup=json_edit("ct/config.json", lambda d: d.pop("quantization_config")))
    cli("eval", "fake export whose manifest says 2 bits", ev("--data", "text.txt", "--seqlen", "16", target="fake"),
        setup=json_edit("fake/quantkit.json", lambda d: d["spec"].update(bits=2)))
    cli("eval", "export with a module missing from its tensors", ev("--data", "text.txt", "--seqlen", "16", target="ct"),
        setup=json_edit("ct/quantkit.json", lambda d: d["quantized_modules"].append("model.layers.0.mlp.extra_proj")))
    for extra in (["--seqlen", "1"], ["--stride", "0"], ["--batch-size", "0"], ["--max-tokens", "1"], ["--seqlen", "100"],
                  ["--part", "middle"], ["--device", "cuda:3"]):
        cli("eval", f"eval {' '.join(extra)}", ev("--data", "text.txt", *extra))
    cli("eval", "near-empty text", ev("--data", "d.txt", "--seqlen", "16", "--part", "all"), setup=write("d.txt", "w1 w2 w3"))
    cli("eval", "chat records as --data", ev("--data", "d.jsonl"), setup=write("d.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT)))
    cli("eval", "nothing to evaluate", ev())
    cli("eval", "--limit without --tasks", ev("--data", "text.txt", "--limit", "3"))
    cli("eval", "--tasks of nothing", ev("--tasks", " , "))
    cli("eval", "a model with a NaN weight", ev("--data", "text.txt", "--seqlen", "16"),
        setup=tensors(model__layers__1__self_attn__o_proj__weight=at(nan)))
    cli("eval", "--tasks reading an unreachable dataset", ev("--tasks", "qk_remote", "--include-path", "tasks"),
        setup=write("tasks/qk_remote.yaml", "task: qk_remote\ndataset_path: quantkit-no-such-org/no-such-data-3141\n"
                    "test_split: test\noutput_type: loglikelihood\ndoc_to_text: a\ndoc_to_target: b\n"
                    "metric_list:\n  - metric: perplexity\nmetadata:\n  version: 1.0\n"))

    # export
    cli("export", "onto its input", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "ct", "--overwrite"])
    cli("export", "of a directory that is no export", lambda w: ["export", w / "model", "--format", "fake", "-o", w / "x"])
    cli("export", "of a truncated export", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "x"],
        setup=lambda w: (w / "ct" / "model.safetensors").write_bytes((w / "ct" / "model.safetensors").read_bytes()[:500]))
    cli("export", "into the export itself", lambda w: ["export", w / "fake", "--format", "compressed-tensors", "-o", w / "fake" / "x"])
    cli("export", "of an export whose config disagrees", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "x"],
        setup=json_edit("ct/config.json", lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(group_size=16)))
    cli("export", "to an unknown format", lambda w: ["export", w / "ct", "--format", "awq", "-o", w / "x"])

    # importance
    cli("importance", "--lam 2", imp("--lam", "2"))
    cli("importance", "--top-fraction 2", imp("--top-fraction", "2"))
    cli("importance", "empty data", imp(data="d.txt"), setup=write("d.txt", ""))
    cli("importance", "image records for a text model", imp(data="vl/data.jsonl"), setup=image_records(False))
    cli("importance", "a model with a NaN weight", imp(), setup=tensors(model__layers__0__mlp__up_proj__weight=at(nan)))
    cli("importance", "--seqlen 1", imp("--seqlen", "1"))

    # demo
    cli("demo", "--model without --data", lambda w: ["demo", "--model", w / "model", "-o", w / "d"])
    cli("demo", "--train-seconds -1", lambda w: ["demo", "--train-seconds", "-1", "-o", w / "d"])
    cli("demo", "--nsamples 0", lambda w: ["demo", "--nsamples", "0", "-o", w / "d"])
    cli("demo", "--seqlen 1", lambda w: ["demo", "--seqlen", "1", "-o", w / "d"])
    cli("demo", "your model with empty data", lambda w: ["demo", "--model", w / "model", "--data", w / "d.txt", "--seqlen", "16", "-o", w / "d"],
        setup=write("d.txt", ""))
    return out


def more_cases() -> list[Case]:
    """The second round: areas and inputs the first round's fixes were not written against."""
    out = Cases()
    cli, cal, api = out.cli, out.cal, out.api

    nan = float("nan")
    # model files
    cal("model", "config.json not JSON", setup=write("model/config.json", "{oops"))
    cal("model", "tokenizer_config.json not JSON", setup=write("model/tokenizer_config.json", "{oops"))
    cal("model", "index naming a missing shard", setup=lambda w: _shard_index(w))
    cal("model", "bfloat16 weights with a NaN", setup=tensors(model__layers__0__mlp__gate_proj__weight=lambda t: at(nan)(t).to(torch.bfloat16)))
    cal("model", "float16 inf in v_proj", setup=tensors(model__layers__1__self_attn__v_proj__weight=lambda t: at(float("inf"))(t.half())))
    cal("model", "model directory with only a tokenizer",
        setup=lambda w: [p.unlink() for p in (w / "model").glob("*.safetensors")])
    cal("model", "max_position_embeddings 8 below --seqlen 16", setup=json_edit("model/config.json", lambda d: d.update(max_position_embeddings=8)))
    # data
    cal("data", "a PNG given as text", data="img.png", setup=write("img.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8))
    cal("data", "chat record whose messages is a string", data="d.jsonl", setup=write("d.jsonl", '{"messages": "hi"}\n'))
    cal("data", "chat without an assistant turn", "--chat-template", "t.jinja", data="d.jsonl",
        setup=both(write("t.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}"),
                   write("d.jsonl", '{"messages": [{"role": "user", "content": "w1"}]}\n')))
    cal("data", "image record whose image is a number", data="d.jsonl", setup=write("d.jsonl", '{"image": 5, "text": "w1"}\n'))
    cal("data", "recipe that is not YAML", data="r.yaml", setup=write("r.yaml", "kind: [text\n"))
    cal("data", "recipe whose weights are all zero", data="r.yml",
        setup=write("r.yml", "kind: text\nsources:\n  - path: text.txt\n    weight: 0\n"))
    cal("data", "hf: spec with five parts", data="hf:a:b:c:d:e")
    cal("data", "comma list with a missing file", data="text.txt,gone.txt")
    cal("data", "chat file with fewer conversations than --nsamples", "--chat-template", "t.jinja", "--nsamples", "9",
        data="d.jsonl", setup=both(write("t.jinja", "{% for m in messages %}{{ m.content }} {% endfor %}"),
                                   write("d.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT))))
    cal("data", "--part train of chat records", "--part", "train", "--chat-template", "t.jinja", data="d.jsonl",
        setup=both(write("t.jinja", "{{ messages }}"), write("d.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT))))
    cal("data", "--chat-template file missing", "--chat-template", "gone.jinja", data="d.jsonl",
        setup=write("d.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT)))
    # options
    cal("options", "recipe override with 5 bits", "--recipe", "r.yaml", setup=write("r.yaml", "overrides:\n  - targets: [down_proj]\n    bits: 5\n"))
    cal("options", "recipe with an unknown key", "--recipe", "r.yaml", setup=write("r.yaml", "targetz: [Linear]\n"))
    cal("options", "--offload-dir inside the model", "--low-memory", "--offload-dir", "model/off")
    cli("options", "--devices with a negative id", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN,
                                                            "--device", "cuda", "--devices", "-1", "-o", w / "out"])
    cli("options", "-o inside the calibration directory", lambda w: ["calibrate", w / "model", "--calib", w / "dir", *RTN,
                                                                   "-o", w / "dir" / "out"],
        setup=write("dir/a.txt", "w1 w2 w3 " * 400))
    # importance
    cli("importance", "--floor-fraction 2 with --top-fraction", imp("--top-fraction", "0.5", "--floor-fraction", "2"))
    cli("importance", "--top-fraction 0", imp("--top-fraction", "0"))
    cli("importance", "--row-groups 2 with layer guidance", imp("--row-groups", "2"))
    cli("importance", "--fisher-draws 0", imp("--importance-loss", "fisher", "--fisher-draws", "0"))
    cli("importance", "--power 0", imp("--power", "0"))
    cli("importance", "-o onto the model", lambda w: ["importance", w / "model", "--calib", w / "text.txt", "-o", w / "model", "--overwrite"])
    cli("importance", "a 10-token tokenizer", imp(), setup=swap_tokenizer(lambda: word_tokenizer(8)))
    # export
    cli("export", "--max-shard-size nonsense", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "x", "--max-shard-size", "lots"])
    cli("export", "--max-shard-size 0", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "x", "--max-shard-size", "0"])
    cli("export", "--private without --push-to-hub", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "x", "--private"])
    cli("export", "of an export whose sidecar is missing", lambda w: ["export", w / "fake", "--format", "compressed-tensors", "-o", w / "x"],
        setup=lambda w: (w / "fake" / "quantkit_qparams.safetensors").unlink())
    cli("export", "of an export with a NaN scale", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "x"],
        setup=lambda w: _poison_export(w))
    # eval
    cli("eval", "--num-fewshot -1", ev("--tasks", "qk", "--include-path", "tasks", "--num-fewshot", "-1"), setup=_local_task)
    cli("eval", "--limit 0", ev("--tasks", "qk", "--include-path", "tasks", "--limit", "0"), setup=_local_task)
    cli("eval", "--include-path is a file", ev("--tasks", "qk", "--include-path", "text.txt"))
    cli("eval", "-o is a directory", ev("--data", "text.txt", "--seqlen", "16", "-o", "ct"))
    cli("eval", "--max-tokens 5 with --seqlen 16", ev("--data", "text.txt", "--seqlen", "16", "--max-tokens", "5"))
    cli("eval", "--data glob matching nothing", ev("--data", "*.nothing"))
    cli("eval", "export with a NaN scale", ev("--data", "text.txt", "--seqlen", "16", target="ct"), setup=lambda w: _poison_export(w))
    # qid
    cli("qid", "measure --tokens-per-step 0", lambda w: ["qid", "measure", w / "model", "--eval", w / "text.txt", "--tokens-per-step", "0", "-o", w / "m.csv"])
    cli("qid", "measure --tokens abc", lambda w: ["qid", "measure", w / "model", "--eval", w / "text.txt", "--tokens", "abc", "-o", w / "m.csv"])
    cli("qid", "measure --tokens -5", lambda w: ["qid", "measure", w / "model", "--eval", w / "text.txt", "--tokens", "-5", "-o", w / "m.csv"])
    cli("qid", "measure onto a CSV of other columns", lambda w: ["qid", "measure", w / "model", "--eval", w / "text.txt", "--tokens", "1e9", "-o", w / "x.csv"],
        setup=write("x.csv", "a,b\n1,2\n"))
    cli("qid", "fit --method that is not in the table", lambda w: ["qid", "fit", w / "q.csv", "--method", "awq"])
    cli("qid", "fit --huber-delta 0", lambda w: ["qid", "fit", w / "q.csv", "--estimator", "huber", "--huber-delta", "0"])
    cli("qid", "fit huber with --resample errors", lambda w: ["qid", "fit", w / "q.csv", "--estimator", "huber", "--resample", "errors"])
    cli("qid", "plot --fit missing", lambda w: ["qid", "plot", w / "q.csv", "--fit", w / "gone.json", "-o", w / "figs"])
    cli("qid", "plot of a CSV without qid", lambda w: ["qid", "plot", w / "b.csv", "-o", w / "figs"], setup=write("b.csv", "model,N\nm,1\n"))
    cli("qid", "predict --law a JSON without beta", lambda w: ["qid", "predict", "--law", w / "l.json", "--params", "1e9", "--bits", "3", "--tokens", "1e12"],
        setup=write("l.json", '{"k": 0.1, "alpha": 0.2, "gamma": 5}'))
    cli("qid", "predict --law a JSON with k = -1", lambda w: ["qid", "predict", "--law", w / "l.json", "--params", "1e9", "--bits", "3", "--tokens", "1e12"],
        setup=write("l.json", '{"k": -1, "alpha": 0.2, "beta": 0.5, "gamma": 5}'))
    # API
    def loaded(w: Path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(w / "model")

    api("a Dataset without a text column", lambda w: quantize(w, data=__import__("datasets").Dataset.from_dict({"body": ["w1"] * 4})))
    api("records without text or messages", lambda w: quantize(w, data=[{"body": "w1"}, {"body": "w2"}]))
    api("a chat record whose messages is a string", lambda w: quantize(w, data=[{"messages": "hi"}]))
    api("image records for a text model", lambda w: quantize(w, data=[{"image": "a.png", "text": "w1"}]))
    api("a loaded model with low_memory", lambda w: quantize(w, model=loaded(w), low_memory=True))
    api("a loaded model with nproc=2", lambda w: quantize(w, model=loaded(w), nproc=2))
    api("output_dir onto the model", lambda w: quantize(w, output_dir=str(w / "model"), overwrite=True))
    api("recipe YAML that is missing", lambda w: quantize(w, recipe=str(w / "gone.yaml")))
    api("a NaN-poisoned loaded model in float16", lambda w: quantize(w, model=_half_nan(loaded(w)), data=["w1 w2 w3 " * 40]))
    api("texts of one token each", lambda w: quantize(w, data=["w1"] * 20))
    api("seqlen beyond max positions", lambda w: quantize(w, seqlen=100))
    return [c for c in out if c is not None]


def third_round() -> list[Case]:
    """The third round (written after the second round's fixes landed): inputs neither earlier round tried.
    Two drafted cases were dropped as no fault: --resume with nothing to resume runs from the first layer (a
    whole run, the right result), and a tokenizer_config naming an unknown class loads tokenizer.json (the same
    vocabulary)."""
    out = Cases()
    cli, cal, api = out.cli, out.cal, out.api

    def no_tokenizer(w: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (w / "model" / name).unlink(missing_ok=True)

    def truncate(rel: str, keep: int) -> Callable[[Path], None]:
        def setup(w: Path) -> None:
            path = w / rel
            path.write_bytes(path.read_bytes()[:keep])
        return setup

    # model
    cal("model", "an export (already quantized) as the model", model="ct")
    cal("model", "safetensors cut short inside its data", setup=truncate("model/model.safetensors", 20000))
    cal("model", "config torch_dtype 'bogus'", setup=json_edit("model/config.json", lambda d: d.update(torch_dtype="bogus", dtype="bogus")))
    cal("model", "config with 3 attention heads for hidden 64", setup=json_edit("model/config.json", lambda d: d.update(num_attention_heads=3, num_key_value_heads=3)))
    cal("model", "q_proj stored with the wrong shape", setup=tensors(model__layers__0__self_attn__q_proj__weight=lambda t: t[:, : t.shape[1] // 2]))
    cal("model", "model directory without any tokenizer", setup=no_tokenizer)
    # data
    cal("data", "--calib is the model directory", data="model")
    cal("data", "a text file of NUL bytes", data="d.txt", setup=write("d.txt", b"\x00" * 5000))
    cal("data", "JSONL whose text is a list", data="d.jsonl", setup=write("d.jsonl", '{"text": ["w1", "w2"]}\n' * 4))
    cal("data", "JSONL mixing text and chat records", data="d.jsonl",
        setup=write("d.jsonl", '{"text": "w1 w2 w3"}\n' + json.dumps(CHAT[0]) + "\n"))
    cli("data", "--calib is an empty string", lambda w: ["calibrate", w / "model", "--calib", "", *RTN, "-o", w / "out"])
    # options
    cal("options", "--seed -1", "--seed", "-1")
    cli("options", "-o is an empty string", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", ""])
    # API
    api("an export as the model", lambda w: quantize(w, model=str(w / "ct")))
    api("data=b'bytes'", lambda w: quantize(w, data=b"w1 w2 w3 " * 100))
    api("dtype='int8'", lambda w: quantize(w, dtype="int8"))
    api("nsamples=10**9", lambda w: quantize(w, nsamples=10**9))
    api("output_dir=''", lambda w: quantize(w, output_dir=""))
    api("importance lam=-1", lambda w: quantize(w, method="tlq", importance={"lam": -1.0}))
    api("chat records without a chat template", lambda w: quantize(w, data=CHAT))
    api("Override with bits=5", lambda w: __import__("quantkit").Override(targets=["down_proj"], bits=5))
    api("Override with no targets", lambda w: __import__("quantkit").Override(targets=[], bits=4))
    api("Override with group_size=0", lambda w: __import__("quantkit").Override(targets=["down_proj"], group_size=0))
    api("Recipe.from_yaml(5)", lambda w: __import__("quantkit").Recipe.from_yaml(5))
    api("load_quantized of the FP model", lambda w: __import__("quantkit").load_quantized(w / "model"))
    api("load_quantized of an export missing its weights", lambda w: __import__("quantkit").load_quantized(w / "ct"),
        setup=lambda w: (w / "ct" / "model.safetensors").unlink())
    # eval
    cli("eval", "--data is the model directory", ev("--data", "model", "--seqlen", "16"))
    cli("eval", "a model without a tokenizer", ev("--data", "text.txt", "--seqlen", "16"), setup=no_tokenizer)
    cli("eval", "-o under a file", ev("--data", "text.txt", "--seqlen", "16", "-o", "text.txt/r.json"))
    cli("eval", "--stride above --seqlen", ev("--data", "text.txt", "--seqlen", "16", "--stride", "32"))
    cli("eval", "--batch-size -1", ev("--data", "text.txt", "--seqlen", "16", "--batch-size", "-1"))
    # qid
    cli("qid", "fit of a table without loss_q", lambda w: ["qid", "fit", w / "b.csv"],
        setup=write("b.csv", "model,method,bits,group_size,N,D,loss_fp,qid,eval_text\nm,gptq,4,128,5,5,3,0.1,e\n"))
    cli("qid", "fit of a binary file", lambda w: ["qid", "fit", w / "b.csv"], setup=write("b.csv", bytes(range(256)) * 4))
    cli("qid", "predict --bits 0", lambda w: ["qid", "predict", "--params", "7e9", "--bits", "0", "--tokens", "1e12"])
    cli("qid", "measure --eval an empty file", lambda w: ["qid", "measure", w / "model", "--eval", w / "e.txt", "--tokens", "1e9",
                                                         "-o", w / "m.csv"], setup=write("e.txt", ""))
    cli("qid", "plot -o a file", lambda w: ["qid", "plot", w / "q.csv", "-o", w / "text.txt"])
    # export
    cli("export", "--max-shard-size -1", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "x", "--max-shard-size", "-1"])
    cli("export", "-o an empty string", lambda w: ["export", w / "ct", "--format", "fake", "-o", ""])
    cli("export", "of the FP model", lambda w: ["export", w / "model", "--format", "compressed-tensors", "-o", w / "x"])
    # importance
    cli("importance", "chat records without a template", imp(data="d.jsonl"),
        setup=write("d.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT)))
    cli("importance", "--nsamples 0", imp("--nsamples", "0"))
    cli("importance", "of an export", imp(model="ct"))
    # demo
    cli("demo", "-o onto a file", lambda w: ["demo", "--model", w / "model", "--data", w / "text.txt", "-o", w / "text.txt"])
    cli("demo", "--data missing", lambda w: ["demo", "--model", w / "model", "--data", w / "gone.txt", "-o", w / "d"])
    return out


def fourth_round() -> list[Case]:
    """The fourth round (after the third round's fixes and RTN without data landed): `quantkit plan`, runs
    without data, and loaded models."""
    out = Cases()
    cli, api = out.cli, out.api

    def bare(*extra):  # calibrate without --calib
        return lambda w: ["calibrate", w / "model", "--group-size", "32", *extra, "-o", w / "out"]

    nan = float("nan")
    cli("options", "no data, default method (tlq)", bare())
    cli("options", "no data, rtn with --act-bits 8 --smooth tlq", bare("--method", "rtn", "--bits", "8", "--group-size", "-1",
                                                                      "--act-bits", "8", "--smooth", "tlq"))
    cli("options", "no data, rtn with --act-bits 8 --smooth uniform", bare("--method", "rtn", "--bits", "8", "--group-size",
                                                                          "-1", "--act-bits", "8", "--smooth", "uniform"))
    cli("options", "no data, rtn with a gptq override", bare("--method", "rtn", "--recipe", "r.yaml"),
        setup=write("r.yaml", "overrides:\n  - targets: [down_proj]\n    method: gptq\n"))
    cli("options", "no data, rtn with --quantize-vision on a text model", bare("--method", "rtn", "--quantize-vision"))
    cli("options", "no data, rtn with --fp-target", bare("--method", "rtn", "--fp-target"))
    cli("model", "no data, rtn on a model with a NaN weight", bare("--method", "rtn"),
        setup=tensors(model__layers__1__mlp__up_proj__weight=at(nan)))
    cli("model", "no data, rtn on an export", lambda w: ["calibrate", w / "ct", "--method", "rtn", "-o", w / "out"])
    cli("model", "no data, rtn on int8 weights", bare("--method", "rtn"),
        setup=tensors(model__layers__0__mlp__down_proj__weight=lambda t: t.to(torch.int8)))
    # plan
    def plan(*extra):
        return lambda w: ["plan", w / "model", "--calib", w / "text.txt", *RTN, *extra]

    cli("plan", "--host-mem lots", plan("--host-mem", "lots"))
    cli("plan", "--host-mem 0", plan("--host-mem", "0"))
    cli("plan", "--gpu-mem -1GiB", plan("--gpu-mem", "-1GiB", "--device", "cuda"))
    cli("plan", "of a missing model", lambda w: ["plan", w / "gone", "--calib", w / "text.txt", *RTN])
    cli("plan", "of an export", lambda w: ["plan", w / "ct", "--calib", w / "text.txt", *RTN])
    cli("plan", "--nproc 0", plan("--nproc", "0"))
    cli("plan", "--bits 5", plan("--bits", "5"))
    cli("plan", "a model with 0 layers", plan(), setup=json_edit("model/config.json", lambda d: d.update(num_hidden_layers=0)))
    cli("plan", "--calib missing", lambda w: ["plan", w / "model", "--calib", w / "gone.txt", *RTN])
    # the API without data
    def without_data(w: Path, **kw):
        import quantkit

        args = dict(model=str(w / "model"), method="rtn", group_size=32, progress=False, output_dir=str(w / "out"))
        args.update(kw)
        return quantkit.quantize(**args)

    api("no data, method gptq", lambda w: without_data(w, method="gptq"))
    api("no data, rtn with nsamples=0", lambda w: without_data(w, nsamples=0))
    api("no data, rtn with a loaded NaN model", lambda w: without_data(w, model=_nan_loaded(w)))
    api("no data, rtn with vision=True on a text model", lambda w: without_data(w, vision=True))
    return out


def _nan_loaded(w: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(w / "model")
    with torch.no_grad():
        model.model.norm.weight[1] = float("nan")
    return model


def _shard_index(w: Path) -> None:
    (w / "model" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))


def _poison_export(w: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(w / "ct" / "model.safetensors")
    key = next(k for k in state if k.endswith("weight_scale"))
    state[key][0, 0] = float("nan")
    save_file(state, w / "ct" / "model.safetensors", metadata={"format": "pt"})


def _local_task(w: Path) -> None:
    (w / "tasks").mkdir()
    (w / "ll.jsonl").write_text('{"context": "w1", "continuation": " w2"}\n')
    (w / "tasks" / "qk.yaml").write_text(
        f"task: qk\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {w / 'll.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: continuation\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "metadata:\n  version: 1.0\n")


def _half_nan(model):
    model = model.half()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def _add_tensor(w: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(w / "model" / "model.safetensors")
    state[name] = torch.zeros(4, 4)
    save_file(state, w / "model" / "model.safetensors", metadata={"format": "pt"})


def _make_set(w: Path) -> None:
    result = run_cli("importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16",
                     "-o", w / "set", "--json")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- round 5: a fresh battery by another hand

GPTQ = ["--method", "gptq", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m.content }} {% endfor %}"
                 "{% if add_generation_prompt %}{% endif %}")
TEXT_IDS = [[2 + (7 * i) % 60 for i in range(16)]]


def build_extras(root: Path) -> None:
    """Round 5's extra inputs beside build_base's: gptq/ (GPTQ W4 export), asym/ (asymmetric compressed-tensors),
    head/ (lm_head quantized), a8/ (W8A8), vlm/ (a tiny Qwen2-VL with its processor) and vl/ (image-text records)."""
    for name, extra in (("gptq", ["--format", "gptq"]), ("asym", ["--asym"]), ("head", ["--quantize-lm-head"]),
                        ("a8", ["--bits", "8", "--group-size", "-1", "--act-bits", "8"])):
        args = [*RTN, *extra] if "--group-size" not in extra else [*RTN[:-2], *extra]
        result = run_cli("calibrate", root / "model", "--calib", root / "text.txt", *args, "-o", root / name)
        assert result.exit_code == 0, (name, result.output)
    from helpers import build_vlm

    model, processor = build_vlm("qwen2_vl")
    model.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    write_image_dataset(root / "vl", n=4)


def finite_model(model) -> str | None:
    """None when every parameter and the logits on a fixed sequence are finite, else what is not."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            return f"non-finite values in {name}"
    rows = model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        logits = model(torch.tensor(TEXT_IDS) % rows).logits
    return None if torch.isfinite(logits).all() else "non-finite logits"


def export_ok(rel: str = "out") -> Callable[[Path, object], str | None]:
    """A success is right when the export loads and its weights and logits are finite."""
    def check(w: Path, result) -> str | None:
        import quantkit

        if not (w / rel).is_dir():
            return f"exit 0 but no {rel}/"
        return finite_model(quantkit.load_quantized(w / rel))
    return check


def returned_ok(w: Path, result) -> str | None:
    model = getattr(result, "model", result)
    return "no model returned" if model is None else finite_model(model)


def eval_ok(w: Path, result) -> str | None:
    """An eval success is right when its loss is finite."""
    import math

    losses = [float(x) for x in __import__("re").findall(r"loss[^0-9-]*(-?[0-9.]+(?:e-?\d+)?|nan|inf)", result.output)]
    return None if losses and all(math.isfinite(x) for x in losses) else f"loss not finite: {result.output[-200:]}"


def st_header(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A setup rewriting a safetensors file's JSON header (the data bytes kept)."""
    def setup(w: Path) -> None:
        path = w / rel
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        edit(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return setup


def st_edit(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A setup editing the tensors of any safetensors file (rel under the case folder)."""
    def setup(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(w / rel)
        edit(state)
        save_file({k: v.contiguous() for k, v in state.items()}, w / rel, metadata={"format": "pt"})
    return setup


def first_key(state: dict, suffix: str) -> str:
    return next(k for k in sorted(state) if k.endswith(suffix))


def sparse_tokenizer():
    """A word-level tokenizer of 62 entries (it fits a 64-row embedding by count) whose ids run up to 1061."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{word: 2 + 10 * i + (1000 if i > 50 else 0) for i, word in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@contextlib.contextmanager
def failing_after_first_layer():
    """Calibration runs (in this process) fail on entering layer 1, so a --low-memory run keeps OUT.partial."""
    from dataclasses import replace

    from helpers import FailAt

    from quantkit.calibrate import run as runner
    from quantkit.engine.comm import Hooks

    real = runner.run_job
    runner.run_job = lambda job: real(replace(job, run=replace(job.run, hooks=Hooks(on_layer=FailAt(0, 1)))))
    try:
        yield
    finally:
        runner.run_job = real


def stopped(*then: Callable[[Path], None]) -> Callable[[Path], None]:
    """A setup leaving out.partial from a --low-memory GPTQ run stopped after its first layer, then `then`."""
    def setup(w: Path) -> None:
        with failing_after_first_layer():
            result = run_cli("calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--low-memory", "-o", w / "out")
        assert result.exit_code == 2 and (w / "out.partial" / "state.json").is_file(), result.output
        for step in then:
            step(w)
    return setup


def fifo_text(w: Path) -> None:
    """d.fifo: a named pipe a thread writes the text into once (as `--calib <(zcat corpus.gz)` gives)."""
    import threading

    os.mkfifo(w / "d.fifo")
    text = (w / "text.txt").read_bytes()

    def feed() -> None:
        with open(w / "d.fifo", "wb") as pipe:
            pipe.write(text)
    threading.Thread(target=feed, daemon=True).start()


def make_set_with(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """A calibration set (quantkit importance) whose tensors are edited and whose manifest hashes are renewed."""
    def setup(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        from quantkit.importance.calibration_set import file_sha256

        _make_set(w)
        manifest = json.loads((w / "set" / "manifest.json").read_text())
        for name in manifest.get("files", {}):
            state = load_file(w / "set" / name)
            edit(state)
            save_file({k: v.contiguous() for k, v in state.items()}, w / "set" / name)
            manifest["files"][name] = file_sha256(w / "set" / name)
        (w / "set" / "manifest.json").write_text(json.dumps(manifest))
    return setup


def on(keys: str, value_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    """An edit applying value_fn to every tensor whose name contains `keys`."""
    any_dtype, name = keys.startswith("!"), keys.lstrip("!")

    def edit(state: dict) -> None:
        for k in list(state):
            if name in k and (any_dtype or state[k].is_floating_point()):
                state[k] = value_fn(state[k].clone())
    return edit


def fifth_round() -> list[Case]:
    """Round 5, written by a second helper as a fresh battery (issue #22's target): every command and public
    function again, inputs no earlier round tried; successes are checked (exports loaded, finite weights and
    logits, codes compared) so a wrong result counts as quiet."""
    out = Cases()
    add, cli, cal, api = out.add, out.cli, out.cal, out.api
    nan, inf = float("nan"), float("inf")

    def config(**fields):
        return json_edit("model/config.json", lambda d: d.update(fields))

    # ---- model files
    cal("model", "safetensors header length says 2**60 bytes",
        setup=lambda w: _poke(w / "model" / "model.safetensors", 0, (1 << 60).to_bytes(8, "little")))
    cal("model", "safetensors data_offsets past the end of the file",
        setup=st_header("model/model.safetensors", lambda h: h["model.norm.weight"].update(
            data_offsets=[h["model.norm.weight"]["data_offsets"][0], 10**7])))
    cal("model", "safetensors header dtype F16 over F32 bytes",
        setup=st_header("model/model.safetensors", lambda h: h["model.layers.0.mlp.up_proj.weight"].update(dtype="F16")))
    cal("model", "bool q_proj weight", setup=tensors(model__layers__0__self_attn__q_proj__weight=lambda t: t > 0))
    cal("model", "float8 down_proj weight", check=export_ok(),
        setup=tensors(model__layers__1__mlp__down_proj__weight=lambda t: t.to(torch.float8_e4m3fn)))
    cal("model", "every tensor float64", check=export_ok(), setup=st_edit("model/model.safetensors", lambda s: s.update(
        {k: v.double() for k, v in s.items()})))
    cal("model", "1e38 in a q_proj weight (finite)", check=export_ok(),
        setup=tensors(model__layers__0__self_attn__q_proj__weight=at(1e38)))
    cal("model", "GPTQ: a whole gate_proj of zeros", method=GPTQ, check=export_ok(),
        setup=tensors(model__layers__0__mlp__gate_proj__weight=lambda t: t * 0))
    cal("model", "GPTQ: a k_proj of subnormals (1e-40)", method=GPTQ, check=export_ok(),
        setup=tensors(model__layers__1__self_attn__k_proj__weight=lambda t: torch.full_like(t, 1e-40)))
    cal("model", "RTN: an up_proj row of 3e38 and -3e38", check=export_ok(),
        setup=tensors(model__layers__0__mlp__up_proj__weight=lambda t: at(-3e38, (0, 1))(at(3e38, (0, 0))(t))))
    cal("model", "config attention_bias true, no biases stored", setup=config(attention_bias=True))
    cal("model", "config hidden_act 'bogus'", setup=config(hidden_act="bogus"))
    cal("model", "config rope_parameters rope_type 'bogus'",
        setup=config(rope_parameters={"rope_type": "bogus", "rope_theta": 10000.0}))
    cal("model", "config num_key_value_heads 0", setup=config(num_key_value_heads=0))
    cal("model", "config intermediate_size 256 (128 stored)", setup=config(intermediate_size=256))
    cal("model", "config num_hidden_layers 3 (2 stored)", setup=config(num_hidden_layers=3))
    cal("model", "config vocab_size 0", setup=config(vocab_size=0))
    cal("model", "a sequence-classifier checkpoint (score.weight, no lm_head)",
        setup=both(config(architectures=["LlamaForSequenceClassification"], num_labels=2),
                   st_edit("model/model.safetensors", lambda s: s.__setitem__("score.weight", s.pop("lm_head.weight")[:2]))))
    cal("model", "config.json a JSON list", setup=write("model/config.json", "[1, 2]"))
    cal("model", "config.json empty", setup=write("model/config.json", ""))
    cal("model", "config.json a directory",
        setup=lambda w: ((w / "model" / "config.json").unlink(), (w / "model" / "config.json").mkdir()))
    cal("model", "model.safetensors a directory", setup=lambda w: (
        (w / "model" / "model.safetensors").unlink(), (w / "model" / "model.safetensors" / "x").mkdir(parents=True)))
    cal("model", "model.safetensors a dangling symlink", setup=lambda w: (
        (w / "model" / "model.safetensors").unlink(), (w / "model" / "model.safetensors").symlink_to(w / "gone")))
    cal("model", "only a pytorch_model.bin of garbage", setup=lambda w: (
        (w / "model" / "model.safetensors").unlink(), (w / "model" / "pytorch_model.bin").write_bytes(b"PK\x03\x04" * 100)))
    cal("model", "model.safetensors.index.json not JSON beside the file",
        setup=write("model/model.safetensors.index.json", "{oops"))
    stale = both(lambda w: shutil.copy(w / "model" / "model.safetensors", w / "model" / "model-old.safetensors"),
                 tensors(model__layers__0__mlp__down_proj__weight=lambda t: t * 0 + 0.5))
    cal("model", "a stale second safetensors file beside model.safetensors (no index)", setup=stale, check=_down_is_half)
    cal("model", "--low-memory: a stale second safetensors file (no index)", "--low-memory", setup=stale,
        check=_down_is_half)
    cal("model", "--low-memory: safetensors cut short", "--low-memory",
        setup=lambda w: (w / "model" / "model.safetensors").write_bytes((w / "model" / "model.safetensors").read_bytes()[:30000]))
    cal("model", "--low-memory: bool q_proj weight", "--low-memory",
        setup=tensors(model__layers__1__self_attn__q_proj__weight=lambda t: t > 0))
    cal("model", "tokenizer ids up to 1592 with 62 entries (fits by count)", setup=swap_tokenizer(sparse_tokenizer))
    cal("model", "tokenizer's own chat template not Jinja, chat data", data="d.jsonl",
        setup=both(json_edit("model/tokenizer_config.json", lambda d: d.update(chat_template="{% for %}")),
                   write("d.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT))))
    cal("model", "tokenizer's own chat template raises", data="d.jsonl",
        setup=both(json_edit("model/tokenizer_config.json", lambda d: d.update(
            chat_template="{{ raise_exception('no system role') }}")),
            write("d.jsonl", "".join(json.dumps(r) + "\n" for r in CHAT))))
    cli("model", "hub id with a revision, offline",
        lambda w: ["calibrate", "quantkit-nobody/none@v1", "--calib", w / "text.txt", *RTN, "-o", w / "out"])

    # ---- calibration data
    chat_lines = "".join(json.dumps(r) + "\n" for r in CHAT)
    text = " ".join(WORDS * 40)
    cal("data", "UTF-8 BOM before the text", data="d.txt", setup=write("d.txt", "\ufeff" + text), check=export_ok())
    cal("data", "JSONL with a BOM on its first line", data="d.jsonl",
        setup=write("d.jsonl", "\ufeff" + "".join(json.dumps({"text": text}) + "\n" for _ in range(3))), check=export_ok())
    cal("data", "JSONL with CRLF line ends", data="d.jsonl",
        setup=write("d.jsonl", "".join(json.dumps({"text": text}) + "\r\n" for _ in range(3))), check=export_ok())
    cal("data", "JSONL text null", data="d.jsonl", setup=write("d.jsonl", '{"text": null}\n' * 3))
    cal("data", "JSONL text a mapping", data="d.jsonl", setup=write("d.jsonl", '{"text": {"body": "w1 w2"}}\n' * 3))
    cal("data", "JSONL whose lines are arrays", data="d.jsonl", setup=write("d.jsonl", '["w1", "w2"]\n' * 3))
    cal("data", "JSONL of text records with messages null", data="d.jsonl",
        setup=write("d.jsonl", "".join(json.dumps({"text": text, "messages": None}) + "\n" for _ in range(3))),
        check=export_ok())
    cal("data", "JSONL text records with image null", data="d.jsonl",
        setup=write("d.jsonl", "".join(json.dumps({"image": None, "text": text}) + "\n" for _ in range(3))))
    cal("data", ".json holding a string", data="d.json", setup=write("d.json", json.dumps(text)))
    cal("data", ".json holding a number", data="d.json", setup=write("d.json", "12"))
    cal("data", ".json array of arrays", data="d.json", setup=write("d.json", json.dumps([[text], [text]])))
    cal("data", ".json array of strings", data="d.json", setup=write("d.json", json.dumps([text, text])),
        check=export_ok())
    cal("data", "chat with an empty messages list", "--chat-template", "t.jinja", data="d.jsonl",
        setup=both(write("t.jinja", CHAT_TEMPLATE), write("d.jsonl", '{"messages": []}\n' * 4)))
    cal("data", "chat content null", "--chat-template", "t.jinja", data="d.jsonl",
        setup=both(write("t.jinja", CHAT_TEMPLATE),
                   write("d.jsonl", json.dumps({"messages": [{"role": "user", "content": None},
                                                             {"role": "assistant", "content": "w1"}]}) + "\n")))
    cal("data", "chat message without a role", "--chat-template", "t.jinja", data="d.jsonl",
        setup=both(write("t.jinja", CHAT_TEMPLATE),
                   write("d.jsonl", json.dumps({"messages": [{"content": "w1 w2"}, {"content": "w3"}]}) + "\n")))
    cal("data", "--chat-template an empty file", "--chat-template", "t.jinja", data="d.jsonl",
        setup=both(write("t.jinja", ""), write("d.jsonl", chat_lines)))
    cal("data", "--chat-template that raises", "--chat-template", "t.jinja", data="d.jsonl",
        setup=both(write("t.jinja", "{{ raise_exception('roles must alternate') }}"), write("d.jsonl", chat_lines)))
    cal("data", "--chat-template a binary file", "--chat-template", "t.jinja", data="d.jsonl",
        setup=both(write("t.jinja", bytes(range(256))), write("d.jsonl", chat_lines)))
    cal("data", "--chat-template a directory", "--chat-template", "tdir", data="d.jsonl",
        setup=both(lambda w: (w / "tdir").mkdir(), write("d.jsonl", chat_lines)))
    cal("data", "TLQ on chats whose assistant turns are empty", "--chat-template", "t.jinja", data="d.jsonl",
        method=["--method", "tlq", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"], check=export_ok(),
        setup=both(write("t.jinja", "{% for m in messages %}{{ m.content }} {% endfor %}"),
                   write("d.jsonl", "".join(json.dumps({"messages": [{"role": "user", "content": " ".join(WORDS[:20])},
                                                                      {"role": "assistant", "content": ""}]}) + "\n"
                                            for _ in range(4)))))
    vlm = dict(model="vlm", method=["--method", "rtn", "--nsamples", "2", "--seqlen", "256", "--group-size", "32"])

    def image_rec(image, **extra):
        return json.dumps({"image": image, "text": "a red square .", **extra}) + "\n"

    def vl(name, lines, *extra, setup=None, check=None):
        cal("data", f"VLM: {name}", *extra, data="d.jsonl", setup=both(write("d.jsonl", lines), *([setup] if setup else [])),
            check=check, **vlm)

    vl("image a truncated PNG", image_rec("cut.png") * 3,
       setup=lambda w: (w / "cut.png").write_bytes((w / "vl" / "img" / "0.png").read_bytes()[:60]))
    vl("image path a directory", image_rec("vl/img") * 3)
    vl("image a text file named .png", image_rec("fake.png") * 3, setup=write("fake.png", "not an image " * 50))
    vl("a 1x1 image", image_rec("px.png") * 3, setup=lambda w: _image(w / "px.png", "RGB", (1, 1)), check=export_ok())
    vl("a grayscale image", image_rec("g.png") * 3, setup=lambda w: _image(w / "g.png", "L", (56, 56)), check=export_ok())
    vl("an RGBA image", image_rec("a.png") * 3, setup=lambda w: _image(w / "a.png", "RGBA", (56, 56)), check=export_ok())
    vl("a 16-bit image", image_rec("i.png") * 3, setup=lambda w: _image(w / "i.png", "I;16", (56, 56)), check=export_ok())
    vl("an image URL, offline", image_rec("http://127.0.0.1:9/x.png") * 3)
    vl("records with empty text", "".join(json.dumps({"image": f"vl/img/{i}.png", "text": ""}) + "\n" for i in range(4)))
    vl("records with neither text nor messages", "".join(json.dumps({"image": f"vl/img/{i}.png"}) + "\n" for i in range(4)))
    vl("--nsamples 9 over 4 records", "".join(image_rec(f"vl/img/{i}.png") for i in range(4)), "--nsamples", "9")
    vl("--part heldout of 4 records", "".join(image_rec(f"vl/img/{i}.png") for i in range(4)), "--part", "heldout")
    vcal = dict(model="vlm", data="vl/data.jsonl",
                method=["--method", "rtn", "--nsamples", "2", "--seqlen", "256", "--group-size", "32"])
    cal("vlm", "processor_config.json deleted", setup=lambda w: (w / "vlm" / "processor_config.json").unlink(), **vcal)
    cal("vlm", "processor_config.json not JSON", setup=write("vlm/processor_config.json", "{oops"), **vcal)
    cal("vlm", "chat_template.jinja deleted (records with messages)",
        setup=lambda w: (w / "vlm" / "chat_template.jinja").unlink(), **vcal)
    cal("vlm", "config image_token_id pointing at a word token", setup=json_edit("vlm/config.json", lambda d: d.update(
        image_token_id=40)), **vcal)
    cal("vlm", "the text llama's tokenizer (no image tokens)", setup=lambda w: _swap_tok(w / "vlm", make_word_tokenizer),
        **vcal)
    cal("vlm", "NaN in a vision tower weight", setup=st_edit("vlm/model.safetensors", _nan_in_vision), **vcal)
    cal("vlm", "--quantize-vision on text-only data", "--quantize-vision", model="vlm", data="text.txt",
        method=vcal["method"])
    cal("vlm", "--quantize-vision --group-size 64 (vision widths 32)", "--quantize-vision", "--group-size", "64", **vcal)
    cal("vlm", "--quantize-vision --format gptq", "--quantize-vision", "--format", "gptq", **vcal)
    vl("a 1 x 400 image (aspect ratio 400)", image_rec("thin.png") * 3,
       setup=lambda w: _image(w / "thin.png", "RGB", (400, 1)), check=export_ok())
    cal("data", "recipe whose source is itself", data="r.yaml", setup=write("r.yaml", "kind: text\nsources:\n  - path: r.yaml\n"))
    cal("data", "recipe with an empty source list", data="r.yaml", setup=write("r.yaml", "kind: text\nsources: []\n"))
    cal("data", "recipe whose sources is a mapping", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n  path: text.txt\n"))
    cal("data", "recipe weight 'heavy'", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n  - path: text.txt\n    weight: heavy\n"))
    cal("data", "recipe weight .nan", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n  - path: text.txt\n    weight: .nan\n"))
    cal("data", "recipe weight .inf", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n  - path: text.txt\n    weight: .inf\n"))
    cal("data", "text recipe naming a chat file", data="r.yaml",
        setup=both(write("c.jsonl", chat_lines), write("r.yaml", "kind: text\nsources:\n  - path: c.jsonl\n")))
    cal("data", "a named pipe (read once)", data="d.fifo", setup=fifo_text)
    cal("data", "a directory of 50 empty .txt files", data="dir",
        setup=lambda w: [write(f"dir/{i}.txt", "")(w) for i in range(50)])
    cal("data", "a glob over the model's files", data="model/*")
    cal("data", "a gzip-compressed .txt.gz", data="d.txt.gz",
        setup=lambda w: (w / "d.txt.gz").write_bytes(__import__("gzip").compress(text.encode())))
    cal("data", "hf: with an empty name", data="hf:")
    cal("data", "hf::: (only separators)", data="hf:::")

    # ---- calibrate options
    cal("options", "--group-size 128 above every input width", "--group-size", "128")
    cal("options", "GPTQ --damp 0", "--damp", "0", method=GPTQ, check=export_ok())
    cal("options", "GPTQ --damp inf", "--damp", "inf", method=GPTQ)
    cal("options", "GPTQ --damp 1e-300", "--damp", "1e-300", method=GPTQ, check=export_ok())
    cal("options", "--seed 2**70", "--seed", str(2**70), method=GPTQ, check=export_ok())
    cal("options", "--nproc 3 with --nsamples 2", "--nproc", "3", method=GPTQ, check=_same_as_one_rank)
    cal("options", "--devices 0,1 on the CPU", "--devices", "0,1")
    cal("options", "--dist-timeout nan", "--dist-timeout", "nan")
    cal("options", "--dist-timeout inf", "--dist-timeout", "inf")
    cal("options", "--offload-dir without --low-memory", "--offload-dir", "scratch")
    cal("options", "GPTQ --dtype float16 on the CPU", "--dtype", "float16", method=GPTQ, check=export_ok())
    cal("options", "--device meta", "--device", "meta")
    cal("options", "--device cpu:1", "--device", "cpu:1", check=export_ok())
    cal("options", "--device ''", "--device", "")
    cal("options", "--device cuda:abc", "--device", "cuda:abc")
    cal("options", "--recipe fp_alpha .nan", "--recipe", "r.yaml", method=GPTQ,
        setup=write("r.yaml", "overrides:\n  - targets: [down_proj]\n    fp_alpha: .nan\n"))
    cal("options", "--recipe fp_alpha '0.5' (a string)", "--recipe", "r.yaml", method=GPTQ,
        setup=write("r.yaml", "overrides:\n  - targets: [down_proj]\n    fp_alpha: '0.5'\n"))
    cal("options", "--recipe method GPTQ (capitals)", "--recipe", "r.yaml",
        setup=write("r.yaml", "overrides:\n  - targets: [down_proj]\n    method: GPTQ\n"))
    cal("options", "--recipe targets: [] (no targets)", "--recipe", "r.yaml", setup=write("r.yaml", "targets: []\n"),
        check=_quantized_nothing)
    cal("options", "--recipe sym 'yes' (a string)", "--recipe", "r.yaml",
        setup=write("r.yaml", "overrides:\n  - targets: [down_proj]\n    sym: 'yes'\n"))
    cal("options", "--recipe bits true", "--recipe", "r.yaml",
        setup=write("r.yaml", "overrides:\n  - targets: [down_proj]\n    bits: true\n"))
    cal("options", "--recipe a directory", "--recipe", "rdir", setup=lambda w: (w / "rdir").mkdir())
    cal("options", "--recipe targets lm_head without --quantize-lm-head", "--recipe", "r.yaml",
        setup=write("r.yaml", "targets: [lm_head]\n"))
    cal("options", "--quantize-lm-head on tied embeddings", "--quantize-lm-head",
        setup=both(config(tie_word_embeddings=True),
                   st_edit("model/model.safetensors", lambda s: s.pop("lm_head.weight"))))
    cal("options", "--dry-run with -o an existing export", "--dry-run", setup=lambda w: shutil.copytree(w / "ct", w / "out"))
    cal("options", "--push-to-hub ''", "--push-to-hub", "")
    cal("options", "--low-memory --offload-dir the output", "--low-memory", "--offload-dir", "out")
    cal("options", "--low-memory --offload-dir OUT.partial", "--low-memory", "--offload-dir", "out.partial",
        check=export_ok())
    add("options", "--calib-set of an empty directory", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "sdir", "--group-size", "32", "-o", w / "out"),
        lambda w: (w / "sdir").mkdir())
    add("options", "--calib-set onto itself with --overwrite", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set", "--group-size", "32", "-o", w / "set", "--overwrite"),
        lambda w: _make_set(w))
    add("options", "--calib-set whose token ids exceed the vocabulary", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set", "--group-size", "32", "-o", w / "out"),
        make_set_with(on("!input_ids", lambda t: t + 1000)))
    add("options", "--calib-set with NaN token weights", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set", "--group-size", "32", "-o", w / "out"),
        make_set_with(on("weight", lambda t: t * nan)), check=export_ok())
    add("options", "--calib-set with negative token weights", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set", "--group-size", "32", "-o", w / "out"),
        make_set_with(on("weight", lambda t: -t - 1)))
    add("options", "--calib-set whose manifest is a list", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set", "--group-size", "32", "-o", w / "out"),
        both(lambda w: _make_set(w), write("set/manifest.json", "[]")))
    add("options", "--calib-set made on another model", lambda w: run_cli(
        "calibrate", w / "model", "--calib-set", w / "set", "--group-size", "32", "-o", w / "out"),
        both(lambda w: save_tiny_llama(w / "other", seed=3), lambda w: _make_set_of(w, "other")))

    # ---- resuming from a broken work area (a --low-memory GPTQ run stopped after layer 0)
    def resume(name, *then, check=_resumed_matches_fresh, extra=()):
        add("resume", name, lambda w, e=extra: run_cli("calibrate", w / "model", "--calib", w / "text.txt", *GPTQ,
                                                       "--low-memory", "--resume", *e, "-o", w / "out"),
            stopped(*then), check=check)

    def state(**fields):
        return json_edit("out.partial/state.json", lambda d: d.update(fields))

    def hidden(edit):
        return st_edit("out.partial/hidden_00001_rank0.safetensors", edit)

    resume("the control: an intact work area")
    resume("state.json not JSON", write("out.partial/state.json", "{oops"))
    resume("state.json deleted", lambda w: (w / "out.partial" / "state.json").unlink())
    resume("state.json a JSON list", write("out.partial/state.json", "[]"))
    resume("state layers_done 7 of 2", state(layers_done=7))
    resume("state layers_done -1", state(layers_done=-1))
    resume("state layers_done '1' (a string)", state(layers_done="1"))
    resume("state n_layers 9", state(n_layers=9))
    resume("state without a fingerprint", json_edit("out.partial/state.json", lambda d: d.pop("fingerprint")))
    resume("the next layer's inputs deleted", lambda w: (w / "out.partial" / "hidden_00001_rank0.safetensors").unlink())
    resume("the next layer's inputs cut short", lambda w: _truncate(w / "out.partial" / "hidden_00001_rank0.safetensors"))
    resume("the next layer's inputs NaN", hidden(lambda s: s.update({k: v * nan for k, v in s.items()})))
    resume("the next layer's inputs of another shape", hidden(lambda s: s.update({k: v[..., :8] for k, v in s.items()})))
    resume("the next layer's inputs int64", hidden(lambda s: s.update({k: v.long() for k, v in s.items()})))
    resume("the finished layer's file deleted", lambda w: (w / "out.partial" / "layer_00000.safetensors").unlink())
    resume("the finished layer's file cut short", lambda w: _truncate(w / "out.partial" / "layer_00000.safetensors"))
    resume("the finished layer's scales NaN", st_edit("out.partial/layer_00000.safetensors",
                                                      on("scale", lambda t: t * nan)))
    resume("out.partial a file", lambda w: (shutil.rmtree(w / "out.partial"), (w / "out.partial").write_text("x")))
    resume("state.json a directory", lambda w: ((w / "out.partial" / "state.json").unlink(),
                                                (w / "out.partial" / "state.json").mkdir()))
    resume("the model's finished layer 0 changed since the stop",
           tensors(model__layers__0__mlp__down_proj__weight=lambda t: t * 3))
    resume("another --seed", extra=("--seed", "5"))
    resume("--nproc 2 over a 1-rank work area", extra=("--nproc", "2"))

    # ---- outputs
    def calo(name, out_args, setup=None, extra=(), check=None):
        add("output", name, lambda w, o=out_args, e=extra: run_cli(
            "calibrate", w / "model", "--calib", w / "text.txt", *RTN, *e, *o(w)), setup, check)

    calo("-o . --overwrite (the folder holding model and data)", lambda w: ["-o", ".", "--overwrite"])
    calo("-o a dangling symlink", lambda w: ["-o", w / "link"], setup=lambda w: (w / "link").symlink_to(w / "gone"),
         check=export_ok("link"))
    calo("-o a symlink to the model, --overwrite", lambda w: ["-o", w / "link", "--overwrite"],
         setup=lambda w: (w / "link").symlink_to(w / "model"))
    calo("-o model/../model --overwrite", lambda w: ["-o", f"{w}/model/../model", "--overwrite"])
    calo("-o a symlink to the text file, --overwrite", lambda w: ["-o", w / "tl", "--overwrite"],
         setup=lambda w: (w / "tl").symlink_to(w / "text.txt"))
    cli("output", "eval -o model/config.json", lambda w: ["eval", w / "model", "--data", w / "text.txt", "--seqlen", "16",
                                                         "-o", w / "model" / "config.json"])
    cli("output", "eval -o the --data file", lambda w: ["eval", w / "model", "--data", w / "text.txt", "--seqlen", "16",
                                                       "-o", w / "text.txt"])
    cli("output", "qid measure -o the --eval text", lambda w: ["qid", "measure", w / "model", "--eval", w / "text.txt",
                                                               "--tokens", "1e9", "-o", w / "text.txt"])
    cli("output", "qid fit -o its input CSV", lambda w: ["qid", "fit", w / "q.csv", "--bootstrap", "0", "-o", w / "q.csv"])
    cli("output", "qid plot -o the model directory", lambda w: ["qid", "plot", w / "q.csv", "-o", w / "model"])
    cli("output", "qid training-level -o its law file", lambda w: [
        "qid", "training-level", w / "model", "--law", w / "l.json", "--bits", "3", "--qid", "0.1", "-o", w / "l.json"],
        setup=write("l.json", '{"k": 0.1, "alpha": 0.2, "beta": 0.5, "gamma": 5}'))
    cli("output", "importance -o the data's folder --overwrite", lambda w: [
        "importance", w / "model", "--calib", w / "dd" / "t.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "dd",
        "--overwrite"], setup=lambda w: ((w / "dd").mkdir(), shutil.copy(w / "text.txt", w / "dd" / "t.txt")))
    cli("output", "export -o an existing non-empty folder", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "model"])
    cli("output", "export -o a file", lambda w: ["export", w / "ct", "--format", "fake", "-o", w / "text.txt"])
    cli("output", "export -o its input's parent --overwrite", lambda w: [
        "export", w / "ct", "--format", "fake", "-o", w, "--overwrite"])
    cli("output", "demo -o the model --overwrite", lambda w: [
        "demo", "--model", w / "model", "--data", w / "text.txt", "--seqlen", "16", "--nsamples", "2", "-o", w / "model",
        "--overwrite"])
    cli("output", "demo -o a non-empty folder", lambda w: [
        "demo", "--model", w / "model", "--data", w / "text.txt", "--seqlen", "16", "--nsamples", "2", "-o", w / "ct"])
    api("output_dir holding a NUL byte", lambda w: quantize(w, output_dir=f"{w}/o\x00ut"))

    # ---- eval
    def ev16(name, *extra, target="model", setup=None, check=None):
        cli("eval", name, ev("--data", "text.txt", "--seqlen", "16", *extra, target=target), setup, check)

    ev16("--device meta", "--device", "meta")
    ev16("--device mps", "--device", "mps")
    ev16("--stride -4", "--stride", "-4")
    ev16("--max-tokens -1", "--max-tokens", "-1")
    ev16("--num-fewshot 3 without --tasks", "--num-fewshot", "3")
    ev16("--batch-size abc", "--batch-size", "abc")
    ev16("an export whose weight_packed is float32", target="ct",
         setup=st_edit("ct/model.safetensors", on("!weight_packed", lambda t: t.float())))
    ev16("an export whose weight_scale lost half its rows", target="ct",
         setup=st_edit("ct/model.safetensors", on("weight_scale", lambda t: t[: t.shape[0] // 2])))
    ev16("an asymmetric export without weight_zero_point", target="asym",
         setup=st_edit("asym/model.safetensors", lambda s: [s.pop(k) for k in list(s) if k.endswith("zero_point")]))
    ev16("an export whose quantization_config format is 'bogus'", target="ct",
         setup=json_edit("ct/config.json", lambda d: d["quantization_config"].update(format="bogus")))
    ev16("a GPTQ export with g_idx out of range", target="gptq",
         setup=st_edit("gptq/model.safetensors", on("!g_idx", lambda t: t + 50)))
    ev16("a GPTQ export whose qzeros lost a row", target="gptq",
         setup=st_edit("gptq/model.safetensors", on("!qzeros", lambda t: t[:-1])))
    ev16("a GPTQ export whose config says 3 bits", target="gptq",
         setup=json_edit("gptq/config.json", lambda d: d["quantization_config"].update(bits=3)))
    ev16("an export with a NaN in a norm weight", target="ct",
         setup=st_edit("ct/model.safetensors", on("model.norm.weight", lambda t: at(nan, (0,))(t))))
    ev16("an export with a 96-token tokenizer for 64 rows", target="ct",
         setup=lambda w: _swap_tok(w / "ct", printable_tokenizer))
    ev16("an export with an extra unknown tensor", target="ct",
         setup=st_edit("ct/model.safetensors", lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(4, 4)})))
    ev16("a fake export whose manifest says group size 16", target="fake",
         setup=json_edit("fake/quantkit.json", lambda d: d["spec"].update(group_size=16)))
    ev16("a sharded export missing a shard", target="sh", setup=_sharded_missing)
    ev16("an export whose quantkit.json is a list", target="ct", setup=write("ct/quantkit.json", "[]"))
    ev16("an export whose quantized_modules is empty", target="ct",
         setup=json_edit("ct/quantkit.json", lambda d: d.update(quantized_modules=[])))
    ev16("the export's model.safetensors as MODEL", target="ct/model.safetensors")
    cli("eval", "image-text records as --data of a text model", ev("--data", "vl/data.jsonl", "--seqlen", "16"))
    cli("eval", "--tasks with a broken task YAML", ev("--tasks", "qk", "--include-path", "tasks"),
        setup=write("tasks/qk.yaml", "task: qk\ndataset_path: [json\n"))
    cli("eval", "a W8A8 export whose config drops its input activations", ev("--data", "text.txt", "--seqlen", "16",
                                                                           target="a8"),
        setup=json_edit("a8/config.json", lambda d: [g.update(input_activations=None) for g in
                                                     d["quantization_config"]["config_groups"].values()]))

    # ---- export
    def exp(name, src, fmt, setup=None, *extra, check=None):
        cli("export", name, lambda w: ["export", w / src, "--format", fmt, "-o", w / "x", *extra], setup, check)

    exp("an lm_head-quantized export to gptq", "head", "gptq")
    exp("a W8A8 export to gptq", "a8", "gptq")
    exp("--max-shard-size 5XB", "ct", "fake", None, "--max-shard-size", "5XB")
    exp("--max-shard-size 1B (every tensor larger)", "ct", "fake", None, "--max-shard-size", "1B", check=export_ok("x"))
    exp("an export whose qparams sidecar is cut short", "fake", "compressed-tensors",
        lambda w: _truncate(w / "fake" / "quantkit_qparams.safetensors"))
    exp("an export with an extra unknown tensor", "ct", "fake",
        st_edit("ct/model.safetensors", lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(4, 4)})))
    exp("an export whose weight_packed is float32", "ct", "fake",
        st_edit("ct/model.safetensors", on("!weight_packed", lambda t: t.float())))
    exp("IN_DIR a file", "text.txt", "fake")
    exp("quantkit.json format 'bogus'", "ct", "fake", json_edit("ct/quantkit.json", lambda d: d.update(format="bogus")))
    exp("quantkit.json spec bits 'four'", "ct", "fake", json_edit("ct/quantkit.json", lambda d: d["spec"].update(bits="four")))
    exp("an export without config.json", "ct", "fake", lambda w: (w / "ct" / "config.json").unlink())
    exp("a dynamic-groups GPTQ export to compressed-tensors", "dg", "compressed-tensors",
        lambda w: _calibrate_into(w, "dg", *GPTQ, "--dynamic-groups", "--format", "gptq"))
    exp("a GPTQ export with g_idx out of range", "gptq", "compressed-tensors",
        st_edit("gptq/model.safetensors", on("!g_idx", lambda t: t + 50)))

    # ---- importance
    def importance(name, *extra, setup=None, check=None, data="text.txt", model="model"):
        cli("importance", name, imp(*extra, data=data, model=model), setup, check)

    importance("--top-fraction nan", "--top-fraction", "nan")
    importance("--floor-fraction -0.1", "--top-fraction", "0.5", "--floor-fraction", "-0.1")
    importance("--per-modality on a text model", "--per-modality")
    importance("--offload-dir inside the model", "--offload-dir", "model/off")
    importance("--device meta", "--device", "meta")
    importance("--lam nan", "--lam", "nan")
    importance("--chat-template with plain text", "--chat-template", "t.jinja", setup=write("t.jinja", CHAT_TEMPLATE))
    importance("--seed 2**70", "--seed", str(2**70), check=_set_finite)
    importance("--row-groups 1000 with linear guidance (32-row linears)", "--guidance", "linear", "--row-groups", "1000",
        check=_set_finite)
    importance("a model with 1e38 in a weight", setup=tensors(model__layers__0__mlp__down_proj__weight=at(1e38)),
        check=_set_finite)
    cli("importance", "-o inside the model", lambda w: ["importance", w / "model", "--calib", w / "text.txt", "--nsamples",
                                                         "2", "--seqlen", "16", "-o", w / "model" / "set"])
    importance("a VLM with an image that is a text file", data="d.jsonl", model="vlm",
        setup=write("d.jsonl", (json.dumps({"image": "text.txt", "text": "a red square ."}) + "\n") * 3))

    # ---- qid
    def fit(name, body, *extra, check=None):
        cli("qid", f"fit: {name}", lambda w: ["qid", "fit", w / "t.csv", "--bootstrap", "0", *extra],
            write("t.csv", body), check)

    good = build_qid_rows()
    fit("a UTF-8 BOM before the header", "\ufeff" + QID_HEADER + good, check=_fit_finite)
    fit("';' as the delimiter", (QID_HEADER + good).replace(",", ";"))
    fit("a row with an extra column", QID_HEADER + good + "m9,gptq,4,128,5000000,1000000000,3.0,3.1,0.1,e,extra\n")
    fit("a short row", QID_HEADER + good + "m9,gptq,4,128\n")
    fit("qid inf", QID_HEADER + good + "m9,gptq,4,128,5000000,1000000000,3.0,3.1,inf,e\n")
    fit("qid_se -1", QID_HEADER.replace("qid,", "qid,qid_se,") + "".join(
        r.rsplit(",", 1)[0] + ",-1,e\n" for r in good.splitlines()))
    fit("CRLF line ends", (QID_HEADER + good).replace("\n", "\r\n"), check=_fit_finite)
    fit("a 0-byte file", "")
    fit("a JSON file", json.dumps({"rows": []}))
    fit("bits 4.5", QID_HEADER + good + "m9,gptq,4.5,128,5000000,1000000000,3.0,3.1,0.1,e\n")
    fit("an empty method", QID_HEADER + good + "m9,,4,128,5000000,1000000000,3.0,3.1,0.1,e\n")
    fit("every row the same D (beta undetermined)", QID_HEADER + "".join(
        f"m{i},gptq,{b},128,{10**6 * (i + 1)},1000000000,3.0,{3.0 + 0.01 * (i + 1) / b!r},{0.01 * (i + 1) / b!r},e\n"
        for i in range(3) for b in (2, 3, 4)), check=_fit_finite)
    fit("N 1e30", QID_HEADER + good + "m9,gptq,4,128,1e30,1000000000,3.0,3.1,0.1,e\n")
    fit("qid 'abc'", QID_HEADER + good + "m9,gptq,4,128,5000000,1000000000,3.0,3.1,abc,e\n")
    fit("loss_q below loss_fp with qid 0.5", QID_HEADER + good + "m9,gptq,4,128,5000000,1000000000,3.0,2.0,0.5,e\n")
    fit("--level 0", QID_HEADER + good, "--level", "0")
    fit("--huber-delta nan", QID_HEADER + good, "--estimator", "huber", "--huber-delta", "nan")
    fit("--method ''", QID_HEADER + good, "--method", "")

    def predict(name, *args, setup=None):
        cli("qid", f"predict: {name}", lambda w: ["qid", "predict", *[str(a).replace("W/", f"{w}/") for a in args]], setup)

    predict("--bits 16.5", "--params", "7e9", "--bits", "16.5", "--tokens", "1e12")
    predict("--bits -3", "--params", "7e9", "--bits", "-3", "--tokens", "1e12")
    predict("--tokens 0.5", "--params", "7e9", "--bits", "3", "--tokens", "0.5")
    predict("--qid 1e-300", "--params", "7e9", "--bits", "3", "--qid", "1e-300")
    predict("--params 1e16", "--params", "1e16", "--bits", "3", "--tokens", "1e12")
    predict("--qid nan", "--params", "7e9", "--bits", "3", "--qid", "nan")
    predict("--law a fit JSON, --method absent from it", "--law", "W/f.json", "--method", "awq", "--params", "1e9",
            "--bits", "3", "--tokens", "1e12", setup=_fit_json)
    predict("--law alpha as a string", "--law", "W/l.json", "--params", "1e9", "--bits", "3", "--tokens", "1e12",
            setup=write("l.json", '{"k": 0.1, "alpha": "0.2", "beta": 0.5, "gamma": 5}'))
    predict("--law with NaN", "--law", "W/l.json", "--params", "1e9", "--bits", "3", "--tokens", "1e12",
            setup=write("l.json", '{"k": NaN, "alpha": 0.2, "beta": 0.5, "gamma": 5}'))
    predict("--law an empty file", "--law", "W/l.json", "--params", "1e9", "--bits", "3", "--tokens", "1e12",
            setup=write("l.json", ""))
    predict("--law draws malformed", "--law", "W/l.json", "--params", "1e9", "--bits", "3", "--tokens", "1e12",
            setup=write("l.json", '{"k": 0.1, "alpha": 0.2, "beta": 0.5, "gamma": 5, "draws": [1, "x"]}'))
    predict("--law a directory", "--law", "W/model", "--params", "1e9", "--bits", "3", "--tokens", "1e12")

    def measure(name, *extra, setup=None, ckpt="model"):
        cli("qid", f"measure: {name}", lambda w: ["qid", "measure", *([w / c for c in ckpt.split()]), "--eval",
                                                  w / "text.txt", "--tokens", "1e9", "--eval-tokens", "400",
                                                  "--eval-seqlen", "16", "--nsamples", "2", "--calib-seqlen", "16",
                                                  "--group-size", "32", "-o", w / "m.csv", *extra], setup)

    measure("--bits ''", "--bits", "")
    measure("--bits 4,x", "--bits", "4,x")
    measure("--methods ''", "--methods", "")
    measure("--calib-seqlen 0", "--calib-seqlen", "0")
    measure("--threads 0", "--threads", "0")
    measure("--threads -1", "--threads", "-1")
    measure("a checkpoint model@step-5", ckpt="model@step-5")
    measure("--act-bits 8 with --group-size 32", "--act-bits", "8")
    measure("-o a directory", "-o", "model")
    measure("--eval-tokens 10 (under one window)", "--eval-tokens", "10")
    measure("--nsamples 100000", "--nsamples", "100000")
    measure("--calib missing", "--calib", "gone.txt")
    measure("an export as a checkpoint", ckpt="ct")
    measure("a model with a NaN weight", setup=tensors(model__layers__0__mlp__up_proj__weight=at(nan)))
    measure("two checkpoints, three --tokens", "--tokens", "2e9", "--tokens", "3e9", ckpt="model ct")

    def level(name, *extra, setup=None):
        cli("qid", f"training-level: {name}", lambda w: ["qid", "training-level", w / "model", "--law", "ouyang2024-gptq",
                                                         "--bits", "3", *extra], setup)

    level("--level 0", "--qid", "0.1", "--level", "0")
    level("--level 1", "--qid", "0.1", "--level", "1")
    level("--qid 0", "--qid", "0")
    level("--qid nan", "--qid", "nan")
    level("--eval-tokens 0", "--data", "text.txt", "--eval-tokens", "0")
    level("--group-size 7", "--data", "text.txt", "--nsamples", "2", "--calib-seqlen", "16", "--eval-tokens", "400",
          "--eval-seqlen", "16", "--group-size", "7")
    level("--method awq", "--qid", "0.1", "--method", "awq")
    level("neither --qid nor --data")
    cli("qid", "training-level: --law a fit JSON for another method", lambda w: [
        "qid", "training-level", w / "model", "--law", w / "f.json", "--bits", "3", "--qid", "0.1", "--method", "tlq"],
        _fit_json)
    cli("qid", "plot: --method absent from the table", lambda w: ["qid", "plot", w / "q.csv", "--method", "awq", "-o", w / "figs"])

    # ---- plan
    def plan(name, *extra, setup=None):
        cli("plan", name, lambda w: ["plan", w / "model", "--calib", w / "text.txt", *RTN, *extra], setup)

    plan("--host-mem 10%", "--host-mem", "10%")
    plan("--host-mem 1e400", "--host-mem", "1e400")
    plan("--seqlen 10**9", "--seqlen", str(10**9))
    plan("--nsamples 10**15", "--nsamples", str(10**15))
    plan("--device meta", "--device", "meta")
    plan("--recipe matching nothing", "--recipe", "r.yaml", setup=write("r.yaml", "targets: [nothing_here]\n"))
    plan("config hidden_size 48 against its headers", setup=config(hidden_size=48))
    cli("plan", "--calib image-text records of a text model",
        lambda w: ["plan", w / "model", "--calib", w / "vl" / "data.jsonl", *RTN], image_records(False))

    # ---- demo (your model and data, so nothing trains)
    def demo(name, *extra, setup=None, data="text.txt", model="model"):
        cli("demo", name, lambda w: ["demo", "--model", w / model, "--data", w / data, "--seqlen", "16", "--nsamples", "2",
                                     "-o", w / "d", *extra], setup)

    demo("--threads 0", "--threads", "0")
    demo("--threads -4", "--threads", "-4")
    demo("a model with a NaN weight", setup=tensors(model__layers__1__mlp__gate_proj__weight=at(nan)))
    demo("image-text records for a text model", data="vl/data.jsonl", setup=image_records(False))
    demo("chat records as --data", data="d.jsonl", setup=write("d.jsonl", chat_lines))
    demo("--seqlen 100 above max positions 64", "--seqlen", "100")
    demo("--nsamples 1000 over short text", "--nsamples", "1000", data="d.txt", setup=write("d.txt", text[:2000]))
    cli("demo", "--train-seconds nan", lambda w: ["demo", "--train-seconds", "nan", "-o", w / "d"])

    # ---- the Python API
    def q(name, check=None, **kw):
        api(name, lambda w, kw=kw: quantize(w, **kw), write("t.jinja", CHAT_TEMPLATE), check=check)

    for name, kw in [
        ("nsamples=2**63", dict(nsamples=2**63)), ("seqlen=-1", dict(seqlen=-1)), ("group_size=-2", dict(group_size=-2)),
        ("damp=nan (gptq)", dict(method="gptq", damp=nan)), ("damp=inf (gptq)", dict(method="gptq", damp=inf)),
        ("dist_timeout=-1", dict(dist_timeout=-1.0)), ("devices='0,1' on the CPU", dict(devices="0,1")),
        ("devices=[0, 1]", dict(devices=[0, 1])), ("offload_dir=5", dict(low_memory=True, offload_dir=5)),
        ("resume='yes'", dict(resume="yes")), ("overwrite=1", dict(overwrite=1)), ("act_order='no'", dict(act_order="no")),
        ("static_groups=True with act_order=False (gptq)", dict(method="gptq", static_groups=True, act_order=False)),
        ("importance={'lam': '0.1'}", dict(method="tlq", importance={"lam": "0.1"})),
        ("importance={'guidance': 'LINEAR'}", dict(method="tlq", importance={"guidance": "LINEAR"})),
        ("importance=[('lam', 0.1)]", dict(method="tlq", importance=[("lam", 0.1)])),
        ("calib_set=5", dict(method="tlq", data=None, calib_set=5)),
        ("calib_set a text file", dict(method="tlq", data=None, calib_set="text.txt")),
        ("part=None", dict(part=None)), ("dtype='float64'", dict(dtype="float64")),
        ("device='cuda:9'", dict(device="cuda:9")), ("device='meta'", dict(device="meta")), ("device=''", dict(device="")),
        ("device=None", dict(device=None)), ("progress=a callback", dict(progress=lambda *a: None)),
        ("push_to_hub=123", dict(push_to_hub=123)), ("private='yes' without push_to_hub", dict(private="yes")),
        ("reload='no'", dict(reload="no")),
        ("data='~/quantkit-nothing.txt'", dict(data="~/quantkit-nothing.txt")),
        ("data=a set of texts", dict(data={text, text + " w1"})),
        ("data=a torch tensor of ids", dict(data=torch.tensor([TEXT_IDS[0] * 4] * 3))),
        ("data=records of input_ids", dict(data=[{"input_ids": TEXT_IDS[0] * 4}] * 3)),
        ("chat records with an int content", dict(data=[{"messages": [{"role": "user", "content": 5},
                                                                       {"role": "assistant", "content": 7}]}] * 3,
                                                   chat_template="t.jinja")),
        ("chat_template of a missing file", dict(data=CHAT, chat_template="gone.jinja")),
        ("recipe=Recipe-like mapping with overrides a mapping", dict(recipe={"overrides": {"targets": ["q_proj"]}})),
        ("recipe a directory", dict(recipe="model")),
    ]:
        q(name, **kw)
    q("device=torch.device('cpu')", check=returned_ok, device=torch.device("cpu"))
    q("seed=2**70 (gptq)", check=returned_ok, method="gptq", seed=2**70)
    q("data=a tuple of texts", check=returned_ok, data=tuple([text] * 3))
    q("data=a numpy array of texts", check=returned_ok, data=__import__("numpy").array([text] * 3))
    q("data=a Dataset whose texts are None", data=__import__("datasets").Dataset.from_dict({"text": [None, None, None]}))
    q("data=a DatasetDict", data=__import__("datasets").DatasetDict(
        {"train": __import__("datasets").Dataset.from_dict({"text": [text] * 3})}))
    q("data=an IterableDataset", check=returned_ok,
      data=__import__("datasets").Dataset.from_dict({"text": [text] * 3}).to_iterable_dataset())

    def loaded(w: Path, dtype=None):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(w / "model", **({"dtype": dtype} if dtype else {}))

    api("a model built on the meta device", lambda w: quantize(w, model=_meta_model(w), data=[text]))
    api("a model with one layer moved to meta", lambda w: quantize(w, model=_part_meta(loaded(w)), data=[text]))
    api("a float16 loaded model (RTN)", lambda w: quantize(w, model=loaded(w, torch.float16), data=[text]),
        check=returned_ok)
    api("a model in train() mode with dropout 0.5 (GPTQ)", lambda w: _dropout_codes(w), check=_same_codes)
    api("a model with requires_grad off everywhere (TLQ)", lambda w: _frozen_codes(w), check=_same_codes)
    api("TLQ inside torch.inference_mode()", lambda w: _in_inference_mode(w), check=returned_ok)
    api("TLQ inside torch.no_grad()", lambda w: _in_no_grad(w), check=returned_ok)
    api("a torch.compile'd model", lambda w: quantize(w, model=torch.compile(loaded(w)), data=[text]), check=returned_ok)
    api("a loaded sequence classifier", lambda w: quantize(w, model=_classifier(w), data=[text]))
    api("a raw tokenizers.Tokenizer", lambda w: quantize(w, tokenizer_or_processor=_raw_tokenizer()))
    api("a VLM's processor for a text model", lambda w: quantize(w, tokenizer_or_processor=_vlm_processor(w)))
    api("a Quantized result as the model", lambda w: quantize(w, model=quantize(w, output_dir=None)))
    api("a (model, report) tuple as the model", lambda w: quantize(w, model=tuple(quantize(w, output_dir=None))))
    api("a model whose tokenizer ids run past its embedding", lambda w: quantize(
        w, model=loaded(w), tokenizer_or_processor=sparse_tokenizer(), data=[text]))
    lq = __import__("quantkit.export.load", fromlist=["load_quantized"])

    def load(name, target, setup=None):
        api(f"load_quantized: {name}", lambda w: lq.load_quantized(target(w) if callable(target) else target), setup)

    load("a path holding a NUL byte", lambda w: f"{w}/c\x00t")
    load("an export without config.json", lambda w: w / "ct", setup=lambda w: (w / "ct" / "config.json").unlink())
    load("quantkit.json spec bits 'four'", lambda w: w / "ct",
         setup=json_edit("ct/quantkit.json", lambda d: d["spec"].update(bits="four")))
    load("a fake export with a NaN in its qparams", lambda w: w / "fake",
         setup=st_edit("fake/quantkit_qparams.safetensors", on("scale", lambda t: t * nan)))
    load("quantkit.json a list", lambda w: w / "ct", setup=write("ct/quantkit.json", "[]"))
    load("the export's model.safetensors file", lambda w: w / "ct" / "model.safetensors")
    load("a bytes path", lambda w: bytes(w / "ct"))
    load("a GPTQ export whose qweight lost a column", lambda w: w / "gptq",
         setup=st_edit("gptq/model.safetensors", on("!qweight", lambda t: t[:, :-1])))
    load("an asymmetric export whose zero points are float", lambda w: w / "asym",
         setup=st_edit("asym/model.safetensors", on("!zero_point", lambda t: t.float() + 0.5)))
    recipe_mod = __import__("quantkit.quant.recipe", fromlist=["Recipe"])
    for name, make in [
        ("Recipe.from_dict overrides a string", lambda w: recipe_mod.Recipe.from_dict({"overrides": "x"})),
        ("Override(bits='4')", lambda w: recipe_mod.Override(targets=["q_proj"], bits="4")),
        ("Override(method='GPTQ')", lambda w: recipe_mod.Override(targets=["q_proj"], method="GPTQ")),
        ("Override(fp_alpha=2)", lambda w: recipe_mod.Override(targets=["q_proj"], fp_alpha=2.0)),
        ("Override(fp_alpha=nan)", lambda w: recipe_mod.Override(targets=["q_proj"], fp_alpha=nan)),
        ("Override(sym='yes')", lambda w: recipe_mod.Override(targets=["q_proj"], sym="yes")),
        ("Override(targets=[5])", lambda w: recipe_mod.Override(targets=[5], bits=4)),
        ("Recipe(targets=['re:('])", lambda w: recipe_mod.Recipe(targets=["re:("])),
        ("Recipe(ignore=5)", lambda w: recipe_mod.Recipe(ignore=5)),
        ("Recipe.from_yaml of a directory", lambda w: recipe_mod.Recipe.from_yaml(str(w / "model"))),
        ("Recipe.from_yaml of a YAML list", lambda w: recipe_mod.Recipe.from_yaml(str(w / "r.yaml"))),
    ]:
        api(name, make, write("r.yaml", "- a\n- b\n"))
    return out


def make_word_tokenizer():
    from helpers import make_tokenizer

    return make_tokenizer()


def _nan_in_vision(state: dict) -> None:
    key = next(k for k in sorted(state) if "visual" in k and k.endswith("weight") and state[k].dim() == 2)
    state[key][0, 0] = float("nan")


def build_qid_rows() -> str:
    """A 27-row QiD table (3 sizes x 3 token counts x 3 widths) whose qid is loss_q - loss_fp."""
    rows = []
    for i in range(3):
        for j in range(3):
            for b in (2, 3, 4):
                qid = 0.01 * (i + j + 1) / b
                rows.append(f"m{i},gptq,{b},128,{10**6 * (i + 1)},{10**9 * (j + 1)},3.0,{3.0 + qid!r},{qid!r},e\n")
    return "".join(rows)


def _poke(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(16, path.stat().st_size // 2)])


def _image(path: Path, mode: str, size: tuple[int, int]) -> None:
    from PIL import Image

    Image.new(mode, size, 200 if mode in ("L", "I;16") else (200, 30, 30, 255)[: len(mode)]).save(path)


def _swap_tok(folder: Path, make) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    make().save_pretrained(folder)


def _sharded_missing(w: Path) -> None:
    result = run_cli("export", w / "ct", "--format", "compressed-tensors", "-o", w / "sh", "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    shards = sorted((w / "sh").glob("model-*.safetensors"))
    assert len(shards) > 1, shards
    shards[-1].unlink()


def _calibrate_into(w: Path, name: str, *args) -> None:
    result = run_cli("calibrate", w / "model", "--calib", w / "text.txt", *args, "-o", w / name)
    assert result.exit_code == 0, result.output


def _make_set_of(w: Path, model: str) -> None:
    result = run_cli("importance", w / model, "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "set")
    assert result.exit_code == 0, result.output


def _fit_json(w: Path) -> None:
    (w / "f.csv").write_text(QID_HEADER + build_qid_rows())
    result = run_cli("qid", "fit", w / "f.csv", "--bootstrap", "0", "--law", "unified", "-o", w / "f.json")
    assert result.exit_code == 0, result.output
    (w / "f.csv").unlink()


def _same_as_one_rank(w: Path, result) -> str | None:
    """Ranks must write the bytes of one process (docs/distributed.md)."""
    from safetensors.torch import load_file

    one = run_cli("calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "-o", w / "one")
    assert one.exit_code == 0, one.output
    a, b = load_file(w / "out" / "model.safetensors"), load_file(w / "one" / "model.safetensors")
    shutil.rmtree(w / "one")
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    return f"3 ranks over 2 samples differ from one process in {differ[:2]}" if differ else None


def _quantized_nothing(w: Path, result) -> str | None:
    """A recipe whose targets list is empty names no linear: a run must quantize none (or refuse)."""
    modules = json.loads((w / "out" / "quantkit.json").read_text())["quantized_modules"]
    return f"an empty targets list quantized {len(modules)} linears" if modules else None


def _down_is_half(w: Path, result) -> str | None:
    """The export's layer-0 down_proj must be the current file's (every weight 0.5), not the stale file's."""
    import quantkit

    weight = quantkit.load_quantized(w / "out").model.layers[0].mlp.down_proj.weight
    return None if torch.allclose(weight, torch.full_like(weight, 0.5)) else "the export holds the stale file's weights"


def _fit_finite(w: Path, result) -> str | None:
    import re

    numbers = re.findall(r"\b(nan|inf)\b", result.output, flags=re.IGNORECASE)
    return f"non-finite coefficients in the fit: {result.output[-300:]}" if numbers else None


def _set_finite(w: Path, result) -> str | None:
    from safetensors.torch import load_file

    for path in (w / "set").glob("*.safetensors"):
        for name, t in load_file(path).items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                return f"non-finite {name} in the set"
    return None


def _resumed_matches_fresh(w: Path, result) -> str | None:
    """After a resume over a changed model, the export must equal a fresh run on the changed model."""
    from safetensors.torch import load_file

    fresh = run_cli("calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "-o", w / "fresh")
    assert fresh.exit_code == 0, fresh.output
    a, b = load_file(w / "out" / "model.safetensors"), load_file(w / "fresh" / "model.safetensors")
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    shutil.rmtree(w / "fresh")
    return f"the export differs from a fresh run on the model as it is now: {differ[:2]}" if differ else None


def _meta_model(w: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(w / "model"))


def _part_meta(model):
    model.model.layers[1] = model.model.layers[1].to("meta")
    return model


def _codes(result) -> dict:
    return {name: (r.qweight, r.scales) for name, r in (result.results or {}).items()}


def _pair(w: Path, odd, **kw):
    """(codes of the odd model's run, codes of the plain model's run) on the same data and settings."""
    from transformers import AutoModelForCausalLM

    text = " ".join(WORDS * 40)
    plain = AutoModelForCausalLM.from_pretrained(w / "model").eval()
    reference = quantize(w, model=plain, data=[text, text], output_dir=None, **kw)
    result = quantize(w, model=odd(AutoModelForCausalLM.from_pretrained(w / "model")), data=[text, text],
                       output_dir=None, **kw)
    return _codes(result), _codes(reference)


def _dropout_codes(w: Path):
    from transformers import AutoModelForCausalLM

    return _pair(w, lambda _: AutoModelForCausalLM.from_pretrained(w / "model", attention_dropout=0.5).train(),
                 method="gptq")


def _frozen_codes(w: Path):
    def odd(model):
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    return _pair(w, odd, method="tlq")


def _same_codes(w: Path, result) -> str | None:
    odd, reference = result
    if not odd or odd.keys() != reference.keys():
        return "no codes, or other linears, than the plain model's run"
    differ = [k for k in odd if not all(torch.equal(a, b) for a, b in zip(odd[k], reference[k]))]
    return f"codes differ from the plain model's run in {len(differ)} linears ({differ[0]})" if differ else None


def _in_inference_mode(w: Path):
    with torch.inference_mode():
        return quantize(w, method="tlq", output_dir=None)


def _in_no_grad(w: Path):
    with torch.no_grad():
        return quantize(w, method="tlq", output_dir=None)


def _classifier(w: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(w / "model", num_labels=2)


def _raw_tokenizer():
    from helpers import make_tokenizer

    return make_tokenizer().backend_tokenizer


def _vlm_processor(w: Path):
    from helpers import build_vlm

    return build_vlm("qwen2_vl")[1]


ROUNDS = {1: first_round, 2: more_cases, 3: third_round, 4: fourth_round, 5: fifth_round}


def cases(rounds: list[int] | None = None) -> list[Case]:
    """The cases of the given rounds (all by default), in round order."""
    return [case for r in (rounds or sorted(ROUNDS)) for case in ROUNDS[r]()]


# ---------------------------------------------------------------- running and classifying


class Hang(BaseException):
    """Raised by the alarm in a case that runs past HANG_SECONDS (a BaseException: no `except Exception` eats it)."""


HANG_SECONDS = 240


def _on_alarm(signum, frame) -> None:
    raise Hang()


def classify(case: Case, work: Path) -> tuple[str, str]:
    """(class, detail) of one case run in `work` (its cwd)."""
    before = tree(work)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(HANG_SECONDS)
    try:
        return _classify(case, work, before)
    except Hang:
        return "hang", f"still running after {HANG_SECONDS} s"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _accepted(case: Case, work: Path, result: object, what: str) -> tuple[str, str]:
    """A run that succeeded: quiet, unless the case says what a right result is and this one is right."""
    if case.check is None:
        return "quiet", what
    try:
        wrong = case.check(work, result)
    except Exception as err:  # noqa: BLE001 - a result the check cannot read is a wrong result
        wrong = f"its result does not load: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return ("quiet", f"{what}; {wrong}") if wrong else ("accepted", f"{what}; the result checked right")


PROGRESS_BAR = re.compile(r"^[^|]*\d+%\|.*\|")


def _classify(case: Case, work: Path, before: dict) -> tuple[str, str]:
    if case.api:
        from quantkit.errors import QuantkitError

        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                value = case.run(work)
        except QuantkitError as err:
            message = str(err)
            kind = "noisy" if "\n" in message else "clean"
            detail = message
        except Exception as err:  # noqa: BLE001 - what the battery counts
            return "traceback", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        else:
            return _accepted(case, work, value, "returned a result")
    else:
        result = case.run(work)
        # tqdm's progress bars (a run refused after its work began) are progress, not error output
        lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
        errors = [line for line in lines if line.startswith("error: ")]
        if result.exit_code == 0:
            return _accepted(case, work, result, "exit 0")
        if result.exit_code == 2 and not errors and "error: " in result.stderr:  # refused, but not on a line of its own
            return "noisy", "error line not at a line start: " + result.stderr[result.stderr.index("error: ") - 80:][:300]
        if result.exit_code != 2 or not errors:
            text = repr(result.exception) if result.exception else result.output[-300:]
            return "traceback", f"exit {result.exit_code}: {text}"
        detail = errors[0]
        if "--debug shows the traceback" in detail:
            return "traceback", detail
        kind = "clean" if len(lines) == 1 else "noisy"
        if kind == "noisy":
            detail = " | ".join(lines[-4:])
    changed = tree(work)
    if case.area == "resume":  # a refused --resume may move its work area on; the rest must stay as it was
        changed, before = ({k: v for k, v in t.items() if not k.startswith("out.partial")} for t in (changed, before))
    if changed != before:
        added = sorted(set(changed) - set(before))
        altered = sorted(k for k in before if changed.get(k) != before[k])
        return "left_behind", f"{detail} [added {added[:3]}, changed {altered[:3]}]"
    return kind, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="Run only cases whose area or name contains this.")
    parser.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "fault_battery.json"))
    parser.add_argument("--round", "--rounds", dest="rounds", default=None,
                        help="Run only these rounds' cases, e.g. 5 or 1,2,3,4 (default: all).")
    parser.add_argument("--show-clean", action="store_true", help="List the clean cases' error lines too.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    started, wall = time.process_time(), time.perf_counter()
    rounds = sorted(int(r) for r in args.rounds.split(",")) if args.rounds else sorted(ROUNDS)
    pool = cases(rounds)
    selected = [c for c in pool if args.k is None or args.k in c.area or args.k in c.name]
    counts: Counter = Counter()
    by_area: dict[str, Counter] = {}
    failures, clean = [], []
    with tempfile.TemporaryDirectory(prefix="quantkit-battery-") as tmp:
        base = build_base(Path(tmp) / "base")
        if 5 in rounds:
            build_extras(base)
        cwd = os.getcwd()
        for number, case in enumerate(selected):
            work = Path(tmp) / f"case{number}"
            shutil.copytree(base, work)
            os.chdir(work)
            try:
                if case.setup is not None:
                    case.setup(work)
            except Exception as err:  # noqa: BLE001 - the battery's own fault, not quantkit's: say so and go on
                kind, detail = "setup_failed", f"{type(err).__name__}: {str(err)[:300]}"
            else:
                kind, detail = classify(case, work)
            finally:
                os.chdir(cwd)
                shutil.rmtree(work, ignore_errors=True)
            counts[kind] += 1
            by_area.setdefault(case.area, Counter())[kind] += 1
            entry = {"area": case.area, "case": case.name, "class": kind, "detail": detail[:400]}
            (clean if kind in ("clean", "accepted") else failures).append(entry)
            print(f"[{number + 1}/{len(selected)}] {kind:<11} {case.area}: {case.name}", file=sys.stderr)
    result = {
        "command": "python benchmarks/fault_battery.py" + (f" -k {args.k!r}" if args.k else "")
                   + (f" --rounds {args.rounds}" if args.rounds else ""),
        "cases": len(selected),
        **{k: counts.get(k, 0) for k in ("clean", "accepted", "traceback", "quiet", "noisy", "left_behind", "hang")},
        "by_area": {a: dict(c) for a, c in sorted(by_area.items())},
        "not_clean": failures, "cpu_seconds": round(time.process_time() - started, 1),
        "wall_seconds": round(time.perf_counter() - wall, 1), "environment": environment(),
    }
    if args.show_clean:
        result["clean_lines"] = clean
    emit(result, args.output)


if __name__ == "__main__":
    main()
