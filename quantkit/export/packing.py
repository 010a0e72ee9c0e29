"""Dense int32 bit packing shared by the GPTQ and compressed-tensors formats.

Both formats lay 32 consecutive `bits`-wide codes along the packed dimension out as one
little-endian bit stream of `bits` int32 words: code k of a run of 32 starts at bit
k*bits of the stream, so 3-bit codes straddle word boundaries (codes 10 and 21). This is
AutoGPTQ/vLLM's 3-bit layout and, for 2/4/8 bits, the usual "32/bits codes per word".
compressed-tensors implements exactly this stream in `pack_to_int32`; it is used here.
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from quantkit.errors import QuantkitError


def pack_codes(codes: torch.Tensor, bits: int, dim: int, whole_words: bool = True) -> torch.Tensor:
    """Pack unsigned `bits`-wide codes (a 2-D integer tensor) into int32 words along `dim`. GPTQ's layout needs
    whole words; compressed-tensors pads the last word with zero bits (whole_words=False)."""
    if codes.dim() != 2:
        raise QuantkitError(f"expected a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    if whole_words and codes.shape[dim] * bits % 32:
        raise QuantkitError(
            f"cannot pack {codes.shape[dim]} {bits}-bit codes into whole int32 words; "
            f"the packed dimension must be a multiple of {32 // math.gcd(32, bits)}"
        )
    signed = (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)
    return pack_to_int32(signed, bits, packed_dim=dim)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes with `length` entries along `dim`."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise QuantkitError(f"packed tensor must be 2-D int32, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[dim] != math.ceil(length * bits / 32):
        raise QuantkitError(
            f"packed tensor has {packed.shape[dim]} words along dim {dim}, "
            f"expected {math.ceil(length * bits / 32)} for {length} {bits}-bit codes"
        )
    # unpack along dim 1 of a freshly laid-out copy: compressed-tensors' 4-bit fast path views
    # the words as bytes, which fails on transposed or size-1-strided inputs
    rows = packed.t() if dim == 0 else packed
    dense = torch.empty(rows.shape, dtype=torch.int32).copy_(rows)
    signed = unpack_from_int32(dense, bits, torch.Size([rows.shape[0], length]), packed_dim=1)
    codes = (signed.to(torch.int32) + (1 << (bits - 1))).to(torch.uint8)
    return codes.t().contiguous() if dim == 0 else codes
