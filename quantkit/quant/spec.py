"""What a solver is asked to do (QuantSpec) and what it returns (QuantResult)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from quantkit.bounds import SUPPORTED_BITS
from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class QuantSpec:
    """Weight quantization settings shared by every solver."""

    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    sym: bool = True
    # GPTQ desc_act: solve columns by decreasing Hessian diagonal. On by default, with static groups,
    # as llm-compressor's actorder="static": at 2 bits it is worth more than any other setting
    # (benchmarks/bench_tlq.py), and static groups keep the g_idx trivial for every export format.
    act_order: bool = True
    static_groups: bool = True  # with act_order: groups fixed before the permutation
    cd_sweeps: int = 0  # coordinate-descent sweeps over the codes after GPTQ (quantkit.quant.cd)
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    block_size: int = 128  # GPTQ lazy-update block width
    mse: bool = False  # search a clipping ratio that minimises the grid's MSE
    # Per-token dynamic symmetric activation bits of every quantized linear's input (None: weight-only).
    act_bits: int | None = None
    # FP-target strength (with the FP target on): the target is W + fp_alpha * W (C - H~) H~^-1 (quant/gptaq.py);
    # 0 fits the quantized path's own output, as without the FP target
    fp_alpha: float = 1.0

    def validate(self, in_features: int | None = None) -> None:
        """Raise QuantkitError if the settings cannot be honoured."""
        if self.bits not in SUPPORTED_BITS:
            raise QuantkitError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise QuantkitError(f"group size must be positive or -1 (per-channel), got {self.group_size}")
        if in_features is not None and self.group_size != -1 and in_features % self.group_size:
            raise QuantkitError(
                f"group size {self.group_size} does not divide the input width {in_features}; "
                "choose a divisor or -1 (per-channel)"
            )
        if self.cd_sweeps < 0:
            raise QuantkitError(f"coordinate-descent sweeps must be >= 0, got {self.cd_sweeps}")
        if not 0 <= self.damp < 1:
            raise QuantkitError(f"damp must be in [0, 1), got {self.damp}")
        if self.act_bits is not None and self.act_bits not in (4, 8):
            raise QuantkitError(f"--act-bits must be 4 or 8 (or omitted for weight-only), got {self.act_bits}")
        if self.act_bits is not None and self.act_bits < self.bits:
            raise QuantkitError(
                f"W{self.bits}A{self.act_bits}: inputs narrower than the weights are a scheme no kernel runs; "
                f"use --act-bits 8 (W{self.bits}A8) or --bits {self.act_bits} --act-bits {self.act_bits}"
            )
        if self.act_bits is not None and (self.group_size != -1 or not self.sym):
            raise QuantkitError(
                "--act-bits needs per-channel symmetric weights (the int8 kernels' layout); pass --group-size -1 --sym"
            )
        if not 0.0 <= self.fp_alpha <= 1.0:
            raise QuantkitError(f"FP-target strength fp_alpha must be in [0, 1], got {self.fp_alpha}")

    def to_dict(self) -> dict:
        """Plain-dict form for reports and manifests (activation bits and a partial FP-target strength only
        when they are on, so that reports and fingerprints of runs without them read as before)."""
        out = asdict(self)
        if out["act_bits"] is None:
            del out["act_bits"]
        if out["fp_alpha"] == 1.0:
            del out["fp_alpha"]
        return out


@dataclass
class QuantResult:
    """One quantized linear in the GPTQ convention.

    weight ~= (qweight - zeros[:, g_idx]) * scales[:, g_idx], exactly (scales are fp16-representable).
    """

    qweight: torch.Tensor  # uint8 [out, in], values in [0, 2**bits - 1], original column order
    scales: torch.Tensor  # float32 [out, n_groups], every value exactly representable in fp16
    zeros: torch.Tensor  # uint8 [out, n_groups], in [0, 2**bits - 1]; sym: 2**(bits-1)
    g_idx: torch.Tensor  # int32 [in], the group of each input column
    bits: int
    group_size: int  # -1: per-channel
    sym: bool
    act_order: bool = False

    @classmethod
    def of(cls, spec: QuantSpec, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
           act_order: bool | None = None) -> QuantResult:
        """A result with the bits, group size and symmetry of `spec` (a QuantSpec, or an export's Setting), and
        its act_order unless given."""
        return cls(qweight, scales, zeros, g_idx, bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                   act_order=spec.act_order if act_order is None else act_order)

    def rows(self, start: int, end: int) -> QuantResult:
        """Output rows [start, end), as tensors of their own (safetensors refuses shared storage)."""
        return replace(self, qweight=self.qweight[start:end].clone(), scales=self.scales[start:end].clone(),
                       zeros=self.zeros[start:end].clone(), g_idx=self.g_idx.clone())

    @staticmethod
    def cat_rows(parts: list[QuantResult]) -> QuantResult:
        """One result from results for consecutive output rows (they share g_idx and settings)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        return replace(first, qweight=torch.cat([p.qweight for p in parts]), scales=torch.cat([p.scales for p in parts]),
                       zeros=torch.cat([p.zeros for p in parts]))

    TENSORS = ("qweight", "scales", "zeros", "g_idx")

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The codes as named tensors `{prefix}.qweight` ... (the settings go by the QuantSpec)."""
        return {f"{prefix}.{part}": getattr(self, part).contiguous() for part in self.TENSORS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, spec: QuantSpec) -> QuantResult:
        """The result to_tensors(prefix) wrote, with `spec`'s settings."""
        return cls.of(spec, *(tensors[f"{prefix}.{part}"] for part in cls.TENSORS))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight this result stands for."""
        g = self.g_idx.long()
        return (self.qweight.float() - self.zeros[:, g].float()) * self.scales[:, g]
