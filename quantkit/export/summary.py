"""How big an export is beside its source, and how to load it: the last lines a run prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantkit.export.common import Setting
    from quantkit.export.formats.base import Format


def weights_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the safetensors files (weights, codes, sidecars) in a model or export directory; 0 if none."""
    root = Path(directory).expanduser()
    return sum(p.stat().st_size for p in root.glob("*.safetensors")) if root.is_dir() else 0


def size(n: float) -> str:
    """n bytes as B/KiB/MiB/GiB/TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


def size_line(source: str | os.PathLike | None, output: str | os.PathLike, source_bytes: int = 0) -> str:
    """"weights 1.2 MiB -> 0.4 MiB (2.9x smaller)": the source's safetensors (or `source_bytes`, e.g. a loaded
    model's parameters) beside the export's; only the export's where the source's size is unknown."""
    before = source_bytes or (weights_bytes(source) if source is not None else 0)
    after = weights_bytes(output)
    if not before or not after:
        return f"weights {size(after)}"
    return f"weights {size(before)} -> {size(after)} ({before / after:.1f}x smaller)"


def settings_of(manifest: dict) -> dict[str, Setting]:
    """The settings quantkit.json gives its quantized linears (spec and module_specs; "spec" for the base one),
    those it cannot read left out."""
    from quantkit.export.common import Setting

    specs = {"spec": manifest.get("spec"), **(manifest.get("module_specs") or {})}
    out = {}
    for name, spec in specs.items():
        try:
            out[name] = Setting.from_dict(spec)
        except (KeyError, TypeError, ValueError):
            continue
    return out


def loading_call(fmt: Format | None, manifest: dict, target: str) -> str | None:
    """`AutoModelForCausalLM.from_pretrained(target...)` with the quantization_config transformers needs for this
    export, if any (the format's transformers_config for the settings it stores; no format known: none); None where
    the installed transformers cannot load it."""
    if fmt is None:
        return f"AutoModelForCausalLM.from_pretrained({target})"
    stored = set(fmt.stored_settings(settings_of(manifest)).values())
    if not fmt.transformers_loads(stored):
        return None
    config = fmt.transformers_config(any(not s.sym for s in stored))
    return f"AutoModelForCausalLM.from_pretrained({target}" + (f", quantization_config={config})" if config else ")")


def not_loadable() -> str:
    """Why loading_call gave None (compressed-tensors' asymmetric linears of several settings), and what loads."""
    import transformers

    return (f"transformers {transformers.__version__} decodes every linear of an asymmetric compressed-tensors export "
            "with one config group's setting, and this export's linears have several widths or group sizes; "
            "`quantkit export DIR --format fake -o OUT` writes one it loads")


def load_line(output: str | os.PathLike, fmt: Format) -> str:
    """How to load the export in transformers, with what the format needs and this environment lacks."""
    import importlib.util
    import json

    extras = getattr(fmt, "transformers_extras", "").split()
    missing = [p for p in extras if importlib.util.find_spec(p.replace("-", "_")) is None]
    need = f" (after `pip install {' '.join(missing)}`)" if missing else ""
    try:
        manifest = json.loads((Path(output) / "quantkit.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    call = loading_call(fmt, manifest if isinstance(manifest, dict) else {}, repr(str(output)))
    if call is None:
        return f"load: quantkit.load_quantized({str(output)!r}) ({not_loadable()})"
    return f"load: {call}{need}, or quantkit.load_quantized({str(output)!r})"
