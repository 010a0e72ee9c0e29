"""Checks of calibration and evaluation data before any model loads: the source through its DataSource, the
model's tokenizer (or a VLM's processor) that reads it, and a chat template where chat records need one."""

from __future__ import annotations

import os

from quantkit.data.calibration import source_for
from quantkit.errors import QuantkitError, first_line
from quantkit.models.checks import check_full_precision, check_language_model
from quantkit.models.files import ModelFiles, check_model_files, check_tokenizer, load_tokenizer


def check_data(source: str | os.PathLike | None, flag: str = "--calib", *, part: str = "all",
               chat_template: str | os.PathLike | None = None) -> None:
    """A data source exists and parses, and --part and --chat-template apply to it (the text is read later, once)."""
    if chat_template is not None:
        from quantkit.data.chat import read_chat_template

        read_chat_template(chat_template)
    if source is None:
        return
    kind = source_for(source)
    try:
        kind.check(os.fspath(source))
    except QuantkitError as err:
        raise QuantkitError(f"{flag}: {err}") from None
    kind.check_draw(os.fspath(source), part, chat_template)


def data_paths(source: str | os.PathLike | None) -> list[str]:
    """The local paths a data source reads (outputs must stay away from them)."""
    return [] if not source else source_for(source).paths(os.fspath(source))


def check_processor(name: str):
    """A VLM's processor (tokenizer and image processor) loads; returns it."""
    from quantkit.data.images import load_processor

    try:
        return load_processor(name)
    except QuantkitError:
        raise
    except Exception as err:  # noqa: BLE001 - processors fail in many ways on broken files
        raise QuantkitError(f"cannot load the processor of {name}: {first_line(err)}") from None


# (the processor's field, config.json's field): the processor counts an image's placeholder tokens by its own
# values, the vision tower makes its features by config.json's; where they differ the counts do not match, and the
# model fails deep in its forward (a size mismatch, "Image features and image tokens do not match")
_GEOMETRY = [("image_processor.patch_size", "vision_config.patch_size"),
             ("image_processor.merge_size", "vision_config.spatial_merge_size"),
             ("image_processor.temporal_patch_size", "vision_config.temporal_patch_size"),
             ("patch_size", "vision_config.patch_size"),  # LLaVA's processor
             ("vision_feature_select_strategy", "vision_feature_select_strategy")]


def _field(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def check_image_geometry(processor: object, config: object, name: str) -> None:
    """The processor's patch and merge sizes (and LLaVA's feature selection) are the vision tower's, and the tower's
    feature layer is one transformers' forward can read: else the first image-text sample fails in the model."""
    for ours, theirs in _GEOMETRY:
        given, built = _field(processor, ours), _field(config, theirs)
        if isinstance(given, int | str) and isinstance(built, int | str) and given != built:
            raise QuantkitError(f"the processor of {name} has {ours.rpartition('.')[2]} {given!r} but config.json's "
                                f"{theirs} is {built!r}; the image tokens it places would not match the vision tower's "
                                "features: save the model's own processor beside it, or make the two agree")
    if (_field(config, "vision_feature_layer") == 0 and _field(config, "vision_config.num_hidden_layers") is not None
            and _asks_only_selected_hidden_states()):
        raise QuantkitError(f"{name}: config field vision_feature_layer is 0 (the vision embeddings' output), which "
                            "transformers' forward reads as no hidden states wanted and fails on; choose a layer of "
                            "the tower (-1 the last, -2 the one before, as LLaVA's own configs)")


def _asks_only_selected_hidden_states() -> bool:
    """Whether this transformers asks a vision tower for the hidden states vision_feature_layer selects (its
    select_hidden_states, 5.2x on): 0 then asks for none and the forward fails; earlier releases ask for all, and a
    feature layer of 0 (the embeddings' output) runs there."""
    try:
        from transformers.utils.output_capturing import select_hidden_states  # noqa: F401 - the import is the check
    except ImportError:
        return False
    return True


def check_image_token(processor: object, config: object, name: str) -> None:
    """The processor's image token is a token of its tokenizer, the one config.json's image_token_id names: else the
    model finds no (or other) placeholders for the image features, a ValueError deep in its forward. The processor's
    sizes are checked against the tower's first (check_image_geometry)."""
    check_image_geometry(processor, config, name)
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    wanted = next((v for v in (getattr(config, k, None) for k in ("image_token_id", "image_token_index"))
                   if isinstance(v, int)), None)
    if not isinstance(token, str) or tokenizer is None or wanted is None:
        return  # a processor or config that names no image token: the model's own forward decides
    marker = tokenizer.convert_tokens_to_ids(token)
    if marker is None or marker == getattr(tokenizer, "unk_token_id", None):
        raise QuantkitError(f"the tokenizer of {name} has no token {token!r}, the processor's image placeholder; "
                            "save the model's own processor (tokenizer included) beside it")
    from quantkit.data.images import image_token_id

    # the id the image's features replace: the marker itself, or (Gemma 3: image_token is the begin-of-image marker)
    # the tokenizer's image token the processor expands the marker into
    got = image_token_id(processor)
    if got != wanted:
        placed = tokenizer.convert_ids_to_tokens(got)
        raise QuantkitError(f"the processor of {name} marks images with {placed!r} (id {got}) but config.json's "
                            f"image_token_id is {wanted}; the model would find no image placeholders: make them agree")


def model_for_data(name: str, source: str | os.PathLike | None = None, *, tokenizer: bool = True,
                   images: bool = False) -> ModelFiles:
    """check_model_files, then what reads `source` (or in-memory records, `images` where they hold images) for that
    model: a VLM's processor for image data, else (with `tokenizer`) the tokenizer; the one loaded is kept in the
    ModelFiles for drawing the samples."""
    from quantkit.models import is_vlm

    files = check_model_files(name, tokenizer=False)
    check_full_precision(files.config, name)
    check_language_model(files.config, name)
    if is_vlm(files.config) and (images or (source is not None and source_for(source).image)):
        files.tokenizer = check_processor(files.path)
        check_image_token(files.tokenizer, files.config, name)
    elif tokenizer:
        files.tokenizer = check_tokenizer(files.path, files.config)
    return files


def check_chat_data(source: str | os.PathLike | None, chat_template: str | os.PathLike | None,
                    files: ModelFiles | None = None) -> None:
    """Chat records can be rendered: without --chat-template, the model's tokenizer (read from `files`) has a
    chat template of its own."""
    if source is None or chat_template is not None or files is None or not source_for(source).chat:
        return
    from quantkit.data.chat import template_for

    template_for(load_tokenizer(files.path), None, files.name)
