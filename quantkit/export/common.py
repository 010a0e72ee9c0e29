"""What the writer, the reader and every format share: the checkpoint's file names, a checkpoint in memory, result
checks, per-module settings and the export plan."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.spec import QuantResult
from quantkit.version import __version__

VERSION = __version__
MANIFEST = "quantkit.json"
REPORT = "quantkit_report.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# tokenizer / processor / generation files an export carries from its source model
SOURCE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
# vLLM loads these linears of a layer as one fused module (its Llama-family packed_modules_mapping), looks
# the fused name up in a GPTQ `dynamic` and needs one compressed-tensors scheme for all of them
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class Layout:
    """Where the quantized linears sit, for the quantization_config: a decoder layer's linears in solve order, the
    number of decoder layers, and the nn.Linear modules kept in full precision."""

    linear_order: tuple[str, ...] | None = None
    n_blocks: int | None = None
    fp_linears: tuple[str, ...] = ()
    # (checkpoint name, the model's name) of the linears whose names differ (DeepSeek-V4's attn.wkv is the model's
    # self_attn.kv_proj): a loader matches quantization targets against the model it builds
    model_names: tuple[tuple[str, str], ...] = ()
    # checkpoint names of the linears whose checkpoints store the weight [in, out] (GPT-2's Conv1D,
    # quantkit.models.conv1d): dense formats write them so, formats without a Conv1D loader refuse them
    transposed: tuple[str, ...] = ()

    @classmethod
    def from_manifest(cls, manifest: dict) -> Layout:
        """The layout quantkit.json recorded."""
        order = manifest.get("linear_order")
        return cls(tuple(order) if order else None, manifest.get("n_blocks"), tuple(manifest.get("fp_linears") or ()),
                   tuple(sorted((manifest.get("model_names") or {}).items())), tuple(manifest.get("transposed") or ()))


@dataclass
class Checkpoint:
    """A quantkit checkpoint in memory: FP tensors, exact quantized results and metadata."""

    config: dict  # config.json without quantization_config
    manifest: dict
    fp_tensors: dict[str, torch.Tensor]
    results: dict[str, QuantResult]
    path: Path | None = None
    layout: Layout | None = None  # None: the manifest's (a checkpoint read back)


def float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the first floating-point tensor (float32 where there is none)."""
    for t in tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def write_json(path: Path, obj: dict) -> None:
    """A checkpoint's JSON file, indented."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@dataclass(frozen=True)
class Setting:
    """The settings one quantized linear was solved with (what a format must declare per module)."""

    bits: int
    group_size: int  # -1: per-channel
    sym: bool
    act_order: bool

    @classmethod
    def of(cls, r: QuantResult) -> Setting:
        """The setting of one result."""
        return cls(bits=r.bits, group_size=r.group_size, sym=r.sym, act_order=r.act_order)

    @classmethod
    def from_dict(cls, d: dict) -> Setting:
        """A setting from its to_dict form (KeyError/TypeError/ValueError on a malformed one)."""
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]), sym=bool(d["sym"]),
                   act_order=bool(d.get("act_order", False)))

    def to_dict(self) -> dict:
        """Plain-dict form for quantkit.json."""
        return asdict(self)


@dataclass(frozen=True)
class ExportPlan:
    """What a format's quantization_config describes: each quantized linear's setting, the FP linears and
    the solver settings that go into the config."""

    settings: dict[str, Setting]  # every quantized linear
    fp_linears: tuple[str, ...] = ()  # nn.Linear modules kept in full precision
    permuted: frozenset[str] = frozenset()  # linears whose g_idx is not the trivial column // group_size
    damp: float = 0.01
    static_groups: bool = False
    linear_order: tuple[str, ...] | None = None  # a decoder layer's linears in solve order
    n_blocks: int | None = None
    act_bits: int | None = None  # per-token dynamic activation bits of every quantized linear's input (W8A8)
    model_names: tuple[tuple[str, str], ...] = ()  # Layout.model_names
    groups: tuple[tuple[Setting, tuple[str, ...]], ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.settings:
            raise QuantkitError("no quantized modules given; quantize the model before exporting it")
        names = sorted(self.settings)
        # most common setting first (ties: the one met first in name order), then by count
        counts = Counter(self.settings[n] for n in names)
        groups = tuple((s, tuple(n for n in names if self.settings[n] == s)) for s, _ in counts.most_common())
        object.__setattr__(self, "groups", groups)

    @property
    def base(self) -> Setting:
        """The most common setting: a format's top-level one, the others are overrides."""
        return self.groups[0][0]

    @property
    def mixed(self) -> bool:
        """Whether the linears do not all share one setting."""
        return len(self.groups) > 1

    def overrides(self) -> dict[str, Setting]:
        """The linears whose setting is not the base one."""
        return {n: s for n, s in sorted(self.settings.items()) if s != self.base}

    def spec(self) -> dict:
        """quantkit.json's spec: the base setting and the solver settings (and the activation bits, if any)."""
        spec = {**self.base.to_dict(), "damp": self.damp, "static_groups": self.static_groups}
        return spec if self.act_bits is None else {**spec, "act_bits": self.act_bits}


def build_plan(results: dict[str, QuantResult], *, fp_linears=(), damp: float = 0.01, static_groups: bool = False,
               linear_order=None, n_blocks: int | None = None, act_bits: int | None = None,
               model_names: tuple[tuple[str, str], ...] = ()) -> ExportPlan:
    """The ExportPlan of `results` (full results or metadata stubs that keep g_idx)."""
    permuted = frozenset(n for n, r in results.items() if is_permuted(r))
    return ExportPlan(
        settings={n: Setting.of(r) for n, r in results.items()}, fp_linears=tuple(sorted(fp_linears or ())),
        permuted=permuted, damp=damp, static_groups=static_groups,
        linear_order=tuple(linear_order) if linear_order else None, n_blocks=n_blocks, act_bits=act_bits,
        model_names=tuple(model_names),
    )


def manifest_settings(manifest: dict, where: Path) -> dict[str, Setting]:
    """Each quantized module's setting from quantkit.json: the spec, with module_specs' overrides."""
    try:
        base = Setting.from_dict(manifest["spec"] or {})
        names = list(manifest["quantized_modules"])
        overrides = {n: Setting.from_dict(d) for n, d in (manifest.get("module_specs") or {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise QuantkitError(f"{where} lacks a valid spec or module list ({err})") from err
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise QuantkitError(f"{where} gives module_specs for {unknown[0]}, which is not a quantized module")
    return {n: overrides.get(n, base) for n in names}


# what the formats store under these names, whichever format (codes and indices as integers, scales as floats)
STORED_KINDS = {"weight_packed": "integer", "qweight": "integer", "qzeros": "integer", "g_idx": "integer",
                "weight_shape": "integer", "weight_zero_point": "integer", "weight_scale": "float", "scales": "float"}


class StoredTensors:
    """A checkpoint's tensors while a format decodes them: each quantized linear takes its own."""

    def __init__(self, root: Path, tensors: dict[str, torch.Tensor], sidecar: dict[str, torch.Tensor]) -> None:
        self.root = root
        self.tensors = tensors
        self.sidecar = sidecar  # the format's side file (fake: quantkit_qparams.safetensors)

    def take(self, name: str, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Remove and return `name`'s tensors with these suffixes (the rest are FP tensors)."""
        out = {}
        for s in suffixes:
            key = f"{name}.{s}"
            if key not in self.tensors:
                raise QuantkitError(f"{self.root}: tensor {key} is missing; the checkpoint is incomplete")
            kind = STORED_KINDS.get(s)
            if kind is not None and self.tensors[key].is_floating_point() != (kind == "float"):
                raise QuantkitError(f"{self.root}: tensor {key} is stored as {self.tensors[key].dtype}, where every "
                                    f"format stores {s} as {kind}s; the export is damaged, export it again")
            out[s] = self.tensors.pop(key)
        return out


def vllm_fused(names) -> list[tuple[str, tuple[str, ...]]]:
    """(fused name, shard names) of each set of `names` that vLLM loads as one fused module."""
    present = set(names)
    out = []
    for name in sorted(present):
        parent, dot, leaf = name.rpartition(".")
        for fused, shards in VLLM_FUSED.items():
            members = tuple(parent + dot + s for s in shards)
            if leaf == shards[0] and all(m in present for m in members):
                out.append((parent + dot + fused, members))
    return out


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The g_idx of an unpermuted layout: column i belongs to group i // group_size."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def is_permuted(r: QuantResult) -> bool:
    """Whether r's groups are not consecutive columns (act-order without static groups)."""
    return not torch.equal(r.g_idx, trivial_g_idx(r.g_idx.shape[0], r.group_size))


def check_result(name: str, r: QuantResult) -> None:
    """Raise QuantkitError unless r is a well-formed QuantResult (shapes, dtypes, ranges)."""
    if r.bits not in (2, 3, 4, 8):
        raise QuantkitError(f"{name}: bits must be 2, 3, 4 or 8, got {r.bits}")
    if r.qweight.dim() != 2:
        raise QuantkitError(f"{name}: qweight must be 2-D [out, in], got shape {tuple(r.qweight.shape)}")
    out_f, in_f = r.qweight.shape
    n_groups = 1 if r.group_size == -1 else in_f // r.group_size if r.group_size > 0 else 0
    if r.group_size != -1 and (r.group_size <= 0 or in_f % r.group_size):
        raise QuantkitError(f"{name}: group size {r.group_size} does not divide the input width {in_f}")
    expect = {
        "qweight": ((out_f, in_f), torch.uint8),
        "scales": ((out_f, n_groups), torch.float32),
        "zeros": ((out_f, n_groups), torch.uint8),
        "g_idx": ((in_f,), torch.int32),
    }
    for part, (shape, dtype) in expect.items():
        t = getattr(r, part)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise QuantkitError(
                f"{name}: {part} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}"
            )
    maxq = (1 << r.bits) - 1
    if int(r.qweight.max()) > maxq or int(r.zeros.max()) > maxq:
        raise QuantkitError(f"{name}: codes or zeros exceed the {r.bits}-bit range 0..{maxq}")
    if r.g_idx.numel() and (int(r.g_idx.min()) < 0 or int(r.g_idx.max()) >= n_groups):
        raise QuantkitError(f"{name}: g_idx values must lie in 0..{n_groups - 1}")
    if not torch.equal(r.scales.to(torch.float16).float(), r.scales):
        raise QuantkitError(f"{name}: scales are not exactly representable in float16")
    if r.sym and not bool((r.zeros == (1 << (r.bits - 1))).all()):
        raise QuantkitError(f"{name}: a symmetric result must have every zero equal to {1 << (r.bits - 1)}")
