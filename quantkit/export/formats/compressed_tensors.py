"""compressed-tensors "pack-quantized" checkpoints (what llm-compressor writes; transformers and vLLM load them).

Per linear: weight_packed int32 [out, ceil(in*bits/32)] (signed codes + 2**(bits-1), one dense bit
stream along the input dim, the last word padded), weight_scale [out, n_groups] in the model dtype,
weight_shape int [2], and for asymmetric weights weight_zero_point int32 [ceil(out*bits/32), n_groups]
(signed zero points packed along the output dim). compressed-tensors' grid is signed,
q_ct = q - 2**(bits-1), zp_ct = z - 2**(bits-1), so (q_ct - zp_ct) * s is our weight exactly;
symmetric schemes store no zero point (it is 0, i.e. our 2**(bits-1)). An export whose packed linears mix
symmetric and asymmetric ones stores every one asymmetric, the symmetric ones with zero points of 0: the same weights
(compressed-tensors' integer range depends on the type and bits only, and (q_ct - 0) * s is q_ct * s), declared by
one scheme per width and group size, which transformers loads where it fails on the mix (5.25: it decompresses an
asymmetric export with one config group's scheme for every linear). quantkit.json keeps them symmetric.

With activation bits (W8A8, W4A8) every scheme declares input_activations (int, symmetric, strategy
"token", dynamic), and 8-bit weights go "int-quantized" as vLLM's int8 W8A8 path reads them: weight
int8 [out, in] (our codes minus 128) and weight_scale [out, 1]; 4-bit weights stay pack-quantized.

quantization_config is built from compressed-tensors' own models (QuantizationArgs ->
QuantizationScheme per config group -> QuantizationConfig), so the installed version validates
it: one config group per distinct setting. With one setting the group targets "Linear"; with
several, each group names its linears ("re:" patterns where a group holds a linear of every
decoder layer, exact names otherwise). FP linears are listed in `ignore`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import torch

from quantkit.errors import QuantkitError
from quantkit.export.common import ExportPlan, Setting, StoredTensors, trivial_g_idx, vllm_fused
from quantkit.export.formats.base import Format
from quantkit.export.packing import pack_codes, unpack_codes
from quantkit.quant.spec import QuantResult

logger = logging.getLogger(__name__)

PACKED = "pack-quantized"
# W8A8 (8-bit weights, quantized inputs): int8 weights unpacked, as vLLM's int8 W8A8 path reads them
INT = "int-quantized"


def encode(r: QuantResult, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one linear (without the module-name prefix)."""
    out = {
        "weight_packed": pack_codes(r.qweight, r.bits, dim=1, whole_words=False),
        "weight_scale": r.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(list(r.qweight.shape), dtype=torch.int64),
    }
    if not r.sym:
        out["weight_zero_point"] = pack_codes(r.zeros, r.bits, dim=0, whole_words=False)
    return out


def zero_point_of_symmetric(bits: int, rows: int, groups: int) -> torch.Tensor:
    """weight_zero_point of a symmetric linear stored asymmetric: 0 on compressed-tensors' signed grid, our 2**(bits-1)."""
    return pack_codes(torch.full((rows, groups), 1 << (bits - 1), dtype=torch.uint8), bits, dim=0, whole_words=False)


def decode(t: dict[str, torch.Tensor], *, bits: int, group_size: int, sym: bool, act_order: bool) -> QuantResult:
    """Rebuild the exact QuantResult from one linear's pack-quantized tensors."""
    out_f, in_f = (int(v) for v in t["weight_shape"].tolist())
    scales = t["weight_scale"].float().contiguous()
    n_groups = scales.shape[1]
    if scales.shape[0] != out_f:
        raise QuantkitError(f"weight_scale has {scales.shape[0]} rows, weight_shape says {out_f}")
    qweight = unpack_codes(t["weight_packed"], bits, dim=1, length=in_f)
    if "weight_zero_point" in t:  # a symmetric linear's too where the export mixes both (check_result: all 0)
        zeros = unpack_codes(t["weight_zero_point"], bits, dim=0, length=out_f)
    else:
        zeros = torch.full((out_f, n_groups), 1 << (bits - 1), dtype=torch.uint8)
    return QuantResult(qweight=qweight, scales=scales, zeros=zeros, g_idx=trivial_g_idx(in_f, group_size), bits=bits,
                       group_size=group_size, sym=sym, act_order=act_order)


def encode_int8(r: QuantResult, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """int-quantized tensors of one 8-bit per-channel symmetric linear: weight int8 [out, in] (our codes
    minus 128) and weight_scale [out, 1]."""
    if r.bits != 8 or r.group_size != -1 or not r.sym:
        raise QuantkitError("compressed-tensors int-quantized (W8A8) stores 8-bit per-channel symmetric weights; "
                            "quantize with --bits 8 --group-size -1 --sym")
    return {"weight": (r.qweight.to(torch.int16) - 128).to(torch.int8).contiguous(),
            "weight_scale": r.scales.to(scale_dtype).contiguous()}


def decode_int8(t: dict[str, torch.Tensor], *, act_order: bool) -> QuantResult:
    """The exact QuantResult of one linear's int-quantized tensors."""
    codes = (t["weight"].to(torch.int16) + 128).to(torch.uint8)
    scales = t["weight_scale"].float().reshape(codes.shape[0], 1).contiguous()
    return QuantResult(qweight=codes, scales=scales, zeros=torch.full_like(scales, 128, dtype=torch.uint8),
                       g_idx=trivial_g_idx(codes.shape[1], -1), bits=8, group_size=-1, sym=True, act_order=act_order)


def group_targets(names: tuple[str, ...], all_linears: set[str]) -> list[str]:
    """Targets matching exactly `names` among `all_linears`: one "re:" pattern for a linear of every decoder
    layer (`prefix.<i>.sub` for every i), the exact name otherwise."""
    def key(name: str) -> tuple[str, str] | None:
        parts = name.split(".")
        i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        return None if i is None else (".".join(parts[:i]), ".".join(parts[i + 1 :]))

    everywhere = Counter(key(n) for n in all_linears)
    mine = Counter(key(n) for n in names)
    whole = {k for k, count in mine.items() if k is not None and count > 1 and count == everywhere[k]}
    patterns = ["re:^" + re.escape(prefix) + r"\.\d+\." + re.escape(sub) + "$" for prefix, sub in whole]
    return sorted(patterns) + [n for n in names if key(n) not in whole]


def targeted(targets: object, name: str, where: str) -> bool:
    """Whether a config group's (or the ignore list's) `targets` select the linear `name`, by compressed-tensors'
    own matcher (exact name, "re:" pattern from the name's start, or a class of nn.Linear)."""
    from compressed_tensors.utils.match import is_match

    strings = [t for t in targets if isinstance(t, str)] if isinstance(targets, list | tuple) else []
    try:
        return is_match(name, torch.nn.Linear(1, 1, bias=False, device="meta"), strings)
    except re.error as err:
        raise QuantkitError(f"{where}: config.json's quantization_config targets a pattern of {strings!r} that is no "
                            f"regular expression ({err}); the export is damaged or was edited: export it again") from None


class CompressedTensorsFormat(Format):
    """compressed-tensors pack-quantized, 2, 3, 4 and 8 bits, consecutive groups."""

    name = "compressed-tensors"
    help = "compressed-tensors pack-quantized, 2-8 bits (llm-compressor's format; transformers; vLLM at 4 and 8 bits)"
    # compressed-tensors (0.20, the floor, and later) packs every width as one dense bit stream, padding the last
    # word (pack_to_int32), and transformers loads each; vLLM's WNA16 kernels take 4 and 8 bits only.
    bits = (2, 3, 4, 8)
    vllm_bits = (4, 8)
    holds_permuted_groups = False  # actorder="group" (a g_idx) was removed from compressed-tensors
    # compressed-tensors (0.20 and later) applies its schemes to nn.Linear and nn.Embedding only: a Conv1D matched by
    # name keeps its dense weight, and transformers would leave it uninitialised beside the stored packed tensors
    holds_conv1d = False
    transformers_extras = "compressed-tensors"
    quant_method = "compressed-tensors"

    def check_family(self, model: Callable[[], torch.nn.Module | None], bits: dict[str, int]) -> None:
        """Refuse a family whose transformers code cannot load the export: compressed-tensors removes the weight of
        each linear it packs before loading, and transformers (5.x) then runs the family's weight init over every
        module, so an init that reads such a weight (Falcon's on each FalconLinear, NanoChat's on o_proj from its
        attention) fails the load. Measured by mirroring that init on a meta copy (load_init), so a family fixed in
        a later transformers passes again."""
        from quantkit.export.formats.load_init import init_failure
        from quantkit.models import QUANTIZED_LOADERS

        # checked for asymmetric exports too, though they load dequantized (transformers_config): transformers 5.21
        # runs the family's init before it decompresses (Falcon's asymmetric export fails there; 5.25 loads it)
        packed = sorted(n for n, b in bits.items() if not self.stores_int8(b))
        built = model() if packed else None
        failure = None if built is None else init_failure(built, packed)
        if failure is None:
            return
        where, error = failure
        family = getattr(built.config, "model_type", type(built).__name__)
        # the dense format first: plain transformers loads it; GPTQ loads with gptqmodel only (QUANTIZED_LOADERS)
        others = sorted((f for f in Format.registered if f.name != self.name), key=lambda f: not f.stores_dense_weights)
        needs = sorted({QUANTIZED_LOADERS[f.quant_method][0] for f in others if f.quant_method in QUANTIZED_LOADERS})
        raise QuantkitError(f"transformers cannot load a {family} model from {self.name}: its weight init, run on "
                            f"every module as from_pretrained loads, reads the weight of a linear {self.name} stores "
                            f"packed ({where}: {error}); pass --format {others[0].name} (dense weights, which plain "
                            f"transformers loads) or {', '.join(f.name for f in others[1:])}"
                            + (f" (which transformers needs {', '.join(needs)} to load)" if needs else ""))

    def declared_settings(self, quantization_config: dict) -> set[tuple]:
        """(num_bits, group_size or -1 per channel, symmetric) of each config group's weights."""
        out = set()
        for group in (quantization_config.get("config_groups") or {}).values():
            weights = (group or {}).get("weights") or {}
            grouped = weights.get("strategy") == "group"
            out.add((weights.get("num_bits"), weights.get("group_size") if grouped else -1, weights.get("symmetric")))
        return out

    def check_declared(self, quantization_config: object, settings: dict[str, Setting], where: str,
                       model_names: dict[str, str] | None = None) -> None:
        """Beyond the weights' settings: the storage format and whether inputs are quantized, which transformers
        and vLLM read from config.json alone; each linear as it is stored (stored_settings; or as solved, which
        quantkit wrote before mixed exports were stored asymmetric and transformers 5.21 loads)."""
        if isinstance(quantization_config, dict) and \
                self.declared_settings(quantization_config) != {(s.bits, s.group_size, s.sym) for s in settings.values()}:
            settings = self.stored_settings(settings)
        super().check_declared(quantization_config, settings, where, model_names)
        stored = {INT if self.stores_int8(s.bits) else PACKED for s in settings.values()}
        wanted = stored.pop() if len(stored) == 1 else "mixed-precision"
        if quantization_config.get("format") != wanted:
            raise QuantkitError(f"{where}: config.json's quantization_config declares format "
                                f"{quantization_config.get('format')!r} where the tensors are stored {wanted!r}; "
                                "the export is inconsistent, export it again")
        groups = (quantization_config.get("config_groups") or {}).values()
        if any(bool((group or {}).get("input_activations")) != (self.act_bits is not None) for group in groups):
            said = f"{self.act_bits}-bit inputs" if self.act_bits is not None else "weight-only"
            raise QuantkitError(f"{where}: config.json's quantization_config and quantkit.json disagree on the "
                                f"linears' input activations (quantkit.json: {said}); the export is inconsistent, "
                                "export it again")
        self._check_schemes(quantization_config, settings, where)
        self._check_targets(quantization_config, settings, where, model_names or {})
        for entry in quantization_config.get("ignore") or []:
            hit = next((m for m in settings if targeted([entry], m, where)), None)
            if hit is not None:
                raise QuantkitError(f"{where}: config.json's quantization_config ignores {entry!r}, which quantkit.json "
                                    f"lists as quantized ({hit}); loaders would read its packed tensors as plain "
                                    "weights: the export is inconsistent, export it again")

    def _check_targets(self, quantization_config: dict, settings: dict[str, Setting], where: str,
                       model_names: dict[str, str]) -> None:
        """Each quantized linear is a target of a config group declaring its own setting (by its exact name, a "re:"
        pattern or its class, Linear, as compressed-tensors matches them): a linear no group targets is loaded as a
        dense weight over its packed tensors, one a group of another setting targets is decoded with that setting."""
        from compressed_tensors.quantization import QuantizationArgs

        groups = {name: group or {} for name, group in (quantization_config.get("config_groups") or {}).items()}
        declared = {name: QuantizationArgs(**(group.get("weights") or {})).model_dump() for name, group in groups.items()}
        for module, setting in sorted(settings.items()):
            name = model_names.get(module, module)
            hits = [g for g, group in groups.items() if targeted(group.get("targets") or [], name, where)]
            if not hits:
                raise QuantkitError(f"{where}: no config group of config.json's quantization_config targets {name}, "
                                    "which quantkit.json lists as quantized; loaders would read its packed tensors as a "
                                    "plain weight (a hand-edited file?): export it again")
            wanted = self.weight_args(setting).model_dump()
            other = next((g for g in hits if declared[g] != wanted), None)
            if other is not None:
                raise QuantkitError(f"{where}: config.json's quantization_config group {other} targets {name} with "
                                    f"{declared[other]['num_bits']}-bit weights (group size "
                                    f"{declared[other]['group_size']}) where quantkit.json stores it {setting.bits}-bit "
                                    f"g{setting.group_size}; loaders would decode it with the wrong setting (a "
                                    "hand-edited file?): export it again")

    def _check_schemes(self, quantization_config: dict, settings: dict[str, Setting], where: str) -> None:
        """Each config group's weight (and input) arguments, read by compressed-tensors itself, are those of a
        setting quantkit.json gives; and nothing else is declared that loaders apply on top (sparsity, transforms,
        a quantized KV cache or outputs, a status other than compressed)."""
        from compressed_tensors.quantization import QuantizationArgs

        def fail(what: str) -> QuantkitError:
            return QuantkitError(f"{where}: config.json's quantization_config {what}, unlike quantkit.json and the "
                                 "stored tensors; transformers would load another model (a hand-edited file?): "
                                 "export it again")

        for key in ("sparsity_config", "transform_config", "kv_cache_scheme", "moe_sparsity_config"):
            if quantization_config.get(key):
                raise fail(f"declares a {key} {quantization_config[key]!r}")
        if quantization_config.get("quantization_status", "compressed") != "compressed":
            raise fail(f"says quantization_status {quantization_config['quantization_status']!r} (not 'compressed')")
        ours = [self.weight_args(s).model_dump() for s in set(settings.values())]
        inputs = None if self.act_bits is None else self.input_args().model_dump()
        for name, group in (quantization_config.get("config_groups") or {}).items():
            group = group or {}
            if group.get("output_activations"):
                raise fail(f"group {name} quantizes the linears' outputs")
            if group.get("format") not in (None, PACKED, INT) or \
                    quantization_config.get("format") not in (group.get("format"), "mixed-precision", None):
                raise fail(f"group {name} declares format {group.get('format')!r}")
            for role, args, allowed in (("weights", group.get("weights"), ours),
                                        ("input_activations", group.get("input_activations"), [inputs])):
                if args is None and role == "input_activations":
                    continue  # its presence against act_bits is checked above
                try:
                    declared = QuantizationArgs(**(args or {})).model_dump()
                except (TypeError, ValueError) as err:
                    first = (getattr(err, "errors", lambda: [])() or [{}])[0]  # pydantic: the field and its problem
                    why = f"{'.'.join(map(str, first.get('loc', ())))}: {first['msg']}" if "msg" in first else str(err)
                    raise fail(f"group {name} has {role} compressed-tensors cannot read ({why.splitlines()[0]})") \
                        from None
                if declared not in allowed:
                    near = min(allowed, key=lambda a: sum(a.get(k) != v for k, v in declared.items()))
                    key = next(k for k in sorted(set(declared) | set(near)) if declared.get(k) != near.get(k))
                    raise fail(f"group {name} declares {role} {key} = {declared.get(key)!r} (quantkit.json: "
                               f"{near.get(key)!r})")

    def encode(self, name: str, r: QuantResult, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """weight_packed, weight_scale (fp16 unless the model is fp32), weight_shape, weight_zero_point if asymmetric."""
        scale_dtype = dtype if dtype in (torch.float16, torch.float32) else torch.float16
        tensors = encode_int8(r, scale_dtype) if self.stores_int8(r.bits) else encode(r, scale_dtype)
        return {f"{name}.{k}": v for k, v in tensors.items()}, {}

    def transformers_config(self, asymmetric: bool) -> str | None:
        """Asymmetric weights load in transformers dequantized only: its compressed modules expect a zero point per
        output row where the checkpoint stores them packed (a size-mismatch error otherwise)."""
        return "CompressedTensorsConfig(dequantize=True)" if asymmetric else None

    def transformers_refuses(self, stored: dict[str, Setting]) -> str | None:
        """MoE experts stored int-quantized (W8A8): transformers (5.21 and 5.25) converts expert weights on load and
        decompresses packed or fp8 ones only; asymmetric experts, where that conversion reads no zero points
        (transformers_reads_asymmetric_experts). An asymmetric export loads dequantized (transformers_config); where
        its linears have several widths or group sizes, as the installed transformers decodes them (5.25 uses one
        config group's scheme for all)."""
        import transformers

        from quantkit.export.installed import (
            transformers_decodes_each_scheme,
            transformers_reads_asymmetric_experts,
        )
        from quantkit.models.experts import expert_of

        experts = sorted(n for n, s in stored.items() if self.stores_int8(s.bits) and expert_of(n) is not None)
        if experts:
            return (f"transformers (5.21 to {transformers.__version__}) loads no MoE experts stored int-quantized, as "
                    f"8-bit weights with {self.act_bits}-bit inputs are ({experts[0]}, ...): its MoE weight conversion "
                    "decompresses packed and fp8 experts only; vLLM serves it")
        asymmetric = sorted(n for n, s in stored.items() if not s.sym and expert_of(n) is not None)
        if asymmetric and not transformers_reads_asymmetric_experts(type(self)):
            return (f"transformers {transformers.__version__} loads no asymmetric MoE experts from compressed-tensors "
                    f"({asymmetric[0]}, ...): its MoE weight conversion reads no zero points; quantize with --sym, or "
                    "`quantkit export DIR --format fake -o OUT` writes one it loads")
        packed = {(s.bits, s.group_size) for s in stored.values() if not self.stores_int8(s.bits)}
        if all(s.sym for s in stored.values()) or len(packed) < 2 or transformers_decodes_each_scheme(type(self)):
            return None
        return (f"transformers {transformers.__version__} decodes every linear of an asymmetric compressed-tensors "
                "export with one config group's setting, and this export's linears have several widths or group "
                "sizes; `quantkit export DIR --format fake -o OUT` writes one it loads")

    def stored_settings(self, settings: dict[str, Setting]) -> dict[str, Setting]:
        """Every packed linear asymmetric where they mix symmetric and asymmetric ones (see the module's docstring)."""
        packed = {s.sym for s in settings.values() if not self.stores_int8(s.bits)}
        if len(packed) < 2:
            return settings
        return {n: s if self.stores_int8(s.bits) else replace(s, sym=False) for n, s in settings.items()}

    def plan_tensors(self, plan: ExportPlan, shape: Callable[[str], list[int]]) -> dict[str, torch.Tensor]:
        """The zero points of the symmetric linears stored asymmetric."""
        stored = self.stored_settings(plan.settings)
        return {f"{n}.weight_zero_point": zero_point_of_symmetric(s.bits, *shape(f"{n}.weight_scale"))
                for n, s in sorted(plan.settings.items()) if s.sym and not stored[n].sym}

    def stores_int8(self, bits: int) -> bool:
        """Whether `bits`-bit weights go unpacked as int-quantized (8-bit weights of a W8A8 model)."""
        return self.act_bits is not None and bits == 8

    def decode(self, name: str, stored: StoredTensors, setting: Setting) -> QuantResult:
        """The pack-quantized (or int-quantized) tensors back to codes, with `setting` from quantkit.json."""
        if f"{name}.weight" in stored.tensors and stored.tensors[f"{name}.weight"].dtype == torch.int8:
            return decode_int8(stored.take(name, ("weight", "weight_scale")), act_order=setting.act_order)
        zero_point = not setting.sym or f"{name}.weight_zero_point" in stored.tensors
        wanted = ("weight_packed", "weight_scale", "weight_shape") + (("weight_zero_point",) if zero_point else ())
        return decode(stored.take(name, wanted), bits=setting.bits, group_size=setting.group_size, sym=setting.sym,
                      act_order=setting.act_order)

    def weight_args(self, setting: Setting):
        """compressed-tensors' QuantizationArgs for weights solved with `setting`."""
        from compressed_tensors.quantization import QuantizationArgs

        grouped = setting.group_size != -1
        return QuantizationArgs(
            num_bits=setting.bits, type="int", symmetric=setting.sym, strategy="group" if grouped else "channel",
            group_size=setting.group_size if grouped else None, dynamic=False,
            actorder="weight" if setting.act_order else None,
        )

    def scheme(self, setting: Setting, targets: list[str]):
        """The QuantizationScheme of one config group: W{bits}A16, or with act_bits W{bits}A{act_bits} with
        the inputs quantized per token, dynamically and symmetrically (vLLM's W8A8 int8 scheme)."""
        from compressed_tensors.quantization import QuantizationScheme

        inputs = None if self.act_bits is None else self.input_args()
        return QuantizationScheme(targets=targets, weights=self.weight_args(setting), input_activations=inputs,
                                  format=INT if self.stores_int8(setting.bits) else PACKED)

    def input_args(self):
        """compressed-tensors' QuantizationArgs of the linears' inputs with act_bits: per token, dynamic, symmetric."""
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(num_bits=self.act_bits, type="int", symmetric=True, strategy="token", dynamic=True)

    def quantization_config(self, plan: ExportPlan) -> dict:
        """One config group per stored setting, FP linears ignored; validated by compressed_tensors'
        QuantizationConfig."""
        from compressed_tensors.quantization import QuantizationConfig

        plan = replace(plan, settings=self.stored_settings(plan.settings))
        all_linears = set(plan.settings) | set(plan.fp_linears)
        # targets by the model's own names, as the ignore list: loaders match them against the model they build
        own = dict(plan.model_names)
        groups = {}
        for i, (setting, names) in enumerate(plan.groups):
            targets = ["Linear"] if not plan.mixed else group_targets(tuple(own.get(n, n) for n in names),
                                                                       {own.get(n, n) for n in all_linears})
            groups[f"group_{i}"] = self.scheme(setting, targets)
        for _, shards in vllm_fused(all_linears):
            if len({plan.settings.get(n) for n in shards}) > 1:
                logger.warning("%s have different settings; vLLM loads them as one module with one scheme and cannot "
                               "read this checkpoint (transformers and quantkit can)", ", ".join(shards))
        try:
            stored = {group.format for group in groups.values()}
            config = QuantizationConfig(config_groups=groups, format=stored.pop() if len(stored) == 1 else "mixed-precision",
                                        quantization_status="compressed",
                                        ignore=sorted(plan.fp_linears))
        except ValueError as err:  # pydantic's ValidationError is a ValueError
            raise QuantkitError(f"compressed-tensors refuses the quantization config: {str(err).splitlines()[0]}") from err
        # as compressed-tensors' ModelCompressor writes it into config.json
        return {"version": _ct_version(), "quant_method": "compressed-tensors", "sparsity_config": {},
                "transform_config": {}, **config.model_dump(mode="json", exclude={"quant_method"})}


def _ct_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


FORMAT = CompressedTensorsFormat()

