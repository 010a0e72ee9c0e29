"""Coverage (issue #23): every causal-LM and image-text model type of the installed transformers, as a tiny
random model, through quantkit calibrate -> export -> reload.

For each type: a tiny config from transformers' own config class (tests/helpers.py: tiny_config, or
tiny_vlm_config for image-text types), the model saved with a word-level tokenizer, `quantkit calibrate`
with GPTQ at 4 bits (per channel) on random text (helpers.run_calibration: the CLI's job, checks, loading,
engine and export), the compressed-tensors export read back by plain transformers (decompressed where transformers
reads it no other way) and its logits compared with quantkit's own reading of the export (<= 1e-3 of the
largest logit). Types with GPT-2-style Conv1D layers, which compressed-tensors' loaders do not quantize, export the
fake format instead (dense dequantized weights, read by plain transformers as an ordinary checkpoint). Each type ends as one of:

- works: the round trip holds (notes say what stayed in full precision and why);
- refused: quantkit's one-line reason (an encoder, an encoder-decoder, Conv1D layers, experts...);
- not built tiny: transformers could not build the tiny config (its own error) or load its own save back;
- failed: anything else (a bug to fix: the line says where).

Architecture classes for the targets: encoder-decoder (config.is_encoder_decoder), encoder (BERT-style
stacks), else decoder-only; among decoder-only types, mixture of experts (an expert block found),
hybrid/recurrent (state-space, convolution or other non-Linear weights kept in full precision) and
attention (the rest).

Run: `OMP_NUM_THREADS=1 python benchmarks/coverage.py --out benchmarks/results/coverage.json --doc docs/formats.md`
(types run in worker processes, restarted after a crash or a type over --timeout seconds; --types runs those types
in the order given; the JSON is rewritten after every type, with `complete` false until the last; --merge PATH: the
rows of this run replace those of an earlier JSON, and the figures cover both).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

README_START = "<!-- coverage:start -->"
README_END = "<!-- coverage:end -->"
WORD = "w1 w2"  # words of the test corpus (helpers.WORDS)
MOE_TARGETS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "llama4"]
VLM_TARGET = 12


class TooSlow(Exception):
    """A type ran over its time limit."""


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {line}"[:300]


def all_types() -> list[tuple[str, str]]:
    """(model type, "causal" or "image-text") for every type transformers maps to either head."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return ([(t, "causal") for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]
            + [(t, "image-text") for t in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)])


def classify(config, adapter) -> str:
    """encoder-decoder, moe, hybrid or attention (for a type whose adapter was derived)."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    layouts = set(adapter.layouts)
    if any(layout.experts for layout in layouts):
        return "moe"
    kept = [why for layout in layouts for _, why in layout.full_precision
            if "router" not in why and "gate of a mixture" not in why and "not called on a probe input" not in why]
    if kept:
        return "hybrid"
    return "attention"


def run_type(model_type: str, head: str, root: Path) -> dict:
    """One type through calibrate -> export -> reload; the row of the JSON."""
    import torch
    from helpers import run_calibration, save_tokenizer, tiny_config, tiny_vlm_config, write_text
    from transformers import AutoConfig

    import quantkit
    from quantkit.errors import QuantkitError
    from quantkit.models import adapter_for, auto_class_for
    from quantkit.quant import QuantSpec

    row: dict = {"type": model_type, "head": head}
    started = time.process_time()
    try:
        defaults = AutoConfig.for_model(model_type)
        with_vision = getattr(defaults, "vision_config", None) is not None
        # two layers: a dense first layer, then an expert layer (DeepSeek-style defaults keep 3 dense layers)
        mixed = {"first_k_dense_replace": 1} if hasattr(defaults, "first_k_dense_replace") else {}
        config = tiny_vlm_config(model_type) if head == "image-text" or with_vision else tiny_config(model_type, **mixed)
        auto = auto_class_for(config)
        torch.manual_seed(0)
        model = auto.from_config(config).eval()
    except (QuantkitError, TooSlow) as err:
        if isinstance(err, TooSlow):
            raise
        return {**row, "status": "refused", "why": str(err)}
    except Exception as err:  # noqa: BLE001 - transformers' own error for a config it cannot build tiny
        return {**row, "status": "not built tiny", "why": first_line(err)}
    row["class"] = "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else None
    model_dir, out = root / "model", root / "out"
    try:  # saved before adapter_for, which splits fused experts in place into a layout transformers cannot read
        model.save_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001
        return {**row, "status": "not built tiny", "why": f"save: {first_line(err)}"}
    saved = AutoConfig.from_pretrained(model_dir)
    try:  # Emu3's causal LM is saved as model_type emu3_text_model, which no Auto class of transformers maps
        auto_class_for(saved)
    except QuantkitError:
        return {**row, "status": "not built tiny", "why": f"save: transformers saves {type(model).__name__} with model_type "
                                                          f"{saved.model_type!r}, which none of its Auto classes loads back"}
    try:
        adapter = adapter_for(model)
    except QuantkitError as err:
        why = str(err)
        row["class"] = row["class"] or ("encoder" if "encoder stack" in why else
                                        "encoder-decoder" if "encoder-decoder" in why else None)
        return {**row, "status": "refused", "why": why}
    except TooSlow:
        raise
    except Exception as err:  # noqa: BLE001
        return {**row, "status": "failed", "why": f"adapter: {first_line(err)}"}
    row["class"] = classify(config, adapter)
    fp = sorted({f"{name}: {why}" for layout in set(adapter.layouts) for name, why in layout.full_precision})
    if fp:
        row["full_precision"] = fp
    try:  # transformers swaps a generic tokenizer for the type's own class (Qwen2's BPE): then a byte-level one
        text = write_text(root / "calib.txt", words=400)
        loaded = save_tokenizer(model_dir, text)
    except Exception as err:  # noqa: BLE001
        return {**row, "status": "not built tiny", "why": f"save: {first_line(err)}"}
    if not loaded(WORD)["input_ids"]:
        return {**row, "status": "not built tiny", "why": f"transformers loads the test tokenizers as "
                                                          f"{type(loaded).__name__} for this type, which reads none of "
                                                          "their words"}
    from quantkit.models.conv1d import transposed_linears

    fmt = "fake" if transposed_linears(model) else "compressed-tensors"
    dense_why = "compressed-tensors loaders quantize nn.Linear only, not Conv1D"
    try:
        try:
            report = run_calibration(str(model_dir), str(out), QuantSpec(bits=4, group_size=-1), method="gptq",
                                     calib=str(text), nsamples=2, seqlen=16, progress=False, format=fmt)
        except QuantkitError as err:
            if fmt == "fake" or "transformers cannot load a" not in str(err):
                raise
            # refused by design (the family's init reads a packed linear's weight at load): its dense export instead
            fmt, dense_why = "fake", str(err).split(": its weight init")[0]
            report = run_calibration(str(model_dir), str(out), QuantSpec(bits=4, group_size=-1), method="gptq",
                                     calib=str(text), nsamples=2, seqlen=16, progress=False, format=fmt)
    except QuantkitError as err:
        return {**row, "status": "refused", "why": str(err)}
    except TooSlow:
        raise
    except Exception as err:  # noqa: BLE001
        return {**row, "status": "failed", "why": f"calibrate: {first_line(err)}"}
    row["linears"] = sum(len(layer["linears"]) for layer in report["layers"])
    ids = torch.randint(1, 60, (1, 12), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            ours = quantkit.load_quantized(out)(input_ids=ids).logits.float()
    except Exception as err:  # noqa: BLE001
        return {**row, "status": "failed", "why": f"quantkit reload: {first_line(err)}"}
    theirs, loading = None, "compressed" if fmt == "compressed-tensors" else f"dense (fake format: {dense_why})"
    try:
        with torch.no_grad():
            theirs = auto.from_pretrained(out)(input_ids=ids).logits.float()
    except Exception as err:  # noqa: BLE001 - then transformers' decompress-on-load path
        from transformers import CompressedTensorsConfig

        loading = f"decompressed (compressed load: {first_line(err)})"
        try:
            with torch.no_grad():
                theirs = auto.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))(
                    input_ids=ids).logits.float()
        except Exception as err2:  # noqa: BLE001
            return {**row, "status": "failed", "why": f"transformers reload: {first_line(err2)}"}
    diff = float((theirs - ours).abs().max() / ours.abs().max().clamp_min(1e-12))
    row.update(loading=loading, logits_rel_diff=diff, cpu_seconds=round(time.process_time() - started, 2))
    if not diff <= 1e-3:
        return {**row, "status": "failed", "why": f"transformers' logits differ from quantkit's by {diff:.2e}"}
    return {**row, "status": "works"}


def worker(pairs: list[str], timeout: int) -> None:
    """Run `type:head` pairs, one JSON line each; exit 3 after a type over `timeout` (a fresh process goes on)."""
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    def alarm(*_) -> None:
        raise TooSlow(f"over {timeout} s")

    signal.signal(signal.SIGALRM, alarm)
    for pair in pairs:
        model_type, head = pair.rsplit(":", 1)
        signal.alarm(timeout)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                row = run_type(model_type, head, Path(tmp))
        except TooSlow as err:
            row = {"type": model_type, "head": head, "status": "failed", "why": str(err)}
        except Exception as err:  # noqa: BLE001
            row = {"type": model_type, "head": head, "status": "failed", "why": first_line(err)}
        signal.alarm(0)
        print(json.dumps(row), flush=True)
        if "over" in row.get("why", "") and row["status"] == "failed":
            sys.exit(3)  # an interrupted import can leave transformers' lazy modules broken: start afresh


def run_all(pairs: list[tuple[str, str]], timeout: int, done_row=lambda rows: None) -> list[dict]:
    """Every pair through workers, restarting after a crash or a slow type; `done_row(rows)` after each row."""
    rows: list[dict] = []
    todo = [f"{t}:{h}" for t, h in pairs]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    while todo:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", *todo, "--timeout", str(timeout)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        done = set()
        for line in proc.stdout:
            row = json.loads(line)
            rows.append(row)
            done.add(f"{row['type']}:{row['head']}")
            print(f"{row['type']:32s} {row['head']:10s} {row['status']:15s} {row.get('why', '')[:100]}", file=sys.stderr)
            done_row(rows)
        proc.wait()
        rest = [p for p in todo if p not in done]
        if rest and proc.returncode not in (0, 3):
            model_type, head = rest[0].rsplit(":", 1)
            rows.append({"type": model_type, "head": head, "status": "failed", "why": f"worker died (exit {proc.returncode})"})
            done_row(rows)
            rest = rest[1:]
        todo = rest
    return rows


DEFINITIONS = {
    "causal_types": "model types in transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "decoder_only": "causal types whose tiny model builds and whose causal-LM class is not an encoder stack (BERT-style "
                    "layers under an `encoder`) nor an encoder-decoder (config.is_encoder_decoder); the causal-LM "
                    "classes that are the decoder half of an encoder-decoder family (BartForCausalLM, TrOCRForCausalLM) "
                    "are decoder-only models and count; types that fail or are refused before their layers are "
                    "classified count too (class null)",
    "attention": "decoder-only types whose derived adapter finds no expert block and keeps no non-Linear weight "
                 "(convolution, state-space parameter) in full precision",
    "moe": "decoder-only types with an expert block", "hybrid": "the other decoder-only types (recurrent / "
                                                            "state-space / convolution kernels kept in full precision)",
    "not_built_tiny": "transformers' own config or model class fails on the tiny config (or its Auto classes cannot load "
                      "the saved model back, or its tokenizer class reads no test word): left out of every share",
}


def summary(rows: list[dict]) -> dict:
    """The figures the issue's targets name."""
    causal = [r for r in rows if r["head"] == "causal"]
    decoder_only = [r for r in causal if r.get("class") not in ("encoder", "encoder-decoder")
                    and r["status"] != "not built tiny"]
    attention = [r for r in decoder_only if r.get("class") == "attention"]
    works = [r for r in decoder_only if r["status"] == "works"]
    vlm_works = sorted(r["type"] for r in rows if r["head"] == "image-text" and r["status"] == "works")
    moe = {t: next((r["status"] if r.get("class") in ("moe", None) else f"{r['status']} without an expert layer"
                    for r in rows if r["type"] in (t, f"{t}_text") and r["head"] == "causal"), "not run")
           for t in MOE_TARGETS}
    return {
        "definitions": DEFINITIONS,
        "statuses": dict(Counter(f"{r['head']} {r['status']}" for r in rows)),
        "causal_types": len(causal),
        "not_built_tiny": sorted(r["type"] for r in causal if r["status"] == "not built tiny"),
        "encoder_or_encoder_decoder": sorted(r["type"] for r in causal if r.get("class") in ("encoder", "encoder-decoder")),
        "decoder_only_built": len(decoder_only),
        "decoder_only_works": len(works),
        "decoder_only_share": round(len(works) / max(1, len(decoder_only)), 4),
        "attention_built": len(attention),
        "attention_works": sum(r["status"] == "works" for r in attention),
        "attention_not_working": sorted(r["type"] for r in attention if r["status"] != "works"),
        "vlm_works": vlm_works,
        "vlm_works_count": len(vlm_works),
        "moe_targets": moe,
        "targets_met": {
            "every_attention_family": all(r["status"] == "works" for r in attention),
            "decoder_only_90pct": len(works) >= 0.9 * len(decoder_only),
            "vlm_12": len(vlm_works) >= VLM_TARGET,
            "moe_7": all(s == "works" for s in moe.values()),
        },
    }


def readme_table(rows: list[dict], figures: dict, total: int) -> str:
    """The support section: figures, then types by outcome, refusals grouped by reason."""
    scope = "" if len(rows) == total else f"; {len(rows)} of its {total} types run so far"
    lines = [README_START,
             f"Measured by `benchmarks/coverage.py` on transformers {transformers_version()} (tiny random models; "
             f"`benchmarks/results/coverage.json`{scope}):",
             f"{figures['decoder_only_works']} of {figures['decoder_only_built']} decoder-only causal-LM types that "
             f"build tiny work ({100 * figures['decoder_only_share']:.0f}%); {figures['attention_works']} of "
             f"{figures['attention_built']} attention-only ones; {figures['vlm_works_count']} image-text types.", ""]
    lines += ["| outcome | model types |", "|---|---|"]
    for head in ("causal", "image-text"):
        works = sorted(r["type"] for r in rows if r["head"] == head and r["status"] == "works")
        lines.append(f"| {head}: works | {', '.join(works) or '-'} |")
        reasons: dict[str, list[str]] = {}
        for r in rows:
            if r["head"] == head and r["status"] != "works":
                reason = f"{r['status']}: {shorten(r.get('why', ''), r['type'])}"
                reasons.setdefault(reason, []).append(r["type"])
        for reason, types in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            lines.append(f"| {head}: {reason.replace('|', '/')} | {', '.join(sorted(types))} |")
    lines.append(README_END)
    return "\n".join(lines)


def shorten(why: str, model_type: str) -> str:
    """A reason without the type's own name, so that types refused for one reason share a row."""
    why = why.replace(f"unsupported architecture {model_type!r}: ", "")
    for sep in (" (", "; "):
        head, _, _ = why.partition(sep)
        why = head if len(head) > 20 else why
    return why[:140]


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def write_readme(path: Path, table: str) -> None:
    text = path.read_text()
    if README_START in text:
        before, _, rest = text.partition(README_START)
        _, _, after = rest.partition(README_END)
        text = before + table + after
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--types", default=None, help="comma-separated model types, run in this order (default: every type)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per type")
    parser.add_argument("--out", default=None, help="JSON path")
    parser.add_argument("--doc", default=None, help="page whose support section to rewrite (docs/formats.md)")
    parser.add_argument("--merge", default=None, help="an earlier JSON whose rows the rows of this run replace (the "
                                                      "figures then cover both; its `runs` list gains this run)")
    parser.add_argument("--note", default="", help="what this run was (for the merged JSON's `runs` list)")
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.timeout)
        return
    from common import emit, environment

    pairs = all_types()
    total = len(pairs)
    if args.types is not None:  # "" runs none: with --merge, the figures and --doc from the earlier JSON alone
        order = {t: i for i, t in enumerate(args.types.split(","))}
        pairs = sorted((p for p in pairs if p[0] in order), key=lambda p: order[p[0]])
    started = time.time()
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else {"types": [], "runs": []}

    def merged(rows: list[dict]) -> list[dict]:
        new = {(r["type"], r["head"]): r for r in rows}
        kept = [new.pop((r["type"], r["head"]), r) for r in earlier["types"]]
        return kept + list(new.values())

    def result(rows: list[dict]) -> dict:
        every = merged(rows)
        run = {"what": args.note or f"{len(pairs)} (type, head) pairs", "wall_seconds": round(time.time() - started, 1)}
        return {"benchmark": "coverage", "transformers": transformers_version(), "environment": environment(),
                "complete": len(every) == total and len(rows) == len(pairs), "types_run": len(every),
                "types_installed": total, "runs": [*earlier.get("runs", []), run], "summary": summary(every),
                "types": every}

    def partial(rows: list[dict]) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result(rows), indent=2) + "\n")

    rows = run_all(pairs, args.timeout, partial)
    emit(result(rows), args.out)
    if args.doc:
        every = merged(rows)
        write_readme(Path(args.doc), readme_table(every, summary(every), total))


if __name__ == "__main__":
    main()
