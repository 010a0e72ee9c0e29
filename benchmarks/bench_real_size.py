"""Issue #26: time and memory of decoder layers at real shapes, quantkit beside llm-compressor, on CPU.

Shapes (random weights, float32; the vocabulary is cut to 4096 because the embeddings and head are not a
layer's cost; the head's share of TLQ's backward is modelled apart in the extrapolation):
  llama-1b   Llama-3.2-1B's layer: hidden 2048, MLP 8192, 32 heads of 64, 8 KV heads
  llama-3b   Llama-3.2-3B's layer: hidden 3072, MLP 8192, 24 heads of 128, 8 KV heads (a third width for the fit)
  llama-8b   Llama-3.1-8B's layer: hidden 4096, MLP 14336, 32 heads of 128, 8 KV heads
  qwen3-moe  a Qwen3-30B-A3B-like layer: hidden 2048, E experts of MLP 768 (top 8), 32 heads of 128, 4 KV heads

Every (shape, tool, method) runs in a fresh process, one at a time, quantkit and llm-compressor interleaved
per shape so that load from other processes on the machine falls on both alike. Each process reports per
layer the wall and CPU (process) seconds of each phase:
  capture   the layer's forward passes that feed the Hessians, the FP-target stream and the propagation
  hessian   summing X^T X (and the FP-target cross term) and normalising it
  solve     GPTQ (and the FP-target transform), or RTN
  stats     the per-linear error report (tr(D H D^T), tr(W H W^T))
  backward  TLQ's importance pass (block-wise backward over the whole model), per layer
  other     the rest of the run (the engine's bookkeeping, layer 0's input capture)
and the solves one by one (rows, columns, seconds), which the fits use. llm-compressor's GPTQModifier runs
with the same settings (W4 g128 sym, act-order static, block 128, damp 0.01) on the same token windows; its
phases are its accumulate_hessian and quantize_weight, the rest of oneshot counted as capture and other.

The MoE layer runs through quantkit's engine like the dense ones (its experts split into linears, each solved on
its routed tokens, quantkit.engine.routed); llm-compressor runs its own MoE handling.

Peak memory: VmHWM of the calibrating process from after the model is loaded (the high-water mark is reset
there), and the RSS sampled every 10 ms, its highest per phase (where the peak happens), beside the sum the
issue names (the layer's weights, its largest Hessians, its activations) as quantkit.planner computes it.

Fits and extrapolation (printed in the JSON with their assumptions): capture and backward seconds per
token x layer parameter, hessian seconds per token x sum of in^2 over the solve groups, solve seconds as
a * out * in^2 + b * in^3 + c * out * in over the recorded solves; experts' time against the expert count.

    python benchmarks/bench_real_size.py [--shapes llama-1b,llama-8b,qwen3-moe] [--nsamples 4] [--seqlen 2048]
        [--methods gptq,rtn,gptq_fp,tlq] [--llmc-venv bench-out/llmc-venv] [--no-llmc] [--device cpu]
        [-o benchmarks/results/bench_real_size.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import emit, environment  # noqa: E402

VOCAB = 4096
SHAPES = {
    "tiny": {"family": "llama", "hidden": 256, "mlp": 768, "heads": 4, "kv_heads": 2, "head_dim": 64, "layers": 2},  # smoke test
    "tiny-moe": {"family": "qwen3_moe", "hidden": 256, "mlp": 768, "heads": 4, "kv_heads": 2, "head_dim": 64,
                 "layers": 1, "experts": 8, "expert_mlp": 128, "top_k": 2},  # smoke test
    "llama-1b": {"family": "llama", "hidden": 2048, "mlp": 8192, "heads": 32, "kv_heads": 8, "head_dim": 64, "layers": 2},
    "llama-3b": {"family": "llama", "hidden": 3072, "mlp": 8192, "heads": 24, "kv_heads": 8, "head_dim": 128, "layers": 1},
    "llama-8b": {"family": "llama", "hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "layers": 1},
    "qwen3-moe": {"family": "qwen3_moe", "hidden": 2048, "mlp": 6144, "heads": 32, "kv_heads": 4, "head_dim": 128,
                  "layers": 1, "experts": 128, "expert_mlp": 768, "top_k": 8},
}
PHASES = ("capture", "hessian", "solve", "stats", "backward", "other")
METHODS = {"rtn": ("rtn", False), "gptq": ("gptq", False), "gptq_fp": ("gptq", True), "tlq": ("tlq", True)}
LLMC_PACKAGES = ["torch==2.13.0", "llmcompressor==0.14.0.1"]


# ---------------------------------------------------------------- shapes


def shape_config(shape: dict, seqlen: int):
    """The transformers config of a shape (random weights are drawn from it)."""
    from transformers import AutoConfig

    common = dict(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                  num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], vocab_size=VOCAB,
                  max_position_embeddings=max(seqlen, 4096), tie_word_embeddings=False)
    if shape["family"] == "qwen3_moe":
        return AutoConfig.for_model("qwen3_moe", intermediate_size=shape["mlp"], moe_intermediate_size=shape["expert_mlp"],
                                    num_experts=shape["experts"], num_experts_per_tok=shape["top_k"], norm_topk_prob=True,
                                    decoder_sparse_step=1, mlp_only_layers=[], **common)
    return AutoConfig.for_model("llama", intermediate_size=shape["mlp"], **common)


def build(directory: Path, shape: dict, seqlen: int) -> None:
    """Save a random-weight model of `shape` (float32 safetensors) to `directory`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape_config(shape, seqlen))
    with torch.no_grad():  # transformers' init draws std 0.02: keep it, it is what trained layers look like in scale
        for module in model.modules():
            if hasattr(module, "gate_up_proj"):  # fused experts are left at zero by from_config on some versions
                for name in ("gate_up_proj", "down_proj"):
                    getattr(module, name).normal_(0, 0.02)
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)  # llm-compressor's oneshot wants a processor beside the model


def tokenizer():
    """A word-level tokenizer over VOCAB made-up words (the windows are token ids already; tools want one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def windows(nsamples: int, seqlen: int, seed: int = 0):
    """The calibration token windows both tools read: [nsamples, seqlen] random ids."""
    import torch

    return torch.randint(0, VOCAB, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- phase clock


class PhaseClock:
    """Exclusive wall and CPU seconds per phase: a nested phase's time is taken out of its parent's."""

    def __init__(self, sync=None) -> None:
        self.sync = sync  # on a GPU: wait for queued kernels, so each phase is charged its own work
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self.solves: list[dict] = []

    def now(self) -> tuple[float, float]:
        if self.sync is not None:
            self.sync()
        return time.perf_counter(), time.process_time()

    def _charge(self, entry: list, now: tuple[float, float]) -> None:
        self.wall[entry[0]] += now[0] - entry[1][0]
        self.cpu[entry[0]] += now[1] - entry[1][1]
        entry[1] = now

    @contextlib.contextmanager
    def phase(self, name: str):
        now = self.now()
        if self.stack:
            self._charge(self.stack[-1], now)
        self.stack.append([name, now])
        try:
            yield
        finally:
            now = self.now()
            self._charge(self.stack.pop(), now)
            if self.stack:
                self.stack[-1][1] = now

    def wrap(self, owner: object, attr: str, name: str, record=None) -> None:
        """Time every call of owner.attr as phase `name`; `record(args, seconds)` may log the call."""
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            started = self.now()
            with self.phase(name):
                out = original(*args, **kwargs)
            if record is not None:
                record(args, kwargs, self.now()[1] - started[1], self.now()[0] - started[0])
            return out

        setattr(owner, attr, timed)

    def watch_memory(self, every_s: float = 0.01) -> None:
        """Sample this process's RSS every `every_s` in a thread; peak_by_phase() gives each phase's highest."""
        import threading

        self.peaks: dict[str, float] = defaultdict(float)
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20

        def sample() -> None:
            with open("/proc/self/statm") as statm:
                while True:
                    statm.seek(0)
                    rss = int(statm.read().split()[1]) * page_mb
                    phase = self.stack[-1][0] if self.stack else "outside"
                    self.peaks[phase] = max(self.peaks[phase], rss)
                    time.sleep(every_s)

        threading.Thread(target=sample, daemon=True).start()

    def peak_by_phase(self, since_mb: float) -> dict:
        """Each phase's sampled peak RSS above `since_mb` (the loaded model), MiB."""
        return {phase: round(peak - since_mb, 1) for phase, peak in sorted(self.peaks.items())}

    def summary(self, layers: int) -> dict:
        return {phase: {"wall_s": round(self.wall.get(phase, 0.0) / layers, 3), "cpu_s": round(self.cpu.get(phase, 0.0) / layers, 3)}
                for phase in PHASES}


def reset_peak() -> None:
    """Restart this process's VmHWM from its current RSS (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- quantkit children


def _solve_record(clock: PhaseClock, kind: str):
    def record(args, kwargs, cpu, wall):
        if kind == "rows":  # solve_rows(solve, weights, hessian, spec, names, cross)
            out = sum(int(w.shape[0]) for w in args[1])
            inn = int(args[1][0].shape[1])
            has_h = args[2] is not None
        else:  # solve_slice(solve, weight, start, out_features, hessian, cross, spec, name)
            out, inn = int(args[1].shape[0]), int(args[1].shape[1])
            has_h = args[4] is not None
        clock.solves.append({"out": out, "in": inn, "hessian": has_h, "cpu_s": round(cpu, 4), "wall_s": round(wall, 4)})
    return record


def install_clock(clock: PhaseClock) -> None:
    """Wrap the engine's phases in the modules that call them (see the module doc): a function is wrapped under
    the name each caller's module holds, so the wrapping follows the engine when code moves between modules."""
    import quantkit.engine.layerwise as layerwise
    import quantkit.engine.solve as solve
    from quantkit.engine.hessian import HessianAccumulator

    if hasattr(layerwise, "run_layer"):
        clock.wrap(layerwise, "run_layer", "capture")
    clock.wrap(HessianAccumulator, "add", "hessian")
    clock.wrap(HessianAccumulator, "take_results", "hessian")
    for module in (layerwise, solve):
        for attr, kind in (("solve_rows", "rows"), ("solve_slice", "slice")):
            if hasattr(module, attr):
                clock.wrap(module, attr, "solve", _solve_record(clock, kind))
        if hasattr(module, "result_stats"):
            clock.wrap(module, "result_stats", "stats")


def child_quantkit(model_dir: str, method_key: str, nsamples: int, seqlen: int, device: str, dtype: str) -> dict:
    """Calibrate the model at `model_dir` with one method in this process; phases, solves and memory."""
    import torch

    from quantkit.engine import calibrate_model
    from quantkit.importance import tlq_token_weights
    from quantkit.memory import current_rss_mb, fix_mmap_threshold, peak_rss_mb
    from quantkit.models import load_model
    from quantkit.quant import QuantSpec

    torch.set_num_threads(1)
    fix_mmap_threshold()
    gpu = device.startswith("cuda")
    clock = PhaseClock(torch.cuda.synchronize if gpu else None)
    install_clock(clock)
    base_mb = current_rss_mb()
    model = load_model(model_dir, dtype=dtype)
    layers = model.config.num_hidden_layers
    samples = [{"input_ids": row.unsqueeze(0)} for row in windows(nsamples, seqlen)]
    loaded_mb = current_rss_mb()
    reset_peak()
    clock.watch_memory()
    method, fp_target = METHODS[method_key]
    started = clock.now()
    weights = None
    if method == "tlq":
        with clock.phase("backward"):
            weights = tlq_token_weights(model, samples, device=device, progress=False)
    with clock.phase("other"):
        calibration = calibrate_model(model, samples, QuantSpec(bits=4, group_size=128), method=method, device=device,
                                      token_weights=weights, progress=False, fp_target=fp_target)
    ended = clock.now()
    cuda = {"peak_cuda_mb": round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)} if gpu else {}
    return {"tool": "quantkit", "method": method_key, "layers": layers, "tokens": nsamples * seqlen, "dtype": dtype, **cuda,
            "per_layer": clock.summary(layers),
            "total_per_layer": {"wall_s": round((ended[0] - started[0]) / layers, 3), "cpu_s": round((ended[1] - started[1]) / layers, 3)},
            "solves": clock.solves, "rss_base_mb": round(base_mb, 1), "rss_loaded_mb": round(loaded_mb, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "peak_over_loaded_mb": round(peak_rss_mb() - loaded_mb, 1),
            "sampled_peak_over_loaded_mb_by_phase": clock.peak_by_phase(loaded_mb),
            "engine_hidden_states_mb": calibration.report.get("hidden_states_mb")}


# ---------------------------------------------------------------- parent


def run_child(*args: str, timeout: float | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "stderr_tail": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_llmc_venv(venv: Path) -> Path:
    """llm-compressor's own venv (it pins its own transformers): created on first use."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", LLMC_PACKAGES[0]], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *LLMC_PACKAGES[1:]], check=True)
    return python


def run_llmc(python: Path, model_dir: Path, nsamples: int, seqlen: int) -> dict:
    """llm-compressor's GPTQModifier on the same windows, in its venv (benchmarks/llmc_layer_runner.py)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "windows.safetensors"
        save_file({"calib": windows(nsamples, seqlen).contiguous()}, str(path))
        proc = subprocess.run([str(python), str(HERE / "llmc_layer_runner.py"), "--model", str(model_dir),
                               "--windows", str(path)], capture_output=True, text=True,
                              env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                   "HOME": str(Path.home())})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("LLMC_RESULT ")), None)
    if line is None:
        return {"tool": "llm-compressor", "error": (proc.stderr.strip().splitlines() or ["no output"])[-1],
                "stderr_tail": proc.stderr[-1500:]}
    return json.loads(line[len("LLMC_RESULT "):])


def layer_terms(shape: dict) -> dict:
    """Per-layer sizes the fits use: parameters, and the sum of in^2 over the solve groups."""
    d, heads, kv, hd = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    attn = d * (heads + 2 * kv) * hd + heads * hd * d
    if "experts" in shape:
        e, m, k = shape["experts"], shape["expert_mlp"], shape["top_k"]
        return {"params": attn + 3 * e * d * m, "active_params": attn + 3 * k * d * m,
                "hessian_in2_per_token": 2 * d * d + (heads * hd) ** 2 * 1 + k * (d * d + m * m)}
    mlp = 3 * d * shape["mlp"]
    linears = [(heads * hd, d), (kv * hd, d), (kv * hd, d), (d, heads * hd), (shape["mlp"], d), (shape["mlp"], d), (d, shape["mlp"])]
    return {"params": attn + mlp, "active_params": attn + mlp,
            "hessian_in2_per_token": 2 * d * d + (heads * hd) ** 2 + shape["mlp"] ** 2,
            # the error report's traces: rows summed (quantkit.engine.solve.report_rows) x in^2, per linear
            "report_units": sum(len(range(0, o, max(1, o // 512))) * i * i for o, i in linears)}


def solve_shapes(shape: dict) -> list[list[tuple[int, int]]]:
    """(out, in) of each solve of a dense layer, by group (q/k/v and gate/up stacked, as one process solves them)."""
    d, heads, kv, hd, m = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["mlp"]
    return [[((heads + 2 * kv) * hd, d)], [(d, heads * hd)], [(2 * m, d)], [(d, m)]]


def _solve_fit(solves: list[dict]) -> dict | None:
    import numpy as np

    if len(solves) < 3:
        return None
    from scipy.optimize import nnls

    a = np.array([[s["out"] * s["in"] ** 2, s["in"] ** 3, s["out"] * s["in"]] for s in solves], dtype=float)
    y = np.array([s["cpu_s"] for s in solves])
    scale = a.max(axis=0)  # columns of similar size for the solver; coefficients are non-negative (costs)
    coef = nnls(a / scale, y)[0] / scale
    pred = a @ coef
    return {"model": "cpu_s = a*out*in^2 + b*in^3 + c*out*in (non-negative least squares)", "a": float(coef[0]),
            "b": float(coef[1]), "c": float(coef[2]),
            "median_abs_rel_error": float(np.median(np.abs(pred - y) / y)), "points": len(solves)}


def fit(runs: list[dict], shapes: dict) -> dict:
    """Rates and least-squares solve-time models from quantkit's runs (see the module doc)."""
    import numpy as np

    out: dict = {}
    ok = [r for r in runs if "error" not in r and r["tool"].startswith("quantkit")]
    for method in sorted({r["method"] for r in ok}):
        mine = [r for r in ok if r["method"] == method and "experts" not in shapes[r["shape"]]]
        rates = {}
        for phase, size_key in (("capture", "active_params"), ("backward", "active_params"),
                                ("hessian", "hessian_in2_per_token"), ("stats", "report_units")):
            points = [(r["per_layer"][phase]["cpu_s"], (1 if phase == "stats" else r["tokens"])
                       * layer_terms(shapes[r["shape"]])[size_key]) for r in mine if r["per_layer"][phase]["cpu_s"] > 0]
            if points:
                per = [sec / n for sec, n in points]
                rates[phase] = {"cpu_s_per_unit": float(np.mean(per)), "spread": float(np.std(per) / np.mean(per)),
                                "unit": size_key if phase == "stats" else f"token x {size_key.replace('_per_token', '')}",
                                "points": len(points)}
        out[method] = rates
    plain = [s for r in ok if r["method"] == "gptq" and "experts" not in shapes[r["shape"]] for s in r["solves"] if s["hessian"]]
    fp = [s for r in ok if r["method"] in ("gptq_fp", "tlq") for s in r["solves"] if s["hessian"]]
    out["gptq_solve"], out["gptq_fp_solve"] = _solve_fit(plain), _solve_fit(fp)
    return out


# Whole models the fits are extrapolated to (Llama-3.1-8B and -70B), at a usual calibration set.
TARGETS = {
    "llama-3.1-8b": {"family": "llama", "hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "layers": 32},
    "llama-3.1-70b": {"family": "llama", "hidden": 8192, "mlp": 28672, "heads": 64, "kv_heads": 8, "head_dim": 128, "layers": 80},
}
TARGET_TOKENS = 128 * 2048


def extrapolate(fits: dict, ranks: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Whole-model CPU time of each method per rank count from the fitted rates, and the assumptions."""
    from types import SimpleNamespace

    from quantkit.engine.plan import plan_group

    out: dict = {"assumptions": [
        f"{TARGET_TOKENS} calibration tokens (128 x 2048), W4 g128 act-order, float32 on CPU at one thread per rank",
        "capture, Hessian sums and TLQ's backward scale with tokens x parameters (tokens x in^2 for the sums) at the "
        "rates fitted on the measured layers; with N ranks each rank runs 1/N of the tokens",
        "solves follow the fitted a*out*in^2 + b*in^3 + c*out*in, spread over the ranks as quantkit.engine.plan does "
        "(whole linears or row slices, each slice repeating the in^3 part), groups one after another",
        "not counted: the Hessian reductions between ranks (in^2 x 4 bytes per group and rank), loading the weights, "
        "the export, the embeddings and the head (TLQ's backward adds about one layer's forward for the head)",
        "GPU times are not extrapolated from CPU rates: benchmarks/device_check.sh measures them on a GPU"]}
    for name, shape in TARGETS.items():
        terms = layer_terms(shape)
        rows = {}
        for method in ("gptq", "gptq_fp", "tlq"):
            rates = fits.get(method) or {}
            solve_fit = fits.get("gptq_solve" if method == "gptq" else "gptq_fp_solve")
            if not rates or solve_fit is None:
                continue
            per_rank = {}
            for n in ranks:
                seconds = 0.0
                for phase, key in (("capture", "active_params"), ("hessian", "hessian_in2_per_token"), ("backward", "active_params")):
                    if phase in rates:
                        tokens = TARGET_TOKENS if phase == "backward" else TARGET_TOKENS / n  # TLQ's pass runs all samples on every rank
                        seconds += rates[phase]["cpu_s_per_unit"] * tokens * terms[key]
                if "stats" in rates:
                    seconds += rates["stats"]["cpu_s_per_unit"] * terms["report_units"] / n
                for group in solve_shapes(shape):
                    linears = {f"l{i}": SimpleNamespace(out_features=o, in_features=i_) for i, (o, i_) in enumerate(group)}
                    load = [0.0] * n
                    for key_, pieces in plan_group(linears, n).items():
                        lin = linears[key_]
                        for rank, start, end in pieces:
                            load[rank] += (solve_fit["a"] * (end - start) * lin.in_features ** 2
                                           + solve_fit["b"] * lin.in_features ** 3 + solve_fit["c"] * (end - start) * lin.in_features)
                    seconds += max(load)
                per_rank[str(n)] = {"per_layer_cpu_s": round(seconds, 1), "model_cpu_h": round(seconds * shape["layers"] / 3600, 2)}
            rows[method] = per_rank
        out[name] = rows
    return out


def essentials_bytes(shape: dict, method: str, tokens: int, nsamples: int) -> dict:
    """What a layer cannot do without, in float32 (the issue's sum): its weights, its largest Hessian sums (float64 on
    CPU; with the FP target their cross terms) and its activations (the stream, the FP stream beside it, one batch's
    widest intermediate activations, the FP target's kept linear inputs)."""
    terms = layer_terms(shape)
    fp = method in ("gptq_fp", "tlq")
    d, widest = shape["hidden"], shape.get("mlp", 0)
    hessians = 0 if method == "rtn" else max(d, widest) ** 2 * 8 * (2 if fp else 1)
    batch = min(16, nsamples) * (tokens // nsamples)
    activations = 0 if method == "rtn" else tokens * d * 4 * (2 if fp else 1) + batch * 3 * widest * 4
    if fp:
        activations += tokens * (2 * d + shape["heads"] * shape["head_dim"] + widest) * 4
    return {"weights": terms["params"] * 4, "hessians": hessians, "activations": activations}


def targets(runs: list[dict], shapes: dict, nsamples: int) -> dict:
    """The issue's three targets, from the runs."""
    ok: dict = {}
    for r in runs:  # the first run of each (shape, tool, method): the main run's, when results are merged
        if "error" not in r:
            ok.setdefault((r["shape"], r["tool"], r["method"]), r)
    out: dict = {}
    mine, theirs = ok.get(("llama-8b", "quantkit", "gptq")), ok.get(("llama-8b", "llm-compressor", "gptq"))
    if mine and theirs:
        ratio = mine["total_per_layer"]["cpu_s"] / theirs["total_per_layer"]["cpu_s"]
        out["gptq_vs_llm_compressor_at_4096"] = {"quantkit_cpu_s": mine["total_per_layer"]["cpu_s"],
                                                 "llm_compressor_cpu_s": theirs["total_per_layer"]["cpu_s"],
                                                 "ratio": round(ratio, 3), "target": 0.8, "met": ratio <= 0.8}
    for name in shapes:
        tlq, fp = ok.get((name, "quantkit", "tlq")), ok.get((name, "quantkit", "gptq_fp"))
        if tlq and fp:
            ratio = tlq["total_per_layer"]["cpu_s"] / fp["total_per_layer"]["cpu_s"]
            out[f"tlq_vs_gptq_fp_{name}"] = {"ratio": round(ratio, 3), "target": 2.0, "met": ratio <= 2.0}
    peaks = {}
    for (name, tool, method), r in ok.items():
        if not tool.startswith("quantkit") or "experts" in shapes[name] or "peak_over_loaded_mb" not in r:
            continue
        need = essentials_bytes(shapes[name], method, r["tokens"], r.get("nsamples") or nsamples)
        measured = r["peak_over_loaded_mb"] * 2**20 + need["weights"]  # the loaded model holds the layer's weights
        total = sum(need.values())
        peaks[f"{name} {method}"] = {"measured_mb": round(measured / 2**20), "sum_mb": round(total / 2**20),
                                     **{f"{k}_mb": round(v / 2**20) for k, v in need.items()},
                                     "ratio": round(measured / total, 3), "met": measured <= 1.2 * total}
    out["peak_vs_weights_hessians_activations"] = {"target": 1.2, "runs": peaks}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama-1b,llama-8b,qwen3-moe")
    parser.add_argument("--methods", default="gptq,rtn,gptq_fp,tlq", help="quantkit's methods ('none': llm-compressor only)")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=None, help="override the MoE shape's expert count")
    parser.add_argument("--layers", type=int, default=None, help="override every shape's layer count")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the dtype quantkit's runs load the layers in (llm-compressor's: float32)")
    parser.add_argument("--llmc-venv", default="bench-out/llmc-venv")
    parser.add_argument("--no-llmc", action="store_true")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="fit over the runs of several result files instead of running")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            build(Path(rest[0]), json.loads(rest[1]), int(rest[2]))
            print("{}")
            return
        model_dir, method, nsamples, seqlen, device, dtype = rest
        print(json.dumps(child_quantkit(model_dir, method, int(nsamples), int(seqlen), device, dtype)))
        return
    if args.merge:
        results = [json.loads(Path(path).read_text()) for path in args.merge]
        runs = [{**r, "source": path, "nsamples": r.get("nsamples", res["nsamples"])} for path, res in zip(args.merge, results)
                for r in res["runs"]]
        shapes = {}
        for res in results:
            for name, shape in res["shapes"].items():
                shapes.setdefault(name, {k: v for k, v in shape.items() if k in SHAPES.get(name, shape)})
        # runs of one shape at other expert counts are told apart by the count
        for r in runs:
            experts = results[args.merge.index(r["source"])]["shapes"][r["shape"]].get("experts")
            if experts and experts != shapes[r["shape"]]["experts"]:
                name = f"{r['shape']}-{experts}"
                shapes[name] = {**shapes[r["shape"]], "experts": experts}
                r["shape"] = name
        fits = fit(runs, shapes)
        emit({"benchmark": "real_size", "merged": args.merge, "shapes": {n: {**s, **layer_terms(s)} for n, s in shapes.items()},
              "runs": runs, "fit": fits, "extrapolation": extrapolate(fits), "targets": targets(runs, shapes, None),
              "env": environment(), "time": time.ctime()}, args.output)
        return
    shapes = {}
    for name in args.shapes.split(","):
        shape = dict(SHAPES[name])
        if args.experts and "experts" in shape:
            shape["experts"] = args.experts
        if args.layers:
            shape["layers"] = args.layers
        shapes[name] = shape
    llmc = None if args.no_llmc else ensure_llmc_venv(Path(args.llmc_venv))
    runs = []
    for name, shape in shapes.items():
        with tempfile.TemporaryDirectory(prefix="bench-real-size-") as tmp:
            model_dir = Path(tmp) / "model"
            built = run_child("build", str(model_dir), json.dumps(shape), str(args.seqlen))
            if "error" in built:
                raise SystemExit(f"building {name} failed: {built['error']}\n{built.get('stderr_tail', '')}")
            methods = [m for m in args.methods.split(",") if m != "none"]  # none: llm-compressor's run alone
            for index, method in enumerate(methods or [None]):
                if method is not None:
                    run = run_child("quantkit", str(model_dir), method, str(args.nsamples), str(args.seqlen), args.device,
                                    args.dtype)
                    runs.append({"shape": name, **run, "method": method, "tool": run.get("tool", "quantkit"),
                                 "nsamples": args.nsamples})
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "solves"}), file=sys.stderr, flush=True)
                if index == 0 and llmc is not None:  # interleaved: right after quantkit's first method
                    run = run_llmc(llmc, model_dir, args.nsamples, args.seqlen)
                    runs.append({"shape": name, **run, "method": "gptq", "tool": "llm-compressor", "nsamples": args.nsamples})
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "solves"}), file=sys.stderr, flush=True)
    fits = fit(runs, shapes)
    emit({"benchmark": "real_size", "device": args.device, "nsamples": args.nsamples, "seqlen": args.seqlen,
          "shapes": {n: {**s, **layer_terms(s)} for n, s in shapes.items()}, "runs": runs, "fit": fits,
          "extrapolation": extrapolate(fits), "targets": targets(runs, shapes, args.nsamples),
          "machine": "shared: other processes ran on the same 2 cores; CPU seconds are this process's own",
          "env": environment(), "loadavg_at_end": os.getloadavg(), "time": time.ctime()}, args.output)


if __name__ == "__main__":
    main()
