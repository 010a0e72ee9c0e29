"""Round 11 of the fault battery (issue #22): a fresh set by another hand, run by fault_battery.py --rounds 11.

What rounds 1-10 did not try: the documented options of every command with wrong types (nan, inf, empty, words,
floats for integers), out of range and in conflicting pairs; every keyword of quantkit.quantize and load_quantized
with wrong types, case and None, and numpy/pathlib spellings of valid values; calibration text in CRLF, with a
UTF-8 or UTF-16 BOM, NUL bytes, one giant line, JSONL with CRLF, blank lines and mixed record kinds; model folders
whose config names an odd dtype, lacks fields, carries a quantization_config, disagrees with its tied or untied
head, or whose shard index points wrong; exports (compressed-tensors and GPTQ) whose configs were edited and then
evaluated, re-exported or loaded; qid tables in other encodings, orders and quotings; resuming after the inputs
changed. Inputs that are valid when spelled another way carry a check against an independent reference.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import torch
from fault_battery import (
    GPTQ,
    QID_HEADER,
    RTN,
    Cases,
    _maybe,
    _resumed_matches_fresh,
    api_same_as,
    both,
    build_qid_rows,
    cal_ref,
    csv_rows_ok,
    eval_close_to,
    eval_ok,
    export_ok,
    fit_same_as,
    json_edit,
    quantize,
    quantized_where,
    returned_ok,
    run_cli,
    same_as,
    st_edit,
    stopped,
    tri,
    valid,
    weights_close,
    write,
)

EARLIER = {"--act-bits 8 --asym", "--offload-dir without --low-memory", "JSONL mixing text and chat records",
           "config dtype 'float33'", "config dtype 5", "config architectures []", "config rope_theta 0",
           "config num_hidden_layers 3 (2 stored)", "config.json empty", "eval --stride 0", "eval --max-tokens 1",
           "eval --batch-size 0", "importance --top-fraction 0", "importance --top-fraction 1.5", "fit --bootstrap -1",
           "measure --bits 5", "measure --eval-tokens -5", "measure --nsamples 0", "measure --tokens-per-step 0",
           "measure --tokens abc", "measure --eval-seqlen 0"}
API_MAYBE = {"device='cpu:0'", "device=None", "part=None", "smooth=None", "importance={}", "progress=None",
             "overwrite=None", "data=('w1 w2', 'w3 w4') (a tuple)", "data=iter of strings (a generator)",
             "data=np.array of strings", "format=None with bits=3", "recipe={'targets': []}",
             "tokenizer_or_processor=the tokenizer's folder path", "smooth='uniform' without act_bits",
             "dtype=torch.float64", "data=['w1 \\x00 w2']", "damp=None", "sym=None", "act_order='true'",
}
# resume implies low_memory (documented), whose result holds no model (model=None, by design): check its export
STREAMED = {"resume=True without a work area"}
# a single target given as a string instead of a list: taken as that one target is right
ONE_TARGET = {"recipe={'targets': 'q_proj'} (a string)", "recipe=Recipe(targets='q_proj')"}
FIT_MAYBE = {"--huber-delta 1 --estimator wls", "--no-misfit --estimator huber", "--method RTN",
             "--law unified --by-bits", "--seed -1", "--resample errors --bootstrap 0", "--law d"}
EVAL_MAYBE = {"--limit 5", "--num-fewshot 3", "--include-path .", "--part HELDOUT"}
MODEL_SAME = {"config without architectures", "config quantization_config null",
              "model.safetensors a symlink to the real file", "both model.safetensors and a pytorch_model.bin of zeros",
              "sharded and a stale model.safetensors beside the index"}
MODEL_SAME_MAYBE = {"sharded, one tensor missing from the index"}
MODEL_MAYBE = {"config torch_dtype 'float16' beside dtype 'float32'", "config architectures []",
               "config architectures LlamaForSequenceClassification", "config rms_norm_eps -1", "config rope_theta 0",
               "config tie_word_embeddings true (lm_head stored, different)", "config quantization_config {}",
               "config with a UTF-8 BOM", "generation_config.json broken", "tokenizer_config.json broken",
               "an extra 3-D tensor named like a linear", "an extra float64 unknown tensor",
               "a q_proj of 1e30 values"}
MAYBE_OPTIONS = {("--damp", "1"), ("--power", "0"), ("--dist-timeout", "inf"), ("--row-groups", "1000"),
                 ("--output-side", "0"), ("--group-size", "1")}
LINES = "\n".join(" ".join(f"w{(7 * i + j) % 40 + 1}" for j in range(20)) for i in range(120))
ALL = ["--part", "all"]


def _ref_text(w: Path) -> None:
    (w / "lf.txt").write_text(LINES)


def _same_text_as(rel: str, *extra):
    """A check: the run on d.txt (another valid spelling of LINES) gives the bytes of a run on lf.txt."""
    return same_as(lambda w: ["calibrate", w / "model", "--calib", w / rel, *RTN, *ALL, *extra, "-o", w / "ref"])


def _copy(src: str, dst: str):
    def setup(w: Path) -> None:
        shutil.copytree(w / src, w / dst) if (w / src).is_dir() else shutil.copy(w / src, w / dst)
    return setup


def _ct_config(edit):
    """ct2/: a copy of the compressed-tensors export whose quantization_config is edited."""
    def change(d: dict) -> None:
        edit(d["quantization_config"])
    return both(_copy("ct", "ct2"), json_edit("ct2/config.json", change))


def _gptq_config(edit, rel: str = "config.json"):
    def change(d: dict) -> None:
        edit(d.get("quantization_config", d))
    return both(_copy("gptq", "g2"), json_edit(f"g2/{rel}", change))


def _eval_of(target: str):
    return lambda w: ["eval", w / target, "--data", w / "text.txt", "--seqlen", "16", "--max-tokens", "64"]


def _shard(w: Path, extra_entry: str | None = None, missing_file: bool = False, drop: str | None = None) -> None:
    """model/ as two shards with an index (optionally an entry for a tensor no shard holds, a shard file gone, or
    one tensor left out of the index while its shard still holds it)."""
    from safetensors.torch import load_file, save_file

    state = load_file(w / "model" / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, w / "model" / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (w / "model" / "model.safetensors").unlink()
    if extra_entry:
        weight_map[extra_entry] = "model-00002-of-00002.safetensors"
    if drop:
        weight_map.pop(next(k for k in weight_map if drop in k))
    if missing_file:
        (w / "model" / "model-00002-of-00002.safetensors").unlink()
    (w / "model" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _same_as_ct(w: Path, result) -> str | None:
    """A check: out/'s tensors equal those of the shared ct/ (an RTN export of the same model, same options)."""
    from safetensors.torch import load_file

    a, b = load_file(w / "out" / "model.safetensors"), load_file(w / "ct" / "model.safetensors")
    if a.keys() != b.keys():
        return f"other tensors than ct's: {sorted(set(a) ^ set(b))[:2]}"
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    return f"differs from ct (the same RTN run on the unedited model): {differ[:2]}" if differ else None


def _fresh_with(*extra):
    """A check: the resumed export equals a fresh GPTQ run with `extra` on the inputs as they are now."""
    def check(w: Path, result) -> str | None:
        from safetensors.torch import load_file

        fresh = run_cli("calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, *extra, "-o", w / "fresh")
        if fresh.exit_code != 0:
            return f"a fresh run refuses what the resume took: {fresh.output[-200:]}"
        a, b = load_file(w / "out" / "model.safetensors"), load_file(w / "fresh" / "model.safetensors")
        differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
        return f"the export differs from a fresh run with {extra}: {differ[:2]}" if differ else None
    return check


def _state(edit):
    return st_edit("model/model.safetensors", edit)


def _qid_rows() -> list[list[str]]:
    return list(csv.reader(io.StringIO(QID_HEADER + build_qid_rows())))


def _csv(rows: list[list[str]], sep: str = ",", newline: str = "\n", quote: bool = False) -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=sep, lineterminator=newline, quoting=csv.QUOTE_ALL if quote else csv.QUOTE_MINIMAL
               ).writerows(rows)
    return out.getvalue()


def _fit(rel: str = "t.csv"):
    return lambda w: ["qid", "fit", w / rel, "--bootstrap", "0", "--json"]


def _loaded(path_of, **kw):
    def call(w: Path):
        import quantkit

        return quantkit.load_quantized(path_of(w), **kw)
    return call


def _module_ok(w: Path, model) -> str | None:
    """A check of load_quantized's module itself (returned_ok reads a Quantized's .model: a LlamaForCausalLM has
    one too, its decoder)."""
    from fault_battery import finite_model

    return finite_model(model)


def _loads_as_ct(w: Path, model) -> str | None:
    """A check of load_quantized: finite and equal to load_quantized('ct') in float32."""
    import quantkit

    bad = _module_ok(w, model)
    if bad:
        return bad
    from fault_battery import TEXT_IDS

    ref = quantkit.load_quantized(w / "ct")
    with torch.no_grad():
        a, b = (m(torch.tensor(TEXT_IDS)).logits.float() for m in (model, ref))
    worst = (a - b).abs().max().item()
    return None if worst <= 1e-4 else f"logits differ from load_quantized(ct)'s by {worst:.3g}"


def eleventh_round() -> list:
    """Round 11's cases."""
    out = Cases()
    cli, cal, api, add = out.cli, out.cal, out.api, out.add
    nanv, inf = "nan", "inf"

    # ---- calibrate: documented options with wrong types, non-finite and out-of-range values
    for flag, value, method in [
        ("--damp", nanv, GPTQ), ("--damp", inf, GPTQ), ("--damp", "-inf", GPTQ), ("--damp", "1", GPTQ),
        ("--damp", "", GPTQ), ("--damp", "1%", GPTQ), ("--lam", nanv, None), ("--lam", "-0.5", None),
        ("--lam", inf, None), ("--power", nanv, None), ("--power", inf, None), ("--power", "0", None),
        ("--dist-timeout", nanv, RTN), ("--dist-timeout", inf, RTN), ("--dist-timeout", "-5", RTN),
        ("--bits", "four", RTN), ("--bits", "4.0", RTN), ("--bits", "", RTN), ("--bits", "1", RTN),
        ("--bits", "16", RTN), ("--bits", "32", RTN), ("--bits", "0x4", RTN), ("--group-size", "32.0", RTN),
        ("--group-size", "1e1", RTN), ("--group-size", "", RTN), ("--group-size", "-3", RTN),
        ("--group-size", "1", RTN), ("--group-size", "99999999999999999999", RTN), ("--nsamples", "2.5", RTN),
        ("--nsamples", "", RTN), ("--nsamples", "99999999999999999999", RTN), ("--seqlen", "0", RTN),
        ("--seqlen", "-16", RTN), ("--seqlen", "16.0", RTN), ("--seqlen", "65", RTN), ("--seed", "abc", RTN),
        ("--seed", "1.5", RTN), ("--seed", "99999999999999999999999", RTN), ("--cd-sweeps", "1.5", GPTQ),
        ("--cd-sweeps", "", GPTQ), ("--row-groups", "-1", None), ("--row-groups", "1000", None),
        ("--output-side", "-1", None), ("--output-side", "0", None), ("--fisher-draws", "-2", None),
        ("--nproc", "-1", RTN), ("--nproc", "1.5", RTN), ("--devices", "", RTN),
        ("--devices", "0,0", RTN), ("--devices", "-1", RTN), ("--device", "", RTN), ("--device", "cpu:x", RTN),
        ("--device", "cuda:-1", RTN), ("--dtype", "fp16", RTN), ("--dtype", "float64", RTN),
        ("--format", "GPTQ-V2", RTN), ("--format", "", RTN), ("--method", "", RTN), ("--method", "awq", RTN),
        ("--smooth", "", RTN), ("--part", "test", RTN), ("--part", "", RTN), ("--act-bits", "16", RTN),
        ("--act-bits", "", RTN), ("--guidance", "token", None), ("--importance-loss", "kl", None),
        ("--expert-tokens", "some", RTN),
    ]:
        meth = method if method is not None else ["--method", "tlq", "--nsamples", "2", "--seqlen", "16",
                                                   "--group-size", "32"]
        maybe = (flag, value) in MAYBE_OPTIONS
        cal("options11", f"{flag} {value!r} ({meth[1]})", flag, value, method=meth,
            check=tri("maybe" if maybe else "", export_ok()))
    for name, extra, kind in [
        ("--act-bits 4 --bits 8 (narrower activations than weights)", ["--act-bits", "4", "--bits", "8"], ""),
        ("--act-bits 8 --bits 2", ["--act-bits", "8", "--bits", "2", "--group-size", "-1"], "maybe"),
        ("--act-bits 8 --asym", ["--act-bits", "8", "--bits", "8", "--group-size", "-1", "--asym"], ""),
        ("--smooth tlq with rtn", ["--smooth", "tlq"], "maybe"),
        ("--guidance linear with gptq", ["--method", "gptq", "--guidance", "linear"], ""),
        ("--importance-loss fisher with rtn", ["--importance-loss", "fisher"], ""),
        ("--row-groups 4 without --guidance linear (tlq)", ["--method", "tlq", "--row-groups", "4"], ""),
        ("--fisher-draws 3 without --importance-loss fisher (tlq)", ["--method", "tlq", "--fisher-draws", "3"], ""),
        ("--offload-dir without --low-memory", ["--offload-dir", "off"], ""),
        ("--resume without --low-memory (documented: it implies --low-memory)", ["--resume"], "maybe"),
        ("--resume with nothing to resume", ["--low-memory", "--resume"], "maybe"),
        ("--devices 0 with --nproc 1 on the CPU", ["--devices", "0"], ""),
        ("--dist-timeout 5 with --nproc 1", ["--dist-timeout", "5"], "maybe"),
        ("--all-experts --expert-tokens routed on a dense llama", ["--all-experts", "--expert-tokens", "routed"], ""),
        ("--mse with --method gptq --damp 0", ["--method", "gptq", "--mse", "--damp", "0"], "maybe"),
        ("--static-groups with rtn", ["--static-groups"], "maybe"),
        ("--format fake --bits 2 --group-size -1 --asym", ["--format", "fake", "--bits", "2", "--group-size", "-1",
                                                           "--asym"], "valid"),
        ("--format gptq --bits 8 --group-size -1", ["--format", "gptq", "--bits", "8", "--group-size", "-1"], "valid"),
    ]:
        cal("conflicts11", name, *extra, check=tri(kind, export_ok()))
    for name, args in [
        ("-o ''", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", ""]),
        ("-o '.' (the case folder, not empty)", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt",
                                                           *RTN, "-o", "."]),
        ("-o a name with a NUL byte", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o",
                                                 "o\x00ut"]),
        ("-o a 300-character name", lambda w: ["calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o",
                                               w / ("o" * 300)]),
        ("-o the data file's folder parent of text (text.txt/out)", lambda w: [
            "calibrate", w / "model", "--calib", w / "text.txt", *RTN, "-o", w / "text.txt" / "out"]),
        ("--calib ''", lambda w: ["calibrate", w / "model", "--calib", "", *RTN, "-o", w / "out"]),
        ("--calib a directory of the model (safetensors only)", lambda w: [
            "calibrate", w / "model", "--calib", w / "ct", *RTN, "-o", w / "out"]),
        ("--calib-set ''", lambda w: ["calibrate", w / "model", "--calib-set", "", *RTN[:2], "-o", w / "out"]),
        ("--calib-set the model folder", lambda w: ["calibrate", w / "model", "--calib-set", w / "model", *RTN[:2],
                                                    "-o", w / "out"]),
        ("model ''", lambda w: ["calibrate", "", "--calib", w / "text.txt", *RTN, "-o", w / "out"]),
        ("model is an export (ct) to be quantized again", lambda w: [
            "calibrate", w / "ct", "--calib", w / "text.txt", *RTN, "-o", w / "out"]),
        ("model is the gptq export", lambda w: ["calibrate", w / "gptq", "--calib", w / "text.txt", *RTN, "-o",
                                                w / "out"]),
        ("model is the fake export", lambda w: ["calibrate", w / "fake", "--calib", w / "text.txt", *RTN, "-o",
                                                w / "out"]),
    ]:
        cli("paths11", name, args)

    # ---- calibration text: encodings and line endings
    crlf = LINES.replace("\n", "\r\n")
    cal("data11", "CRLF text gives the bytes of the LF text (--part all)", *ALL, data="d.txt",
        setup=both(_ref_text, write("d.txt", crlf)), check=_same_text_as("lf.txt"))
    cal("data11", "CR-only line ends give the bytes of the LF text (--part all)", *ALL, data="d.txt",
        setup=both(_ref_text, write("d.txt", LINES.replace("\n", "\r"))), check=_maybe(_same_text_as("lf.txt")))
    cal("data11", "tabs for spaces give the bytes of the LF text (--part all)", *ALL, data="d.txt",
        setup=both(_ref_text, write("d.txt", LINES.replace(" ", "\t"))), check=_same_text_as("lf.txt"))
    cal("data11", "trailing blank lines give the bytes of the LF text (--part all)", *ALL, data="d.txt",
        setup=both(_ref_text, write("d.txt", LINES + "\n\n\n\n")), check=_same_text_as("lf.txt"))
    same_lf = _same_text_as("lf.txt")
    for name, content, check in [
        ("UTF-8 BOM", "\ufeff" + LINES, _maybe(export_ok())),
        ("UTF-16-LE with BOM", ("\ufeff" + LINES).encode("utf-16-le"), _maybe(same_lf)),
        ("UTF-16-BE with BOM", ("\ufeff" + LINES).encode("utf-16-be"), _maybe(same_lf)),
        ("UTF-32 with BOM", LINES.encode("utf-32"), _maybe(same_lf)),
        ("UTF-16 without BOM", LINES.encode("utf-16-le"), _maybe(same_lf)),
        ("NUL bytes between words", LINES.replace(" ", "\x00"), _maybe(same_lf)),
        ("a NUL byte in the middle", LINES[:500] + "\x00" + LINES[500:], _maybe(export_ok())),
        ("one giant line of 200k words", " ".join(["w1", "w2", "w3"] * 70000), valid(export_ok())),
        ("form feeds and vertical tabs for line ends", LINES.replace("\n", "\f\v"), valid(same_lf)),
        ("invalid UTF-8 (lone continuation bytes)", LINES.encode()[:400] + b"\x80\x81\xbf" + LINES.encode()[400:],
         _maybe(export_ok())),
        ("only NUL bytes", b"\x00" * 5000, None), ("a UTF-8 BOM only", "\ufeff", None),
        ("unicode whitespace only (NBSP, em space)", "\u00a0\u2003\u3000" * 300, None),
        ("zero-width spaces between words", LINES.replace(" ", "\u200b"), _maybe(export_ok())),
        ("unpaired surrogate escaped as bytes", LINES.encode()[:100] + b"\xed\xa0\x80" + LINES.encode()[100:],
         _maybe(export_ok())),
    ]:
        cal("data11", f".txt in {name}", *ALL, data="d.txt", setup=both(_ref_text, write("d.txt", content)),
            check=check)
    rec = [json.dumps({"text": line}) for line in LINES.split("\n")]
    for name, content, ok in [
        ("JSONL with CRLF line ends", "\r\n".join(rec), True),
        ("JSONL with blank lines between records", "\n\n".join(rec), True),
        ("JSONL with trailing spaces on each line", "\n".join(r + "   " for r in rec), True),
        ("JSONL with a UTF-8 BOM", "\ufeff" + "\n".join(rec), "maybe"),
        ("JSONL in UTF-16 with BOM", ("\ufeff" + "\n".join(rec)).encode("utf-16"), "maybe"),
        ("JSONL mixing text and chat records", "\n".join(rec[:60] + [json.dumps(
            {"messages": [{"role": "user", "content": "w1 w2"}]})] * 3 + rec[60:]), "maybe"),
        ("JSONL mixing text and image records", "\n".join(rec + [json.dumps({"image": "x.png", "text": "w1"})]),
         False),
        ("JSONL with a record of two fields (text and meta)", "\n".join(
            json.dumps({"text": line, "meta": {"id": i}}) for i, line in enumerate(LINES.split("\n"))), True),
        ("JSONL with a null text record", "\n".join(rec + [json.dumps({"text": None})]), False),
        ("JSONL with a list as text", "\n".join(rec + [json.dumps({"text": ["w1", "w2"]})]), False),
        ("JSONL with a bare string line", "\n".join(rec + [json.dumps("w1 w2")]), False),
        ("JSONL with a JSON array line", "\n".join(rec + ["[1, 2]"]), False),
        ("JSONL with a NUL inside a text", "\n".join(rec + [json.dumps({"text": "w1\u0000w2"})]), "maybe"),
        ("JSONL with 'Text' (capital) field", "\n".join(json.dumps({"Text": line}) for line in LINES.split("\n")),
         False),
        ("JSONL of one 2 MB record", json.dumps({"text": " ".join(["w1", "w2", "w3"] * 200000)}), "valid"),
        ("JSONL truncated mid-record at the end", "\n".join(rec) + '\n{"text": "w1 w2', False),
        ("JSONL with duplicate 'text' keys", "\n".join('{"text": 5, "text": ' + json.dumps(line) + "}"
                                                        for line in LINES.split("\n")), "maybe"),
    ]:
        if ok is True:
            ref = "\n".join(rec)
            cal("data11", f"{name} gives the bytes of plain JSONL", *ALL, data="d.jsonl",
                setup=both(write("d.jsonl", content), write("lf.jsonl", ref)),
                check=_same_text_as("lf.jsonl"))
        else:
            cal("data11", name, data="d.jsonl", setup=write("d.jsonl", content), check=tri(ok, export_ok()))
    for name, fname, content, kind in [
        ("a .csv file", "d.csv", "text\n" + "\n".join(LINES.split("\n")), "maybe"),
        ("a .parquet-named text file", "d.parquet", LINES, "maybe"), ("a .TXT (capital suffix)", "d.TXT", LINES, "maybe"),
        ("a .JSONL (capital suffix)", "d.JSONL", "\n".join(rec), "maybe"),
        ("a file without a suffix", "d", LINES, "maybe"), ("a .md file", "d.md", LINES, "maybe"),
        ("a .txt that is a zip", "d.txt", b"PK\x03\x04" + b"\x00" * 200, ""),
        ("a .jsonl.gz that is not gzip", "d.jsonl.gz", "\n".join(rec), "maybe"),
    ]:
        cal("data11", f"--calib {name}", data=fname, setup=write(fname, content), check=tri(kind, export_ok()))
    cal("data11", "--calib a glob whose files include a UTF-16 one", data="dir/*.txt",
        setup=both(write("dir/a.txt", LINES), write("dir/b.txt", LINES.encode("utf-16"))), check=_maybe(export_ok()))
    cal("data11", "--calib a directory holding a symlink loop", data="dir",
        setup=both(write("dir/a.txt", LINES), lambda w: (w / "dir" / "loop").symlink_to(w / "dir")),
        check=_maybe(export_ok()))
    cal("data11", "--calib a dangling symlink", data="gone.txt",
        setup=lambda w: (w / "gone.txt").symlink_to(w / "nowhere.txt"))
    cal("data11", "--calib a symlink to text.txt equals text.txt", data="link.txt",
        setup=lambda w: (w / "link.txt").symlink_to(w / "text.txt"), check=same_as(cal_ref()))
    cal("data11", "--calib text.txt through ./ and ../ equals text.txt", data="dir/../text.txt",
        setup=write("dir/x", ""), check=same_as(cal_ref()))
    cal("data11", "recipe YAML with CRLF line ends", data="r.yaml",
        setup=write("r.yaml", "kind: text\r\nsources:\r\n  - path: text.txt\r\n"), check=valid(export_ok()))
    cal("data11", "recipe YAML with tabs for indentation", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n\t- path: text.txt\n"))
    cal("data11", "recipe YAML that is a list", data="r.yaml", setup=write("r.yaml", "- text.txt\n"))
    cal("data11", "recipe YAML with weight 'abc'", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n  - path: text.txt\n    weight: abc\n"))
    cal("data11", "recipe YAML with weight .nan", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n  - path: text.txt\n    weight: .nan\n"))
    cal("data11", "recipe YAML with weight .inf", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n  - path: text.txt\n    weight: .inf\n"))
    cal("data11", "recipe YAML whose source is itself", data="r.yaml",
        setup=write("r.yaml", "kind: text\nsources:\n  - path: r.yaml\n"))
    cal("data11", "recipe YAML with an empty sources list", data="r.yaml", setup=write("r.yaml", "kind: text\nsources: []\n"))

    # ---- model folders with odd configs and files
    def cfg(**fields):
        return json_edit("model/config.json", lambda d: d.update(fields))

    def drop(*keys):
        return json_edit("model/config.json", lambda d: [d.pop(k, None) for k in keys])

    for name, setup, ok in [
        ("config dtype 'float33'", cfg(dtype="float33"), False), ("config dtype 'fp16'", cfg(dtype="fp16"), False),
        ("config dtype 5", cfg(dtype=5), False), ("config dtype 'bfloat16' (weights float32)", cfg(dtype="bfloat16"), True),
        ("config torch_dtype 'float16' beside dtype 'float32'", cfg(torch_dtype="float16"), True),
        ("config without hidden_size", drop("hidden_size"), False),
        ("config without num_attention_heads", drop("num_attention_heads"), False),
        ("config without vocab_size", drop("vocab_size"), False),
        ("config without architectures", drop("architectures"), True),
        ("config architectures LlamaForSequenceClassification", cfg(architectures=["LlamaForSequenceClassification"]),
         False),
        ("config architectures []", cfg(architectures=[]), True),
        ("config num_attention_heads 5 (32 not divisible)", cfg(num_attention_heads=5), False),
        ("config num_key_value_heads 3 (4 heads)", cfg(num_key_value_heads=3), False),
        ("config head_dim 16 (weights for 8)", cfg(head_dim=16), False),
        ("config intermediate_size 48 (weights 64)", cfg(intermediate_size=48), False),
        ("config max_position_embeddings 8 (seqlen 16)", cfg(max_position_embeddings=8), False),
        ("config rms_norm_eps '1e-6' (a string)", cfg(rms_norm_eps="1e-6"), False),
        ("config rms_norm_eps -1", cfg(rms_norm_eps=-1.0), False),
        ("config hidden_act 'swishy'", cfg(hidden_act="swishy"), False),
        ("config rope_parameters rope_type 'nonsense'", cfg(rope_parameters={"rope_type": "nonsense",
                                                                             "rope_theta": 1e4}), False),
        ("config rope_theta 0", cfg(rope_parameters={"rope_type": "default", "rope_theta": 0.0}), False),
        ("config num_hidden_layers 3 (2 stored)", cfg(num_hidden_layers=3), False),
        ("config num_hidden_layers 1 (2 stored)", cfg(num_hidden_layers=1), False),
        ("config num_hidden_layers '2' (a string)", cfg(num_hidden_layers="2"), False),
        ("config tie_word_embeddings true (lm_head stored, different)", cfg(tie_word_embeddings=True), False),
        ("config quantization_config gptq (on float weights)", cfg(quantization_config={
            "quant_method": "gptq", "bits": 4, "group_size": 32}), False),
        ("config quantization_config bitsandbytes", cfg(quantization_config={
            "quant_method": "bitsandbytes", "load_in_4bit": True}), False),
        ("config quantization_config {}", cfg(quantization_config={}), False),
        ("config quantization_config null", cfg(quantization_config=None), True),
        ("config model_type 'LLAMA' (capitals)", cfg(model_type="LLAMA"), False),
        ("config with a UTF-8 BOM", lambda w: (w / "model" / "config.json").write_text(
            "\ufeff" + (w / "model" / "config.json").read_text()), False),
        ("config with a trailing comma", lambda w: (w / "model" / "config.json").write_text(
            (w / "model" / "config.json").read_text().rstrip().rstrip("}") + ",}"), False),
        ("config.json is a directory", lambda w: ((w / "model" / "config.json").unlink(),
                                                  (w / "model" / "config.json").mkdir()), False),
        ("config.json empty", write("model/config.json", ""), False),
        ("config.json 'null'", write("model/config.json", "null"), False),
        ("generation_config.json broken", write("model/generation_config.json", "{oops"), False),
        ("tokenizer_config.json broken", write("model/tokenizer_config.json", "{oops"), False),
        ("model.safetensors empty", write("model/model.safetensors", b""), False),
        ("model.safetensors 8 bytes of header length only", write("model/model.safetensors", b"\x10" + b"\x00" * 7),
         False),
        ("model.safetensors a symlink to the real file", lambda w: ((w / "model" / "model.safetensors").rename(
            w / "real.safetensors"), (w / "model" / "model.safetensors").symlink_to(w / "real.safetensors")), True),
        ("both model.safetensors and a pytorch_model.bin of zeros", lambda w: torch.save(
            {"model.embed_tokens.weight": torch.zeros(64, 32)}, w / "model" / "pytorch_model.bin"), True),
        ("sharded, the index naming a tensor no shard holds", lambda w: _shard(w, extra_entry="model.layers.9.x.weight"),
         False),
        ("sharded, a shard file gone", lambda w: _shard(w, missing_file=True), False),
        ("sharded, one tensor missing from the index", lambda w: _shard(w, drop="q_proj"), False),
        ("sharded and a stale model.safetensors beside the index", lambda w: (
            shutil.copy(w / "model" / "model.safetensors", w / "keep.st"), _shard(w),
            shutil.copy(w / "keep.st", w / "model" / "model.safetensors")), True),
        ("sharded index that is not JSON", lambda w: (_shard(w), (w / "model" / "model.safetensors.index.json")
                                                      .write_text("{nope")), False),
        ("sharded index without weight_map", lambda w: (_shard(w), (w / "model" / "model.safetensors.index.json")
                                                        .write_text('{"metadata": {}}')), False),
        ("lm_head missing, untied", _state(lambda s: s.pop("lm_head.weight")), False),
        ("k_proj weights stored transposed (32x16 for 16x32)", _state(
            lambda s: s.update({k: s[k].t().contiguous() for k in list(s) if "k_proj" in k})), False),
        ("an extra 3-D tensor named like a linear", _state(lambda s: s.update(
            {"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 4, 4)})), True),
        ("an extra float64 unknown tensor", _state(lambda s: s.update({"unknown.table": torch.zeros(8, dtype=torch.float64)})),
         True),
        ("weights stored bfloat16 (config float32)", _state(lambda s: s.update({k: v.bfloat16() for k, v in s.items()})),
         True),
        ("weights stored float16 (config float32)", _state(lambda s: s.update(
            {k: v.half() for k, v in s.items()})), True),
        ("a down_proj of all zeros", _state(lambda s: s.update({k: torch.zeros_like(v) for k, v in s.items()
                                                                if "down_proj" in k})), True),
        ("a q_proj of 1e30 values", _state(lambda s: s.update({k: torch.full_like(v, 1e30) for k, v in s.items()
                                                               if "layers.0.self_attn.q_proj" in k})), False),
        ("a norm weight of all zeros", _state(lambda s: s.update({k: torch.zeros_like(v) for k, v in s.items()
                                                                  if k.endswith("input_layernorm.weight")})), True),
        ("a denormal-filled v_proj", _state(lambda s: s.update({k: torch.full_like(v, 1e-42) for k, v in s.items()
                                                                if "v_proj" in k})), True),
    ]:
        if name in MODEL_SAME_MAYBE:  # a loader reading every shard's tensors gets the model right
            check = _maybe(_same_as_ct)
        elif name in MODEL_SAME:
            check = valid(_same_as_ct)
        elif name in MODEL_MAYBE:
            check = _maybe(export_ok())
        else:
            check = valid(export_ok()) if ok else None
        cal("model11", name, setup=setup, check=check)
    cli("model11", "model folder given with a trailing slash equals without", lambda w: [
        "calibrate", str(w / "model") + "/", "--calib", w / "text.txt", *RTN, "-o", w / "out"],
        check=same_as(cal_ref()))
    cli("model11", "model folder through a symlink equals the folder", lambda w: [
        "calibrate", w / "mlink", "--calib", w / "text.txt", *RTN, "-o", w / "out"],
        setup=lambda w: (w / "mlink").symlink_to(w / "model"), check=same_as(cal_ref()))
    cli("model11", "model folder relative to the cwd equals absolute", lambda w: [
        "calibrate", "model", "--calib", "text.txt", *RTN, "-o", "out"], check=same_as(cal_ref()))

    # ---- exports whose configs were edited, then evaluated, re-exported, loaded
    ref_eval = _eval_of("ct")
    for name, edit in [
        ("num_bits 3", lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3)),
        ("num_bits 8", lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8)),
        ("group_size 16", lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=16)),
        ("group_size null", lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=None)),
        ("symmetric false", lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False)),
        ("strategy 'channel'", lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="channel")),
        ("type 'float'", lambda q: q["config_groups"]["group_0"]["weights"].update(type="float")),
        ("format 'int-quantized'", lambda q: q.update(format="int-quantized")),
        ("quant_method 'gptq'", lambda q: q.update(quant_method="gptq")),
        ("quant_method 'Compressed-Tensors'", lambda q: q.update(quant_method="Compressed-Tensors")),
        ("ignore lists q_proj of layer 0", lambda q: q.update(ignore=["lm_head", "model.layers.0.self_attn.q_proj"])),
        ("targets ['Conv2d']", lambda q: q["config_groups"]["group_0"].update(targets=["Conv2d"])),
        ("config_groups {}", lambda q: q.update(config_groups={})),
        ("quantization_status 'frozen'", lambda q: q.update(quantization_status="frozen")),
        ("input_activations 8-bit dynamic added", lambda q: q["config_groups"]["group_0"].update(
            input_activations={"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True,
                               "strategy": "token"})),
    ]:
        cli("export11", f"eval of ct with quantization_config {name}", _eval_of("ct2"), setup=_ct_config(edit),
            check=_maybe(eval_close_to(ref_eval, 1e-5)))
        cli("export11", f"export to gptq of ct with quantization_config {name}",
            lambda w: ["export", w / "ct2", "--format", "gptq", "-o", w / "out"], setup=_ct_config(edit),
            check=_maybe(weights_close("out", "ct", 1e-6)))
    for name, edit in [("bits 3", lambda q: q.update(bits=3)), ("group_size 16", lambda q: q.update(group_size=16)),
                       ("desc_act true", lambda q: q.update(desc_act=True)), ("sym false", lambda q: q.update(sym=False)),
                       ("checkpoint_format 'gptq_v2'", lambda q: q.update(checkpoint_format="gptq_v2")),
                       ("bits '4' (a string)", lambda q: q.update(bits="4")),
                       ("lm_head true", lambda q: q.update(lm_head=True)),
                       ("quant_method 'awq'", lambda q: q.update(quant_method="awq"))]:
        cli("export11", f"eval of gptq with config.json {name}", _eval_of("g2"), setup=_gptq_config(edit),
            check=_maybe(eval_close_to(_eval_of("gptq"), 1e-5)))
        cli("export11", f"eval of gptq with quantize_config.json {name}", _eval_of("g2"),
            setup=_gptq_config(edit, "quantize_config.json"), check=_maybe(eval_close_to(_eval_of("gptq"), 1e-5)))
    for name, setup in [
        ("quantkit.json removed", lambda w: (_copy("ct", "ct2")(w), (w / "ct2" / "quantkit.json").unlink())),
        ("quantkit.json 'null'", both(_copy("ct", "ct2"), write("ct2/quantkit.json", "null"))),
        ("quantkit.json bits 8", both(_copy("ct", "ct2"), json_edit("ct2/quantkit.json",
                                                                     lambda d: d["spec"].update(bits=8)))),
        ("quantkit.json quantized_modules []", both(_copy("ct", "ct2"), json_edit(
            "ct2/quantkit.json", lambda d: d.update(quantized_modules=[])))),
        ("quantkit.json format 'gptq'", both(_copy("ct", "ct2"), json_edit("ct2/quantkit.json",
                                                                            lambda d: d.update(format="gptq")))),
        ("config.json quantization_config removed", both(_copy("ct", "ct2"), json_edit(
            "ct2/config.json", lambda d: d.pop("quantization_config")))),
        ("a weight_scale tensor removed", both(_copy("ct", "ct2"), st_edit("ct2/model.safetensors", lambda s: s.pop(
            next(k for k in sorted(s) if k.endswith("weight_scale")))))),
        ("a weight_scale of zeros", both(_copy("ct", "ct2"), st_edit("ct2/model.safetensors", lambda s: s.update(
            {k: torch.zeros_like(v) for k, v in s.items() if k.endswith("q_proj.weight_scale")})))),
        ("a weight_scale in float64", both(_copy("ct", "ct2"), st_edit("ct2/model.safetensors", lambda s: s.update(
            {k: v.double() for k, v in s.items() if k.endswith("weight_scale")})))),
        ("the tokenizer files removed", lambda w: (_copy("ct", "ct2")(w), (w / "ct2" / "tokenizer.json").unlink(),
                                                   (w / "ct2" / "tokenizer_config.json").unlink())),
    ]:
        zero = "zeros" in name  # zero scales are zero weights: a pruned model, not a corrupt one
        cli("export11", f"eval of ct with {name}", _eval_of("ct2"), setup=setup,
            check=_maybe(eval_ok if zero else eval_close_to(ref_eval, 1e-5)))
        api(f"load_quantized of ct with {name}", _loaded(lambda w: w / "ct2"), setup=setup,
            check=_maybe(_module_ok if zero else _loads_as_ct))
    for fmt in ("GPTQ", "Compressed-Tensors", "gptq-v2", "compressed_tensors", ""):
        cli("export11", f"export --format {fmt!r}", lambda w, f=fmt: ["export", w / "ct", "--format", f, "-o", w / "out"],
            check=_maybe(weights_close("out", "ct", 1e-6)))
    cli("export11", "export of the plain model folder", lambda w: ["export", w / "model", "--format", "gptq", "-o",
                                                                   w / "out"])
    cli("export11", "export of a text file", lambda w: ["export", w / "text.txt", "--format", "gptq", "-o", w / "out"])
    cli("export11", "export -o ''", lambda w: ["export", w / "ct", "--format", "gptq", "-o", ""])
    cli("export11", "export --private without --push-to-hub", lambda w: ["export", w / "ct", "--format", "gptq",
                                                                          "--private", "-o", w / "out"])
    cli("export11", "export of ct through a symlink loads ct's weights", lambda w: [
        "export", w / "clink", "--format", "gptq", "-o", w / "out"], setup=lambda w: (w / "clink").symlink_to(w / "ct"),
        check=valid(weights_close("out", "ct", 1e-6)))
    cli("export11", "export of ct to compressed-tensors (its own format) loads ct's weights", lambda w: [
        "export", w / "ct", "--format", "compressed-tensors", "-o", w / "out"],
        check=valid(weights_close("out", "ct", 1e-6)))

    # ---- eval options
    for extra in [("--seqlen", "0"), ("--seqlen", "-1"), ("--seqlen", nanv), ("--seqlen", ""), ("--stride", "0"),
                  ("--stride", "-4"), ("--stride", "1.5"), ("--max-tokens", "-1"), ("--max-tokens", "1"),
                  ("--batch-size", "0"), ("--batch-size", "-2"), ("--limit", "5"), ("--limit", nanv),
                  ("--num-fewshot", "-1"), ("--num-fewshot", "3"), ("--include-path", "."), ("--tasks", ""),
                  ("--tasks", ","), ("--tasks", "no_such_task_r11"), ("--part", "HELDOUT"), ("--device", ""),
                  ("--device", "cuda:x"), ("--data", ""), ("--data", "gone.txt"), ("--data", "*.none")]:
        cli("eval11", f"eval {' '.join(extra) if extra[1] else extra[0] + ' (empty)'}", lambda w, e=extra: [
            "eval", w / "ct", *(["--data", w / "text.txt"] if e[0] != "--data" else []), "--seqlen", "16",
            "--max-tokens", "64", *e], check=_maybe(eval_ok) if " ".join(extra) in EVAL_MAYBE else None)
    cli("eval11", "eval -o a directory", lambda w: ["eval", w / "ct", "--data", w / "text.txt", "--seqlen", "16",
                                                    "-o", w / "model"])
    cli("eval11", "eval -o ''", lambda w: ["eval", w / "ct", "--data", w / "text.txt", "--seqlen", "16", "-o", ""])
    cli("eval11", "eval --data CRLF text equals the LF text", lambda w: [
        "eval", w / "ct", "--data", w / "d.txt", "--seqlen", "16", "--part", "all"],
        setup=both(_ref_text, write("d.txt", crlf)),
        check=valid(eval_close_to(lambda w: ["eval", w / "ct", "--data", w / "lf.txt", "--seqlen", "16", "--part",
                                             "all"], 1e-6)))
    cli("eval11", "eval of a model whose config lacks vocab_size", lambda w: [
        "eval", w / "model", "--data", w / "text.txt", "--seqlen", "16"],
        setup=json_edit("model/config.json", lambda d: d.pop("vocab_size")), check=_maybe(eval_ok))

    # ---- plan options
    for mem in ("24", "abc", "-1GiB", "0GiB", "", "1e400GiB", "nanGiB", "24 GiB"):
        printed = _maybe(lambda w, r: None if r.output.strip() else "no plan printed") if mem in ("24", "24 GiB") \
            else None
        cli("plan11", f"plan --gpu-mem {mem!r}", lambda w, m=mem: ["plan", w / "model", *RTN, "--device", "cuda",
                                                                    "--gpu-mem", m], check=printed)
        cli("plan11", f"plan --host-mem {mem!r}", lambda w, m=mem: ["plan", w / "model", *RTN, "--host-mem", m],
            check=printed)
    cli("plan11", "plan of a model folder without config.json", lambda w: ["plan", w / "model", *RTN],
        setup=lambda w: (w / "model" / "config.json").unlink())
    cli("plan11", "plan of a sharded model whose index names a missing shard", lambda w: ["plan", w / "model", *RTN],
        setup=lambda w: _shard(w, missing_file=True))
    cli("plan11", "plan -o an existing output", lambda w: ["plan", w / "model", *RTN, "-o", w / "ct"],
        check=_maybe(lambda w, r: None))

    # ---- importance options
    for extra in [("--top-fraction", "0"), ("--top-fraction", "1.5"), ("--top-fraction", nanv),
                  ("--floor-fraction", "0.5"), ("--floor-fraction", "-1"), ("--lam", nanv), ("--power", "-inf"),
                  ("--seed", "x"), ("--per-modality",), ("--output-side", "7")]:
        cli("importance11", f"importance {' '.join(extra)}", lambda w, e=extra: [
            "importance", w / "model", "--calib", w / "text.txt", "--nsamples", "2", "--seqlen", "16", "-o",
            w / "set", *e], check=_maybe(lambda w, r: None if (w / "set" / "manifest.json").is_file() else "no set")
            if extra in (("--floor-fraction", "0.5"), ("--per-modality",), ("--output-side", "7")) else None)

    # ---- qid: tables in other encodings, orders and quotings
    rows = _qid_rows()
    body = _csv(rows)
    reordered = [list(reversed(r)) for r in rows]
    for name, content, same in [
        ("CRLF line ends", _csv(rows, newline="\r\n"), True),
        ("every cell quoted", _csv(rows, quote=True), True),
        ("columns in reverse order", _csv(reordered), True),
        ("a UTF-8 BOM", "\ufeff" + body, True),
        ("N written 1E6 (capital E)", _csv([rows[0]] + [r[:4] + ["1E6" if r[4] == "1000000" else r[4]] + r[5:]
                                                        for r in rows[1:]]), True),
        ("blank lines between rows", body.replace("\n", "\n\n"), True),
        ("UTF-16 with BOM", body.encode("utf-16"), "maybe"),
        ("semicolons for commas", _csv(rows, sep=";"), False),
        ("a NUL byte in a row (a model label)", body.replace("m0,", "m\x000,", 1), "label"),
        ("header with spaces after commas", body.replace(",", ", ", 9), "maybe"),
        ("header in capitals", body.replace(QID_HEADER, QID_HEADER.upper()), "maybe"),
        ("a duplicate qid column", body.replace("eval_text\n", "eval_text,qid\n", 1).replace(",e\n", ",e,0.5\n"),
         False),
        ("no qid column (loss columns only)", _csv([r[:8] + r[9:] for r in rows]), "maybe"),
        ("no loss columns (qid only)", _csv([r[:6] + r[8:] for r in rows]), "maybe"),
        ("numbers with a thousands comma, quoted", _csv([rows[0]] + [r[:4] + [f"{int(r[4]):,}"] + r[5:]
                                                                     for r in rows[1:]]), "maybe"),
        ("qid 'nan' on one row", _csv([rows[0], rows[1][:8] + ["nan", "e"]] + rows[2:]), False),
        ("qid 'inf' on one row", _csv([rows[0], rows[1][:8] + ["inf", "e"]] + rows[2:]), False),
        ("D 0 on one row", _csv([rows[0], rows[1][:5] + ["0"] + rows[1][6:]] + rows[2:]), False),
        ("bits 0 on one row", _csv([rows[0], rows[1][:2] + ["0"] + rows[1][3:]] + rows[2:]), False),
        ("N negative on one row", _csv([rows[0], rows[1][:4] + ["-5"] + rows[1][5:]] + rows[2:]), False),
        ("one data row only", _csv(rows[:2]), False),
        ("every row the same", _csv([rows[0]] + [rows[1]] * 12), False),
        ("a row with a missing cell", body.replace(",e\n", "\n", 1), False),
        ("a row with an extra cell", body.replace(",e\n", ",e,extra\n", 1), False),
        ("a 1 MB model name", _csv([rows[0], ["m" * 1_000_000] + rows[1][1:]] + rows[2:]), False),
    ]:
        cli("qid11", f"fit of a table with {name}", _fit(), setup=write("t.csv", content),
            check=_maybe(lambda w, r: None if json.loads(r.stdout) else "empty fit") if same == "label"
            else tri("valid" if same is True else same, fit_same_as(body)))
    for extra in [("--bootstrap", "-1"), ("--level", "0"), ("--level", "1"), ("--level", nanv), ("--level", "-0.5"),
                  ("--huber-delta", "0", "--estimator", "huber"), ("--huber-delta", "-1", "--estimator", "huber"),
                  ("--huber-delta", nanv, "--estimator", "huber"), ("--huber-delta", "1", "--estimator", "wls"),
                  ("--no-misfit", "--estimator", "huber"), ("--method", "RTN"), ("--method", ""),
                  ("--method", "nothing"), ("--law", "unified", "--by-bits"), ("--seed", "-1"),
                  ("--resample", "errors", "--bootstrap", "0"), ("--law", "d")]:
        cli("qid11", f"fit {' '.join(extra)}", lambda w, e=extra: ["qid", "fit", w / "q.csv", "--json", *e,
                                                                 *(["--bootstrap", "0"] if "--bootstrap" not in e else [])],
            check=_maybe(lambda w, r: None if json.loads(r.stdout) else "empty fit") if " ".join(extra) in FIT_MAYBE else None)
    cli("qid11", "fit -o the table itself", lambda w: ["qid", "fit", w / "q.csv", "--bootstrap", "0", "-o", w / "q.csv"])
    cli("qid11", "fit -o a directory", lambda w: ["qid", "fit", w / "q.csv", "--bootstrap", "0", "-o", w / "model"])
    for extra in [("--params", "0", "--bits", "4", "--tokens", "1e12"), ("--params", "-1", "--bits", "4", "--tokens", "1e12"),
                  ("--params", nanv, "--bits", "4", "--tokens", "1e12"), ("--params", inf, "--bits", "4", "--tokens", "1e12"),
                  ("--params", "7e9", "--bits", "0", "--tokens", "1e12"), ("--params", "7e9", "--bits", "-4", "--tokens", "1e12"),
                  ("--params", "7e9", "--bits", nanv, "--tokens", "1e12"), ("--params", "7e9", "--bits", "4", "--tokens", "0"),
                  ("--params", "7e9", "--bits", "4", "--tokens", "-1e12"), ("--params", "7e9", "--bits", "4", "--tokens", inf),
                  ("--params", "7e9", "--bits", "4", "--qid", "0"), ("--params", "7e9", "--bits", "4", "--qid", "-0.1"),
                  ("--params", "7e9", "--bits", "4", "--qid", nanv),
                  ("--params", "7e9", "--bits", "4", "--tokens", "1e12", "--qid", "0.1"),
                  ("--params", "7e9", "--bits", "4"), ("--params", "7e9", "--bits", "4", "--tokens", "1e12", "--law", ""),
                  ("--params", "7e9", "--bits", "4", "--tokens", "1e12", "--law", "q.csv"),
                  ("--params", "7e9", "--bits", "4", "--tokens", "1e12", "--method", "gptq"),
                  ("--params", "7e9", "--bits", "4", "--tokens", "1e12", "--law", "text.txt")]:
        cli("qid11", f"predict {' '.join(extra)}", lambda w, e=extra: ["qid", "predict", *e, "--json"],
            check=_maybe(lambda w, r: None if json.loads(r.stdout) else "empty prediction") if "gptq" in extra else None)
    for extra in [("--bits", ""), ("--bits", "4,,3"), ("--bits", "5"), ("--bits", "4,4"), ("--methods", ""),
                  ("--methods", "rtn,rtn"), ("--methods", "RTN"), ("--methods", "bogus"), ("--eval-tokens", "0"),
                  ("--eval-tokens", "-5"), ("--nsamples", "0"), ("--tokens-per-step", "0"), ("--tokens", "abc"),
                  ("--eval-seqlen", "0"), ("--calib-seqlen", "-1"), ("--group-size", "7"), ("--threads", "0")]:
        cli("qid11", f"measure {' '.join(extra) if extra[1] else extra[0] + ' (empty)'}", lambda w, e=extra: [
            "qid", "measure", w / "model", "--eval", w / "text.txt", "--eval-tokens", "64", "--eval-seqlen", "16",
            "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "32", "--methods", "rtn", "--bits", "4",
            "--no-progress", "-o", w / "m.csv", *e],
            check=_maybe(csv_rows_ok) if extra in (("--bits", "4,4"), ("--methods", "rtn,rtn"), ("--methods", "RTN"))
            else None)
    cli("qid11", "measure -o a CSV in UTF-16 from before", lambda w: [
        "qid", "measure", w / "model", "--eval", w / "text.txt", "--eval-tokens", "64", "--eval-seqlen", "16",
        "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "32", "--methods", "rtn", "--bits", "4",
        "--no-progress", "-o", w / "m.csv"], setup=write("m.csv", body.encode("utf-16")))
    cli("qid11", "measure -o a CSV of another header from before", lambda w: [
        "qid", "measure", w / "model", "--eval", w / "text.txt", "--eval-tokens", "64", "--eval-seqlen", "16",
        "--nsamples", "2", "--calib-seqlen", "16", "--group-size", "32", "--methods", "rtn", "--bits", "4",
        "--no-progress", "-o", w / "m.csv"], setup=write("m.csv", "a,b,c\n1,2,3\n"))

    # ---- demo options
    for extra in [("--train-seconds", "-1"), ("--train-seconds", nanv), ("--seqlen", "0"), ("--nsamples", "0"),
                  ("--threads", "-1"), ("--format", "GPTQ"), ("--seed", "x"), ("--model", ""), ("--data", "")]:
        cli("demo11", f"demo {' '.join(extra)}", lambda w, e=extra: [
            "demo", "--model", w / "model", "--data", w / "text.txt", "--seqlen", "16", "--nsamples", "2", "-o",
            w / "out", *e])

    # ---- resume after the inputs changed between runs
    def resume(name, *then, extra=(), check=None):
        add("resume", f"r11 {name}", lambda w, e=extra: run_cli(
            "calibrate", w / "model", "--calib", w / "text.txt", *GPTQ, "--low-memory", "--resume", *e, "-o",
            w / "out"), stopped(*then), check=check)

    resume("text.txt rewritten with CRLF between runs (words the same)",
           lambda w: (w / "text.txt").write_bytes((w / "text.txt").read_bytes().replace(b" ", b"\r\n")),
           check=_maybe(_resumed_matches_fresh))
    resume("text.txt appended to between runs", lambda w: (w / "text.txt").write_text(
        (w / "text.txt").read_text() + " w1 w2 w3"), check=_maybe(_resumed_matches_fresh))
    resume("config rms_norm_eps changed between runs", json_edit("model/config.json",
                                                                 lambda d: d.update(rms_norm_eps=0.5)),
           check=_maybe(_resumed_matches_fresh))
    resume("tokenizer swapped for the 96-symbol one between runs", lambda w: _swap_printable(w),
           check=_maybe(_resumed_matches_fresh))
    resume("model.safetensors re-saved, same tensors (bytes differ in metadata)", st_edit(
        "model/model.safetensors", lambda s: None), check=_maybe(_resumed_matches_fresh))
    resume("--seed 1 given at resume", extra=("--seed", "1"), check=_maybe(_fresh_with("--seed", "1")))
    resume("--dtype bfloat16 given at resume", extra=("--dtype", "bfloat16"))
    resume("--damp 0.1 given at resume", extra=("--damp", "0.1"))
    resume("--method tlq given at resume", extra=("--method", "tlq"))
    resume("--format gptq given at resume (export only)", extra=("--format", "gptq"),
           check=_maybe(_fresh_with("--format", "gptq")))
    resume("out.partial/state.json made 'null'", write("out.partial/state.json", "null"))
    resume("out.partial/state.json with a UTF-8 BOM", lambda w: (w / "out.partial" / "state.json").write_text(
        "\ufeff" + (w / "out.partial" / "state.json").read_text()), check=_maybe(_resumed_matches_fresh))
    resume("an unknown file added to out.partial", write("out.partial/notes.txt", "mine"),
           check=_maybe(_resumed_matches_fresh))
    resume("out.partial is a symlink to a moved work area", lambda w: (
        (w / "out.partial").rename(w / "elsewhere"), (w / "out.partial").symlink_to(w / "elsewhere")),
        check=_maybe(_resumed_matches_fresh))
    resume("out/ created empty beside out.partial", lambda w: (w / "out").mkdir(), check=_maybe(_resumed_matches_fresh))

    # ---- the Python API: every keyword with wrong types, case, None; valid spellings checked
    import numpy as np

    for name, kw in [
        ("bits=np.int64(4) equals bits=4", dict(bits=np.int64(4))),
        ("group_size=np.int32(32) equals 32", dict(group_size=np.int32(32))),
        ("nsamples=np.int64(2) equals 2", dict(nsamples=np.int64(2))),
        ("model=Path equals model=str", dict(model="PATH")),
        ("data=Path equals data=str", dict(data="DPATH")),
        ("output_dir relative equals absolute", dict(output_dir="out")),
        ("method=None with format=None (the defaults) for rtn", dict(format=None)),
        ("reload=False gives the same files", dict(reload=False)),
        ("dtype='float32' equals the default for a float32 model", dict(dtype="float32")),
        ("seed=np.int64(0) equals seed=0", dict(seed=np.int64(0))),
    ]:
        api(f"quantize {name}", lambda w, kw=kw: quantize(w, **_resolve(w, kw)), check=api_same_as({}))
    for name, kw in [
        ("bits=True", dict(bits=True)), ("bits=None", dict(bits=None)), ("bits=np.float32(4)", dict(bits=np.float32(4))),
        ("group_size=-1.0", dict(group_size=-1.0)), ("group_size=np.nan", dict(group_size=float("nan"))),
        ("nsamples=None", dict(nsamples=None)), ("nsamples=-1", dict(nsamples=-1)), ("seqlen=None", dict(seqlen=None)),
        ("seqlen=0", dict(seqlen=0)), ("seqlen=np.float64(16)", dict(seqlen=np.float64(16))),
        ("damp=nan", dict(method="gptq", damp=float("nan"))), ("damp=inf", dict(method="gptq", damp=float("inf"))),
        ("damp=None", dict(method="gptq", damp=None)), ("sym=None", dict(sym=None)), ("sym='false'", dict(sym="false")),
        ("sym=0", dict(sym=0)), ("act_order='true'", dict(method="gptq", act_order="true")),
        ("static_groups=2", dict(method="gptq", static_groups=2)), ("mse='on'", dict(mse="on")),
        ("fp_target='no'", dict(method="gptq", fp_target="no")), ("cd_sweeps=1.5", dict(method="gptq", cd_sweeps=1.5)),
        ("method='Rtn'", dict(method="Rtn")), ("method=' rtn'", dict(method=" rtn")), ("method=4", dict(method=4)),
        ("method=['rtn']", dict(method=["rtn"])), ("format='Fake'", dict(format="Fake")),
        ("format='compressed_tensors'", dict(format="compressed_tensors")), ("format=None with bits=3", dict(bits=3)),
        ("format=4", dict(format=4)), ("dtype=torch.float64", dict(dtype=torch.float64)),
        ("dtype=torch.int8", dict(dtype=torch.int8)), ("dtype='Float16'", dict(dtype="Float16")),
        ("dtype=16", dict(dtype=16)), ("device=torch.device('meta')", dict(device=torch.device("meta"))),
        ("device='cpu:0'", dict(device="cpu:0")), ("device=None", dict(device=None)),
        ("part=None", dict(part=None)), ("part='ALL'", dict(part="ALL")), ("smooth=None", dict(smooth=None)),
        ("smooth='uniform' without act_bits", dict(smooth="uniform")), ("act_bits=4 with bits=8", dict(act_bits=4, bits=8)),
        ("act_bits=True", dict(act_bits=True)), ("expert_tokens='MIX'", dict(expert_tokens="MIX")),
        ("expert_tokens=1", dict(expert_tokens=1)), ("guidance='LINEAR'", dict(method="tlq", guidance="LINEAR")),
        ("importance={'lam': 'x'}", dict(method="tlq", importance={"lam": "x"})),
        ("importance=[]", dict(method="tlq", importance=[])), ("importance={}", dict(method="tlq", importance={})),
        ("low_memory=1", dict(low_memory=1)), ("offload_dir=5", dict(low_memory=True, offload_dir=5)),
        ("resume=True without a work area", dict(low_memory=True, resume=True)), ("resume='yes'", dict(resume="yes")),
        ("nproc=0", dict(nproc=0)), ("nproc=2.0", dict(nproc=2.0)), ("devices=[0, 1]", dict(devices=[0, 1])),
        ("dist_timeout=-1", dict(dist_timeout=-1.0)), ("dry_run='no'", dict(dry_run="no")),
        ("overwrite=None", dict(overwrite=None)), ("progress=None", dict(progress=None)),
        ("output_dir=''", dict(output_dir="")), ("output_dir=b'out'", dict(output_dir=b"out")),
        ("output_dir the model itself", dict(output_dir="MODEL")), ("data=b'w1 w2'", dict(data=b"w1 w2 w3")),
        ("data=Path of a missing file", dict(data="MISSING")), ("data=('w1 w2', 'w3 w4') (a tuple)",
                                                                dict(data=("w1 w2 w3 " * 20, "w4 w5 w6 " * 20))),
        ("data=iter of strings (a generator)", dict(data="GEN")), ("data=np.array of strings",
                                                                   dict(data=np.array(["w1 w2 w3 " * 20] * 2))),
        ("data=[None, None]", dict(data=[None, None])), ("data=[{'text': 5}]", dict(data=[{"text": 5}])),
        ("data=[{'messages': 'w1'}]", dict(data=[{"messages": "w1"}])),
        ("data=[{'image': None, 'text': 'w1'}]", dict(data=[{"image": None, "text": "w1"}])),
        ("data=['w1 \\x00 w2']", dict(data=["w1 \x00 w2 " * 20])), ("data=''", dict(data="")),
        ("data='   '", dict(data="   ")), ("calib_set='nowhere'", dict(data=None, calib_set="nowhere")),
        ("calib_set=5", dict(data=None, calib_set=5)), ("calib_set and data", dict(calib_set="text.txt")),
        ("chat_template='' (empty)", dict(chat_template="")), ("chat_template=Path missing",
                                                                dict(chat_template="MISSING")),
        ("recipe='' (empty)", dict(recipe="")), ("recipe=[]", dict(recipe=[])),
        ("recipe={'targets': 'q_proj'} (a string)", dict(recipe={"targets": "q_proj"})),
        ("recipe={'targets': []}", dict(recipe={"targets": []})),
        ("recipe={'ignore': ['re:.*']} (everything ignored)", dict(recipe={"ignore": ["re:.*"]})),
        ("recipe={'overrides': {'bits': 3}} (a dict, not a list)", dict(recipe={"overrides": {"bits": 3}})),
        ("recipe={'overrides': [{'targets': ['q_proj'], 'bits': 5}]}",
         dict(recipe={"overrides": [{"targets": ["q_proj"], "bits": 5}]})),
        ("recipe={'overrides': [{'bits': 3}]} (no targets)", dict(recipe={"overrides": [{"bits": 3}]})),
        ("recipe={'targets': ['re:[']} (a broken regex)", dict(recipe={"targets": ["re:["]})),
        ("recipe=Recipe(targets='q_proj')", dict(recipe="RECIPE_STR")),
        ("recipe=Override(...) (not a Recipe)", dict(recipe="OVERRIDE")),
        ("recipe Override bits='4'", dict(recipe="OVERRIDE_BITS")),
        ("push_to_hub=True", dict(push_to_hub=True)), ("private=True without push_to_hub", dict(private=True)),
        ("tokenizer_or_processor=the tokenizer's folder path", dict(tokenizer_or_processor="TOKPATH")),
        ("model=a loaded model's state_dict", dict(model="STATE")), ("model=torch.nn.Linear", dict(model="LINEAR")),
        ("model=Path of the ct export", dict(model="CT")), ("model=' model' (a leading space)", dict(model=" model")),
        ("two keywords misspelt (grup_size, bitz)", dict(grup_size=32, bitz=4)),
        ("keyword 'Bits' (capital)", dict(Bits=4)), ("keyword 'output' (CLI's name)", dict(output="x")),
        ("keyword 'calib' (CLI's name)", dict(calib="text.txt")),
    ]:
        api(f"quantize {name}", lambda w, kw=kw: quantize(w, **_resolve(w, kw)),
            check=_maybe(returned_ok) if name in API_MAYBE else _maybe(export_ok()) if name in STREAMED else _maybe(
                quantized_where(lambda m: m.endswith("q_proj"), "the q_proj ones")) if name in ONE_TARGET else None)
    for name, path_of, kw in [
        ("path=None", lambda w: None, {}), ("path=5", lambda w: 5, {}), ("path=''", lambda w: "", {}),
        ("path=b'ct'", lambda w: bytes(w / "ct"), {}), ("path of the plain model", lambda w: w / "model", {}),
        ("path of text.txt", lambda w: w / "text.txt", {}), ("path of a missing folder", lambda w: w / "gone", {}),
        ("path of an empty folder", lambda w: w / "empty", {}),
        ("path of a set", lambda w: w / "set", {}),
        ("dtype='fp16'", lambda w: w / "ct", dict(dtype="fp16")), ("dtype='FLOAT16'", lambda w: w / "ct", dict(dtype="FLOAT16")),
        ("dtype=torch.float64", lambda w: w / "ct", dict(dtype=torch.float64)),
        ("dtype=torch.int8", lambda w: w / "ct", dict(dtype=torch.int8)), ("dtype=16", lambda w: w / "ct", dict(dtype=16)),
        ("dtype=''", lambda w: w / "ct", dict(dtype="")), ("device='cpu' (no such argument)", lambda w: w / "ct",
                                                           dict(device="cpu")),
        ("dtype='float32' equals ct", lambda w: w / "ct", dict(dtype="float32")),
        ("dtype='auto' equals ct", lambda w: w / "ct", dict(dtype="auto")),
        ("path a str with a trailing slash equals ct", lambda w: str(w / "ct") + "/", {}),
        ("path of the gptq export equals ct's weights", lambda w: w / "gptq", {}),
    ]:
        if " equals " in name:
            check = valid(_loads_as_ct)
        elif name in ("dtype='fp16'", "dtype='FLOAT16'", "path=b'ct'", "path of the plain model"):
            check = _maybe(_module_ok)
        else:
            check = None
        api(f"load_quantized {name}", _loaded(path_of, **kw),
            setup=SETUPS.get(name), check=check)
    # a name an earlier round already ran is not run again
    return [case for case in out if case.name not in EARLIER]


SETUPS = {"path of a set": lambda w: __import__("fault_battery")._make_set(w),
          "path of an empty folder": lambda w: (w / "empty").mkdir()}


def _swap_printable(w: Path) -> None:
    from fault_battery import printable_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (w / "model" / name).unlink(missing_ok=True)
    printable_tokenizer().save_pretrained(w / "model")


def _resolve(w: Path, kw: dict) -> dict:
    """Placeholders in an API case's keywords made real in the case folder."""
    import quantkit

    kw = dict(kw)
    for key, value in list(kw.items()):
        if not isinstance(value, str):
            continue
        if value == "PATH":
            kw[key] = w / "model"
        elif value == "DPATH":
            kw[key] = w / "text.txt"
        elif value == "MISSING":
            kw[key] = w / "missing.txt"
        elif value == "MODEL":
            kw[key] = str(w / "model")
        elif value == "GEN":
            kw[key] = (s for s in ["w1 w2 w3 " * 20] * 2)
        elif value == "RECIPE_STR":
            kw[key] = quantkit.Recipe(targets="q_proj")
        elif value == "OVERRIDE":
            kw[key] = quantkit.Override(targets=("q_proj",), bits=3)
        elif value == "OVERRIDE_BITS":
            kw[key] = quantkit.Recipe(overrides=(quantkit.Override(targets=("q_proj",), bits="4"),))
        elif value == "TOKPATH":
            kw[key] = str(w / "model")
        elif value == "STATE":
            from safetensors.torch import load_file

            kw[key] = load_file(w / "model" / "model.safetensors")
        elif value == "LINEAR":
            kw[key] = torch.nn.Linear(4, 4)
        elif value == "CT":
            kw[key] = w / "ct"
        elif key == "output_dir" and value == "out":
            kw[key] = "out"
    return kw
