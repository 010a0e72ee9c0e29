"""Quantization recipes: which linears to quantize, which to leave in full precision, and per-module overrides.

A recipe names modules by pattern, as llm-compressor and compressed-tensors do:

- ``re:REGEX`` matches module names with ``re.match`` (anchored at the start, so ``re:.*down_proj$``
  matches every down_proj and ``re:model\\.layers\\.0\\.`` everything in layer 0);
- ``Linear`` (the class name) matches every candidate linear;
- any other pattern is a module name or a suffix of one on a dot boundary: ``down_proj`` matches
  ``model.layers.3.mlp.down_proj``, ``layers.0.mlp.down_proj`` only layer 0's, ``lm_head`` the head.

`targets` picks the linears to quantize among the candidates (every decoder-layer linear, plus
lm_head and the vision side when those are asked for); none given means all of them. `ignore`
leaves matches in full precision (ignore wins over targets). `overrides` are applied in order to
every quantized linear they match, each setting only the keys it names (bits, group_size, sym,
act_order, method, fp_alpha: the FP target's strength) over the run's defaults (the top-level --bits etc.), so a later override wins
where two match. Nothing here knows a model: names are strings, checked against a model's
linears by Recipe.check.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from quantkit.errors import QuantkitError, checked_call, expect_path, one_line, unknown_choice
from quantkit.quant.methods import METHODS, Method, method_for
from quantkit.quant.spec import SUPPORTED_BITS, QuantSpec

# The settings an override may change, with the type its value must have.
OVERRIDE_KEYS = {"bits": int, "group_size": int, "sym": bool, "act_order": bool, "method": str, "fp_alpha": float}
RECIPE_KEYS = ("targets", "ignore", "overrides")
ALL_LINEARS = "Linear"


def _patterns(value: object, where: str) -> tuple[str, ...]:
    """A pattern or a list of patterns as a tuple, each checked (a bad regex is a one-line error)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) and p for p in items):
        raise QuantkitError(f"recipe {where} must be a module-name pattern or a non-empty list of them, got {value!r}")
    for pattern in items:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise QuantkitError(f"recipe {where}: bad regular expression {pattern!r}: {err}") from None
    return tuple(items)


def matches(pattern: str, name: str) -> bool:
    """Whether module `name` matches `pattern` (re:REGEX with re.match, Linear, or a name or dotted suffix)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if pattern == ALL_LINEARS:
        return True
    return name == pattern or name.endswith("." + pattern)


def _any_match(patterns: Iterable[str], name: str) -> bool:
    return any(matches(p, name) for p in patterns)


@dataclass(frozen=True)
class LinearSettings:
    """How one linear is quantized: its QuantSpec and its Method."""

    spec: QuantSpec
    method: Method

    def describe(self) -> dict:
        """The settings a report lists for the linear."""
        out = {"bits": self.spec.bits, "group_size": self.spec.group_size, "sym": self.spec.sym,
               "act_order": self.spec.act_order, "method": self.method.name}
        if self.spec.fp_alpha != 1.0:
            out["fp_alpha"] = self.spec.fp_alpha
        return out


@checked_call
@dataclass(frozen=True)
class Override:
    """Settings for the linears matching `targets`; None leaves a setting at the run's (or an earlier override's)."""

    targets: tuple[str, ...]
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    act_order: bool | None = None
    method: str | None = None
    fp_alpha: float | None = None  # FP-target strength (0: these linears fit the quantized path's own output)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", _patterns(self.targets, "override targets"))
        if isinstance(self.fp_alpha, int) and not isinstance(self.fp_alpha, bool):
            object.__setattr__(self, "fp_alpha", float(self.fp_alpha))
        where = f"override {list(self.targets)}"
        for key, kind in OVERRIDE_KEYS.items():
            value = getattr(self, key)
            # bool is an int in Python: bits: true must not pass as 1
            if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise QuantkitError(f"recipe {where}: {key} must be a {kind.__name__}, got {value!r}")
        if all(getattr(self, key) is None for key in OVERRIDE_KEYS):
            raise QuantkitError(f"recipe {where} sets nothing; give any of {', '.join(OVERRIDE_KEYS)}")
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise QuantkitError(f"recipe {where}: bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise QuantkitError(f"recipe {where}: group_size must be positive or -1 (per-channel), got {self.group_size}")
        if self.fp_alpha is not None and not 0.0 <= self.fp_alpha <= 1.0:
            raise QuantkitError(f"recipe {where}: fp_alpha must be in [0, 1], got {self.fp_alpha}")
        if self.method is not None and self.method not in METHODS:
            raise QuantkitError(f"recipe {where}: {unknown_choice('quantization method', self.method, sorted(METHODS))}")

    def apply(self, settings: LinearSettings) -> LinearSettings:
        """`settings` with this override's keys set."""
        changes = {key: getattr(self, key) for key in ("bits", "group_size", "sym", "fp_alpha") if getattr(self, key) is not None}
        if self.act_order is not None:
            # static groups follow the act-order switch (as quantkit.quantize's default does)
            changes.update(act_order=self.act_order,
                           static_groups=self.act_order and (settings.spec.static_groups or not settings.spec.act_order))
        method = settings.method if self.method is None else method_for(self.method)
        return LinearSettings(replace(settings.spec, **changes), method)

    def to_dict(self) -> dict:
        """The override as its YAML mapping."""
        return {"targets": list(self.targets),
                **{key: getattr(self, key) for key in OVERRIDE_KEYS if getattr(self, key) is not None}}


@checked_call
@dataclass(frozen=True)
class Recipe:
    """Which linears to quantize (targets), which to leave in FP (ignore), and ordered per-module overrides.

    Recipe(ignore=["lm_head"], overrides=[Override(targets=[r"re:.*layers\\.(0|23)\\.mlp\\.down_proj$"], bits=8)])
    keeps the first and last (of 24) decoder layers' down_proj at 8 bits. See the module docstring for
    the pattern syntax and docs/commands.md for the YAML schema (Recipe.from_yaml).
    """

    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = field(default=())

    def __post_init__(self) -> None:
        if isinstance(self.targets, list) and not self.targets:  # None (YAML `targets: null`) is targets left out
            raise QuantkitError("recipe targets is [], which names no linear (and would quantize them all); name the "
                                "linears to quantize, or leave targets out to quantize every one")
        targets = () if self.targets is None else self.targets
        object.__setattr__(self, "targets", _patterns(targets, "targets") if targets != () else ())
        # an empty list is no ignore at all; an empty string is a pattern naming nothing (refused, as in targets)
        ignore = self.ignore if isinstance(self.ignore, str) or self.ignore else ()
        object.__setattr__(self, "ignore", _patterns(ignore, "ignore") if ignore != () else ())
        overrides = self.overrides
        if isinstance(overrides, (Override, Mapping)):
            overrides = [overrides]
        if not isinstance(overrides, (list, tuple)):
            raise QuantkitError(f"recipe overrides must be a list of mappings, got {overrides!r}")
        object.__setattr__(self, "overrides", tuple(_override(o, i) for i, o in enumerate(overrides)))

    @classmethod
    def from_dict(cls, data: object, where: str = "recipe") -> Recipe:
        """A recipe from its mapping form (the YAML schema); unknown keys are one-line errors."""
        if not isinstance(data, Mapping):
            raise QuantkitError(f"{where} must be a mapping with keys {', '.join(RECIPE_KEYS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise QuantkitError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(RECIPE_KEYS)}")
        return cls(targets=data.get("targets"), ignore=() if data.get("ignore") is None else data["ignore"], overrides=data.get("overrides") or ())

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        """The recipe in YAML file `path`."""
        from quantkit.readers import read_yaml

        if isinstance(path, str) and "\n" in path and not os.path.lexists(path):
            raise QuantkitError(f"recipe {one_line(path)} is YAML text, not a path: a str recipe names a YAML file; "
                                "for inline content pass a mapping (yaml.safe_load(text)) or a quantkit.Recipe")
        file = Path(expect_path("Recipe.from_yaml(path)", path))
        if not file.is_file():
            raise QuantkitError(f"recipe {one_line(path)} not found; give a YAML file with targets, ignore and overrides")
        data = read_yaml(file, "recipe")
        if data is None:  # an empty file (or comments only) says nothing: more likely the wrong file than "no recipe"
            raise QuantkitError(f"recipe {one_line(path)} is empty; give targets, ignore and overrides, or leave the recipe out")
        return cls.from_dict(data, f"recipe {one_line(path)}")

    def to_dict(self) -> dict:
        """The recipe as its YAML mapping (reports, manifests, resume fingerprints)."""
        return {"targets": list(self.targets), "ignore": list(self.ignore),
                "overrides": [o.to_dict() for o in self.overrides]}

    def bits(self, default: int) -> set[int]:
        """Every bit width a run with default `default` may use (to pick an export format that holds them all)."""
        return {default, *(o.bits for o in self.overrides if o.bits is not None)}

    def settings_for(self, name: str, spec: QuantSpec, method: Method | str) -> LinearSettings | None:
        """How linear `name` is quantized given the run's defaults, or None where it stays in full precision."""
        if self.targets and not _any_match(self.targets, name):
            return None
        if _any_match(self.ignore, name):
            return None
        settings = LinearSettings(spec, method_for(method))
        for override in self.overrides:
            if _any_match(override.targets, name):
                settings = override.apply(settings)
        return settings

    def check(self, widths: Mapping[str, int], spec: QuantSpec, method: Method | str,
              other_linears: Iterable[str] = (), fp_target: bool | None = None) -> dict[str, LinearSettings]:
        """Each candidate linear's settings (the quantized ones), given `widths` (candidate name -> input width):
        QuantkitError for a pattern that matches no candidate (an ignore pattern may match one of the model's
        `other_linears` instead, as `lm_head` does in a run that leaves the head alone), an override pattern whose
        linears all stay in full precision, a group size that does not divide a quantized linear's width, an
        override method that needs statistics the run's method does not gather, or (given whether the run has an
        FP target) an fp_alpha that no linear of its override is solved with."""
        run = method_for(method)
        others = list(other_linears)
        for where, patterns in (("targets", self.targets), ("ignore", self.ignore),
                                *((f"override {list(o.targets)}", o.targets) for o in self.overrides)):
            for pattern in patterns:
                known = [*widths, *others] if where == "ignore" else widths
                if not any(matches(pattern, name) for name in known):
                    example = next(iter(widths), "model.layers.0.mlp.down_proj")
                    raise QuantkitError(f"recipe {where}: pattern {pattern!r} matches no linear to quantize "
                                        f"(names look like {example!r}); fix or remove it")
        for override in self.overrides:
            if override.method is not None:
                check_method_fits(method_for(override.method), run)
        chosen = {}
        for name, width in widths.items():
            settings = self.settings_for(name, spec, run)
            if settings is None:
                continue
            try:
                settings.spec.validate(width)
            except QuantkitError as err:
                raise QuantkitError(f"recipe, for {name}: {err}") from None
            chosen[name] = settings
        if not chosen:
            raise QuantkitError("recipe leaves every linear in full precision; loosen its targets or ignore")
        for override in self.overrides:
            where = f"recipe override {list(override.targets)}"
            for pattern in override.targets:
                hits = [name for name in widths if matches(pattern, name)]
                if not any(name in chosen for name in hits):
                    raise QuantkitError(f"{where}: pattern {pattern!r} applies to no quantized linear ({hits[0]}"
                                        f"{f' and {len(hits) - 1} more' if len(hits) > 1 else ''} stay in full "
                                        "precision by the recipe's targets or ignore); drop the override or quantize them")
            fitted = [name for name in chosen if _any_match(override.targets, name)
                      and chosen[name].method.needs_activations]
            if override.fp_alpha is not None and fp_target is not None and not (fp_target and fitted):
                why = "their method reads no activations" if fp_target else "this run has no FP target"
                raise QuantkitError(f"{where} sets fp_alpha {override.fp_alpha}, the FP target's strength, and none of "
                                    f"its linears is solved with one ({why}); drop fp_alpha, or run gptq or tlq with "
                                    "--fp-target (fp_target=True)")
        return chosen


def check_method_fits(method: Method, run: Method) -> None:
    """Raise QuantkitError if `method` needs statistics that a run of method `run` does not gather."""
    if method.needs_activations and not run.needs_activations:
        raise QuantkitError(f"recipe override method {method} reads calibration activations, which a {run} run "
                            f"does not gather; run with a method that reads them and override the rest to {run}")
    if method.token_weights and not run.token_weights:
        raise QuantkitError(f"recipe override method {method} weighs tokens by importance, which a {run} run does "
                            f"not compute; run with --method {method} and override the rest to {run}")


def _override(value: object, index: int) -> Override:
    if isinstance(value, Override):
        return value
    if not isinstance(value, Mapping):
        raise QuantkitError(f"recipe overrides: override {index + 1} must be a mapping with targets and settings, got {value!r}")
    unknown = sorted(set(value) - {"targets", *OVERRIDE_KEYS})
    if unknown:
        raise QuantkitError(f"recipe override {index + 1}: unknown key {unknown[0]!r}; "
                            f"known keys: targets, {', '.join(OVERRIDE_KEYS)}")
    if not value.get("targets"):
        raise QuantkitError(f"recipe override {index + 1} has no targets; give the module-name patterns it applies to")
    return Override(**value)


def as_recipe(recipe: Recipe | Mapping | str | os.PathLike | None) -> Recipe | None:
    """A Recipe from a Recipe, its mapping form or a YAML path (None stays None)."""
    if recipe is None or isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.from_yaml(recipe)
    raise QuantkitError(f"recipe must be a Recipe, a mapping or a YAML path, got {type(recipe).__name__}")
