"""Round 13 of the fault battery (issue #22): a fresh set by another hand, run by fault_battery.py --rounds 13.

What rounds 1-12 tried thinly: the Python API's in-memory data (lists of texts, tuples, datasets.Dataset and
its relatives, generators) against the documented convention (each text one sample cut to seqlen, nsamples of
them drawn with the seed, one warning when fewer), and wrong-typed items inside those lists; a calibration
recipe's own nsamples and seqlen when the options are not given (CLI, API, importance, plan); `eval`'s per-source
report, its parts and an export folder edited after it was written; numbers at the edges spelled the ways Python
and click read them (a leading +, spaces, underscores, full-width digits, 1e309 overflowing to inf, 1e-400
underflowing to 0, -0) for the numeric options of every command; MoE families' router settings and odd expert
inputs; llava_onevision and qwen2_vl given odd in-memory records; resuming with changed options; --low-memory
with the other run options (equal to the in-memory run); --overwrite through symlinks; QiD tables with odd rows.
Valid inputs spelled another way carry a check against a reference run (byte-equal exports or equal JSON).
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import torch
from fault_battery import (
    EV,
    GPTQ,
    QID_HEADER,
    RTN,
    Cases,
    _bytes_of,
    _make_set,
    _maybe,
    both,
    build_qid_rows,
    cal_ref,
    eval_ok,
    export_ok,
    json_edit,
    loss_of,
    quantize,
    returned_ok,
    run_cli,
    same_as,
    st_edit,
    stopped,
    tri,
    valid,
    write,
)

W = [f"w{i}" for i in range(60)]


def freeze(rel: str, make: bool = True):
    """fault_battery.freeze, the folder recorded where the running battery thaws it (it runs as __main__, whose
    FROZEN is not the imported fault_battery's)."""
    import sys

    import fault_battery

    def setup(w: Path) -> None:
        fault_battery.freeze(rel, make)(w)
        main = sys.modules.get("__main__")
        if getattr(main, "FROZEN", None) is not None and main.FROZEN is not fault_battery.FROZEN:
            main.FROZEN.append(fault_battery.FROZEN.pop())
    return setup


def words(i: int, n: int) -> str:
    """n tokens of the tiny llama's word tokenizer (one word, one token), a different run for each i."""
    return " ".join(W[(7 * i + 3 * j + j * j) % 60] for j in range(n))


T16 = [words(i, 16) for i in range(12)]  # texts of exactly one seqlen
T40 = [t + " " + words(i + 50, 24) for i, t in enumerate(T16)]  # the same texts, 24 tokens longer


class Got:
    """An API result and the warnings its call gave (the battery ignores warnings; these cases count them)."""

    def __init__(self, value, messages: list[str]) -> None:
        self.model = getattr(value, "model", value)
        self.value = value
        self.messages = messages


def _fewer(messages: list[str]) -> list[str]:
    return [m for m in messages if "fewer than nsamples" in m]


def gq(**kw):
    """quantkit.quantize GPTQ (2 x 16, group 32) into out/, `kw` on top; the warnings recorded (a Got)."""
    def call(w: Path):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            value = quantize(w, **{"method": "gptq", **{k: (v(w) if callable(v) and k in LAZY else v)
                                                         for k, v in kw.items()}})
        return Got(value, [str(x.message) for x in got])
    return call


LAZY = {"data", "tokenizer_or_processor", "model", "calib_set", "chat_template"}  # keywords given as a function of the case folder


def equals_api(ref: dict, warned: int | None = None):
    """A check: out/ equals a GPTQ API call's with `ref` (byte for byte); warned: the call gave exactly this many
    "fewer than nsamples" warnings."""
    def check(w: Path, result) -> str | None:
        if warned is not None and isinstance(result, Got) and len(_fewer(result.messages)) != warned:
            return f"{len(_fewer(result.messages))} 'fewer than nsamples' warnings, expected {warned}"
        gq(**{**ref, "output_dir": str(w / "ref")})(w)
        a, b = _bytes_of(w / "out" / "model.safetensors"), _bytes_of(w / "ref" / "model.safetensors")
        return None if a and a == b else "out/model.safetensors differs from the reference call's"
    return check


def drawn(n: int, k: int, seed: int = 0) -> list[int]:
    """The documented draw (quantize's docstring; llm-compressor's convention): k of n texts by
    random.Random(seed).shuffle, in that order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:k]


def dataset(**columns):
    from datasets import Dataset

    return Dataset.from_dict(columns)


def _one_warning(w: Path, result) -> str | None:
    n = len(_fewer(result.messages))
    return None if n == 1 else f"{n} 'fewer than nsamples' warnings, expected one"


def _api_data_cases(out: Cases) -> None:
    """In-memory data of quantkit.quantize: the documented list-of-texts convention, checked against references."""
    api = out.api
    two = {"data": T16[:2], "nsamples": 2}
    for name, kw, ref, kind, warned in [
        ("two 40-token texts equal their first 16 tokens (each cut to seqlen)", dict(data=T40[:2]), two, "valid", 0),
        ("a tuple of two texts equals the list", dict(data=tuple(T16[:2])), two, "maybe", 0),
        ("[{'text': t}, ...] records equal the list of texts", dict(data=[{"text": t} for t in T16[:2]]), two,
         "maybe", 0),
        ("[{'text': t, 'id': i}] records (an extra field) equal the list", dict(
            data=[{"text": t, "id": i} for i, t in enumerate(T16[:2])]), two, "maybe", 0),
        ("numpy str_ items equal the list", dict(data="NPSTR"), two, "valid", 0),
        ("a str subclass's items equal the list", dict(data="SUBSTR"), two, "valid", 0),
        ("a Dataset 'text' column equals the list", dict(data="DS"), two, "valid", 0),
        ("a Dataset with an extra 'id' column equals the list", dict(data="DS_ID"), two, "valid", 0),
        ("a Dataset with an int 'label' column equals the list", dict(data="DS_LABEL"), two, "valid", 0),
        ("a collections.deque of texts equals the list", dict(data="DEQUE"), two, "maybe", 0),
        ("a generator of texts equals the list", dict(data="GEN2"), two, "maybe", 0),
        ("a pandas Series of texts equals the list", dict(data="SERIES"), two, "maybe", 0),
        ("a pandas DataFrame with a 'text' column equals the list", dict(data="FRAME"), two, "maybe", 0),
        ("an IterableDataset 'text' column equals the list", dict(data="ITERDS"), two, "maybe", 0),
        ("5 texts, nsamples 2: the two seed-0 draws", dict(data=T16[:5]), {"data": [T16[i] for i in drawn(5, 2)],
                                                                        "nsamples": 2}, "valid", 0),
        ("5 texts, nsamples 2, seed 3: the two seed-3 draws", dict(data=T16[:5], seed=3),
         {"data": [T16[i] for i in drawn(5, 2, 3)], "nsamples": 2, "seed": 3}, "valid", 0),
        ("12 texts, nsamples 3: the three seed-0 draws", dict(data=T16, nsamples=3),
         {"data": [T16[i] for i in drawn(12, 3)], "nsamples": 3}, "valid", 0),
        ("a Dataset of 5 rows, nsamples 2: the two seed-0 draws", dict(data="DS5"),
         {"data": [T16[i] for i in drawn(5, 2)], "nsamples": 2}, "valid", 0),
        ("2000 texts, nsamples 2: the two seed-0 draws", dict(data=[words(i, 16) for i in range(2000)]),
         {"data": [words(i, 16) for i in drawn(2000, 2)], "nsamples": 2}, "valid", 0),
        ("two texts, nsamples 4: one warning, the two texts", dict(data=T16[:2], nsamples=4), two, "valid", 1),
        ("three texts one of them 1 token, nsamples 3: one warning, the other two",
         dict(data=[T16[0], "w5", T16[1]], nsamples=3), two, "valid", 1),
        ("three texts one of them '', nsamples 3: one warning, the other two",
         dict(data=[T16[0], "", T16[1]], nsamples=3), two, "maybe", 1),
        ("three texts one of them blank, nsamples 3: one warning, the other two",
         dict(data=[T16[0], "  \n ", T16[1]], nsamples=3), two, "maybe", 1),
        ("two texts of 8 and 24 tokens equal the same texts cut (seqlen 16)",
         dict(data=[T16[0][: len(words(0, 8))], T40[1]]), {"data": [T16[0][: len(words(0, 8))], T16[1]],
                                                           "nsamples": 2}, "valid", 0),
        ("a single long text equals the text file (part all)", dict(data="TEXTFILE", part="all"),
         {"data": "PATH", "part": "all"}, "valid", None),
        ("a single long text equals the text file (part train)", dict(data="TEXTFILE", part="train"),
         {"data": "PATH", "part": "train"}, "valid", None),
        ("text.txt as a Path equals it as a str", dict(data="PATHOBJ"), {"data": "PATH"}, "valid", None),
    ]:
        api(f"data13 {name}", gq(**_lazy(kw)), check=tri(kind, equals_api(_lazy(ref), warned)))
    api("data13 two texts, nsamples 4: exactly one 'fewer than nsamples' warning", gq(data=T16[:2], nsamples=4),
        check=valid(_one_warning))
    api("data13 a Dataset of 2 rows, nsamples 4: exactly one warning", gq(data=lambda w: dataset(text=T16[:2]),
                                                                         nsamples=4), check=valid(_one_warning))
    bad = T16[1]
    for name, data in [
        ("[text, 5]", [T16[0], 5]), ("[text, None]", [T16[0], None]), ("[text, b'w1 w2']", [T16[0], b"w1 w2"]),
        ("[text, Path('text.txt')] (a path among texts)", "TEXT_AND_PATH"), ("[text, ['w1 w2']]", [T16[0], [bad]]),
        ("[text, {'text': text}] (a string and a record)", [T16[0], {"text": bad}]),
        ("[{'text': text}, {'text': 5}]", [{"text": T16[0]}, {"text": 5}]),
        ("[{'text': text}, {'txt': text}] (a misspelt field)", [{"text": T16[0]}, {"txt": bad}]),
        ("[{'text': text}, {'text': None}]", [{"text": T16[0]}, {"text": None}]),
        ("[{'text': text}, {}] (an empty record)", [{"text": T16[0]}, {}]),
        ("[text, nan]", [T16[0], float("nan")]), ("[text, True]", [T16[0], True]),
        ("[[text], [text]] (lists of lists)", [[T16[0]], [bad]]), ("[(text,), (text,)] (tuples)", [(T16[0],), (bad,)]),
        ("[text, Ellipsis]", [T16[0], ...]), ("[text, a lone surrogate text]", [T16[0], "w1 \ud800 w2 " * 6]),
        ("[text, a chat record]", [T16[0], {"messages": [{"role": "user", "content": bad}]}]),
        ("[chat record, {'text': text}]", [{"messages": [{"role": "user", "content": bad}]}, {"text": T16[0]}]),
        ("[{'text': text, 'messages': [...]}] (both fields)", [{"text": T16[0], "messages": [
            {"role": "user", "content": bad}]}] * 2),
        ("[{'image': 'vl/img/0.png', 'text': text}] for the text llama", "IMAGE_RECORDS"),
        ("{'text': [t, t]} (a dict of columns)", {"text": T16[:2]}), ("a set of texts (no order)", set(T16[:2])),
        ("range(3)", range(3)), ("a generator of ints", "GEN_INTS"), ("a Dataset whose 'text' holds ints", "DS_INTS"),
        ("a Dataset whose 'text' holds a None among texts", "DS_NONE"), ("a Dataset of no rows", "DS_EMPTY"),
        ("a Dataset with only a 'Text' column", "DS_CAPITAL"), ("a Dataset with only a 'content' column",
                                                               "DS_CONTENT"),
        ("a Dataset with 'text' and 'messages' columns", "DS_BOTH"), ("a DatasetDict {'train': ...}", "DSDICT"),
        ("a Dataset whose 'messages' holds strings", "DS_MSG_STR"), ("a pandas DataFrame without 'text'", "FRAME_X"),
        ("a torch tensor of token ids", torch.randint(2, 60, (2, 16))), ("a list of token-id lists", [
            list(range(2, 18)), list(range(20, 36))]),
        ("a text that is no path (a raw string)", " ".join(T16)), ("texts of unknown words only",
                                                                   ["zz yy xx " * 8] * 2),
        ("two texts of 3 tokens (under one seqlen in all)", [words(0, 3), words(1, 3)]),
        ("a file object of text.txt", "FILEOBJ"), ("bytes of a text", T16[0].encode() * 4),
    ]:
        api(f"data13 data={name}", gq(data=_lazy({"data": data})["data"]))
    for name, kw in [
        ("two texts with seqlen 1", dict(data=T16[:2], seqlen=1)),
        ("two texts with nsamples 0", dict(data=T16[:2], nsamples=0)),
        ("two texts with calib_set too", dict(data=T16[:2], calib_set="SET")),
        ("two texts with chat_template", dict(data=T16[:2], chat_template="TEMPLATE")),
        ("chat records with part 'heldout'", dict(data=[{"messages": [{"role": "user", "content": t}]} for t in T16[:2]],
                                                 part="heldout")),
        ("chat records, the tokenizer without a chat template, no chat_template",
         dict(data=[{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t}]}
                    for t in T16[:2]])),
        ("two texts with a 96-symbol tokenizer for 64 rows", dict(data=T16[:2], tokenizer_or_processor="PRINTABLE")),
        ("two texts with the VLM's processor for the llama", dict(data=T16[:2], tokenizer_or_processor="VLMPROC")),
        ("two texts with tokenizer_or_processor=5", dict(data=T16[:2], tokenizer_or_processor=5)),
    ]:
        api(f"data13 {name}", gq(**_lazy(kw)), setup=_make_set if "calib_set" in kw else _template)
    api("data13 two texts with tokenizer_or_processor the model's folder equals none given",
        gq(data=T16[:2], tokenizer_or_processor=lambda w: str(w / "model")), check=_maybe(equals_api(two)))
    api("data13 two texts with low_memory equal the in-memory call", gq(data=T16[:2], low_memory=True),
        check=_maybe(equals_api(two)))
    api("data13 a loaded model and two texts equal the folder's call", gq(**_lazy(dict(model="LOADED", data=T16[:2]))),
        check=_maybe(equals_api(two)))
    api("data13 chat records with a chat_template file are a quantized copy",
        gq(data=[{"messages": [{"role": "user", "content": words(i, 4)}, {"role": "assistant", "content": words(i, 6)}]}
                 for i in range(3)], chat_template=lambda w: w / "t.jinja", seqlen=16),
        setup=_template, check=valid(returned_ok))


def _template(w: Path) -> None:
    from fault_battery import CHAT_TEMPLATE

    (w / "t.jinja").write_text(CHAT_TEMPLATE)


class _Sub(str):
    """A str subclass (as a library's wrapped string type is)."""


def _lazy(kw: dict) -> dict:
    """Placeholders of in-memory data made per case (some need the case folder): each value a function of w."""
    def of(key, value):
        if not isinstance(value, str) or not value.isupper() or " " in value:
            return value
        import collections

        import numpy as np

        makers = {
            "NPSTR": lambda w: [np.str_(t) for t in T16[:2]], "SUBSTR": lambda w: [_Sub(t) for t in T16[:2]],
            "DS": lambda w: dataset(text=T16[:2]), "DS_ID": lambda w: dataset(text=T16[:2], id=[0, 1]),
            "DS_LABEL": lambda w: dataset(label=[1, 0], text=T16[:2]), "DEQUE": lambda w: collections.deque(T16[:2]),
            "GEN2": lambda w: (t for t in T16[:2]), "SERIES": lambda w: __import__("pandas").Series(T16[:2]),
            "FRAME": lambda w: __import__("pandas").DataFrame({"text": T16[:2]}),
            "ITERDS": lambda w: dataset(text=T16[:2]).to_iterable_dataset(), "DS5": lambda w: dataset(text=T16[:5]),
            "TEXTFILE": lambda w: [(w / "text.txt").read_text()], "PATH": lambda w: str(w / "text.txt"),
            "PATHOBJ": lambda w: w / "text.txt", "TEXT_AND_PATH": lambda w: [T16[0], w / "text.txt"],
            "IMAGE_RECORDS": lambda w: [{"image": str(w / "vl" / "img" / "0.png"), "text": t} for t in T16[:2]],
            "GEN_INTS": lambda w: (i for i in range(3)), "DS_INTS": lambda w: dataset(text=[1, 2]),
            "DS_NONE": lambda w: dataset(text=[T16[0], None, T16[1]]), "DS_EMPTY": lambda w: dataset(text=[]),
            "DS_CAPITAL": lambda w: dataset(Text=T16[:2]), "DS_CONTENT": lambda w: dataset(content=T16[:2]),
            "DS_BOTH": lambda w: dataset(text=T16[:2], messages=[[{"role": "user", "content": t}] for t in T16[:2]]),
            "DSDICT": lambda w: __import__("datasets").DatasetDict(train=dataset(text=T16[:2])),
            "DS_MSG_STR": lambda w: dataset(messages=T16[:2]), "FRAME_X": lambda w: __import__("pandas").DataFrame(
                {"body": T16[:2]}),
            "FILEOBJ": lambda w: open(w / "text.txt"), "SET": lambda w: str(w / "set"),  # noqa: SIM115
            "TEMPLATE": lambda w: w / "t.jinja", "PRINTABLE": lambda w: __import__("fault_battery").printable_tokenizer(),
            "VLMPROC": lambda w: __import__("fault_battery")._vlm_processor(w),
            "LOADED": lambda w: __import__("transformers").AutoModelForCausalLM.from_pretrained(w / "model").eval(),
        }
        return makers[value] if value in makers else value
    return {k: of(k, v) for k, v in kw.items()}


# ---------------------------------------------------------------- calibration recipes' own nsamples and seqlen

PLAIN = "sources:\n  - path: text.txt\n"
GQ_NC = ["--method", "gptq", "--group-size", "32"]  # no --nsamples/--seqlen: the recipe's apply


def _recipe_cli(body: str, *extra):
    return lambda w: run_cli("calibrate", w / "model", "--calib", w / "r.yaml", *GQ_NC, *extra, "-o", w / "out")


def _gptq_ref(nsamples: str, seqlen: str, data: str = "plain.yaml"):
    return same_as(lambda w: ["calibrate", w / "model", "--calib", w / data, "--method", "gptq", "--group-size", "32",
                              "--nsamples", nsamples, "--seqlen", seqlen, "-o", w / "ref"])


def _report_counts(nsamples: int, seqlen: int):
    def check(w: Path, result) -> str | None:
        report = json.loads((w / "out" / "quantkit_report.json").read_text())
        got = (report.get("nsamples"), report.get("seqlen"))
        return None if got == (nsamples, seqlen) else f"the report says nsamples, seqlen = {got}, not the recipe's"
    return valid(check)


def _json_counts(nsamples: int, seqlen: int):
    def check(w: Path, result) -> str | None:
        doc = json.loads(result.stdout)
        got = (doc.get("nsamples"), doc.get("seqlen"))
        return None if got == (nsamples, seqlen) else f"--json says nsamples, seqlen = {got}, not the recipe's"
    return valid(check)


def _plan_same(*ref_extra):
    """A check: the plan's JSON equals that of plan with the plain recipe and explicit counts (paths dropped)."""
    def check(w: Path, result) -> str | None:
        ref = run_cli("plan", w / "model", "--calib", w / "plain.yaml", *GQ_NC, *ref_extra, "--json")
        if ref.exit_code != 0:
            return f"the reference plan failed: {ref.output[-200:]}"

        def strip(doc):
            return {k: v for k, v in doc.items() if k not in ("calib", "data", "model", "output", "host_limit_bytes",
                                                              "device_limit_bytes")}
        return None if strip(json.loads(ref.stdout)) == strip(json.loads(result.stdout)) else \
            "the plan differs from the plan with explicit --nsamples/--seqlen"
    return valid(check)


def _set_equal(*ref_extra):
    def check(w: Path, result) -> str | None:
        ref = run_cli("importance", w / "model", "--calib", w / "plain.yaml", *ref_extra, "-o", w / "ref")
        if ref.exit_code != 0:
            return f"the reference importance failed: {ref.output[-200:]}"
        for name in ("samples.safetensors", "weights.safetensors"):
            if _bytes_of(w / "set" / name) != _bytes_of(w / "ref" / name) or not _bytes_of(w / "set" / name):
                return f"set/{name} differs from importance with the explicit counts"
        return None
    return valid(check)


def _api_recipe(**kw):
    def call(w: Path):
        import quantkit

        return quantkit.quantize(str(w / "model"), data=str(w / "r.yaml"), method="gptq", group_size=32,
                                 progress=False, output_dir=str(w / "out"), **kw)
    return call


def _api_recipe_ref(nsamples: int, seqlen: int):
    def check(w: Path, result) -> str | None:
        import quantkit

        quantkit.quantize(str(w / "model"), data=str(w / "plain.yaml"), method="gptq", group_size=32, progress=False,
                          output_dir=str(w / "ref"), nsamples=nsamples, seqlen=seqlen)
        a, b = _bytes_of(w / "out" / "model.safetensors"), _bytes_of(w / "ref" / "model.safetensors")
        return None if a and a == b else "out/ differs from the call with explicit nsamples/seqlen"
    return valid(check)


def _recipe_cases(out: Cases) -> None:
    add = out.add

    def rec(body: str):
        return both(write("r.yaml", body), write("plain.yaml", PLAIN),
                    lambda w: shutil.copy(w / "text.txt", w / "t2.txt"))
    r2x16 = "nsamples: 2\nseqlen: 16\n" + PLAIN
    for name, body, extra, check in [
        ("nsamples 2 seqlen 16, no options: equals --nsamples 2 --seqlen 16", r2x16, (), _gptq_ref("2", "16")),
        ("nsamples 3 seqlen 8, no options: equals --nsamples 3 --seqlen 8", "nsamples: 3\nseqlen: 8\n" + PLAIN, (),
         _gptq_ref("3", "8")),
        ("seqlen 16 only, --nsamples 2 given: equals both given", "seqlen: 16\n" + PLAIN, ("--nsamples", "2"),
         _gptq_ref("2", "16")),
        ("nsamples 2 only, --seqlen 16 given: equals both given", "nsamples: 2\n" + PLAIN, ("--seqlen", "16"),
         _gptq_ref("2", "16")),
        ("nsamples 5 seqlen 8, --nsamples 2 --seqlen 16 given: the options win", "nsamples: 5\nseqlen: 8\n" + PLAIN,
         ("--nsamples", "2", "--seqlen", "16"), _gptq_ref("2", "16")),
        ("seqlen 100 (beyond the 64 positions), --seqlen 16 given: the option wins",
         "nsamples: 2\nseqlen: 100\n" + PLAIN, ("--seqlen", "16"), _gptq_ref("2", "16")),
        ("nsamples 2 seqlen 16: the report records 2 and 16", r2x16, (), _report_counts(2, 16)),
        ("nsamples 2 seqlen 16 --json says 2 and 16", r2x16, ("--json",), _json_counts(2, 16)),
        ("two sources, nsamples 3 seqlen 8: equals the options given",
         "nsamples: 3\nseqlen: 8\nsources:\n  - path: text.txt\n  - path: t2.txt\n", (),
         same_as(lambda w: ["calibrate", w / "model", "--calib", w / "two.yaml", *GQ_NC, "--nsamples", "3", "--seqlen",
                            "8", "-o", w / "ref"])),
        ("nsamples 2 seqlen 16 --dry-run writes nothing", r2x16, ("--dry-run",),
         valid(lambda w, r: "a dry run wrote out/" if (w / "out").exists() else None)),
        ("nsamples 0", "nsamples: 0\nseqlen: 16\n" + PLAIN, (), None),
        ("nsamples -2", "nsamples: -2\nseqlen: 16\n" + PLAIN, (), None),
        ("seqlen 1 (no next token)", "nsamples: 2\nseqlen: 1\n" + PLAIN, (), None),
        ("seqlen 100 (beyond the 64 positions), no options", "nsamples: 2\nseqlen: 100\n" + PLAIN, (), None),
        ("nsamples 1000 (too little text for 1000 x 16)", "nsamples: 1000\nseqlen: 16\n" + PLAIN, (), None),
        ("seqlen 10**30", "nsamples: 2\nseqlen: 1000000000000000000000000000000\n" + PLAIN, (), None),
        ("no nsamples/seqlen and no options (the defaults 128 x 512 beyond 64 positions)", PLAIN, (), None),
    ]:
        setup = rec(body)
        if name.startswith("two sources"):
            setup = both(setup, write("two.yaml", "sources:\n  - path: text.txt\n  - path: t2.txt\n"))
        add("recipe13", name, _recipe_cli(body, *extra), setup, check)
    add("recipe13", "importance with the recipe's nsamples 2 seqlen 16 equals the options given",
        lambda w: run_cli("importance", w / "model", "--calib", w / "r.yaml", "-o", w / "set"), rec(r2x16),
        _set_equal("--nsamples", "2", "--seqlen", "16"))
    add("recipe13", "importance with the recipe's seqlen 100 (beyond positions), no options",
        lambda w: run_cli("importance", w / "model", "--calib", w / "r.yaml", "-o", w / "set"),
        rec("nsamples: 2\nseqlen: 100\n" + PLAIN))
    add("recipe13", "plan --json with the recipe's counts equals plan with the options given",
        lambda w: run_cli("plan", w / "model", "--calib", w / "r.yaml", *GQ_NC, "--json"), rec(r2x16),
        _plan_same("--nsamples", "2", "--seqlen", "16"))
    add("recipe13", "plan with the recipe's seqlen 100 (beyond positions), no options",
        lambda w: run_cli("plan", w / "model", "--calib", w / "r.yaml", *GQ_NC), rec("nsamples: 2\nseqlen: 100\n" + PLAIN))
    add("recipe13", "API quantize(data=recipe) without nsamples/seqlen equals them given", _api_recipe(), rec(r2x16),
        _api_recipe_ref(2, 16), api=True)
    add("recipe13", "API quantize(data=recipe, nsamples=3): 3 wins, the recipe's seqlen", _api_recipe(nsamples=3),
        rec(r2x16), _api_recipe_ref(3, 16), api=True)
    add("recipe13", "API quantize(data=recipe of seqlen 100) without seqlen", _api_recipe(),
        rec("nsamples: 2\nseqlen: 100\n" + PLAIN), None, api=True)


# ---------------------------------------------------------------- eval: sources, parts, edited exports


def _ev(target: str, data: str, *extra):
    return lambda w: run_cli("eval", w / target if target else "", "--data", data.format(w=w), *EV, *extra)


def _by_source(n: int, alone: bool = False):
    """A check of eval --json over several sources: n by_source entries whose tokens sum to the total and whose
    token-weighted mean loss is the total's; alone: each entry's loss equals an eval of that source by itself."""
    def check(w: Path, result) -> str | None:
        doc = json.loads(result.stdout)
        parts = doc.get("by_source") or {}
        if len(parts) != n:
            return f"{len(parts)} by_source entries for {n} sources: {sorted(parts)}"
        tokens = sum(p["tokens"] for p in parts.values())
        if tokens != doc["tokens"]:
            return f"by_source tokens sum to {tokens}, the total says {doc['tokens']}"
        mean = sum(p["loss"] * p["tokens"] for p in parts.values()) / tokens
        if abs(mean - doc["loss"]) > 1e-6:
            return f"the token-weighted mean of by_source losses {mean} is not the total's {doc['loss']}"
        if alone:
            for name, part in parts.items():
                one = run_cli("eval", w / "model", "--data", w / name, *EV, "--json")
                if one.exit_code != 0:
                    return f"eval of {name} alone failed"
                if abs(json.loads(one.stdout)["loss"] - part["loss"]) > 1e-6:
                    return f"{name}'s by_source loss differs from its eval alone"
        return None
    return valid(check)


def _close_to(target: str, *extra, tol: float = 1e-6):
    def check(w: Path, result) -> str | None:
        bad = eval_ok(w, result)
        if bad:
            return bad
        ref = run_cli("eval", w / target, "--data", w / "text.txt", *EV, *extra)
        if ref.exit_code != 0:
            return f"the reference eval failed: {ref.output[-200:]}"
        a, b = loss_of(result.output), loss_of(ref.output)
        return None if abs(a - b) <= tol else f"loss {a} vs the reference's {b}"
    return check


def _copy(src: str, dst: str):
    return lambda w: shutil.copytree(w / src, w / dst) and None


def _eval_cases(out: Cases) -> None:
    add = out.add
    t2 = lambda w: (w / "t2.txt").write_text(" ".join(words(i, 40) for i in range(60)))  # noqa: E731
    for name, data, setup, n, alone in [
        ("two files: by_source sums to the total", "{w}/text.txt,{w}/t2.txt", t2, 2, False),
        ("two files: each source's loss equals its eval alone", "{w}/text.txt,{w}/t2.txt", t2, 2, True),
        ("a glob of two files: two by_source entries", "{w}/d/*.txt", both(t2, lambda w: (
            (w / "d").mkdir(), shutil.copy(w / "text.txt", w / "d" / "a.txt"), shutil.copy(w / "t2.txt", w / "d" / "b.txt"))),
         2, False),
        ("a folder of two files: two by_source entries", "{w}/d", both(t2, lambda w: (
            (w / "d").mkdir(), shutil.copy(w / "text.txt", w / "d" / "a.txt"), shutil.copy(w / "t2.txt", w / "d" / "b.txt"))),
         2, False),
        ("d1/text.txt,d2/text.txt (two files of one name): two by_source entries", "{w}/d1/text.txt,{w}/d2/text.txt",
         both(t2, lambda w: ((w / "d1").mkdir(), (w / "d2").mkdir(), shutil.copy(w / "text.txt", w / "d1" / "text.txt"),
                             shutil.copy(w / "t2.txt", w / "d2" / "text.txt"))), 2, False),
        ("d1/x.txt and d2/x.txt through a glob (one name twice)", "{w}/d*/x.txt",
         both(t2, lambda w: ((w / "d1").mkdir(), (w / "d2").mkdir(), shutil.copy(w / "text.txt", w / "d1" / "x.txt"),
                             shutil.copy(w / "t2.txt", w / "d2" / "x.txt"))), 2, False),
        ("three files, one of them JSONL records: three by_source entries", "{w}/text.txt,{w}/t2.txt,{w}/r.jsonl",
         both(t2, write("r.jsonl", "".join(json.dumps({"text": words(i, 200)}) + "\n" for i in range(5)))), 3, False),
    ]:
        add("eval13", f"--data {name}", lambda w, d=data: run_cli("eval", w / "model", "--data", d.format(w=w), *EV,
                                                                     "--json"), setup, _by_source(n, alone))
    add("eval13", "--data text.txt,./text.txt (one file spelled twice)", lambda w: run_cli(
        "eval", w / "model", "--data", f"{w / 'text.txt'},{w}/./text.txt", *EV, "--json"), None,
        _maybe(lambda w, r: None if json.loads(r.stdout)["tokens"] in (90, 180) else "odd token count"))
    add("eval13", "--part heldout given equals the default part", _ev("model", "{w}/text.txt", "--part", "heldout"),
        None, valid(_close_to("model")))
    add("eval13", "--part train --json records part 'train' and at most --max-tokens tokens",
        _ev("model", "{w}/text.txt", "--part", "train", "--json"), None,
        valid(lambda w, r: None if json.loads(r.stdout)["part"] == "train" and json.loads(r.stdout)["tokens"] <= 96
              else f"part/tokens wrong: {r.stdout[:200]}"))
    add("eval13", "--part all and --part train differ from heldout's tokens (not the same text)",
        _ev("model", "{w}/text.txt", "--part", "all", "--json"), None,
        valid(lambda w, r: None if json.loads(r.stdout)["part"] == "all" else "part not recorded as all"))
    add("eval13", "--part heldout of a 20-word file (its held-out part under one window)",
        _ev("model", "{w}/short.txt"), write("short.txt", words(0, 20)), None)
    add("eval13", "--data text.txt,a file of 20 words (one source too short for a held-out window)",
        _ev("model", "{w}/text.txt,{w}/short.txt", "--json"), write("short.txt", words(0, 20)),
        _maybe(lambda w, r: None if len(json.loads(r.stdout).get("by_source", {})) in (1, 2) else "odd by_source"))
    ct_same = _close_to("ct")
    for name, edit, kind in [
        ("README.md deleted", lambda w: (w / "x" / "README.md").unlink(), "valid"),
        ("quantkit_report.json deleted", lambda w: (w / "x" / "quantkit_report.json").unlink(), "valid"),
        ("quantkit_report.json not JSON", write("x/quantkit_report.json", "{oops"), "maybe"),
        ("generation_config.json deleted", lambda w: (w / "x" / "generation_config.json").unlink(), "valid"),
        ("a stray model.safetensors.bak beside", lambda w: shutil.copy(w / "x" / "model.safetensors",
                                                                       w / "x" / "model.safetensors.bak"), "valid"),
        ("model.safetensors renamed to one shard with an index", "_reshard", "valid"),
        ("config.json max_position_embeddings 8 (seqlen 16)", json_edit("x/config.json", lambda d: d.update(
            max_position_embeddings=8)), ""),
        ("config.json vocab_size 128 (64 rows stored)", json_edit("x/config.json", lambda d: d.update(vocab_size=128)),
         ""),
        ("config.json num_hidden_layers 3 (2 stored)", json_edit("x/config.json", lambda d: d.update(
            num_hidden_layers=3)), ""),
        ("config.json num_hidden_layers 1 (2 stored)", json_edit("x/config.json", lambda d: d.update(
            num_hidden_layers=1)), ""),
        ("config.json quantization_config.ignore emptied (lm_head stored dense)", json_edit(
            "x/config.json", lambda d: d["quantization_config"].update(ignore=[])), "maybe-same"),
        ("config.json quantization_config.config_groups.group_0.weights.group_size 64 (scales of 32)", json_edit(
            "x/config.json", lambda d: d["quantization_config"]["config_groups"]["group_0"]["weights"].update(
                group_size=64)), ""),
        ("model.safetensors replaced by the fake export's", lambda w: shutil.copy(w / "fake" / "model.safetensors",
                                                                                  w / "x" / "model.safetensors"), ""),
        ("model.safetensors replaced by the plain model's", lambda w: shutil.copy(w / "model" / "model.safetensors",
                                                                                  w / "x" / "model.safetensors"), ""),
        ("a weight_scale of layer 0's q_proj negated", st_edit("x/model.safetensors", lambda s: s.update({
            k: -v for k, v in s.items() if k.endswith("layers.0.self_attn.q_proj.weight_scale")})), "maybe"),
        ("a weight_packed of layer 1 truncated to half its rows", st_edit("x/model.safetensors", lambda s: s.update({
            k: v[: v.shape[0] // 2] for k, v in s.items() if k.endswith("layers.1.mlp.up_proj.weight_packed")})), ""),
        ("tokenizer_config.json model_max_length 8", json_edit("x/tokenizer_config.json", lambda d: d.update(
            model_max_length=8)), "maybe"),
        ("tokenizer.json deleted (tokenizer_config.json kept)", lambda w: (w / "x" / "tokenizer.json").unlink(), ""),
        ("config.json hidden_act 'relu' (another model than was quantized)", json_edit(
            "x/config.json", lambda d: d.update(hidden_act="relu")), "maybe"),
    ]:
        setup = _copy("ct", "x")
        if edit == "_reshard":
            edit = _reshard
        add("eval13", f"eval of ct with {name}", _ev("x", "{w}/text.txt"), both(setup, edit),
            _maybe(ct_same) if kind == "maybe-same" else tri(kind, ct_same if kind == "valid" else eval_ok))
    for name, rel in [("a folder named with a space and unicode", "ct ünï cödé"), ("a folder named '-x'", "-x"),
                      ("a folder named with a newline", "c\nt")]:
        add("eval13", f"eval of ct copied to {name} equals ct", lambda w, r=rel: run_cli(
            "eval", w / r, "--data", w / "text.txt", *EV), _copy("ct", rel), valid(ct_same))
    add("eval13", "eval -o e.json, e.json an immutable existing file", _ev("model", "{w}/text.txt", "-o", "e.json"),
        both(write("e.json", "{}"), freeze("e.json", make=False)))
    add("eval13", "eval -o a path with a space and unicode writes the JSON", _ev("model", "{w}/text.txt", "-o",
                                                                                "r é s.json", "--json"), None,
        valid(lambda w, r: None if json.loads((w / "r é s.json").read_text()) == json.loads(r.stdout) else "differs"))
    add("eval13", "eval of the gptq export with quantize_config.json deleted", _ev("x", "{w}/text.txt"),
        both(_copy("gptq", "x"), lambda w: (w / "x" / "quantize_config.json").unlink(missing_ok=True)),
        _maybe(_close_to("gptq")))
    add("eval13", "eval of the asym export with its zero points deleted", _ev("x", "{w}/text.txt"),
        both(_copy("asym", "x"), st_edit("x/model.safetensors", lambda s: [s.pop(k) for k in list(s)
                                                                           if k.endswith("weight_zero_point")])))


def _reshard(w: Path) -> None:
    x = w / "x"
    (x / "model.safetensors").rename(x / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(x / "model-00001-of-00001.safetensors", "pt") as f:
        keys = list(f.keys())
    (x / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))


def thirteenth_round() -> list:
    """Round 13's cases."""
    out = Cases()
    _api_data_cases(out)
    _recipe_cases(out)
    _eval_cases(out)
    _number_cases(out)
    _plan_cases(out)
    _moe_cases(out)
    _vlm_cases(out)
    _resume_cases(out)
    _lowmem_cases(out)
    _path_cases(out)
    _qid_cases(out)
    _calibset_cases(out)
    return out


# ---------------------------------------------------------------- numbers at the edges, every command

FULL = str.maketrans("0123456789.", "０１２３４５６７８９．")
ARABIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def spellings(normal: str, kind: str, zero_ok: bool, inf_ok: bool = False, huge: bool = True,
              huge_ok: bool = False) -> list[tuple[str, str]]:
    """(value, expectation) pairs: "same" (another spelling of `normal`: a refusal, or the normal run's result),
    "" (must be refused), "maybe" (a refusal or a sound result)."""
    out = [("+" + normal, "same")]
    if kind == "int":
        out.append((normal.translate(FULL), "same"))
        if len(normal) > 1:
            out.append((normal[0] + "_" + normal[1:], "same"))
        out.append(("-0", "maybe" if zero_ok else ""))
        if huge:
            out.append(("9" * 25, "maybe" if huge_ok else ""))
    else:
        out += [("1e309", "maybe" if inf_ok else ""), ("-1e309", ""), ("1e-400", "maybe"),
                ("-0.0", "maybe" if zero_ok else "")]
    return out


def _same_json(ref_args):
    def check(w: Path, result) -> str | None:
        ref = run_cli(*ref_args(w))
        if ref.exit_code != 0:
            return f"the reference run failed: {ref.output[-200:]}"
        def steady(doc):  # plan's host limit is the memory free now: it moves between two runs
            return {k: v for k, v in doc.items() if k not in ("host_limit_bytes", "device_limit_bytes")}
        same = steady(json.loads(ref.stdout)) == steady(json.loads(result.stdout))
        return None if same else "the JSON differs from the reference's"
    return check


def _json_ok(w: Path, result) -> str | None:
    import math

    def finite(x):
        if isinstance(x, float):
            return math.isfinite(x)
        if isinstance(x, dict):
            return all(finite(v) for v in x.values())
        if isinstance(x, list):
            return all(finite(v) for v in x)
        return True
    return None if finite(json.loads(result.stdout)) else "non-finite numbers in the JSON"


def _set_like(ref_args):
    def check(w: Path, result) -> str | None:
        ref = run_cli(*ref_args(w))
        if ref.exit_code != 0:
            return f"the reference importance failed: {ref.output[-200:]}"
        for name in ("samples.safetensors", "weights.safetensors"):
            if not _bytes_of(w / "set" / name) or _bytes_of(w / "set" / name) != _bytes_of(w / "ref" / name):
                return f"set/{name} differs from the reference's"
        return None
    return check


def _set_ok(w: Path, result) -> str | None:
    from safetensors.torch import load_file

    weights = load_file(w / "set" / "weights.safetensors")["weights"]
    return None if torch.isfinite(weights).all() and (weights >= 0).all() else "non-finite or negative weights"


TLQ = ["--method", "tlq", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]
IMP = ["--nsamples", "2", "--seqlen", "16"]
PLAN = ["--method", "gptq", "--nsamples", "2", "--seqlen", "16", "--group-size", "32", "--json"]
P = ["--params", "1e9", "--bits", "3", "--tokens", "1e12"]
FIT = ["--bootstrap", "0", "--json"]


def _number_cases(out: Cases) -> None:
    add = out.add
    # (command, flag, normal, int/float, zero_ok, inf_ok, base args)
    table = [
        ("calibrate", "--bits", "4", "int", False, False, RTN),
        ("calibrate", "--group-size", "32", "int", False, False, RTN),
        ("calibrate", "--nsamples", "2", "int", False, False, RTN),
        ("calibrate", "--seqlen", "16", "int", False, False, RTN),
        ("calibrate", "--seed", "7", "int", True, False, GPTQ),
        ("calibrate", "--cd-sweeps", "1", "int", True, False, GPTQ),
        ("calibrate", "--row-groups", "2", "int", False, False, [*TLQ, "--guidance", "linear"]),
        ("calibrate", "--fisher-draws", "2", "int", False, False, [*TLQ, "--importance-loss", "fisher"]),
        ("calibrate", "--damp", "0.05", "float", True, False, GPTQ),
        ("calibrate", "--lam", "0.5", "float", True, False, TLQ),
        ("calibrate", "--power", "2.0", "float", True, False, TLQ),
        ("calibrate", "--dist-timeout", "60", "float", False, True, RTN),
        ("importance", "--nsamples", "2", "int", False, False, IMP),
        ("importance", "--seqlen", "16", "int", False, False, IMP),
        ("importance", "--seed", "3", "int", True, False, IMP),
        ("importance", "--row-groups", "2", "int", False, False, [*IMP, "--guidance", "linear"]),
        ("importance", "--lam", "0.5", "float", True, False, IMP),
        ("importance", "--power", "2.0", "float", True, False, IMP),
        ("importance", "--top-fraction", "0.5", "float", False, False, IMP),
        ("importance", "--floor-fraction", "0.3", "float", True, False, [*IMP, "--top-fraction", "0.5"]),
        ("plan", "--bits", "4", "int", False, False, PLAN),
        ("plan", "--group-size", "32", "int", False, False, PLAN),
        ("plan", "--nsamples", "2", "int", False, False, PLAN),
        ("plan", "--seqlen", "16", "int", False, False, PLAN),
        ("eval", "--seqlen", "16", "int", False, False, EV),
        ("eval", "--stride", "8", "int", False, False, EV),
        ("eval", "--max-tokens", "96", "int", False, False, EV),
        ("eval", "--batch-size", "4", "int", False, False, EV),
        ("qid predict", "--params", "1e9", "float", False, False, P),
        ("qid predict", "--bits", "3", "float", False, False, P),
        ("qid predict", "--tokens", "1e12", "float", False, False, P),
        ("qid fit", "--level", "0.9", "float", False, False, FIT),
        ("qid fit", "--huber-delta", "1.0", "float", False, False, [*FIT, "--estimator", "huber"]),
        ("qid fit", "--seed", "5", "int", True, False, FIT),
    ]
    for command, flag, normal, kind, zero_ok, inf_ok, base in table:
        def args(w: Path, value: str, command=command, flag=flag, base=base, rel="out") -> list:
            if command == "calibrate":
                return ["calibrate", w / "model", "--calib", w / "text.txt", *base, flag, value, "-o", w / rel]
            if command == "importance":
                return ["importance", w / "model", "--calib", w / "text.txt", *base, flag, value, "-o",
                        w / ("set" if rel == "out" else rel)]
            if command == "plan":
                return ["plan", w / "model", "--calib", w / "text.txt", *base, flag, value]
            if command == "eval":
                return ["eval", w / "model", "--data", w / "text.txt", *base, flag, value, "--json"]
            if command == "qid predict":
                return ["qid", "predict", *base, flag, value, "--json"]
            return ["qid", "fit", w / "q.csv", *base, flag, value]
        def ref(w: Path, a=args, n=normal) -> list:
            return a(w, n, rel="ref")
        for value, expect in spellings(normal, kind, zero_ok, inf_ok, huge=not (command == "calibrate" and flag in (
                "--group-size", "--nsamples", "--seed")), huge_ok=(command, flag) in (
                ("eval", "--max-tokens"), ("eval", "--batch-size"))):  # a budget or batch above all there is
            if expect == "same":
                if command == "calibrate":
                    check = same_as(ref, must_take=False)
                elif command == "importance":
                    check = _set_like(ref)
                elif command == "eval":
                    check = _same_json(ref)
                else:
                    check = _same_json(ref)
            elif expect == "maybe":
                check = {"calibrate": export_ok(), "importance": _set_ok}.get(command, _json_ok)
            else:
                check = None
            check = _maybe(check) if check is not None else None
            add("numbers13", f"{command} {flag} {value!r}", lambda w, a=args, v=value: _bounded(w, a(w, v)), None, check)
    for flag, base in [("--fisher-draws", [*IMP, "--importance-loss", "fisher"]), ("--output-side", IMP)]:
        add("numbers13", f"importance {flag} {'9' * 25!r}", lambda w, f=flag, b=base: _bounded(w, [
            "importance", w / "model", "--calib", w / "text.txt", *b, f, "9" * 25, "-o", w / "set"]))
    add("numbers13", f"qid fit --bootstrap {'9' * 25!r}", lambda w: _capped(w, [
        "qid", "fit", w / "q.csv", "--json", "--bootstrap", "9" * 25]))
    # qid measure and demo: the values that must be refused (a measurement or a demo is minutes of work)
    measure = ["--eval-tokens", "64", "--eval-seqlen", "16", "--nsamples", "2", "--calib-seqlen", "16", "--group-size",
               "32", "--methods", "rtn", "--bits", "4", "--no-progress"]
    for flag in ("--eval-tokens", "--eval-seqlen", "--nsamples", "--calib-seqlen", "--threads"):
        for value in ("-0", "9" * 25, "１e3"):
            add("numbers13", f"qid measure {flag} {value!r}", lambda w, f=flag, v=value: _bounded(w, [
                "qid", "measure", w / "model", "--eval", w / "text.txt", *measure, f, v, "-o", w / "m.csv"]))
    add("numbers13", "demo --train-seconds '1e309' (no --model: trains that long)", lambda w: _capped(w, [
        "demo", "--data", w / "text.txt", "--seqlen", "16", "--nsamples", "2", "-o", w / "out", "--train-seconds",
        "1e309"]))
    for flag, value in [("--train-seconds", "1e-400"), ("--train-seconds", "-0.0"), ("--seqlen", "-0"), ("--nsamples", "-0"), ("--threads", "-0"),
                        ("--seqlen", "9" * 25), ("--nsamples", "9" * 25), ("--threads", "9" * 25)]:
        add("numbers13", f"demo {flag} {value!r}", lambda w, f=flag, v=value: _bounded(w, [
            "demo", "--data", w / "text.txt", "--seqlen", "16", "--nsamples", "2", "-o", w / "out", f, v]))


def _capped(w: Path, args: list, seconds: int = 90):
    """`quantkit ARGS` in a child stopped after `seconds` (exit 124): for an input a right run refuses at once and a
    wrong one works on for good (an endless training or resampling), so the battery does not wait HANG_SECONDS."""
    import subprocess

    from fault_battery import QUANTKIT_BIN, Ran

    try:
        done = subprocess.run([QUANTKIT_BIN, *[str(a) for a in args]], cwd=w, text=True, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=seconds)
    except subprocess.TimeoutExpired:
        return Ran(124, "", f"the child was still running after {seconds} s (killed): the input was taken\n")
    return Ran(done.returncode, done.stdout, done.stderr)


def _bounded(w: Path, args: list):
    """run_cli, except that a huge number (25 digits) runs in a child limited to 3.5 GB of address space: a run that
    takes it as a size allocates until the machine runs out (importance --row-groups 10**25 did, past 5 GB)."""
    import resource

    from fault_battery import last_wins, limited

    if not any(str(a) == "9" * 25 for a in args):
        return run_cli(*args)
    return limited(w, *last_wins(args), limits={resource.RLIMIT_AS: 3_500_000_000})


# ---------------------------------------------------------------- plan against calibrate's own refusals

def _plan_cases(out: Cases) -> None:
    add = out.add
    for name, extra in [
        ("--seqlen 100 beyond the model's 64 positions (calibrate refuses)", ["--nsamples", "2", "--seqlen", "100"]),
        ("no --seqlen: the default 512 beyond the model's 64 positions (calibrate refuses)", ["--nsamples", "2"]),
        ("--seed 10**25 (calibrate refuses)", ["--nsamples", "2", "--seqlen", "16", "--seed", "9" * 25]),
    ]:
        add("plan13", f"plan {name}", lambda w, e=extra: run_cli("plan", w / "model", "--calib", w / "text.txt",
                                                                  "--method", "gptq", "--group-size", "32", *e))


# ---------------------------------------------------------------- MoE families: routers, experts, options

def _need(name: str, family: str, **overrides):
    """A setup: the tiny `family` model (tests' save_tiny_causal_lm, `overrides` on its config) built once into the
    shared base as `name` and copied into the case."""
    def setup(w: Path) -> None:
        from helpers import save_tiny_causal_lm

        base = w.parent / "base"
        if not (base / name).is_dir():
            tmp = base / f"_{name}"
            save_tiny_causal_lm(tmp, family, **overrides)
            (tmp / family).rename(base / name)
            tmp.rmdir()
        if not (w / name).is_dir():
            shutil.copytree(base / name, w / name)
    return setup


MOE = {"mx13": ("mixtral", {}), "q3m13": ("qwen3_moe", {}), "ds13": ("deepseek_v3", {"first_k_dense_replace": 1}),
       "oss13": ("gpt_oss", {})}
FAMILY_OF = {name: family for name, (family, _) in MOE.items()}


def _moe(name: str):
    family, overrides = MOE[name]
    return _need(name, family, **overrides)


def _mcfg(name: str, **fields):
    return both(_moe(name), json_edit(f"{name}/config.json", lambda d: d.update(fields)))


def _mstate(name: str, keys: str, value_fn):
    """A setup editing every tensor of the MoE model whose name holds `keys` (all of them if keys is '')."""
    def edit(state: dict) -> None:
        for k in list(state):
            if keys in k and state[k].is_floating_point():
                state[k] = value_fn(state[k].clone())
    return both(_moe(name), st_edit(f"{name}/model.safetensors", edit))


def _g(name: str, args: list) -> list:
    """args with group size 16 for the deepseek_v3 model (its kv_b_proj takes 16 inputs: 32 does not divide it)."""
    args = list(args)
    if name == "ds13":
        args = [("16" if a == "32" and i and args[i - 1] == "--group-size" else a) for i, a in enumerate(args)]
    return args


def _mcal(name: str, *extra, method=RTN, rel: str = "out") -> list:
    return lambda w: run_cli("calibrate", w / name, "--calib", w / "text.txt", *_g(name, [*method, *extra]), "-o",
                             w / rel)


def _experts_all_quantized(name: str):
    """A check: the export loads finite and quantizes as many modules as an --expert-tokens all run (no expert left
    in full precision for want of tokens)."""
    def check(w: Path, result) -> str | None:
        bad = export_ok()(w, result)
        if bad:
            return bad
        ref = run_cli("calibrate", w / name, "--calib", w / "text.txt", *_g(name, [
            "--method", "gptq", "--group-size", "32", "--nsamples", "1", "--seqlen", "4"]), "--expert-tokens", "all",
                      "-o", w / "ref")
        if ref.exit_code != 0:
            return f"the reference run failed: {ref.output[-200:]}"
        mods = [json.loads((w / r / "quantkit.json").read_text())["quantized_modules"] for r in ("out", "ref")]
        return None if mods[0] == mods[1] else f"{len(mods[0])} quantized modules vs {len(mods[1])} with all experts"
    return check


def _moe_cases(out: Cases) -> None:
    add = out.add
    for name, setup, kind in [
        ("deepseek_v3: config n_group 3 (4 experts)", _mcfg("ds13", n_group=3, topk_group=1), ""),
        ("deepseek_v3: config topk_group 2 > n_group 1", _mcfg("ds13", topk_group=2), ""),
        ("deepseek_v3: config n_routed_experts 4.0 (a float)", _mcfg("ds13", n_routed_experts=4.0), "maybe"),
        ("deepseek_v3: config routed_scaling_factor 0", _mcfg("ds13", routed_scaling_factor=0.0), "maybe"),
        ("deepseek_v3: config routed_scaling_factor NaN", _mcfg("ds13", routed_scaling_factor=float("nan")), ""),
        ("deepseek_v3: config norm_topk_prob false", _mcfg("ds13", norm_topk_prob=False), "valid"),
        ("deepseek_v3: e_score_correction_bias NaN", _mstate("ds13", "e_score_correction_bias", lambda t: t * float("nan")),
         ""),
        ("deepseek_v3: e_score_correction_bias 1e30 on one expert (every token routed to it)",
         _mstate("ds13", "e_score_correction_bias", lambda t: torch.cat([t[:1] + 1e30, t[1:]])), "maybe"),
        ("deepseek_v3: config first_k_dense_replace 5 (every layer dense, experts stored)",
         _mcfg("ds13", first_k_dense_replace=5), ""),
        ("qwen3_moe: config norm_topk_prob true", _mcfg("q3m13", norm_topk_prob=True), "valid"),
        ("qwen3_moe: config num_experts_per_tok '2' (a string)", _mcfg("q3m13", num_experts_per_tok="2"), ""),
        ("qwen3_moe: config num_experts_per_tok 2.0 (a float)", _mcfg("q3m13", num_experts_per_tok=2.0), "maybe"),
        ("qwen3_moe: config num_experts_per_tok -1", _mcfg("q3m13", num_experts_per_tok=-1), ""),
        ("qwen3_moe: config router_aux_loss_coef NaN (training only)", _mcfg("q3m13", router_aux_loss_coef=float("nan")),
         "maybe"),
        ("qwen3_moe: config output_router_logits true", _mcfg("q3m13", output_router_logits=True), "maybe"),
        ("qwen3_moe: config moe_intermediate_size 48 (experts of 32 stored)", _mcfg("q3m13", moe_intermediate_size=48),
         ""),
        ("mixtral: config router_jitter_noise 0.5 (training only)", _mcfg("mx13", router_jitter_noise=0.5), "maybe"),
        ("mixtral: config num_experts_per_tok null", _mcfg("mx13", num_experts_per_tok=None), ""),
        ("mixtral: config num_local_experts 3 (4 stored)", _mcfg("mx13", num_local_experts=3), ""),
        ("mixtral: router weight all zeros (every top-k a tie)", _mstate("mx13", ".gate.", torch.zeros_like), "valid"),
        ("mixtral: router weight x 1e4 (one-hot routing)", _mstate("mx13", ".gate.", lambda t: t * 1e4), "valid"),
        ("mixtral: one layer's experts all zeros (dead experts)", _mstate("mx13", "layers.0.mlp.experts",
                                                                          torch.zeros_like), "valid"),
        ("mixtral: router weight -inf at one entry", _mstate("mx13", ".gate.", lambda t: t.index_fill_(
            0, torch.tensor([0]), float("-inf"))), ""),
        ("gpt_oss: router bias NaN", _mstate("oss13", "router.bias", lambda t: t * float("nan")), ""),
        ("gpt_oss: router bias 1e30 on one expert", _mstate("oss13", "router.bias", lambda t: torch.cat(
            [t[:1] + 1e30, t[1:]])), "maybe"),
        ("gpt_oss: experts gate_up_proj inf at one entry", _mstate("oss13", "gate_up_proj", lambda t: t.view(-1).index_fill_(
            0, torch.tensor([0]), float("inf")).view(t.shape)), ""),
        ("gpt_oss: config swiglu_limit 0", _mcfg("oss13", swiglu_limit=0.0), "maybe"),
        ("gpt_oss: config num_local_experts 8 (4 stored)", _mcfg("oss13", num_local_experts=8), ""),
        ("gpt_oss: config experts_per_token 5 (of 4)", _mcfg("oss13", num_experts_per_tok=5, experts_per_token=5), ""),
    ]:
        model = name.split(":")[0]
        rel = {"deepseek_v3": "ds13", "qwen3_moe": "q3m13", "mixtral": "mx13", "gpt_oss": "oss13"}[model]
        add("moe13", name, _mcal(rel), setup, tri(kind, export_ok()))
    for rel in MOE:
        fam = FAMILY_OF[rel]
        add("moe13", f"{fam}: 1 sample of 4 tokens, routed: every expert still quantized", _mcal(
            rel, "--nsamples", "1", "--seqlen", "4", method=["--method", "gptq", "--group-size", "32"]), _moe(rel),
            valid(_experts_all_quantized(rel)))
        add("moe13", f"{fam}: --quantize-lm-head", _mcal(rel, "--quantize-lm-head"), _moe(rel), valid(export_ok()))
        add("moe13", f"{fam}: --bits 8 --group-size -1 --act-bits 8", _mcal(rel, "--bits", "8", "--group-size", "-1",
                                                                            "--act-bits", "8"), _moe(rel),
            valid(export_ok()))
        add("moe13", f"{fam}: --format gptq", _mcal(rel, "--format", "gptq"), _moe(rel), valid(export_ok()))
        add("moe13", f"{fam}: --expert-tokens mix --low-memory equals in memory", _mcal(
            rel, "--expert-tokens", "mix", "--low-memory", method=GPTQ), _moe(rel),
            same_as(lambda w, r=rel: ["calibrate", w / r, "--calib", w / "text.txt", *_g(r, GPTQ), "--expert-tokens",
                                      "mix", "-o", w / "ref"]))
        add("moe13", f"{fam}: --recipe overrides bits 8 on the experts", _mcal(rel, "--recipe", "q.yaml"),
            both(_moe(rel), write("q.yaml", "overrides:\n  - targets: ['re:.*experts.*']\n    bits: 8\n")),
            valid(export_ok()))
        add("moe13", f"{fam}: importance makes a set", lambda w, r=rel: run_cli(
            "importance", w / r, "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "set"),
            _moe(rel), valid(_set_ok))
        add("moe13", f"{fam}: --expert-tokens all with --all-experts (both spellings)", _mcal(
            rel, "--expert-tokens", "all", "--all-experts"), _moe(rel), _maybe(export_ok()))
        add("moe13", f"{fam}: --expert-tokens mix with --all-experts (a conflict)", _mcal(
            rel, "--expert-tokens", "mix", "--all-experts"), _moe(rel))


# ---------------------------------------------------------------- VLMs given odd in-memory records

VRUN = dict(method="rtn", group_size=32, nsamples=2, seqlen=256)


def _need_vlm(name: str, family: str):
    def setup(w: Path) -> None:
        from helpers import build_vlm

        base = w.parent / "base"
        if not (base / name).is_dir():
            model, processor = build_vlm(family)
            model.save_pretrained(base / name)
            processor.save_pretrained(base / name)
        if not (w / name).is_dir():
            shutil.copytree(base / name, w / name)
    return setup


def _records(w: Path, image=None, n: int = 4) -> list:
    """vl/data.jsonl's records, each image made by image(w, path) (the path itself when None)."""
    out = []
    for line in (w / "vl" / "data.jsonl").read_text().splitlines()[:n]:
        r = json.loads(line)
        path = w / "vl" / r["image"]
        text = r.get("text") or " ".join(m["content"] for m in r["messages"])  # captions: one kind of record
        out.append({"image": str(path) if image is None else image(w, path), "text": text})
    return out


def _vq(model: str, records, processor: str | None = None, **kw):
    def call(w: Path):
        from helpers import build_vlm

        import quantkit

        # the processor as tests build it (AutoProcessor.from_pretrained asks these folders for a video processor)
        proc = build_vlm({"vlm": "qwen2_vl", "lov13": "llava_onevision"}[processor or model])[1]
        data = records(w) if callable(records) else records
        return quantkit.quantize(str(w / model), proc, data=data, progress=False, output_dir=str(w / "out"),
                                 **{**VRUN, **kw})
    return call


def _pil(w: Path, path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def _vlm_cases(out: Cases) -> None:
    add = out.add
    setups = {"vlm": None, "lov13": _need_vlm("lov13", "llava_onevision")}
    for model in ("vlm", "lov13"):
        fam = "qwen2_vl" if model == "vlm" else "llava_onevision"
        setup = setups[model]
        import numpy as np

        for name, records, kind in [
            ("images as numpy HxWx3 uint8 arrays", lambda w: _records(w, lambda w, p: np.asarray(_pil(w, p))), "maybe"),
            ("images as torch 3xHxW uint8 tensors", lambda w: _records(
                w, lambda w, p: torch.from_numpy(np.asarray(_pil(w, p)).copy()).permute(2, 0, 1)), "maybe"),
            ("images as numpy float arrays of 0..255", lambda w: _records(
                w, lambda w, p: np.asarray(_pil(w, p)).astype("float32")), "maybe"),
            ("images as the PNG files' bytes", lambda w: _records(w, lambda w, p: p.read_bytes()), "maybe"),
            ("images as open file objects", lambda w: _records(w, lambda w, p: open(p, "rb")), "maybe"),  # noqa: SIM115
            ("images as Path objects", lambda w: _records(w, lambda w, p: p), "maybe"),
            ("images as paths relative to the cwd", lambda w: _records(w, lambda w, p: str(p.relative_to(w))), "maybe"),
            ("images of 0x0 pixels", lambda w: _records(w, lambda w, p: __import__("PIL.Image").Image.new(
                "RGB", (0, 0))), ""),
            ("images of 2x2 pixels", lambda w: _records(w, lambda w, p: _pil(w, p).resize((2, 2))), "maybe"),
            ("a list of two images per record", lambda w: _records(w, lambda w, p: [str(p), str(p)]), "maybe"),
            ("an image None in one record", lambda w: [{**r, "image": None} if i == 0 else r
                                                       for i, r in enumerate(_records(w))], ""),
            ("a record of text only among image records", lambda w: [{"text": r["text"]} if i == 0 else r
                                                                      for i, r in enumerate(_records(w))], ""),
            ("plain strings (no images) with the processor", lambda w: [r["text"] for r in _records(w)], "maybe"),
            ("a Dataset with an image column of paths", lambda w: dataset(
                image=[r["image"] for r in _records(w)], text=[r["text"] for r in _records(w)]), "maybe"),
            ("a Dataset with an image column of PIL images", lambda w: __import__("datasets").Dataset.from_list(
                _records(w, _pil)), "maybe"),
            ("records whose text is 5", lambda w: [{**r, "text": 5} for r in _records(w)], ""),
            ("records whose text is a list of strings", lambda w: [{**r, "text": [r["text"]]} for r in _records(w)], ""),
            ("records with an 'images' (plural) field", lambda w: [{"images": [r["image"]], "text": r["text"]}
                                                                   for r in _records(w)], ""),
        ]:
            add("vlm13", f"{fam}: data={name}", _vq(model, records), setup,
                tri(kind, returned_ok), api=True)
        add("vlm13", f"{fam}: 4 records, nsamples 10", _vq(model, lambda w: _records(w), nsamples=10), setup,
            _maybe(returned_ok), api=True)
        add("vlm13", f"{fam}: seqlen 8 (below one image's tokens)", _vq(model, lambda w: _records(w), seqlen=8), setup,
            api=True)
        add("vlm13", f"{fam}: part 'heldout' with image records", _vq(model, lambda w: _records(w), part="heldout"),
            setup, api=True)
    both_vlms = both(setups["lov13"])
    add("vlm13", "qwen2_vl with llava_onevision's processor", _vq("vlm", lambda w: _records(w), processor="lov13"),
        both_vlms, api=True)
    add("vlm13", "llava_onevision with qwen2_vl's processor", _vq("lov13", lambda w: _records(w), processor="vlm"),
        both_vlms, api=True)
    for name, edit in [("image_token_index 500 (beyond the vocabulary)", dict(image_token_index=500)),
                       ("vision_feature_layer 99", dict(vision_feature_layer=99)),
                       ("vision_feature_select_strategy 'middle'", dict(vision_feature_select_strategy="middle"))]:
        add("vlm13", f"llava_onevision: config {name}", lambda w: run_cli(
            "calibrate", w / "lov13", "--calib", w / "vl" / "data.jsonl", "--method", "rtn", "--nsamples", "2",
            "--seqlen", "256", "--group-size", "32", "-o", w / "out"),
            both(setups["lov13"], json_edit("lov13/config.json", lambda d, e=edit: d.update(e))))


# ---------------------------------------------------------------- resume with changed options

def _fresh_lm(*extra):
    """A check: the resumed export equals a fresh --low-memory GPTQ run with `extra` (the inputs as they are now)."""
    def check(w: Path, result) -> str | None:
        fresh = run_cli("calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--low-memory", *extra, "-o",
                        w / "fresh")
        if fresh.exit_code != 0:
            return f"a fresh run refuses what the resume took: {fresh.output[-200:]}"
        a, b = _bytes_of(w / "out" / "model.safetensors"), _bytes_of(w / "fresh" / "model.safetensors")
        return None if a and a == b else f"the export differs from a fresh --low-memory run with {extra}"
    return check


def _resume_cases(out: Cases) -> None:
    add = out.add

    def resume(name, *extra, kind="maybe", then=(), data="text.txt", out_rel=None, ref_extra=None):
        def run(w: Path, e=extra, d=data, o=out_rel):
            return run_cli("calibrate", w / "model", "--calib", w / d if d else "", *GPTQ, "--low-memory", "--resume",
                           *e, "-o", (o if o else w / "out"))
        check = _fresh_lm(*(extra if ref_extra is None else ref_extra))
        add("resume", f"r13 {name}", run, stopped(*then), tri(kind, check))
    resume("the same options spelled again equal a fresh run", kind="valid")
    resume("--seed 0 (the default, spelled out) equals a fresh run", "--seed", "0", kind="valid")
    resume("--json added equals a fresh run", "--json", kind="valid", ref_extra=())
    resume("--dist-timeout 30 added equals a fresh run", "--dist-timeout", "30", kind="valid", ref_extra=())
    resume("--calib ./text.txt (another spelling) equals a fresh run", data="./text.txt", kind="valid")
    resume("--calib through a symlink to the same file", data="tl.txt", then=(
        lambda w: (w / "tl.txt").symlink_to(w / "text.txt"),), ref_extra=())
    resume("-o relative (out) equals a fresh run", out_rel="out", kind="valid", ref_extra=())
    resume("--bits 8 --group-size -1", "--bits", "8", "--group-size", "-1")
    resume("--bits 2", "--bits", "2")
    resume("--sym (the default, spelled out)", "--sym", kind="valid")
    resume("--static-groups (the default, spelled out)", "--static-groups", kind="valid")
    resume("--act-bits 8 --bits 8 --group-size -1", "--act-bits", "8", "--bits", "8", "--group-size", "-1")
    resume("--smooth uniform --act-bits 8 --bits 8 --group-size -1", "--smooth", "uniform", "--act-bits", "8", "--bits",
           "8", "--group-size", "-1")
    resume("--expert-tokens mix on a dense llama", "--expert-tokens", "mix", kind="")
    resume("--format gptq_v2", "--format", "gptq_v2")
    resume("--nsamples 2 spelled +2", "--nsamples", "+2", kind="valid", ref_extra=())
    resume("--device cpu:0", "--device", "cpu:0", ref_extra=())
    resume("--recipe of an empty mapping", "--recipe", "q.yaml", then=(write("q.yaml", "{}\n"),), ref_extra=())
    resume("--recipe ignoring lm_head (already full precision)", "--recipe", "q.yaml",
           then=(write("q.yaml", "ignore: [lm_head]\n"),), ref_extra=())
    resume("--offload-dir given only on resume", "--offload-dir", "off", ref_extra=())
    # (the work area records each input file's size and mtime, by design: a fresh copy of the same bytes may be refused)
    resume("text.txt replaced by a copy of itself (same bytes, new inode)", then=(
        lambda w: (shutil.copy(w / "text.txt", w / "t.tmp"), (w / "t.tmp").replace(w / "text.txt")),), kind="maybe")
    resume("model/config.json rewritten with keys reordered (same values)", then=(
        lambda w: (w / "model" / "config.json").write_text(json.dumps(dict(sorted(json.loads(
            (w / "model" / "config.json").read_text()).items())), indent=1)),), kind="maybe")
    add("resume", "r13 --dry-run --resume leaves the work area as it was", lambda w: run_cli(
        "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--low-memory", "--resume", "--dry-run", "-o",
        w / "out"), stopped(), _maybe(lambda w, r: None if (w / "out.partial" / "state.json").is_file()
                                      and not (w / "out").exists() else "the dry run changed the work area"))


# ---------------------------------------------------------------- --low-memory with the other run options

def _lowmem_cases(out: Cases) -> None:
    add = out.add
    for name, extra, method in [
        ("--quantize-lm-head", ["--quantize-lm-head"], GPTQ),
        ("--bits 8 --group-size -1 --act-bits 8", ["--bits", "8", "--group-size", "-1", "--act-bits", "8"], GPTQ),
        ("--asym", ["--asym"], GPTQ),
        ("--format gptq", ["--format", "gptq"], GPTQ),
        ("--format fake --bits 3", ["--format", "fake", "--bits", "3"], GPTQ),
        ("--mse", ["--mse"], GPTQ),
        ("--cd-sweeps 1", ["--cd-sweeps", "1"], GPTQ),
        ("--fp-target", ["--fp-target"], GPTQ),
        ("--no-act-order --dynamic-groups --format gptq", ["--no-act-order", "--dynamic-groups", "--format", "gptq"],
         GPTQ),
        ("--recipe overriding q_proj to 8 bits", ["--recipe", "q.yaml"], GPTQ),
        ("--dtype bfloat16 (RTN)", ["--dtype", "bfloat16"], RTN),
        ("--part heldout", ["--part", "heldout"], GPTQ),
        ("--seed 5", ["--seed", "5"], GPTQ),
    ]:
        add("lowmem13", f"--low-memory {name} equals the in-memory run", lambda w, e=extra, m=method: run_cli(
            "calibrate", w / "model", "--calib", w / "text.txt", *m, *e, "--low-memory", "-o", w / "out"),
            write("q.yaml", "overrides:\n  - targets: [q_proj]\n    bits: 8\n"),
            same_as(lambda w, e=extra, m=method: ["calibrate", w / "model", "--calib", w / "text.txt", *m, *e, "-o",
                                                  w / "ref"]))
    same_lm = same_as(lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "-o", w / "ref"])
    add("lowmem13", "--low-memory --offload-dir a symlink to a folder equals the in-memory run", lambda w: run_cli(
        "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--low-memory", "--offload-dir", w / "offl", "-o",
        w / "out"), lambda w: ((w / "offreal").mkdir(), (w / "offl").symlink_to(w / "offreal")) and None, same_lm)
    add("lowmem13", "--low-memory --offload-dir named with a space and unicode equals the in-memory run",
        lambda w: run_cli("calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--low-memory", "--offload-dir",
                          w / "off ü", "-o", w / "out"), None, same_lm)
    for name, extra in [
        ("--devices 0 on the CPU", ["--devices", "0"]), ("--devices ' 0' (a space) on the CPU", ["--devices", " 0"]),
        ("--nproc 2 --devices 0,1 on the CPU", ["--nproc", "2", "--devices", "0,1"]),
        ("--device cuda --devices 0 on a CPU machine", ["--device", "cuda", "--devices", "0"]),
        ("--devices '0;1'", ["--devices", "0;1"]), ("--devices 'cuda:0'", ["--devices", "cuda:0"]),
        ("--devices '0-1' (a range)", ["--devices", "0-1"]), ("--devices '１' (full width)", ["--devices", "１"]),
        ("--nproc 3 on a 2-layer model", ["--nproc", "3"]),
        ("--offload-dir the text file", ["--offload-dir", "text.txt"]),
        ("--offload-dir inside -o's folder-to-be", ["--offload-dir", "out/off"]),
    ]:
        add("lowmem13", f"--low-memory {name}", lambda w, e=extra: run_cli(
            "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--low-memory", *e, "-o", w / "out"),
            None, _maybe(export_ok()) if name.startswith(("--nproc 3", "--offload-dir inside")) else None)


# ---------------------------------------------------------------- --overwrite through symlinks, odd names

def _path_cases(out: Cases) -> None:
    add = out.add
    cal = ["--method", "rtn", "--nsamples", "2", "--seqlen", "16", "--group-size", "32"]

    def link(name: str, target: str):
        return lambda w: (w / name).symlink_to(w / target)
    for name, args, setup in [
        ("calibrate -o a symlink to the case folder --overwrite", lambda w: [
            "calibrate", w / "model", "--calib", w / "text.txt", *cal, "-o", w / "lnk", "--overwrite"], link("lnk", ".")),
        ("calibrate -o a symlink to a symlink to the model --overwrite", lambda w: [
            "calibrate", w / "model", "--calib", w / "text.txt", *cal, "-o", w / "l2", "--overwrite"],
         both(link("l1", "model"), link("l2", "l1"))),
        ("calibrate -o a symlink to the model's parent's parent --overwrite", lambda w: [
            "calibrate", w / "model", "--calib", w / "text.txt", *cal, "-o", w / "up", "--overwrite"],
         lambda w: (w / "up").symlink_to(w.parent)),
        ("importance -o a symlink to the model --overwrite", lambda w: [
            "importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o", w / "lnk",
            "--overwrite"], link("lnk", "model")),
        ("export -o a symlink to IN_DIR --overwrite", lambda w: ["export", w / "ct", "--format", "fake", "-o",
                                                                 w / "lnk", "--overwrite"], link("lnk", "ct")),
        ("eval -o a symlink to model/config.json", lambda w: ["eval", w / "model", "--data", w / "text.txt", *EV, "-o",
                                                              w / "e.json"], lambda w: (w / "e.json").symlink_to(
            w / "model" / "config.json")),
        ("qid fit -o a symlink to q.csv", lambda w: ["qid", "fit", w / "q.csv", "--bootstrap", "0", "-o", w / "f.json"],
         lambda w: (w / "f.json").symlink_to(w / "q.csv")),
        ("qid plot -o a symlink to the model", lambda w: ["qid", "plot", w / "q.csv", "-o", w / "lnk"],
         link("lnk", "model")),
        ("demo -o a symlink to the model --overwrite", lambda w: ["demo", "--model", w / "model", "--data",
                                                                  w / "text.txt", "--seqlen", "16", "--nsamples", "2",
                                                                  "-o", w / "lnk", "--overwrite"], link("lnk", "model")),
        ("calibrate -o a symlink loop", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *cal, "-o",
                                                   w / "la"], both(link("la", "lb"), link("lb", "la"))),
        ("calibrate --calib a symlink loop", lambda w: ["calibrate", w / "model", "--calib", w / "la", *cal, "-o",
                                                        w / "out"], both(link("la", "lb"), link("lb", "la"))),
        ("calibrate of a model that is a symlink loop", lambda w: ["calibrate", w / "la", "--calib", w / "text.txt",
                                                                   *cal, "-o", w / "out"],
         both(link("la", "lb"), link("lb", "la"))),
    ]:
        add("path13", name, lambda w, a=args: run_cli(*a(w)), setup)
    ref = same_as(cal_ref())
    for name, model, data, o, setup in [
        ("a chain of three symlinks to the model equals the model", "l3", "text.txt", "out",
         both(link("l1", "model"), link("l2", "l1"), link("l3", "l2"))),
        ("a chain of three symlinks to the text equals the text", "model", "t3", "out",
         both(link("t1", "text.txt"), link("t2", "t1"), link("t3", "t2"))),
        ("-o through a symlinked parent folder (lnk/out)", "model", "text.txt", "lnk/out",
         lambda w: ((w / "real").mkdir(), (w / "lnk").symlink_to(w / "real"))),
        ("-o a folder name ending in a space", "model", "text.txt", "out ", None),
        ("-o a folder name with '%' and '$HOME'", "model", "text.txt", "o%d$HOME", None),
        ("--calib a file name with a newline", "model", "te\nxt.txt", "out",
         lambda w: shutil.copy(w / "text.txt", w / "te\nxt.txt")),
        ("a model folder named '--calib'", "--calib", "text.txt", "out", lambda w: shutil.copytree(w / "model",
                                                                                                    w / "--calib")),
    ]:
        def check(w: Path, result, o=o) -> str | None:
            bad = ref(w, result) if o == "out" else None
            if bad:
                return bad
            if o != "out" and _bytes_of(w / o / "model.safetensors") != _bytes_of(w / "ct" / "model.safetensors"):
                return f"{o!r}/model.safetensors differs from ct's (the same run)"
            return None
        add("path13", f"calibrate: {name}", lambda w, m=model, d=data, o=o: run_cli(
            "calibrate", w / m, "--calib", w / d, *cal, "-o", w / o), setup, valid(check))


# ---------------------------------------------------------------- QiD tables with odd rows

def _rows() -> list[list[str]]:
    return [line.split(",") for line in (QID_HEADER + build_qid_rows()).strip().split("\n")]


def _body(edit) -> str:
    rows = _rows()
    edit(rows)
    return "\n".join(",".join(r) if isinstance(r, list) else r for r in rows) + "\n"


def _cell13(col: str, value: str, row: int = 1):
    def edit(rows):
        rows[row][rows[0].index(col)] = value
    return edit


def _fit_same_as_plain(w: Path, result) -> str | None:
    (w / "plain.csv").write_text(QID_HEADER + build_qid_rows())
    ref = run_cli("qid", "fit", w / "plain.csv", "--bootstrap", "0", "--json")
    if ref.exit_code != 0:
        return f"the reference fit failed: {ref.output[-200:]}"
    a, b = json.loads(result.stdout), json.loads(ref.stdout)

    def params(doc):  # each fit's parameters (residual lists follow the table's row order)
        return [{k: v["value"] for k, v in f["params"].items()} for f in doc["fits"]]
    pa, pb = params(a), params(b)
    if len(pa) != len(pb) or any(x.keys() != y.keys() for x, y in zip(pa, pb)):
        return "other fits than the plain table's"
    worst = max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-300) for x, y in zip(pa, pb) for k in x)
    return None if worst < 1e-9 else f"the fit's parameters differ from the plain table's (relative {worst:.3g})"


def _qid_cases(out: Cases) -> None:
    add = out.add
    for name, edit, kind in [
        ("a '# comment' row in the middle (qid tables skip '#' lines)", lambda rows: rows.insert(
            5, "# measured again later"), "same"),
        ("the header repeated in the middle", lambda rows: rows.insert(10, list(rows[0])), ""),
        ("a row of empty cells only", lambda rows: rows.insert(3, [""] * len(rows[0])), ""),
        ("a row with the header's column count but a missing qid cell", _cell13("qid", ""), ""),
        ("N ' 1000000' (a leading space)", _cell13("N", " 1000000"), "same"),
        ("bits '+2'", _cell13("bits", "+2"), "same"),
        ("bits '2.0'", _cell13("bits", "2.0"), "same"),
        ("bits '２' (full width)", _cell13("bits", "２"), "same"),
        ("N '1e6'", _cell13("N", "1e6"), "same"),
        ("D '1e309' (overflows to inf)", _cell13("D", "1e309"), ""),
        ("N '1e-400' (underflows to 0)", _cell13("N", "1e-400"), ""),
        ("qid '1e-400' (underflows to 0) with loss_q = loss_fp", lambda rows: (_cell13("qid", "1e-400")(rows),
                                                                               _cell13("loss_q", "3.0")(rows)), "maybe"),
        ("qid negative with loss_q below loss_fp (consistent)", lambda rows: (
            _cell13("loss_q", "2.99")(rows), _cell13("qid", "-0.01")(rows)), "maybe"),
        ("qid 10 times loss_q - loss_fp", lambda rows: rows[1].__setitem__(
            rows[0].index("qid"), repr(10 * float(rows[1][rows[0].index("qid")]))), "maybe"),
        ("a NUL byte in a model name (another label)", _cell13("model", "m\x000"), "maybe"),
        ("a model name with a quoted comma", _cell13("model", '"m,0"'), "maybe"),
        ("method 'gptq ' (a trailing space)", _cell13("method", "gptq "), "maybe"),
        ("group_size -1 in one row", _cell13("group_size", "-1"), "maybe"),
        ("group_size 'none'", _cell13("group_size", "none"), ""),
        ("one row only", lambda rows: rows.__delitem__(slice(2, None)), "fit-refuses"),
        ("two rows only", lambda rows: rows.__delitem__(slice(3, None)), "maybe"),
        ("two rows identical but for qid (conflicting repeats)", lambda rows: rows.append(
            rows[1][:8] + [repr(2 * float(rows[1][8]))] + rows[1][9:]), "maybe"),
        ("another eval_text in one row", _cell13("eval_text", "other"), "maybe"),
        ("a row for method 'rtn' alone", _cell13("method", "rtn"), "maybe"),
        ("every row's D the same except one", lambda rows: [r.__setitem__(rows[0].index("D"), "1000000000")
                                                            for r in rows[2:]], "maybe"),
        ("rows in reverse order", lambda rows: rows.__setitem__(slice(1, None), rows[1:][::-1]), "same"),
    ]:
        body = _body(edit)
        check = valid(_fit_same_as_plain) if kind == "same" and name.startswith("rows in") else (
            _maybe(_fit_same_as_plain) if kind == "same" else (_maybe(_json_ok) if kind == "maybe" else None))
        plot_kind = "maybe" if kind in ("maybe", "fit-refuses") else kind
        add("qid13", f"fit: {name}", lambda w: run_cli("qid", "fit", w / "t.csv", "--bootstrap", "0", "--json"),
            write("t.csv", body), check)
        if kind != "same":
            add("qid13", f"plot: {name}", lambda w: run_cli("qid", "plot", w / "t.csv", "--format", "png", "-o",
                                                            w / "figs"), write("t.csv", body),
                _maybe(lambda w, r: None if list((w / "figs").glob("*.png")) else "no figures") if plot_kind == "maybe"
                else None)
    for name, extra, kind in [
        ("--law a fit JSON of a one-method table, --method gptq", ["--law", "{w}/f.json", "--method", "gptq"], "valid"),
        ("--law a fit JSON whose file is a symlink", ["--law", "{w}/fl.json"], "valid"),
        ("--law a fit JSON, --method ' gptq' (a space)", ["--law", "{w}/f.json", "--method", " gptq"], "maybe"),
    ]:
        def setup(w: Path) -> None:
            done = run_cli("qid", "fit", w / "q.csv", "--bootstrap", "0", "--law", "unified", "-o", w / "f.json")
            assert done.exit_code == 0, done.output[-300:]
            (w / "fl.json").symlink_to(w / "f.json")
        add("qid13", f"predict {name}", lambda w, e=extra: run_cli(  # N and D inside the table's range
            "qid", "predict", "--params", "2e6", "--bits", "3", "--tokens", "2e9", *[x.format(w=w) for x in e],
            "--json"), setup, tri(kind, _json_ok))


# ---------------------------------------------------------------- calibration sets reused after edits

def _with_set(*then):
    def setup(w: Path) -> None:
        base = w.parent / "base"
        if not (base / "set13").is_dir():
            _make_set(base)
            (base / "set").rename(base / "set13")
        shutil.copytree(base / "set13", w / "set")
        for step in then:
            step(w)
    return setup


SETRUN = ["--group-size", "32"]


def _calibset_cases(out: Cases) -> None:
    add = out.add
    ref = same_as(lambda w: ["calibrate", w / "model", "--calib-set", w.parent / "base" / "set13", *SETRUN, "-o",
                             w / "ref"])

    def setcal(name, *then, extra=(), rel="set", kind="valid"):
        add("calibset13", name, lambda w, e=extra, r=rel: run_cli("calibrate", w / "model", "--calib-set", w / r,
                                                                  *SETRUN, *e, "-o", w / "out"),
            _with_set(*then), tri(kind, ref))
    setcal("the set folder a symlink equals the set", lambda w: (w / "sl").symlink_to(w / "set"), rel="sl")
    setcal("each set file a symlink to a copy elsewhere equals the set", lambda w: (
        shutil.copytree(w / "set", w / "elsewhere"),
        [((w / "set" / p.name).unlink(), (w / "set" / p.name).symlink_to(p)) for p in (w / "elsewhere").iterdir()]))
    setcal("each set file a hard link equals the set", lambda w: (
        shutil.copytree(w / "set", w / "elsewhere"),
        [((w / "set" / p.name).unlink(), __import__("os").link(p, w / "set" / p.name)) for p in (w / "elsewhere").iterdir()]))
    setcal("an extra notes.txt in the set equals the set", write("set/notes.txt", "mine"))
    setcal("manifest.json re-indented (same JSON) equals the set", lambda w: (w / "set" / "manifest.json").write_text(
        json.dumps(json.loads((w / "set" / "manifest.json").read_text()), indent=4)))
    setcal("manifest.json with an extra unknown key", json_edit("set/manifest.json", lambda d: d.update(note="x")),
           kind="maybe")
    setcal("the set folder immutable equals the set", freeze("set", make=False))
    setcal("the set folder named with a space and unicode equals the set", lambda w: (w / "set").rename(w / "sé t"),
           rel="sé t")
    setcal("--nsamples 3 with a 2-sample set", extra=("--nsamples", "3"), kind="")
    setcal("--seqlen 8 with a set of 16-token samples", extra=("--seqlen", "8"), kind="maybe")
    for method in ("rtn", "gptq"):
        add("calibset13", f"--method {method} with a set is a quantized copy", lambda w, m=method: run_cli(
            "calibrate", w / "model", "--calib-set", w / "set", *SETRUN, "--method", m, "-o", w / "out"), _with_set(),
            _maybe(export_ok()))
    setcal("samples.safetensors deleted", lambda w: (w / "set" / "samples.safetensors").unlink(), kind="")
    setcal("weights.safetensors emptied", write("set/weights.safetensors", b""), kind="")
    setcal("manifest.json deleted", lambda w: (w / "set" / "manifest.json").unlink(), kind="")
    setcal("the set of the other llama (same config, another seed)", lambda w: (
        shutil.rmtree(w / "set"), _set_of_other(w)), kind="")


def _set_of_other(w: Path) -> None:
    from helpers import save_tiny_llama

    save_tiny_llama(w / "other13", seed=3)
    done = run_cli("importance", w / "other13", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o",
                   w / "set")
    assert done.exit_code == 0, done.output[-300:]
