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
    """Each quantized linear's setting from quantkit.json (module_specs', else the spec; "spec" stands for the linears
    where it lists none), those it cannot read left out."""
    from quantkit.export.common import Setting

    specs = manifest.get("module_specs") if isinstance(manifest.get("module_specs"), dict) else {}
    listed = manifest.get("quantized_modules") if isinstance(manifest.get("quantized_modules"), list) else []
    out = {}
    for name in dict.fromkeys([*([n for n in listed if isinstance(n, str)] or ["spec"]), *specs]):
        try:
            out[name] = Setting.from_dict(specs.get(name, manifest.get("spec")))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return out


def stored(fmt: Format, manifest: dict) -> tuple[Format, dict[str, Setting]]:
    """The format as the export holds it (with its activation bits) and each linear's setting as it is stored."""
    act_bits = (manifest.get("spec") or {}).get("act_bits") if isinstance(manifest.get("spec"), dict) else None
    if isinstance(act_bits, int) and fmt.holds_activation_bits:
        fmt = fmt.with_act_bits(act_bits)
    return fmt, fmt.stored_settings(settings_of(manifest))


def refusal(fmt: Format | None, manifest: dict) -> str | None:
    """Why the installed transformers cannot load this export, and what can (None: it loads, or no format is known)."""
    if fmt is None:
        return None
    fmt, settings = stored(fmt, manifest)
    return fmt.transformers_refuses(settings)


def auto_class_name(config: dict | None) -> str:
    """The transformers Auto class that loads an export whose config.json holds `config`: the one quantkit's own
    loader builds it with (an image-text model is no AutoModelForCausalLM, which refuses its config class)."""
    from types import SimpleNamespace

    from quantkit.errors import QuantkitError
    from quantkit.models import auto_class_for

    fields = config if isinstance(config, dict) else {}
    try:
        return auto_class_for(SimpleNamespace(model_type=fields.get("model_type"),
                                              vision_config=fields.get("vision_config"))).__name__
    except QuantkitError:  # a type transformers builds with neither class: no better name to give
        return "AutoModelForCausalLM"


def loading_call(fmt: Format | None, manifest: dict, target: str, config: dict | None = None) -> str | None:
    """`AutoModel...from_pretrained(target...)` (the Auto class of config.json's `config`: auto_class_name) with the
    quantization_config transformers needs for this export, if any (the format's transformers_config for the settings
    it stores; no format known: none); None where the installed transformers cannot load it (refusal says why)."""
    auto = auto_class_name(config)
    if fmt is None:
        return f"{auto}.from_pretrained({target})"
    fmt, settings = stored(fmt, manifest)
    if fmt.transformers_refuses(settings) is not None:
        return None
    quantization = fmt.transformers_config(any(not s.sym for s in settings.values()))
    return f"{auto}.from_pretrained({target}" + (f", quantization_config={quantization})" if quantization else ")")


def load_line(output: str | os.PathLike, fmt: Format) -> str:
    """How to load the export in transformers, with what the format needs and this environment lacks."""
    import importlib.util
    import json

    extras = getattr(fmt, "transformers_extras", "").split()
    missing = [p for p in extras if importlib.util.find_spec(p.replace("-", "_")) is None]
    need = f" (after `pip install {' '.join(missing)}`)" if missing else ""
    read = {}
    for name in ("quantkit.json", "config.json"):
        try:
            read[name] = json.loads((Path(output) / name).read_text())
        except (OSError, ValueError):
            read[name] = {}
    manifest = read["quantkit.json"] if isinstance(read["quantkit.json"], dict) else {}
    call = loading_call(fmt, manifest, repr(str(output)), read["config.json"])
    if call is None:
        return f"load: quantkit.load_quantized({str(output)!r}) ({refusal(fmt, manifest)})"
    return f"load: {call}{need}, or quantkit.load_quantized({str(output)!r})"
