"""Calibration recipes: YAML files mixing several sources with weights (the project ships calib/*.yaml).

Schema::

    kind: text                 # text | image-caption | image-qa
    nsamples: 128              # samples drawn where the caller gives none (--nsamples); default 128
    seqlen: 512                # likewise (--seqlen; default 512); text: tokens per window; image kinds: max per sample
    sources:
      - path: ../data/a.txt    # relative to the recipe file, absolute, ~ or $VAR (must be set), or hf:NAME[...]
        weight: 0.7            # share of the samples (weights are normalised; "fraction" is an alias)
        part: train            # all | train | heldout (text sources; default all)

Samples are split among sources by largest remainder of nsamples * weight (every source with a
positive weight gets at least one sample when nsamples allows); each source draws its share
with the same seed; with several sources each sample's tokens carry its source's index (source_ids, for
per-source analysis). Text sources give token windows (quantkit.data.calibration_samples); image
kinds read image-text JSONL (quantkit.data.images.image_text_samples) through a processor.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError

RECIPE_SUFFIXES = (".yaml", ".yml")
RECIPE_KINDS = ("text", "image-caption", "image-qa")
# how many samples of how many tokens are drawn where neither the caller nor a recipe says (sample_counts)
DEFAULT_NSAMPLES, DEFAULT_SEQLEN = 128, 512


@dataclass(frozen=True)
class RecipeSource:
    """One source of a recipe: where (resolved path or hf: spec), its weight and its part."""

    path: str
    weight: float = 1.0
    part: str = "all"


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: kind, default sample count and length, weighted sources."""

    name: str
    kind: str = "text"
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    sources: tuple[RecipeSource, ...] = field(default_factory=tuple)


def is_recipe(path: object) -> bool:
    """True for a .yaml/.yml path (a recipe), False for any other calibration source."""
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(RECIPE_SUFFIXES)


def _resolve(raw: str, base: Path, where: str) -> str:
    if raw.startswith("hf:"):
        return raw
    empty = [name for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", raw) if os.environ.get(name) == ""]
    if empty:  # expandvars would make the path the recipe's own folder
        raise QuantkitError(f"{where} path {raw!r} uses ${empty[0]}, which is set but empty; "
                            f"set it to the folder holding your data, or edit the recipe")
    expanded = os.path.expanduser(os.path.expandvars(raw))
    unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:  # expandvars leaves unset variables as they are; say so instead of "not found" later
        raise QuantkitError(f"{where} path {raw!r} uses ${unset.group(1)}, which is not set; "
                            f"set it to the folder holding your data, or edit the recipe")
    path = Path(expanded)
    return str(path if path.is_absolute() else (base / path).resolve())


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse and check a recipe file; any problem is a QuantkitError naming the file and field."""
    from quantkit.data.sources import PARTS
    from quantkit.readers import read_yaml

    file = Path(path)
    data = read_yaml(file, "recipe")
    if not isinstance(data, dict):
        raise QuantkitError(f"recipe {file} must be a mapping with a 'sources' list")
    unknown = set(data) - {"name", "kind", "nsamples", "seqlen", "sources", "description"}
    if unknown:
        raise QuantkitError(f"recipe {file}: unknown keys {sorted(unknown)}")
    kind = data.get("kind", "text")
    if kind not in RECIPE_KINDS:
        raise QuantkitError(f"recipe {file}: kind must be one of {', '.join(RECIPE_KINDS)}, got {kind!r}")
    raw_sources = data.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise QuantkitError(f"recipe {file}: 'sources' must be a non-empty list of {{path, weight, part}}")
    sources = []
    for number, entry in enumerate(raw_sources, start=1):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise QuantkitError(f"recipe {file}: source {number} needs a 'path' string")
        extra = set(entry) - {"path", "weight", "fraction", "part"}
        if extra:
            raise QuantkitError(f"recipe {file}: source {number} has unknown keys {sorted(extra)}")
        if "weight" in entry and "fraction" in entry:  # one is the other's alias: one of them was silently dropped
            raise QuantkitError(f"recipe {file}: source {number} gives both 'weight' and 'fraction' (one setting under "
                                "two names); keep one")
        weight = entry.get("weight", entry.get("fraction", 1.0))
        # a YAML true/false is a bool, which Python counts as an int: `weight: true` read as 1
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or not math.isfinite(weight):
            raise QuantkitError(f"recipe {file}: source {number} weight must be a non-negative number, got {weight!r}")
        part = entry.get("part", "all")
        if part not in PARTS:
            raise QuantkitError(f"recipe {file}: source {number} part must be one of {', '.join(PARTS)}, got {part!r}")
        sources.append(RecipeSource(path=_resolve(entry["path"], file.parent, f"recipe {file}: source {number}"), weight=float(weight), part=part))
    if sum(s.weight for s in sources) <= 0:
        raise QuantkitError(f"recipe {file}: source weights sum to zero")
    counts = {key: data.get(key, Recipe.__dataclass_fields__[key].default) for key in ("nsamples", "seqlen")}
    for key, least in (("nsamples", 1), ("seqlen", 2)):  # as --nsamples and --seqlen: a 1-token window predicts nothing
        value = counts[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise QuantkitError(f"recipe {file}: {key} must be an integer of at least {least}, got {value!r}")
    return Recipe(name=str(data.get("name", file.stem)), kind=kind, sources=tuple(sources), **counts)


def sample_counts(source: object, nsamples: int | None = None, seqlen: int | None = None) -> dict[str, int]:
    """{"nsamples", "seqlen"} drawn from `source`: each the value given, else a recipe's own, else the defaults."""
    given = {"nsamples": nsamples, "seqlen": seqlen}
    if None in given.values() and is_recipe(source):
        from quantkit.data.sources import check_source_name

        check_source_name(source)  # text given where a path belongs: check_data's line, not open()'s OSError
        own = load_recipe(source)
    else:
        own = Recipe(name="")  # plain files, in-memory data and calibration sets: the defaults
    return {key: getattr(own, key) if value is None else value for key, value in given.items()}


def split_counts(weights: list[float], total: int) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainder; positive weights get >= 1 when possible)."""
    norm = sum(weights)
    exact = [total * w / norm for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i, w in enumerate(weights):  # lift zero shares of positive weights, taking from the largest
        if w > 0 and counts[i] == 0 and total >= sum(1 for x in weights if x > 0):
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] = 1
    return counts


def recipe_samples(
    recipe: Recipe | str | os.PathLike,
    tokenizer,
    nsamples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    processor=None,
) -> list[dict]:
    """Calibration samples of a recipe (text windows, or image-text samples through `processor`)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    nsamples = recipe.nsamples if nsamples is None else nsamples
    seqlen = recipe.seqlen if seqlen is None else seqlen
    if nsamples <= 0 or seqlen <= 0:
        raise QuantkitError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    import torch

    from quantkit.data.samples import SOURCE_KEY

    counts = split_counts([s.weight for s in recipe.sources], nsamples)
    samples: list[dict] = []
    for index, (source, count) in enumerate(zip(recipe.sources, counts)):
        if count == 0:
            continue
        if recipe.kind == "text":
            from quantkit.data.samples import calibration_samples

            drawn = calibration_samples(source.path, tokenizer, nsamples=count, seqlen=seqlen, seed=seed, part=source.part)
        else:
            if processor is None:
                raise QuantkitError(f"recipe {recipe.name} is an {recipe.kind} recipe: it needs a VLM processor")
            from quantkit.data.images import image_text_samples

            drawn = image_text_samples(source.path, processor, count, seed=seed, max_length=seqlen)
        if len(recipe.sources) > 1:  # each token's source is the recipe source it was drawn from
            for sample in drawn:
                sample[SOURCE_KEY] = torch.full_like(sample["input_ids"], index, dtype=torch.long)
        samples.extend(drawn)
    return samples
