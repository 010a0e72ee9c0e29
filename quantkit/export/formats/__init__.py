"""The export formats: one file each, one registry. A new format is a Format subclass in its own file
(quantkit/export/formats/base.py says what to implement) and one line in REGISTRY below."""

from __future__ import annotations

from quantkit.errors import QuantkitError
from quantkit.export.formats import compressed_tensors, fake, gptq
from quantkit.export.formats.base import Format

REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        gptq.V1,
        gptq.V2,
        compressed_tensors.FORMAT,
        fake.FORMAT,
    )
}
FORMATS = tuple(REGISTRY)
# the default export: the first of these that stores the bit width. compressed-tensors packs every width and
# plain transformers loads it (compressed-tensors is a dependency of quantkit), where a GPTQ checkpoint needs
# gptqmodel and optimum, on CPU too.
DEFAULT_ORDER = (compressed_tensors.FORMAT, fake.FORMAT)
Format.registered[:] = [*DEFAULT_ORDER, *(f for f in REGISTRY.values() if f not in DEFAULT_ORDER)]


def format_for(name: str | Format) -> Format:
    """The Format registered under `name` (a Format passes through), else QuantkitError."""
    if isinstance(name, Format):
        return name
    if not isinstance(name, str) or name not in REGISTRY:
        raise QuantkitError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return REGISTRY[name]


def check_format(name: str) -> str:
    """Return `name` if it is a known export format, else raise QuantkitError."""
    return format_for(name).name


def default_format(bits: int) -> str:
    """The first format of DEFAULT_ORDER that stores `bits` (compressed-tensors for every width quantkit has)."""
    return next(f.name for f in DEFAULT_ORDER if bits in f.bits)


__all__ = ["DEFAULT_ORDER", "FORMATS", "REGISTRY", "Format", "check_format", "default_format", "format_for"]
