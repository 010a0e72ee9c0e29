"""The model card (README.md) every export holds: YAML front matter for the hub, then how to load it."""

from __future__ import annotations

from pathlib import Path

from quantkit.export.formats import REGISTRY
from quantkit.export.summary import loading_call, refusal

CARD = "README.md"
PART_WORDS = {"train": "its first 90%: the train part", "heldout": "its last 10%: the held-out part", "all": "all of it"}


def is_hub_id(name: str | None) -> bool:
    """True for an `owner/name` hub id that is not a local path (only those go in base_model)."""
    if not name or name.count("/") != 1 or name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_card(manifest: dict, report: dict | None, source: str | None = None, config: dict | None = None) -> str:
    """README.md for an export described by quantkit.json's `manifest`, the run's `report` and its config.json."""
    from huggingface_hub import ModelCardData

    report = report or {}
    spec = manifest.get("spec", {})
    fmt = manifest.get("format", "")
    method = report.get("method") or "unknown"
    base = report.get("model") or source
    quantization = {
        "method": method, "bits": spec.get("bits"), "group_size": spec.get("group_size"), "sym": spec.get("sym"),
        "act_order": spec.get("act_order"), "format": fmt,
        "fp_target": report.get("fp_target"), "lm_head": bool(report.get("lm_head")), "vision": bool(report.get("vision")),
    }
    act_bits = spec.get("act_bits")
    if act_bits is not None:  # inputs quantized per token too (weight-only cards read as before)
        presolve = report.get("presolve") or {}
        quantization.update(act_bits=act_bits, act_strategy="token, dynamic, symmetric",
                            smooth=presolve.get("weights", "none"))
    calibration = {"data": report.get("calib_set") or report.get("calib"), "part": report.get("part"),
                   "nsamples": report.get("nsamples"), "seqlen": report.get("seqlen"), "seed": report.get("seed")}
    data = ModelCardData(
        base_model=base if is_hub_id(base) else None, library_name="quantkit",
        tags=["quantkit", "quantized", f"{spec.get('bits')}-bit", method, fmt],
        quantization=quantization, calibration={k: v for k, v in calibration.items() if v is not None},
        **({"evaluation": report["eval"]} if isinstance(report.get("eval"), dict) else {}),
    )
    known = REGISTRY.get(fmt)
    widths = {spec.get("bits")} | {s.get("bits") for s in (manifest.get("module_specs") or {}).values()}
    extras = known.transformers_extras if known is not None else ""
    vllm = known is not None and widths <= set(known.vllm_bits)
    title = f"{Path(base).name if base else 'model'} {method.upper()} W{spec.get('bits')}" + (
        f"A{act_bits}" if act_bits is not None else "")
    group = "per channel" if spec.get("group_size") == -1 else f"group size {spec.get('group_size')}"
    lines = [
        "---", data.to_yaml(), "---", "", f"# {title}", "",
        f"{base or 'A model'} quantized by quantkit with {method} to {spec.get('bits')} bits ({group}, "
        f"{'symmetric' if spec.get('sym') else 'asymmetric'}), stored as {fmt}.",
    ]
    if act_bits is not None:
        lines.append(f"Every quantized linear's input is quantized per token to {act_bits} bits at inference (dynamic, "
                     "symmetric: compressed-tensors' input_activations), as it was during calibration.")
    overrides = manifest.get("module_specs") or {}
    if overrides:
        others = sorted({f"W{s.get('bits')} g{s.get('group_size')} {'sym' if s.get('sym') else 'asym'}"
                         for s in overrides.values()})
        lines.append(f"Mixed settings: {len(overrides)} of {len(manifest.get('quantized_modules', []))} quantized linears "
                     f"use other settings ({', '.join(others)}; each listed in quantkit.json's module_specs and "
                     "declared in the format's quantization_config).")
    if calibration["data"]:
        part = PART_WORDS.get(calibration["part"], "")
        lines.append(f"Calibration: {calibration['nsamples']} samples of {calibration['seqlen']} tokens from "
                     f"`{calibration['data']}`" + (f" ({part})" if part else "") + ".")
    elif report.get("nsamples") == 0:
        lines.append("Calibration: none (round-to-nearest reads no data).")
    if isinstance(report.get("eval"), dict):
        ev = report["eval"]
        part = PART_WORDS.get(ev.get("part"), "")
        lines.append(f"Measured: loss {ev.get('loss')} nats, perplexity {ev.get('ppl')} on `{ev.get('data')}`"
                     + (f" ({part})" if part else "") + ".")
    call = loading_call(known, manifest, '"THIS_REPO_OR_DIR"', config)
    if call is None:
        lines += ["", "## Load it", "", "```python", "import quantkit", "model = quantkit.load_quantized(\"DIR\")", "```",
                  f"Note: {refusal(known, manifest)}."]
    else:
        imports = call.split(".", 1)[0] + (", CompressedTensorsConfig" if "CompressedTensorsConfig(" in call else "")
        lines += ["", "## Load it", "", "```python", f"from transformers import {imports}", f"model = {call}", "```"]
    if extras and call is not None:
        lines.append(f"transformers needs `pip install {extras}` for this format.")
    if vllm:
        lines += ["", "```bash", "vllm serve THIS_REPO_OR_DIR", "```"]
    lines += ["", "With quantkit, from a local copy (any format, dequantized weights): `quantkit.load_quantized(DIR)`.",
              "`quantkit.json` names the quantized modules; `quantkit_report.json` holds per-layer errors and timings.", ""]
    return "\n".join(lines)
