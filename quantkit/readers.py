"""Reading the small files a user gives or may have edited (a JSON object, a YAML document): a missing or unreadable
file, bad bytes or bad syntax are each one QuantkitError naming the file, never a parser's traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

from quantkit.errors import QuantkitError, first_line, refuse_special


def read_json_object(path: str | os.PathLike, remedy: str) -> dict:
    """A JSON file that must hold one object; a missing or unreadable file, bad JSON or another JSON type is one
    QuantkitError naming the file and ending in `remedy` (what the user should do)."""
    file = Path(path)
    refuse_special(file, "the JSON file")
    try:
        parsed = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantkitError(f"{file} is missing; {remedy}") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise QuantkitError(f"{file} is not valid JSON ({first_line(err)}); {remedy}") from None
    except OSError as err:
        raise QuantkitError(f"cannot read {file}: {err.strerror or err}; {remedy}") from None
    if not isinstance(parsed, dict):
        raise QuantkitError(f"{file} holds a JSON {type(parsed).__name__}, not an object; {remedy}")
    return parsed


def read_yaml(path: str | os.PathLike, what: str) -> object:
    """A YAML file's content; a missing or unreadable file, bytes that are not UTF-8, bad YAML and a key given twice in
    one mapping (YAML would keep the last one silently) are each one QuantkitError naming `what` and the file."""
    import yaml

    file = Path(path)
    refuse_special(file, what)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantkitError(f"{what} {file} not found") from None
    except UnicodeDecodeError as err:
        raise QuantkitError(f"{what} {file} is not UTF-8 text (byte {err.start}); give a YAML file") from None
    except OSError as err:
        raise QuantkitError(f"cannot read {what} {file}: {err.strerror or err}") from None

    class UniqueKeys(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping."""

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                if key.value in seen:
                    raise QuantkitError(f"{what} {file}: key {key.value!r} is given twice (line {key.start_mark.line + 1}); "
                                        "keep one")
                seen.add(key.value)
        return loader.construct_yaml_map(node)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=UniqueKeys)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QuantkitError(f"{what} {file} is not valid YAML: {first}") from None


def check_generation_config(folder: str | os.PathLike) -> None:
    """A folder's generation_config.json, where it has one, is one transformers builds: a model folder's is copied
    into its export, an export's into the next, and from_pretrained of either refuses a bad one (max_new_tokens -1,
    an unknown cache_implementation, a JSON list) only when someone loads the result."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return
    read_json_object(path, "fix or delete it")
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(str(path.parent))  # what loading a model does with it
    except Exception as err:  # noqa: BLE001 - validate() raises ValueError, a bad field's type TypeError
        raise QuantkitError(f"{path} is no generation config transformers loads ({first_line(err)}); fix or delete "
                            "it") from None
