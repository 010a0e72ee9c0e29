"""Calibration data, whatever its kind: the DataSource registry (recipe, chat, image-text, text) that calibration,
the checks before it and `quantkit importance` all read sources through, and in-memory data."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quantkit.data.chat import (
    chat_samples,
    is_chat_jsonl,
    is_chat_record,
    read_chat_records,
    read_chat_template,
)
from quantkit.data.recipes import is_recipe, load_recipe, recipe_samples
from quantkit.data.samples import calibration_samples, text_samples
from quantkit.data.sources import (
    check_characters,
    check_source_name,
    check_text_source,
    local_paths,
)
from quantkit.errors import QuantkitError


def is_image_jsonl(source: object) -> bool:
    """True for a file of image-text records (objects with an "image" field), whatever its suffix."""
    from quantkit.data.sources import record_kind

    return isinstance(source, (str, os.PathLike)) and record_kind(source) == "image-text"


@dataclass(frozen=True)
class Draw:
    """What a DataSource draws: how many samples of what length, with which tokenizer (and processor)."""

    tokenizer: Any
    nsamples: int
    seqlen: int
    seed: int = 0
    part: str = "all"
    chat_template: str | os.PathLike | None = None
    processor: Any = None  # a VLM's processor, for image data
    model_name: str | None = None


@dataclass(frozen=True)
class DataSource:
    """One kind of calibration data named by a path or source spec: which sources it reads (match), what it checks
    before the model loads (check: its files exist and hold what it reads), the local paths it reads (paths:
    outputs must stay away from them) and the samples it draws. Image data goes to a vision-language model only
    (check_source_for_model)."""

    name: str
    match: Callable[[str], bool]
    check: Callable[[str], None]
    samples: Callable[[str, Draw], list[dict]]
    image: bool = False  # drawn through a VLM's processor
    chat: bool = False  # records rendered with a chat template
    whole: str | None = None  # what its records are called where each is drawn whole (no --part)
    paths: Callable[[str], list[str]] = local_paths

    def check_draw(self, source: str, part: str, chat_template: str | os.PathLike | None) -> None:
        """--part and --chat-template apply to this kind of data."""
        if chat_template is not None and not self.chat:
            raise QuantkitError(f"--chat-template renders chat records ({{\"messages\": [...]}} JSONL); {source} holds none")
        if self.whole and part != "all":
            raise QuantkitError(f"--part {part} splits text files; the {self.whole} of {source} are drawn whole: "
                                "drop --part or split the file")


def _chat_samples(source: str, draw: Draw) -> list[dict]:
    template = read_chat_template(draw.chat_template) if draw.chat_template is not None else None
    return chat_samples(source, draw.tokenizer, draw.nsamples, seed=draw.seed, max_length=draw.seqlen,
                        chat_template=template, model_name=draw.model_name or "the model")


def _image_samples(source: str, draw: Draw) -> list[dict]:
    from quantkit.data.images import image_text_samples

    return image_text_samples(source, draw.processor, draw.nsamples, seed=draw.seed, max_length=draw.seqlen)


# The kinds of calibration data, the first that matches reads a source. A new kind is one DataSource here, its
# reading beside the others in quantkit/data/.
def _check_image_records(source: str) -> None:
    from quantkit.data.images import read_image_records

    read_image_records(source)


SOURCES: tuple[DataSource, ...] = (
    DataSource("recipe", is_recipe, load_recipe,
               lambda source, d: recipe_samples(source, d.tokenizer, nsamples=d.nsamples, seqlen=d.seqlen,
                                                seed=d.seed, processor=d.processor),
               image=True),
    DataSource("chat", is_chat_jsonl, read_chat_records, _chat_samples, chat=True, whole="conversations"),
    DataSource("image-text", is_image_jsonl, _check_image_records, _image_samples, image=True,
               whole="image-text records"),
    DataSource("text", lambda source: True, check_text_source,
               lambda source, d: calibration_samples(source, d.tokenizer, nsamples=d.nsamples, seqlen=d.seqlen,
                                                     seed=d.seed, part=d.part)),
)


def source_for(source: str | os.PathLike) -> DataSource:
    """The DataSource that reads `source`: the records a file holds (quantkit.data.sources.record_kind), a recipe, or
    text."""
    check_source_name(source)
    return next(kind for kind in SOURCES if kind.match(os.fspath(source)))


def load_calibration(
    source: str, model_name: str | None, vlm: bool, nsamples: int, seqlen: int, seed: int = 0, part: str = "all",
    tokenizer_or_processor=None, chat_template: str | os.PathLike | None = None,
) -> list[dict]:
    """Calibration samples for `model_name` from a source its DataSource reads: text, an image-text or chat JSONL,
    or a recipe.

    VLMs read image data through their processor, and chat records ({"messages": [...]}) are rendered with the
    chat template (the file `chat_template`, else the tokenizer's): seqlen is then the longest sample. Plain text
    gives windows of exactly seqlen tokens. A given tokenizer or processor is used instead of the one saved with
    `model_name`.
    """
    from transformers import AutoTokenizer

    source = os.fspath(source)
    kind = source_for(source)
    kind.check_draw(source, part, chat_template)
    check_source_for_model(source, vlm, model_name or "the model")
    given = tokenizer_or_processor
    processor = None
    if vlm and kind.image:
        from quantkit.data.images import load_processor

        processor = given if given is not None and hasattr(given, "image_processor") else load_processor(model_name)
    if given is not None:
        tokenizer = getattr(given, "tokenizer", given)
    elif processor is not None:
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    draw = Draw(tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part=part,
                chat_template=chat_template, processor=processor, model_name=model_name)
    return kind.samples(source, draw)


def holds_images(data: object) -> bool:
    """Whether calibration data is image-text: a file of image-text records, an image recipe, or in-memory records
    (or a datasets.Dataset) with an "image" field."""
    if isinstance(data, (str, os.PathLike)):
        if is_recipe(data):
            from quantkit.data.recipes import load_recipe

            return load_recipe(data).kind != "text"
        return is_image_jsonl(data)
    if type(data).__module__.startswith("datasets") and hasattr(data, "column_names"):
        return "image" in data.column_names
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(r, dict) and "image" in r for r in data)


def check_source_for_model(source: object, vlm: bool, model_name: str) -> None:
    """Image-text data (a file of image-text records, or an image recipe) goes to a vision-language model only,
    and every image it names exists: a QuantkitError otherwise, before any model loads."""
    from quantkit.data.images import check_image_files

    if not isinstance(source, (str, os.PathLike)):
        return
    if is_recipe(source):
        from quantkit.data.recipes import load_recipe

        recipe = load_recipe(source)
        files = [s.path for s in recipe.sources if not s.path.startswith("hf:")] if recipe.kind != "text" else []
        what = f"recipe {source} is an {recipe.kind} recipe"
        if recipe.kind == "text":
            return
    elif is_image_jsonl(source):
        files = [os.fspath(source)]
        what = f"{source} holds image-text records"
    else:
        return
    if not vlm:
        raise QuantkitError(f"{what}, but {model_name} is a text-only model: it would calibrate on the text without "
                            "the images; give text or chat data, or a vision-language model")
    for file in files:
        check_image_files(file)


def load_data_tokenizer(name_or_path: str, model: object = None):
    """The tokenizer (the processor, for a VLM) saved with a model, or a QuantkitError asking for one."""
    from quantkit.models import is_vlm

    try:
        if model is not None and is_vlm(model.config):
            from quantkit.data.images import load_processor

            return load_processor(name_or_path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError, QuantkitError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QuantkitError(f"cannot load a tokenizer or processor for {name_or_path}: {first}; "
                            "pass one (tokenizer_or_processor=)") from None


DATA_KINDS = ("a path or source spec (text, JSONL, directory, glob, hf:NAME, recipe)", "a list of strings",
              "a list of image-text records {'image', 'text' or 'messages'}", "a list of chat records {'messages'}",
              "a datasets.Dataset")


def is_source(data: object) -> bool:
    """True for data named by a path or source spec (read from files), False for in-memory data."""
    return isinstance(data, (str, os.PathLike))


def memory_calibration(data: object, tokenizer_or_processor, nsamples: int, seqlen: int, seed: int = 0,
                       part: str = "all", chat_template: str | os.PathLike | None = None) -> list[dict]:
    """Calibration samples from in-memory data: a list of strings, of image-text or chat records, or a
    datasets.Dataset (a "text" or "messages" column, or "image" with "text" or "messages" columns).
    Several texts are several samples (quantkit.data.samples.text_samples: each cut to seqlen, up to nsamples);
    a single text is one long document cut into nsamples windows of seqlen tokens.
    chat_template is a Jinja template file that renders chat records instead of the tokenizer's template."""
    if type(data).__module__.startswith("datasets") and hasattr(data, "column_names"):
        columns = set(data.column_names)
        if "image" not in columns and {"messages", "text"} <= columns:
            raise QuantkitError("the dataset has both a 'text' and a 'messages' column, and chat samples are "
                                "rendered from the messages alone; remove one of the two columns")
        if "image" not in columns and "messages" in columns:
            data = [{"messages": m} for m in data["messages"]]
        elif "image" not in columns:
            if "text" not in columns:
                raise QuantkitError(f"the dataset has no 'text' column (columns: {', '.join(sorted(columns))}); "
                                    "rename the text column to 'text'")
            # Every row goes on as the list of texts would: a None or non-string row is refused by its number
            # there, not dropped here unseen (blank texts are skipped by text_samples, as a list's are).
            data = list(data["text"])
        else:
            data = list(data)
    if not isinstance(data, (list, tuple)) or not data:
        raise QuantkitError(f"calibration data must be {', '.join(DATA_KINDS[:-1])} or {DATA_KINDS[-1]}; "
                            f"got {type(data).__name__ if data is not None else 'None'}"
                            + (" (empty)" if isinstance(data, (list, tuple)) else ""))
    for number, record in enumerate(data, start=1):
        check_characters(record, f"data record {number}")
    chat = all(is_chat_record(r) for r in data)
    if chat_template is not None and not chat:
        raise QuantkitError("--chat-template renders chat records ({\"messages\": [...]}); the data holds other kinds")
    if chat:
        if part != "all":
            raise QuantkitError(f"--part {part} splits texts; conversations are drawn whole: drop --part")
        from quantkit.data.chat import memory_chat_records

        tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
        template = read_chat_template(chat_template) if chat_template is not None else None
        return chat_samples(memory_chat_records(list(data)), tokenizer, nsamples, seed=seed, max_length=seqlen,
                            chat_template=template)
    if all(isinstance(t, str) for t in data):
        tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
        if len(data) == 1:  # one long text: cut into seeded windows of seqlen tokens, as a file is
            return calibration_samples(list(data), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part=part)
        return text_samples(list(data), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed, part=part)
    if all(isinstance(r, dict) and "image" in r for r in data):
        if not hasattr(tokenizer_or_processor, "image_processor"):
            raise QuantkitError("image-text records need the model's processor; pass a VLM and its processor")
        if part != "all":
            raise QuantkitError(f"--part {part} splits texts; image-text records are drawn whole: drop --part")
        from quantkit.data.images import memory_image_records, sample_records

        return sample_records(memory_image_records(list(data)), tokenizer_or_processor, nsamples, seed, seqlen)
    if all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in data):
        return memory_calibration([r["text"] for r in data], tokenizer_or_processor, nsamples, seqlen, seed, part)
    number, odd = next((n, r) for n, r in enumerate(data, start=1) if not isinstance(r, str))
    raise QuantkitError(f"calibration data must be {', '.join(DATA_KINDS)}; the list mixes kinds or holds "
                        f"{type(odd).__name__} items (record {number})")
