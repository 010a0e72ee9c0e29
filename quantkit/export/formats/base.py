"""What an export format is: the modules and settings it holds, its tensors, its quantization_config."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar

import torch

from quantkit.errors import QuantkitError
from quantkit.export.common import ExportPlan, Setting, StoredTensors, is_permuted
from quantkit.quant.spec import SUPPORTED_BITS, QuantResult


class Format:
    """One export format. Subclasses set the class attributes and implement encode, decode and
    quantization_config; the writer and reader (quantkit/export/writer.py, reader.py) ask nothing else."""

    name: str = ""
    help: str = ""  # one line for --format's help and docs/formats.md
    bits: tuple[int, ...] = SUPPORTED_BITS  # widths it stores
    holds_permuted_groups: bool = True  # act-order groups without static groups (a permuted g_idx)
    holds_outside_layers: bool = True  # quantized linears outside the decoder layers (lm_head, vision side)
    holds_activation_bits: bool = True  # a declaration of quantized linear inputs (W8A8); False: weight-only
    stores_dense_weights: bool = False  # weights stored unpacked (the export is about the FP model's size)
    holds_conv1d: bool = True  # linears whose checkpoints store the weight [in, out] (GPT-2's Conv1D)
    sidecar: str | None = None  # a safetensors file of its own beside the weights, if any
    transformers_extras: str = ""  # what `pip install` transformers needs to load it ("" for nothing)
    vllm_bits: tuple[int, ...] = SUPPORTED_BITS  # widths vLLM loads in this format (empty: none)
    act_bits: int | None = None  # set on the variant with_act_bits returns
    quant_method: str | None = None  # quantization_config's quant_method (None: it writes no quantization_config)
    # every registered format, the default exports first (filled by quantkit/export/formats/__init__.py, so that a
    # format's messages can name the others without importing the registry)
    registered: ClassVar[list[Format]] = []

    def with_act_bits(self, act_bits: int | None) -> Format:
        """This format for a model whose quantized linears' inputs are quantized to `act_bits` per token
        (itself for None); QuantkitError where the format describes weight-only models."""
        if act_bits is None:
            return self
        if not self.holds_activation_bits:
            raise QuantkitError(f"{self.name} checkpoints describe weight-only models and cannot hold {act_bits}-bit "
                                "activations; export to compressed-tensors or fake")
        variant = copy.copy(self)
        variant.act_bits = act_bits
        return variant

    def __str__(self) -> str:
        return self.name

    def check(self, name: str, r: QuantResult) -> None:
        """Raise QuantkitError if this format cannot store result `r` of linear `name` exactly."""
        if r.bits not in self.bits:
            raise QuantkitError(
                f"{name}: {self.name} stores {_widths(self.bits)}-bit weights, got {r.bits}-bit; "
                f"export to {_alternative(self, r.bits)} instead"
            )
        if not self.holds_permuted_groups and is_permuted(r):
            raise QuantkitError(
                f"{name}: act-order groups (a permuted g_idx) cannot be stored in {self.name}; quantize with "
                "static groups or export to gptq_v2"
            )
        # the shape check the run makes before calibrating (preflight), so that `quantkit export` of a result into
        # this format refuses it in the run's words, not in the packer's ('cannot pack 148 4-bit codes ...')
        self.check_linear(name, r.qweight.shape[0], r.qweight.shape[1], r.bits)

    def check_conv1d(self, name: str) -> None:
        """Raise QuantkitError if this format cannot hold linear `name`, a GPT-2-style Conv1D."""
        if not self.holds_conv1d:
            able = sorted((f.name for f in Format.registered if f.holds_conv1d), key=lambda n: n != "gptq_v2")
            raise QuantkitError(f"{name} is a GPT-2-style Conv1D (weight stored [in, out]), which {self.name} loaders "
                                f"do not quantize (nn.Linear only); pass --format {able[0]} (or {', '.join(able[1:])})")

    def check_family(self, model: Callable[[], torch.nn.Module | None], bits: dict[str, int]) -> None:
        """Raise QuantkitError if transformers cannot load the model from this format with its linears quantized
        (`bits`: each one's bits by its name in the model), as a family's own code may need what the format does not
        keep; `model()` builds the model (None where it cannot be built), called only by a format that needs it."""

    def check_plan(self, plan: ExportPlan) -> None:
        """Raise QuantkitError if the model as a whole cannot be described (after every check())."""

    def stored_settings(self, settings: dict[str, Setting]) -> dict[str, Setting]:
        """The setting each linear's tensors are stored and declared with (quantkit.json keeps the solved one)."""
        return settings

    def plan_tensors(self, plan: ExportPlan, shape: Callable[[str], list[int]]) -> dict[str, torch.Tensor]:
        """Tensors written once every linear is encoded and the plan known (`shape`: an encoded tensor's shape by
        name); none unless stored_settings changes a linear's setting."""
        return {}

    def check_options(self, bits: int, act_order: bool, static_groups: bool, *, act_bits: int | None = None,
                      lm_head: bool = False, vision: bool = False) -> None:
        """check() before calibrating: refuse settings whose results this format could not store."""
        flag = "--quantize-lm-head" if lm_head else "--quantize-vision" if vision else None
        if flag and not self.holds_outside_layers:
            able = [f for f in Format.registered if f.holds_outside_layers]
            named = [f.name if f.bits == SUPPORTED_BITS else f"{f.name} ({_widths(f.bits, 'or')} bits)" for f in able]
            raise QuantkitError(
                f"{flag} exports to {' or '.join(named)} only: {self.name} checkpoints describe quantized decoder "
                f"layers only; pass --format {able[0].name} or drop the flag"
            )
        if act_bits is not None and not self.holds_activation_bits:
            raise QuantkitError(f"{self.name} checkpoints describe weight-only models and cannot hold --act-bits; "
                                "pass --format compressed-tensors (or fake)")
        if bits not in self.bits:
            raise QuantkitError(
                f"--format {self.name} stores {_widths(self.bits)} bits only, got --bits {bits}; "
                f"use --format {_alternative(self, bits)}"
            )
        if act_order and not static_groups and not self.holds_permuted_groups:
            raise QuantkitError(
                f"--act-order without static groups permutes the groups, which {self.name} cannot store; "
                "add --static-groups or use --format gptq_v2"
            )

    def encode(self, name: str, r: QuantResult, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The tensors linear `name` is stored as (keys prefixed with `name`), and its sidecar tensors;
        `dtype` is the model's float dtype."""
        raise NotImplementedError

    def decode(self, name: str, stored: StoredTensors, setting: Setting) -> QuantResult:
        """The exact result of linear `name` from its stored tensors, solved with `setting`."""
        raise NotImplementedError

    def quantization_config(self, plan: ExportPlan) -> dict | None:
        """config.json's quantization_config (None: an ordinary dense checkpoint)."""
        return None

    def config_files(self, quantization_config: dict | None) -> dict[str, dict]:
        """JSON files written beside config.json (file name -> content)."""
        return {}

    def transformers_config(self, asymmetric: bool) -> str | None:
        """The quantization_config= (Python source) that transformers' from_pretrained needs to load an export of this
        format, None where it loads with the config.json alone; `asymmetric`: whether any linear is asymmetric."""
        return None

    def transformers_refuses(self, stored: dict[str, Setting]) -> str | None:
        """Why the installed transformers cannot load an export of this format whose linears are stored with the
        settings `stored` (stored_settings, by name) with the transformers_config it gives, and what can; None
        where it loads it."""
        return None

    def check_linear(self, name: str, out_features: int, in_features: int, bits: int) -> None:
        """Raise QuantkitError if a linear of this shape cannot be stored at `bits` (checked before calibrating)."""

    def declared_settings(self, quantization_config: dict) -> set[tuple]:
        """The weight settings (bits, group_size, sym) a stored quantization_config declares."""
        return set()

    def check_declared(self, quantization_config: object, settings: dict[str, Setting], where: str,
                       model_names: dict[str, str] | None = None) -> None:
        """config.json's quantization_config says what quantkit.json says (the settings the tensors are read with):
        transformers and vLLM load by the former, quantkit by the latter, so a disagreement would make them load
        different models. A QuantkitError names the first difference. `model_names`: quantkit.json's checkpoint name ->
        the model's name of the linears whose names differ (loaders match targets against the model's)."""
        wanted = {(s.bits, s.group_size, s.sym) for s in settings.values()}
        if self.quant_method is None:
            if quantization_config is not None:
                raise QuantkitError(f"{where}: config.json declares a quantization_config, but quantkit.json says the "
                                    f"weights are stored dense ({self.name}); the export is inconsistent, export it again")
            return
        if not isinstance(quantization_config, dict):
            raise QuantkitError(f"{where}: config.json has no quantization_config, so transformers would load the packed "
                                f"{self.name} tensors as plain weights; the export is incomplete, export it again")
        method = quantization_config.get("quant_method")
        if method != self.quant_method:
            raise QuantkitError(f"{where}: config.json declares quant_method {method!r} but quantkit.json says "
                                f"{self.name}; the export is inconsistent, export it again")
        declared = self.declared_settings(quantization_config)
        if declared != wanted:
            def show(found: set[tuple]) -> str:
                return ", ".join(f"{b}-bit g{g}{'' if s else ' asym'}" for b, g, s in sorted(found, key=str)) or "none"

            raise QuantkitError(f"{where}: config.json's quantization_config declares {show(declared)} weights but "
                                f"quantkit.json declares {show(wanted)}; transformers and quantkit would load different "
                                "models (a hand-edited file?): export it again")


def _widths(bits: tuple[int, ...], two: str = "and") -> str:
    return f" {two} ".join(map(str, bits)) if len(bits) <= 2 else ", ".join(map(str, bits[:-1])) + f" or {bits[-1]}"


def _alternative(fmt: Format, bits: int) -> str:
    """The format to suggest where `fmt` cannot store `bits`: the default for that width, else any packed one."""
    return next((f.name for f in Format.registered if bits in f.bits and f.name != fmt.name), "fake")
