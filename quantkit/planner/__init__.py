"""What a calibration run will need before it runs: per rank peak device and host memory, disk and time.

plan_run(shape, settings) follows the engine's phases for every rank (TLQ's importance pass; each decoder
layer's groups: their forward passes, Hessian sums, solves; the low-memory store's reads and writes) and
adds up, per phase, the named terms that are live at once: the process itself, the model's weights, the
current layer, the activation streams (samples x seqlen x hidden, the FP-target stream beside them), one
batch's intermediate activations, the Hessian sums and their cross terms, the solver's factors, the FP
target's kept linear inputs, TLQ's stored layer inputs and block backward, the quantized codes kept in
memory. A rank's peak is its largest phase. The byte counts mirror the code (quantkit.engine,
quantkit.quant.gptq) and were checked against peak RSS on CPU (tests/test_planner.py); the constants that
are measured, not derived, are named below with how they were measured.

The model's shapes come from quantkit.planner.shape (config.json and safetensors headers, no weights);
time comes from the rates measured by benchmarks/bench_real_size.py (quantkit.planner.rates).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# the engine's own constants: samples stacked per layer pass (and per importance chunk); GPU Hessian sums move
# to float64 past FLOAT32_SUM_TOKENS tokens; logit rows of TLQ's head gradient at once
from quantkit.engine.driver import BATCH_SIZE
from quantkit.engine.hessian import FLOAT32_SUM_TOKENS, PRODUCT_ROWS
from quantkit.errors import QuantkitError
from quantkit.importance.backward import HEAD_ROWS
from quantkit.planner.rates import estimate_seconds
from quantkit.planner.shape import LayerShape, ModelShape, read_shape
from quantkit.quant.recipe import Recipe

__all__ = ["Plan", "RankPlan", "RunSettings", "Term", "check_plan", "parse_bytes", "plan_run", "read_shape"]

# Peak RSS of a calibrate process (each spawned rank is one) on a model too small to count: Python, torch 2.13
# (CPU build), transformers and quantkit imported (386-400 MiB), the tokenizer, the data and torch's first
# kernels (measured 501-515 MiB, in memory and --low-memory, 1 and 2 ranks).
PROCESS_BYTES = 500 * 2**20
# What a CUDA build adds to a process's host memory (its libraries and context): an assumption, not
# measured here (no GPU on the machine the rest was measured on); benchmarks/device_check.sh reports it.
CUDA_HOST_BYTES = 1536 * 2**20
# A CUDA build of torch maps its CUDA libraries into every process that imports it, CPU runs included (measured:
# the same calibrate process peaked at 916 and 1105 MiB in two runs with torch 2.10's CUDA build on a CPU, where
# the plan without this term said 604; CI's floors and newest releases install such builds).
CUDA_BUILD_BYTES = 450 * 2**20


@dataclass
class RunSettings:
    """The calibrate options that change what a run needs (quantkit.calibrate.budget makes them from a job)."""

    method: str = "gptq"  # its name, for the plan's text
    hessians: bool = True  # the method reads activations (GPTQ, TLQ; not RTN)
    token_weights: bool = False  # TLQ's token weights (an importance pass unless calib_set)
    fp_target: bool = False
    nsamples: int = 128
    seqlen: int = 512
    nproc: int = 1
    device: str = "cpu"
    low_memory: bool = False
    offload_dir: bool = False  # activations (and the FP target's linear inputs) on disk
    calib_set: bool = False  # TLQ's token weights come from a calibration set: no importance pass here
    bits: int = 4
    group_size: int = 128
    fmt: str | None = None
    recipe: Recipe | None = None  # per-linear bits and group sizes, and the linears left in full precision

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def uses_fp_target(self) -> bool:
        return self.hessians and self.fp_target


@dataclass
class Term:
    """A named amount of memory live at a phase's peak, and what to change to shrink it."""

    name: str
    bytes: int
    detail: str = ""
    remedy: str = ""


@dataclass
class Phase:
    """What is live at once at one moment of the run, on the compute device and on the host."""

    name: str
    device: list[Term] = field(default_factory=list)
    host: list[Term] = field(default_factory=list)

    @property
    def device_bytes(self) -> int:
        return sum(t.bytes for t in self.device)

    @property
    def host_bytes(self) -> int:
        return sum(t.bytes for t in self.host)


@dataclass
class RankPlan:
    """One rank's peaks (the phases where they happen) and its share of the samples."""

    rank: int
    samples: int
    peak_device_bytes: int
    peak_host_bytes: int
    device_phase: Phase
    host_phase: Phase

    def to_dict(self) -> dict:
        def terms(items: list[Term]) -> list[dict]:
            return [asdict(t) for t in sorted(items, key=lambda t: -t.bytes) if t.bytes]

        return {"rank": self.rank, "samples": self.samples, "peak_device_bytes": self.peak_device_bytes,
                "peak_host_bytes": self.peak_host_bytes,
                "device_peak": {"phase": self.device_phase.name, "terms": terms(self.device_phase.device)},
                "host_peak": {"phase": self.host_phase.name, "terms": terms(self.host_phase.host)}}


@dataclass
class Plan:
    """Everything plan_run says about one run."""

    shape: ModelShape
    settings: RunSettings
    ranks: list[RankPlan]
    disk: dict[str, int]
    seconds: dict
    notes: list[str]

    @property
    def peak_device_bytes(self) -> int:
        return max(r.peak_device_bytes for r in self.ranks)

    @property
    def peak_host_bytes(self) -> int:
        """Host memory of the whole run: every rank's peak (ranks share one host)."""
        return sum(r.peak_host_bytes for r in self.ranks)

    def to_dict(self) -> dict:
        return {"model": self.shape.name, "shape": self.shape.describe(), "settings": asdict(self.settings),
                "ranks": [r.to_dict() for r in self.ranks], "peak_device_bytes": self.peak_device_bytes,
                "peak_host_bytes": self.peak_host_bytes, "disk_bytes": self.disk, "time": self.seconds,
                "notes": self.notes}


def parse_bytes(text: str) -> int:
    """'24GiB', '24GB', '512MiB', '1.5TiB' or a plain number of bytes -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    stripped = text.strip().lower().replace(" ", "")
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not 0 < value * units.get(unit, 1) < 2**80:  # nan and inf fail too
        raise QuantkitError(f"cannot read {text!r} as an amount of memory; write it like 24GiB, 80GB or 512MiB")
    return int(value * units[unit])


def human(n: float) -> str:
    """Bytes in binary units, 3 significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TiB"


# ---------------------------------------------------------------- the terms


def _samples_of(rank: int, settings: RunSettings) -> int:
    """This rank's share of the samples (every nproc-th one, starting at its rank: quantkit.engine.driver.shard)."""
    return len(range(rank, settings.nsamples, settings.nproc))


def _sum_bytes(settings: RunSettings, tokens: int) -> tuple[int, int]:
    """(bytes per element of a Hessian sum, of its float32 product temporary per sample or batch)."""
    if not settings.on_gpu:
        return 8, 4  # float64 sums of per-sample float32 products
    if tokens > FLOAT32_SUM_TOKENS:
        return 8, 4
    return 4, 0  # float32 sums, one addmm per batch


def _forward_work(layer: LayerShape, shape: ModelShape, tokens: int) -> int:
    """A batch's intermediate activations at the widest point of a layer's forward: the MLP's gate, up and
    their product (3 x widest per token; measured 3.0-3.3 at widths 512-1024, torch 2.13 CPU), and its input
    upcast to float32 for the Hessian when the model is not float32."""
    per_token = 3 * layer.widest * shape.dtype_bytes
    if shape.dtype_bytes != 4:
        per_token += layer.widest * 4
    return tokens * per_token


def _batch_work(layer: LayerShape, shape: ModelShape, tokens: int) -> int:
    """A whole batch pass (the propagation): the widest point plus the layer's outputs and residuals
    (2 x hidden per token; measured 1.4-1.6)."""
    return _forward_work(layer, shape, tokens) + tokens * 2 * shape.hidden * shape.dtype_bytes


def _results_bytes(layers: list[LayerShape], settings: RunSettings) -> int:
    """Quantized codes kept in memory (LinearShape.result_bytes of every linear)."""
    return sum(lin.result_bytes(settings.group_size) for layer in layers for lin in layer.linears)


def _group_phases(layer: LayerShape, shape: ModelShape, settings: RunSettings, tokens: int, batch_tokens: int,
                  owned: set[str] | None) -> list[tuple[str, list[Term]]]:
    """Per group: the transient terms of its Hessian pass and of its solve (device)."""
    fp = settings.uses_fp_target
    element, temp = _sum_bytes(settings, tokens)
    distributed = settings.nproc > 1
    out = []
    for group in layer.groups:
        names = "/".join(lin.name.rsplit(".", 1)[-1] for lin in group)
        inputs = layer.inputs(group)
        widest_in = max(inputs)
        sums = sum(w * w for w in inputs) * element * (2 if fp else 1)
        # with ranks each linear reduces its own copy of a shared sum
        copies = sum(lin.in_features ** 2 for lin in group) * element * (2 if fp else 1) if distributed and len(group) > len(inputs) else 0
        hessian_pass = [
            Term("batch activations", _forward_work(layer, shape, batch_tokens),
                 f"{batch_tokens} tokens' intermediate activations (widest {layer.widest})",
                 "fewer samples per rank (more ranks, --nsamples) or shorter --seqlen"),
            Term("Hessian sums", sums + copies, f"{names}: {' + '.join(f'{w}^2' for w in inputs)} in "
                 f"{'float64' if element == 8 else 'float32'}{' with the FP-target cross terms' if fp else ''}",
                 "a wider device or --device cpu (a Hessian is in^2 whatever the ranks)"),
            Term("Hessian product", min(widest_in, PRODUCT_ROWS) * widest_in * temp,
                 f"{PRODUCT_ROWS} rows of one sample's float32 X^T X before they are summed"),
            # the float32 results are made over the sums' own memory (quantkit.engine.hessian), except a float64
            # sum on a GPU: its float32 Hessian is made beside it
            Term("Hessian result", widest_in * widest_in * 4 if settings.on_gpu and element == 8 else 0,
                 "one float32 Hessian made beside its float64 sum on the GPU"),
        ]
        out.append((f"{names} Hessians", hessian_pass))
        solved = [lin for lin in group if owned is None or lin.name in owned]
        if not solved:
            continue
        # one H (and C) per input, shared by the linears reading it; with ranks each linear reduced its own copy
        kept = (sum(lin.in_features ** 2 for lin in group if lin.name in owned) if distributed
                else sum(w * w for w in inputs)) * 4 * (2 if fp else 1)
        widest = max(solved, key=lambda lin: lin.in_features)
        rows = sum(lin.out_features for lin in solved if lin.in_features == widest.in_features)
        n = widest.in_features
        weights = rows * n * 4
        # GPTQ: one [in, in] factor (the reversed copy of H, factored in place) beside a weight copy, or the
        # stacked weight's work arrays (measured 3-3.5 weight sizes for gate/up stacked); the FP target's float64
        # solve: H~'s factor and the copy cholesky_solve makes of it, the right-hand side and the solution
        solver = max(n * n * 4 + weights, 7 * weights // 2)
        if fp:
            solver = max(solver, 4 * n * n * 4 + 5 * weights)
        out.append((f"{names} solve", [
            Term("Hessians", kept, f"{names}: float32 H{' and C' if fp else ''} per {'linear' if distributed else 'input'}"),
            Term("solver", solver, f"GPTQ on {rows} x {n}: the Cholesky factor of H, weight work arrays"
                 + (", the FP target's float64 solve" if fp else "")),
        ]))
    return out


def _cuda_bytes(gpu: bool) -> int:
    """What CUDA adds to a process's host memory: its libraries and context on a GPU run, its libraries alone on a
    CPU run of a CUDA build of torch."""
    import torch

    return CUDA_HOST_BYTES if gpu else CUDA_BUILD_BYTES if torch.version.cuda else 0


def _rank_plan(shape: ModelShape, settings: RunSettings, rank: int) -> RankPlan:
    samples = _samples_of(rank, settings)
    tokens = samples * settings.seqlen
    batch_tokens = min(BATCH_SIZE, samples) * settings.seqlen
    sz = shape.dtype_bytes
    gpu = settings.on_gpu
    fp = settings.uses_fp_target
    needs_h = settings.hessians
    layer = max(shape.layers, key=lambda one: (one.params, max(max(one.inputs(g)) for g in one.groups)))
    layer_bytes = layer.params * sz
    outside_bytes = shape.outside_params * sz
    process = Term("process", PROCESS_BYTES + _cuda_bytes(gpu), "Python, torch, transformers, quantkit")
    if settings.low_memory:
        model = Term("model outside the layers", outside_bytes, "embeddings, final norm, head (the skeleton)")
    else:
        model = Term("model weights", outside_bytes + shape.layer_params * sz,
                     f"the whole model in {shape.dtype} on every rank", "--low-memory (one layer at a time)")
    current = Term("current layer", layer_bytes, f"one decoder layer in {shape.dtype}")
    stream = tokens * shape.hidden * sz
    streams = Term("activations", stream * (2 if fp else 1),
                   f"{samples} samples x {settings.seqlen} tokens x {shape.hidden} in {shape.dtype}"
                   + (", the FP-target stream beside them" if fp else ""),
                   "fewer samples per rank (more ranks, --nsamples) or shorter --seqlen")
    attn_width = max((lin.in_features for g in layer.groups for lin in g if lin.in_features != shape.hidden
                      and lin.in_features != layer.widest), default=shape.hidden)
    replay = Term("replayed block outputs", tokens * (shape.hidden + attn_width) * sz if needs_h else 0,
                  "finished blocks' outputs and kept inputs, replayed in the layer's later passes")
    fp_inputs_bytes = 0
    if fp and needs_h:
        widths = sum(w for g in layer.groups for w in layer.inputs(g))
        fp_inputs_bytes = tokens * widths * sz
    fp_inputs = Term("FP-target linear inputs", 0 if settings.offload_dir else fp_inputs_bytes,
                     "every linear's FP input for this rank's tokens, kept on the host", "--offload-dir (on disk)")
    results = Term("quantized codes", 0 if settings.low_memory else _results_bytes(shape.layers, settings),
                   "every layer's codes kept in memory until the export", "--low-memory (finished layers go to disk)")
    phases: list[Phase] = []

    def add(name: str, device_terms: list[Term], host_terms: list[Term]) -> None:
        on_host = [] if gpu else device_terms  # without a GPU the device is the host
        phases.append(Phase(name, device_terms, [process, model, results, *host_terms, *on_host]))

    on_device = [Term("model outside the layers", outside_bytes, "embeddings, final norm, head")] if gpu else []
    layer_on_device = [current] if gpu or settings.low_memory else []
    fixed_device = [*on_device, *layer_on_device, streams, replay]
    if needs_h:
        owned = None
        if settings.nproc > 1:
            owned = _owned(layer, settings.nproc, rank)
        for name, terms in _group_phases(layer, shape, settings, tokens, batch_tokens, owned):
            add(name, [*fixed_device, *terms], [fp_inputs])
    else:
        add("RTN solve", [*fixed_device, Term("solver", 3 * max(lin.in_features * lin.out_features for lin in layer.linears) * 4,
                                              "the widest linear's float32 copies")], [])
    add("layer forward", [*fixed_device, Term("batch activations", _batch_work(layer, shape, batch_tokens),
                                              f"{batch_tokens} tokens' intermediate activations")], [fp_inputs])
    if settings.low_memory:  # the finished layer and the streams are written out (serialised copies)
        written = Term("serialised streams", stream * (2 if fp else 1), "the next layer's inputs written to OUTPUT.partial")
        read = Term("layer being read", layer_bytes, "a layer read from the safetensors files (mapped pages and copies)")
        add("layer written", [*fixed_device], [written, current] + ([read] if not gpu else []))
    if settings.token_weights and not settings.calib_set:
        phases.append(_importance_phase(shape, settings, layer, process, model, gpu))
    device_phase = max(phases, key=lambda p: p.device_bytes)
    host_phase = max(phases, key=lambda p: p.host_bytes)
    return RankPlan(rank, samples, device_phase.device_bytes, host_phase.host_bytes, device_phase, host_phase)


def _importance_phase(shape: ModelShape, settings: RunSettings, layer: LayerShape, process: Term, model: Term,
                      gpu: bool) -> Phase:
    """TLQ's gradient pass (quantkit.importance.gradients): every rank runs it on all samples; the forward
    keeps every layer's input (on disk under --low-memory --offload-dir), the backward recomputes one block at a time
    with autograd; under --low-memory each layer is read from the files for it (quantkit.importance.layers)."""
    sz = shape.dtype_bytes
    on_disk = settings.low_memory and settings.offload_dir
    stored = Term("stored layer inputs",
                  0 if on_disk else len(shape.layers) * settings.nsamples * settings.seqlen * shape.hidden * sz,
                  f"{len(shape.layers)} layers x {settings.nsamples} samples x {settings.seqlen} tokens x {shape.hidden}"
                  + (" (on disk: --offload-dir)" if on_disk else ""),
                  "--offload-dir (with --low-memory)" if settings.low_memory else
                  "make a calibration set first (quantkit importance --offload-dir), then calibrate --calib-set")
    chunk = min(BATCH_SIZE, settings.nsamples) * settings.seqlen
    block = Term("block backward", 2 * _batch_work(layer, shape, chunk) + HEAD_ROWS * shape.vocab * 4 * 3,
                 f"autograd through one layer for {chunk} tokens, and the head's logits in blocks of {HEAD_ROWS} rows",
                 "fewer samples or shorter --seqlen")
    outside = Term("model outside the layers", shape.outside_params * sz, "embeddings, final norm, head")
    current = Term("current layer", layer.params * sz, "one decoder layer")
    device = [stored, block, outside, current] if gpu else [stored, block]
    # under --low-memory `model` is the skeleton: the layer read from the files is held beside it
    host = [process, model] + ([] if gpu else device + ([current] if settings.low_memory else []))
    return Phase("TLQ importance pass", device, host)


def _owned(layer: LayerShape, nproc: int, rank: int) -> set[str]:
    """The linears (or row slices of them) that `rank` solves, by the engine's own plan (quantkit.engine.plan)."""
    from types import SimpleNamespace

    from quantkit.engine.plan import plan_group

    owned = set()
    for group in layer.groups:
        linears = {lin.name: SimpleNamespace(in_features=lin.in_features, out_features=lin.out_features) for lin in group}
        for name, pieces in plan_group(linears, nproc).items():
            if any(piece[0] == rank for piece in pieces):
                owned.add(name)
    return owned


# ---------------------------------------------------------------- the plan


def _disk(shape: ModelShape, settings: RunSettings) -> dict[str, int]:
    """Bytes on disk: the export, OUTPUT.partial's finished layers and streams (--low-memory), --offload-dir."""
    quantized = _results_bytes(shape.layers, settings)
    disk = {"export": shape.export_bytes(settings.bits, settings.group_size, settings.recipe, settings.method)}
    stream = settings.nsamples * settings.seqlen * shape.hidden * shape.dtype_bytes * (2 if settings.uses_fp_target else 1)
    if settings.low_memory:
        per_layer_fp = (shape.layer_params - shape.linear_params) * shape.dtype_bytes
        disk["low_memory_work"] = quantized + per_layer_fp * len(shape.layers) + 2 * stream
        disk["export_spool"] = disk["export"]  # the export is written beside the work area, then renamed
    if settings.offload_dir:
        layer = shape.layers[0]
        widths = sum(w for g in layer.groups for w in layer.inputs(g))
        disk["offload"] = stream + (settings.nsamples * settings.seqlen * widths * shape.dtype_bytes
                                    if settings.uses_fp_target else 0)
    disk["total"] = sum(disk.values())
    return disk


def plan_run(shape: ModelShape, settings: RunSettings) -> Plan:
    """Per-rank memory, disk and time of calibrating `shape` with `settings`."""
    if settings.nproc < 1 or settings.nsamples < 1 or settings.seqlen < 1:
        raise QuantkitError("--nproc, --nsamples and --seqlen must be at least 1")
    ranks = [_rank_plan(shape, settings, rank) for rank in range(min(settings.nproc, settings.nsamples))]
    notes = list(shape.notes)
    if settings.nproc > settings.nsamples:
        notes.append(f"{settings.nproc - settings.nsamples} rank(s) get no samples")
    if settings.on_gpu:
        notes.append("device bytes are tensors (torch.cuda.max_memory_allocated); the CUDA context adds ~0.5 GiB")
    seconds = estimate_seconds(shape, settings)
    return Plan(shape, settings, ranks, _disk(shape, settings), seconds, notes)


# ---------------------------------------------------------------- the check


def check_plan(plan: Plan, device_bytes: int | None, host_bytes: int | None) -> None:
    """Raise QuantkitError (one line: the biggest term and what to change) if the plan does not fit."""
    settings = plan.settings
    worst = max(plan.ranks, key=lambda r: r.peak_device_bytes)
    if device_bytes is not None and settings.on_gpu and worst.peak_device_bytes > device_bytes:
        biggest = max(worst.device_phase.device, key=lambda t: t.bytes)
        raise QuantkitError(
            f"rank {worst.rank} needs {human(worst.peak_device_bytes)} of GPU memory at its peak "
            f"({worst.device_phase.name}) but has {human(device_bytes)}; the biggest term is {biggest.name}, "
            f"{human(biggest.bytes)} ({biggest.detail}): {_remedy(biggest, settings)}")
    if host_bytes is not None and plan.peak_host_bytes > host_bytes:
        rank = max(plan.ranks, key=lambda r: r.peak_host_bytes)
        biggest = max(rank.host_phase.host, key=lambda t: t.bytes)
        every = f" on each of {len(plan.ranks)} ranks" if len(plan.ranks) > 1 else ""
        raise QuantkitError(
            f"the run needs {human(plan.peak_host_bytes)} of host memory at its peak but {human(host_bytes)} is "
            f"available; the biggest term is {biggest.name}, {human(biggest.bytes)}{every} ({biggest.detail}): "
            f"{_remedy(biggest, settings)}")


def _remedy(term: Term, settings: RunSettings) -> str:
    if term.remedy:
        return term.remedy
    if settings.nproc == 1:
        return "more ranks (--nproc), fewer samples or a shorter --seqlen"
    return "fewer samples or a shorter --seqlen"
