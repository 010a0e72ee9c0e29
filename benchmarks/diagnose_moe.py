"""Issue #23 item 8: where quantkit's GPTQ loss gap on the trained MoE differs from llm-compressor's (one draw).

Usage:
    python benchmarks/diagnose_moe.py --seed 0 --llmc /tmp/llmc-venv/bin/python -o diag.json

One calibration draw (bench_moe's windows), one setting: quantkit GPTQ (routed expert tokens, its default) and
llm-compressor's GPTQModifier (its saved weights, as evaluated) on the same windows. Per linear (each attention
projection, each expert's gate/up/down; the router stays FP in both) it reports the relative output error
tr(dW G dW^T) / tr(W G W^T) on the FP model's inputs to it (G: their Gram matrix, routed tokens for an expert) from
the calibration windows and from the held-out windows, and the first-order term <g, dW> of the held-out loss (g: its
gradient at the FP weights). Per group (a layer's attention, a layer's experts, each expert) it reports the held-out
loss gap and KL(FP || model) of quantkit's model with that group's weights taken from llm-compressor's, and the
reverse. Whole models: loss gap, KL, prediction entropy and the loss at the temperature that minimises each model's
held-out loss (how much of a gap is the sharpness of the predictions rather than their damage). Prints one JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import LLMC_RUNNER, SETTINGS, FPReference, corpus_windows  # noqa: E402
from common import TEXT_DIR, emit, environment, run_llmc_runner  # noqa: E402


def units(model) -> list[str]:
    """Names of every quantized linear (attention projections, each expert's gate/up/down; not the router)."""
    return [name for name, module in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(module, torch.nn.Linear) and not name.endswith("mlp.gate")]


def short(name: str) -> str:
    """'model.layers.0.mlp.experts.3.up_proj' -> '0.e3.up_proj', 'model.layers.0.self_attn.q_proj' -> '0.q_proj'."""
    parts = name.split(".")
    return f"{parts[2]}.e{parts[5]}.{parts[6]}" if "experts" in parts else f"{parts[2]}.{parts[-1]}"


class Grams:
    """Gram matrices (float64) of the inputs each quantized linear receives (an expert: its routed tokens)."""

    def __init__(self, model) -> None:
        self.g: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        modules = dict(model.named_modules())
        self.hooks = [modules[name].register_forward_hook(self._hook(name)) for name in units(model)]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            self.g[name] = self.g.get(name, 0) + x.T @ x
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def grams_of(model, windows: torch.Tensor, batch: int = 16) -> Grams:
    """The Gram matrices of every unit's FP inputs on these windows."""
    grams = Grams(model)
    for i in range(0, windows.shape[0], batch):
        model(input_ids=windows[i : i + batch])
    grams.close()
    return grams


def heldout_gradient(model, windows: dict[str, torch.Tensor], batch: int = 16) -> dict[str, torch.Tensor]:
    """Gradient of the mean held-out loss per token over every corpus's tokens at the FP weights."""
    model.zero_grad()
    count = sum(w[:, 1:].numel() for w in windows.values())
    for w in windows.values():
        for i in range(0, w.shape[0], batch):
            ids = w[i : i + batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum") / count
            loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@torch.no_grad()
def sharpness(model, held: FPReference) -> dict:
    """Mean entropy of the predictions, and the loss at the temperature minimising it (of 0.95, 1, 1.05)."""
    temps = [0.95, 1.0, 1.05]
    totals = [0.0] * len(temps)
    entropy, count = 0.0, 0
    for name, w in held.windows.items():
        for k, i in enumerate(range(0, w.shape[0], held.batch)):
            ids = w[i : i + held.batch]
            logits = held.logits[name][k] if model is None else model(input_ids=ids).logits[:, :-1].float()
            flat, target = logits.reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1)
            logp = torch.log_softmax(flat, dim=-1)
            entropy += float(-(logp.exp() * logp).sum())
            for j, t in enumerate(temps):
                totals[j] += float(torch.nn.functional.cross_entropy(flat / t, target, reduction="sum"))
            count += target.numel()
    best = min(range(len(temps)), key=lambda j: totals[j])
    return {"entropy": entropy / count, "best_temperature": temps[best], "loss_at_best": totals[best] / count,
            "loss": totals[1] / count}


def summarise(result: dict) -> dict:
    """Per group (a layer's attention, a layer's experts, all attention, all experts): the summed first-order terms
    of both models and their difference, the summed relative output errors, and the held-out gap and KL moved by
    swapping the group (ours with theirs: theirs minus ours)."""
    whole = result["whole"]
    base = {"gap": whole["ours"]["gap"]["all"], "kl": whole["ours"]["kl"]["all"]}
    other = {"gap": whole["theirs"]["gap"]["all"], "kl": whole["theirs"]["kl"]["all"]}
    layers = sorted({int(u.split(".")[0]) for u in result["per_unit"]})
    groups = {"all.attn": lambda u: ".e" not in u, "all.experts": lambda u: ".e" in u}
    for i in layers:
        groups[f"{i}.attn"] = lambda u, i=i: u.split(".")[0] == str(i) and ".e" not in u
        groups[f"{i}.experts"] = lambda u, i=i: u.split(".")[0] == str(i) and ".e" in u
    out = {"gap_difference": other["gap"] - base["gap"], "kl_difference": other["kl"] - base["kl"],
           "first_order_total": {k: sum(r[f"{k}_first_order"] for r in result["per_unit"].values())
                                 for k in ("ours", "theirs")},
           "groups": {}}
    for group, member in groups.items():
        rows = [r for u, r in result["per_unit"].items() if member(u)]
        entry = {f"{k}_first_order": sum(r[f"{k}_first_order"] for r in rows) for k in ("ours", "theirs")}
        for k in ("ours", "theirs"):
            for part in ("calib", "heldout"):
                errs = [r[f"{k}_{part}_rel_err"] for r in rows if r[f"{k}_{part}_rel_err"] is not None]
                entry[f"{k}_{part}_rel_err_mean"] = sum(errs) / len(errs)
        swap = result["swaps"].get(group, {}).get("ours_with_theirs")
        if swap:
            entry["swap_gap_change"] = swap["gap"] - base["gap"]
            entry["swap_kl_change"] = swap["kl"] - base["kl"]
        back = result["swaps"].get(group, {}).get("theirs_with_ours")
        if back:
            entry["reverse_swap_gap_change"] = back["gap"] - other["gap"]
            entry["reverse_swap_kl_change"] = back["kl"] - other["kl"]
        out["groups"][group] = entry
    return out


def across(runs: list[dict]) -> dict:
    """Mean and SE over draws of the whole-model differences (llm-compressor minus quantkit) and, per group, of the
    first-order difference, the swap's changes and both models' mean relative output errors."""
    from common import mean_se

    summaries = [summarise(run) for run in runs]

    def stat(values: list[float]) -> dict:
        mean, se = mean_se(values)
        return {"mean": mean, "se": se}

    out = {key: stat([s[key] for s in summaries]) for key in ("gap_difference", "kl_difference")}
    out["first_order_difference"] = stat([s["first_order_total"]["theirs"] - s["first_order_total"]["ours"]
                                          for s in summaries])
    for label in ("ours", "theirs"):
        for metric in ("gap", "kl"):
            out[f"{label}_{metric}"] = stat([run["whole"][label][metric]["all"] for run in runs])
        out[f"{label}_entropy_change"] = stat([run["whole"][label]["entropy"] - run["whole"]["fp"]["entropy"]
                                               for run in runs])
    out["groups"] = {}
    for group in summaries[0]["groups"]:
        rows = [s["groups"][group] for s in summaries]
        entry = {"first_order_difference": stat([r["theirs_first_order"] - r["ours_first_order"] for r in rows])}
        for key in rows[0]:
            if key.endswith(("rel_err_mean", "_change")):
                entry[key] = stat([r[key] for r in rows])
        out["groups"][group] = entry
    return out


def load_into(model, state: dict[str, torch.Tensor]) -> None:
    """Copy these parameters into the model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def main() -> None:
    """Run the draw and print (and optionally write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/bench-models/moe-lm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--setting", default="W4g32", choices=list(SETTINGS))
    parser.add_argument("--llmc", default=None, help="python of a venv with llm-compressor")
    parser.add_argument("--summarise", nargs="+", default=None, help="add the summary to these finished runs' JSON "
                        "(printed as one object keyed by file) instead of running")
    parser.add_argument("--llmc-mode", default="all", choices=["all", "routed"])
    parser.add_argument("--expert-tokens", default="routed", help="quantkit's expert statistics")
    parser.add_argument("--expert-swaps", action="store_true", help="also swap each expert alone (32 more evaluations)")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    if args.summarise:
        runs = [json.loads(Path(path).read_text()) for path in args.summarise]
        emit({"benchmark": "diagnose_moe", "draws": [run["seed"] for run in runs], "across_draws": across(runs),
              "runs": [{**run, "summary": summarise(run)} for run in runs]}, args.output)
        return
    if not args.llmc:
        parser.error("--llmc is needed to run")

    from transformers import AutoTokenizer

    from quantkit.data import calibration_samples
    from quantkit.engine import calibrate_model
    from quantkit.models import load_model
    from quantkit.quant.methods import method_for
    from quantkit.quant.spec import QuantSpec

    torch.set_num_threads(1)
    started = time.process_time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    fp = load_model(args.model, dtype="float32")
    windows = corpus_windows(tokenizer, args.seqlen, args.eval_windows)
    samples = calibration_samples(str(TEXT_DIR), tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                  part="train")
    calib = torch.cat([s["input_ids"].reshape(1, -1) for s in samples])
    held = FPReference(fp, windows)
    bits, group, sym = SETTINGS[args.setting]

    ours_model = copy.deepcopy(fp)
    calibrate_model(ours_model, samples, QuantSpec(bits=bits, group_size=group, sym=sym),
                    method=method_for("gptq").with_expert_tokens(args.expert_tokens), progress=False)
    fp_state = {k: v.detach().clone() for k, v in fp.named_parameters()}
    ours = {k: v.detach().clone() for k, v in ours_model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        wanted = [{"bits": bits, "group_size": group, "sym": sym, "all_experts": args.llmc_mode == "all",
                   "ignore": ["re:.*mlp.gate$"]}]
        run_llmc_runner(args.llmc, LLMC_RUNNER, args.model, calib, torch.cat(list(windows.values()))[:1],
                        ["--settings", json.dumps(wanted), "--save", tmp])
        from safetensors.torch import load_file

        theirs = load_file(str(Path(tmp) / "setting0.safetensors"))
    names = units(fp)
    quantized = [f"{n}.weight" for n in names]
    missing = [k for k in quantized if k not in theirs]
    if missing:
        raise RuntimeError(f"llm-compressor's saved state lacks {missing[:3]}")
    # every other parameter (router, norms, embeddings) must be the FP one in both
    other_differs = sorted(k for k in fp_state if k not in quantized and
                           (not torch.equal(ours[k], fp_state[k]) or not torch.equal(theirs[k], fp_state[k])))
    theirs = {k: theirs[k].float() for k in quantized}
    ours = {k: ours[k] for k in quantized}

    theirs_model = copy.deepcopy(fp)
    load_into(theirs_model, theirs)
    whole = {}
    for label, model in (("fp", None), ("ours", ours_model), ("theirs", theirs_model)):
        entry = sharpness(model, held)
        if model is not None:
            loss, kl = held.scores(model)
            entry.update(gap={k: loss[k] - held.fp_loss[k] for k in loss}, kl=kl)
        whole[label] = entry
    del ours_model, theirs_model
    print(json.dumps({"whole": whole}), file=sys.stderr, flush=True)

    # per linear: relative output errors on FP inputs (calibration / held-out) and the first-order term
    cal_g = grams_of(fp, calib)
    held_g = grams_of(fp, torch.cat(list(windows.values())))
    grad = heldout_gradient(fp, windows)
    per_unit = {}
    for name, param in zip(names, quantized):
        w = fp_state[param].double()
        row = {"calib_tokens": cal_g.tokens.get(name, 0), "heldout_tokens": held_g.tokens.get(name, 0)}
        for label, state in (("ours", ours), ("theirs", theirs)):
            dw = state[param].double() - w
            for part, grams in (("calib", cal_g), ("heldout", held_g)):
                g = grams.g.get(name)
                row[f"{label}_{part}_rel_err"] = None if g is None else \
                    float(torch.trace(dw @ g @ dw.T) / torch.trace(w @ g @ w.T))
            row[f"{label}_first_order"] = float((grad[param].double() * dw).sum()) if param in grad else 0.0
        per_unit[short(name)] = row

    # swaps: a group's weights taken from the other model
    layers = len(fp.model.layers)
    experts, expert_swaps = fp.model.layers[0].mlp.experts.num_experts, args.expert_swaps
    groups = {"all.attn": [k for k in quantized if "self_attn" in k], "all.experts": [k for k in quantized if "experts" in k]}
    for i in range(layers):
        mine = [k for k in quantized if k.startswith(f"model.layers.{i}.")]
        groups[f"{i}.attn"] = [k for k in mine if "self_attn" in k]
        groups[f"{i}.experts"] = [k for k in mine if "experts" in k]
        for e in range(experts if expert_swaps else 0):
            groups[f"{i}.e{e}"] = [k for k in mine if f"experts.{e}." in k]
    swaps = {}
    for group, members in groups.items():
        entry = {}
        both = group.startswith("all.") or group.endswith(("attn", "experts"))
        directions = [("ours_with_theirs", ours, theirs)] + ([("theirs_with_ours", theirs, ours)] if both else [])
        for label, base, donor in directions:
            model = copy.deepcopy(fp)
            load_into(model, {k: (donor if k in members else base)[k] for k in quantized})
            loss, kl = held.scores(model)
            entry[label] = {"gap": loss["all"] - held.fp_loss["all"], "kl": kl["all"]}
            del model
        swaps[group] = entry
        print(json.dumps({group: entry}), file=sys.stderr, flush=True)

    result = {"whole": whole, "per_unit": per_unit, "swaps": swaps}
    emit({"benchmark": "diagnose_moe", "summary": summarise(result), "model": args.model, "seed": args.seed, "nsamples": args.nsamples,
          "seqlen": args.seqlen, "setting": args.setting, "llmc_mode": args.llmc_mode,
          "expert_tokens": args.expert_tokens,
          "eval_tokens_per_corpus": {k: int(w.numel()) for k, w in windows.items()},
          "other_params_differ": other_differs,
          "whole": whole, "per_unit": per_unit, "swaps": swaps,
          "cpu_seconds": round(time.process_time() - started, 1), "environment": environment()}, args.output)


if __name__ == "__main__":
    main()
