"""Round 18 of the fault battery, second half (fault_round18.py holds the first and the docstring): the Python API
in odd calling contexts and other toolkits' keyword names, and MoE experts that no token reaches, top-k equal to
the expert count, shared experts and the routing variants of the tiny MoE families the tests build."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path

import torch
from fault_battery import (
    GPTQ,
    RTN,
    TEXT_IDS,
    Cases,
    _bytes_of,
    export_ok,
    faithful,
    quantize,
    run_cli,
    then,
    valid,
)
from fault_round18 import _save_moe, built, chain, tri

# ---------------------------------------------------------------- H. the API in odd calling contexts


def same_call(ref_kw: dict, rels: tuple[str, ...] = ("out",), must_take: bool = True):
    """A check: each of rels/model.safetensors equals that of a plain `quantize(**ref_kw)` made here, in the main
    thread with nothing around it."""
    def check(w: Path, result) -> str | None:
        quantize(w, **{**ref_kw, "output_dir": str(w / "ref")})
        want = _bytes_of(w / "ref" / "model.safetensors")
        for rel in rels:
            got = _bytes_of(w / rel / "model.safetensors")
            if not got or got != want:
                return f"{rel}/ differs from the plain call's export"
        return None
    check.valid = must_take
    return check


def threaded(*calls):
    """A run: each call(w) in its own thread, all at once; its values (an exception in a thread is raised here)."""
    def run(w: Path):
        box: dict = {}

        def target(i, call):
            try:
                box[i] = call(w)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                box[i] = err
        threads = [threading.Thread(target=target, args=(i, c)) for i, c in enumerate(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(len(calls)):
            if isinstance(box.get(i), BaseException):
                raise box[i]
        return [box.get(i) for i in range(len(calls))]
    return run


def within(make_context, **kw):
    def run(w: Path):
        with make_context():
            return quantize(w, **kw)
    return run


@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def grad_off():
    before = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        torch.set_grad_enabled(before)


def loaded(w: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(w / "model", **kw)


def _inference_loaded(w: Path, **kw):
    with torch.inference_mode():
        model = loaded(w)
    return quantize(w, model=model, **kw)


def _offloaded(w: Path, **kw):
    model = loaded(w, device_map="auto", max_memory={"cpu": "20KB"}, offload_folder=str(w / "offload"))
    return quantize(w, model=model, **kw)


def _cpu_offload(w: Path, **kw):
    from accelerate import cpu_offload

    model = loaded(w)
    cpu_offload(model, execution_device="cpu")
    return quantize(w, model=model, **kw)


def api_cases(out: Cases) -> None:
    add = out.add
    for method in ("rtn", "gptq", None):
        name = method or "the default (TLQ)"
        add("api18", f"quantize {name} from a thread: the main thread's bytes",
            threaded(lambda w, m=method: quantize(w, method=m)), None, same_call({"method": method}), api=True)
    add("api18", "two RTN calls at once from two threads into out/ and out2/: each the plain call's bytes",
        threaded(lambda w: quantize(w), lambda w: quantize(w, output_dir=str(w / "out2"))), None,
        same_call({}, ("out", "out2")), api=True)

    def both_own(w: Path, result) -> str | None:
        bad = same_call({"method": "gptq"})(w, result)
        if bad:
            return bad
        quantize(w, output_dir=str(w / "ref2"))
        return None if _bytes_of(w / "out2" / "model.safetensors") == _bytes_of(w / "ref2" / "model.safetensors") \
            else "out2/ (RTN) differs from the plain RTN call's"
    both_own.valid = True
    add("api18", "a GPTQ and an RTN call at once from two threads: each its own plain call's bytes",
        threaded(lambda w: quantize(w, method="gptq"), lambda w: quantize(w, output_dir=str(w / "out2"))), None,
        both_own, api=True)
    add("api18", "a refused call (group 48) from a thread: one QuantkitError",
        threaded(lambda w: quantize(w, group_size=48)), None, api=True)
    for label, context, method, kind in [
        ("inside torch.inference_mode()", torch.inference_mode, "gptq", "valid"),
        ("with torch.set_grad_enabled(False) set (not a context)", grad_off, "gptq", "valid"),
        ("with deterministic algorithms on", deterministic, "gptq", "valid"),
        ("inside torch.autocast('cpu', bfloat16)", lambda: torch.autocast("cpu", dtype=torch.bfloat16), "gptq",
         "maybe"),
        ("inside torch.autocast('cpu', bfloat16)", lambda: torch.autocast("cpu", dtype=torch.bfloat16), None, "maybe"),
        ("with float64 as torch's default dtype", lambda: default_dtype(torch.float64), "gptq", "maybe"),
        ("inside torch.device('meta')", lambda: torch.device("meta"), "rtn", "maybe"),
    ]:
        add("api18", f"quantize {method or 'default'} {label}: the plain call's bytes",
            within(context, method=method), None, tri(kind, same_call({"method": method})), api=True)
    for label, call, method, kind in [
        ("a model loaded under inference_mode, quantized (GPTQ) outside it",
         lambda w: _inference_loaded(w, method="gptq"), "gptq", "valid"),
        ("a model loaded under inference_mode, quantized (TLQ) outside it",
         lambda w: _inference_loaded(w, method=None), None, "valid"),
        ("a model loaded with device_map='cpu'", lambda w: quantize(w, model=loaded(w, device_map="cpu"),
                                                                    method="gptq"), "gptq", "valid"),
        ("a model offloaded to disk by device_map='auto' (accelerate hooks, meta weights)",
         lambda w: _offloaded(w, method="gptq"), "gptq", "maybe"),
        ("a model under accelerate.cpu_offload hooks", lambda w: _cpu_offload(w, method="gptq"), "gptq", "maybe"),
        ("a model in float16 (model.half())", lambda w: quantize(w, model=loaded(w).half(), method="gptq"), "gptq",
         "maybe"),
        ("a model loaded with dtype=torch.bfloat16", lambda w: quantize(w, model=loaded(w, dtype=torch.bfloat16),
                                                                        method="rtn"), "rtn", "maybe"),
    ]:
        add("api18", f"quantize {label}: the bytes of the call on its path", call, None,
            tri(kind, same_call({"method": method})), api=True)
    for key, value in [
        ("dataset", "text.txt"), ("scheme", "W4A16"), ("save_dir", "out"), ("wbits", 4),
        ("groupsize", 32), ("tokenizer", None), ("dampening_frac", 0.01), ("actorder", "static"),
    ]:
        add("api18", f"quantize({key}=...) (another toolkit's keyword): refused naming the nearest",
            lambda w, k=key, v=value: quantize(w, **{k: (str(w / v) if isinstance(v, str) and v in ("text.txt", "out")
                                                         else v)}), None, api=True)


# ---------------------------------------------------------------- I. mixture of experts

def _router_keys(state: dict, experts: int) -> list[str]:
    return [k for k, v in state.items() if v.dim() == 2 and v.shape[0] == experts
            and re.search(r"(gate|router)\.weight$", k)]


def _edit_state(folder: str, edit) -> callable:
    def setup(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = w / folder / "model.safetensors"
        state = load_file(path)
        edit(state)
        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    return setup


def _top1_never(experts: int = 4):
    """Routers of top-1 layers whose rows make experts 0 and 3 never chosen: rows (0, u, -u, 0) give logits
    (0, s, -s, 0), and max(s, -s) > 0 for every token with s != 0."""
    def edit(state: dict) -> None:
        assert _router_keys(state, experts), "no router weight found"
        for key in _router_keys(state, experts):
            u = state[key][1].clone()
            state[key] = torch.stack([torch.zeros_like(u), u, -u, torch.zeros_like(u)])
    return edit


def _bias_never(suffix: str, expert: int = 3):
    def edit(state: dict) -> None:
        keys = [k for k in state if k.endswith(suffix)]
        assert keys, f"no tensor ends with {suffix}"
        for key in keys:
            state[key][expert] = -1e4
    return edit


def _expert_slices(state: dict, expert: int, experts: int) -> dict:
    """Expert `expert`'s weights: the per-expert tensors (.experts.E.) and the E-th slice of fused 3-D ones."""
    out = {}
    for k, v in state.items():
        if f".experts.{expert}." in k:
            out[k] = v
        elif ".experts." in k and not re.search(r"\.experts\.\d+\.", k) and v.dim() == 3 and v.shape[0] == experts:
            out[f"{k}[{expert}]"] = v[expert]
    return out


def unrouted_rtn(model: str, never: tuple[int, ...], experts: int = 4, extra: tuple = ()):
    """A check of a GPTQ run on `model` whose experts `never` get no token: their weights (load_quantized) equal
    an RTN run's, the report marks them solved by RTN, and a routed expert is not RTN's (GPTQ ran)."""
    def check(w: Path, result) -> str | None:
        import quantkit

        bad = export_ok()(w, result)
        if bad:
            return bad
        done = run_cli("calibrate", w / model, "--calib", w / "text.txt", *RTN, *extra, "-o", w / "ref")
        if done.exit_code != 0:
            return f"the RTN reference failed: {done.output[-200:]}"
        got, ref = quantkit.load_quantized(w / "out").state_dict(), quantkit.load_quantized(w / "ref").state_dict()
        for e in range(experts):
            a, b = _expert_slices(got, e, experts), _expert_slices(ref, e, experts)
            if not a:
                return f"no weights found for expert {e}"
            same = all(torch.equal(a[k], b[k]) for k in a)
            if e in never and not same:
                return f"expert {e} (never routed) differs from the RTN run's"
            if e not in never and same:
                return f"expert {e} (routed) equals the RTN run's: GPTQ did not solve it"
        report = (w / "out" / "quantkit_report.json").read_text()
        return None if '"solved_by": "rtn"' in report else "the report marks no expert solved by rtn"
    check.valid = True
    return check


def plain_like(rel: str = "out", model: str | None = None, quantized: str | None = "default"):
    """A check: the export is a quantized copy of the model (faithful) and plain transformers loads it with
    load_quantized's logits."""
    def check(w: Path, result) -> str | None:
        from transformers import AutoModelForCausalLM

        import quantkit

        if model:
            bad = faithful(model, rel, quantized=quantized)(w, result)
            if bad:
                return bad
        a = AutoModelForCausalLM.from_pretrained(w / rel).eval()
        b = quantkit.load_quantized(w / rel).eval()
        with torch.no_grad():
            diff = (a(torch.tensor(TEXT_IDS)).logits - b(torch.tensor(TEXT_IDS)).logits).abs().max().item()
        return None if diff <= 1e-4 else f"plain transformers' logits differ from load_quantized's by {diff:.3g}"
    check.valid = True
    return check


def _no_rtn_expert(w: Path, result) -> str | None:
    report = (w / "out" / "quantkit_report.json").read_text()
    return "an expert was rounded to nearest though every token reaches it" if '"solved_by": "rtn"' in report else None


def _group(rel: str) -> tuple[str, ...]:
    """DeepSeek-V3's latent attention reads 16 inputs in kv_b_proj: group 16 there (32 elsewhere)."""
    return ("--group-size", "16") if rel.startswith("deepseek") else ()


def _moe(rel: str, *extra, method=GPTQ):
    return lambda w: run_cli("calibrate", w / rel, "--calib", w / "text.txt", *method, *_group(rel), *extra, "-o",
                             w / "out")


def moe_cases(out: Cases) -> None:
    add = out.add
    for family, fields, edit, never in [
        ("mixtral", dict(num_experts_per_tok=1), _top1_never(), (0, 3)),
        ("qwen3_moe", dict(num_experts_per_tok=1), _top1_never(), (0, 3)),
        ("qwen2_moe", dict(num_experts_per_tok=1), _top1_never(), (0, 3)),
        ("deepseek_v3", {}, _bias_never("e_score_correction_bias"), (3,)),
        ("gpt_oss", {}, _bias_never("router.bias"), (3,)),
    ]:
        rel = f"{family}_never"
        made = built(rel, _save_moe(family, **fields))
        add("moe18", f"{family}: experts {list(never)} never routed: GPTQ gives them RTN's codes, the report says so",
            _moe(rel), chain(made, _edit_state(rel, edit)), unrouted_rtn(rel, never, extra=_group(rel)))
        add("moe18", f"{family}: experts {list(never)} never routed, --expert-tokens all: none rounded to nearest",
            _moe(rel, "--expert-tokens", "all"), chain(made, _edit_state(rel, edit)),
            valid(then(faithful(rel), _no_rtn_expert)))
    for family, fields in [
        ("mixtral", dict(num_experts_per_tok=4)),
        ("qwen3_moe", dict(num_experts_per_tok=4)),
        ("qwen2_moe", dict(num_experts_per_tok=4)),
        ("olmoe", dict(num_experts_per_tok=4)),
        ("deepseek_v3", dict(num_experts_per_tok=4)),
        ("gpt_oss", dict(num_experts_per_tok=4)),
    ]:
        rel = f"{family}_all"
        add("moe18", f"{family}: top-k equal to the expert count (4 of 4): a quantized copy plain transformers "
            "loads with load_quantized's logits, no expert rounded to nearest", _moe(rel),
            built(rel, _save_moe(family, **fields)), then(plain_like(model=rel), _no_rtn_expert))
    for family, fields, label, quantized in [
        ("qwen2_moe", {}, "shared expert and its one-output gate", "shared_expert."),
        ("deepseek_v3", dict(n_shared_experts=1), "one shared expert", "shared_experts"),
        ("deepseek_v3", dict(n_group=2, topk_group=1, num_experts_per_tok=2), "group routing (2 groups, 1 kept)",
         "default"),
        ("deepseek_v3", dict(n_group=4, topk_group=2, num_experts_per_tok=2), "group routing (4 groups of 1, 2 kept)",
         "default"),
        ("deepseek_v3", dict(routed_scaling_factor=2.5), "routed_scaling_factor 2.5", "default"),
        ("qwen3_moe", dict(decoder_sparse_step=2), "decoder_sparse_step 2 (layer 0 dense)", "default"),
        ("qwen3_moe", dict(mlp_only_layers=[1]), "mlp_only_layers [1]", "default"),
        ("qwen2_moe", dict(shared_expert_intermediate_size=32), "a shared expert as wide as the experts",
         "shared_expert."),
    ]:
        rel = f"{family}_{abs(hash(label)) % 10**6}"
        add("moe18", f"{family}: {label}: a quantized copy plain transformers loads with load_quantized's logits",
            _moe(rel), built(rel, _save_moe(family, **fields)), plain_like(model=rel, quantized=quantized))
    for family, fields, label in [
        ("deepseek_v3", dict(n_group=3), "n_group 3 over 4 experts"),
        ("deepseek_v3", dict(n_group=2, topk_group=3), "topk_group 3 over n_group 2"),
        ("qwen3_moe", dict(decoder_sparse_step=0), "decoder_sparse_step 0"),
        ("mixtral", dict(num_local_experts=1, num_experts_per_tok=2), "top-2 of one expert"),
    ]:
        rel = f"{family}_bad{abs(hash(label)) % 10**6}"

        def setup(w: Path, r=rel, f=family, fl=fields) -> None:
            from helpers import MOE_FIELDS

            built(r, _save_moe(f))(w)
            cfg = json.loads((w / r / "config.json").read_text())
            cfg.update(fl)
            cfg.update({k: v for k, v in MOE_FIELDS.get(f, {}).items() if k not in cfg})
            (w / r / "config.json").write_text(json.dumps(cfg))
        add("moe18", f"bad MoE config: {family} {label}", _moe(rel), setup)
    rel = "mixtral_never_api"
    made = built(rel, _save_moe("mixtral", num_experts_per_tok=1))

    def api_never(w: Path):
        return quantize(w, model=str(w / rel), method="gptq", output_dir=str(w / "out"))
    add("moe18", "API: mixtral experts 0 and 3 never routed: RTN's codes, the report says so", api_never,
        chain(made, _edit_state(rel, _top1_never())), unrouted_rtn(rel, (0, 3)), api=True)
