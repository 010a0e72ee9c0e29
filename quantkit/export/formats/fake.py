"""The fake-quant format: an ordinary dense checkpoint holding the dequantized weights.

Any loader reads it as a plain model. The exact codes go to a sidecar,
quantkit_qparams.safetensors ({name}.scales fp16, {name}.zeros, {name}.g_idx), so quantkit reads
the codes back; a weight is stored in the model dtype only where that dtype holds it exactly
(float32 otherwise).
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.export.common import Setting, StoredTensors
from quantkit.export.formats.base import Format
from quantkit.quant.spec import QuantResult

QPARAMS = "quantkit_qparams.safetensors"


class FakeFormat(Format):
    """Dequantized weights plus a sidecar of exact codes."""

    name = "fake"
    help = "dequantized weights in an ordinary checkpoint (any loader), exact codes in a sidecar"
    stores_dense_weights = True
    sidecar = QPARAMS

    def encode(self, name: str, r: QuantResult, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The dequantized weight (in `dtype` where exact), and scales/zeros/g_idx for the sidecar."""
        w = r.dequantize()
        stored = w.to(dtype)
        weight = stored if torch.equal(stored.float(), w) else w
        sidecar = {f"{name}.scales": r.scales.to(torch.float16).contiguous(), f"{name}.zeros": r.zeros.contiguous(),
                   f"{name}.g_idx": r.g_idx.contiguous()}
        return {f"{name}.weight": weight}, sidecar

    def decode(self, name: str, stored: StoredTensors, setting: Setting) -> QuantResult:
        """Codes from the stored weight and the sidecar's grid; refused unless they reproduce it exactly."""
        w = stored.take(name, ("weight",))["weight"].float()
        p = {k: stored.sidecar.get(f"{name}.{k}") for k in ("scales", "zeros", "g_idx")}
        if any(v is None for v in p.values()):
            raise QuantkitError(f"{stored.root / QPARAMS} lacks the scales/zeros/g_idx of {name}; the checkpoint is incomplete")
        g = p["g_idx"].long()
        scales = p["scales"].float()
        zeros = p["zeros"]
        codes = torch.round(w / scales[:, g]) + zeros[:, g].float()
        maxq = (1 << setting.bits) - 1
        if bool(((codes < 0) | (codes > maxq)).any()):
            raise QuantkitError(f"{name}: stored weights do not fit the {setting.bits}-bit grid of {QPARAMS}")
        r = QuantResult.of(setting, codes.to(torch.uint8), scales, zeros, p["g_idx"])
        if not torch.equal(r.dequantize(), w):
            raise QuantkitError(f"{name}: stored weights are not exactly on the grid of {QPARAMS}")
        return r


FORMAT = FakeFormat()
