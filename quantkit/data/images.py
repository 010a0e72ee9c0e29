"""Image-text calibration samples: JSONL records rendered through a VLM's processor and chat template.

Record forms (one JSON object per line; ``image`` is a path relative to the JSONL file):

- ``{"image": "img/0.png", "text": "a red square at the top left"}``: a caption. It is rendered as
  a user turn holding only the image and an assistant turn holding the caption.
- ``{"image": "img/0.png", "messages": [{"role": "user", "content": "what colour is the square?"},
  {"role": "assistant", "content": "red"}]}``: a conversation. String contents become text parts;
  the image placeholder is put first in the first user turn unless a content list already holds
  a ``{"type": "image"}`` part.

Each sample is the processor's output for the whole conversation, used as is (for Qwen2-VL that
includes ``mm_token_type_ids`` and ``image_grid_thw``), plus two [1, T] bool masks:
``loss_mask`` (True on the tokens the assistant turns produce: the answer or caption and the end
of its turn, i.e. every token after a generation prompt up to the end of that turn) and
``vision_mask`` (True on the image placeholder tokens the processor expanded).
"""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import torch

from quantkit.data.sources import jsonl_records
from quantkit.errors import QuantkitError, first_line

# Processor outputs with one entry per token: cut together when max_length truncates a sample.
_PER_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "loss_mask", "vision_mask")


def image_only_processor(processor_class, image_processor, tokenizer, **kwargs):
    """A VLM processor (Qwen2-VL, LLaVA-OneVision...) built without its video processor, which needs torchvision.

    `processor_class` is the family's processor class; the result handles images and text only.
    """

    class ImageTextProcessor(processor_class):
        """The processor class whose sub-processors are the image processor and tokenizer alone."""

        @classmethod
        def get_attributes(cls) -> list[str]:
            """Sub-processor attributes: no video processor."""
            return ["image_processor", "tokenizer"]

    # Saved as the family's own processor class, so that a full install loads it back whole.
    ImageTextProcessor.__name__ = ImageTextProcessor.__qualname__ = processor_class.__name__
    if "video_processor" in inspect.signature(processor_class.__init__).parameters:
        kwargs.setdefault("video_processor", None)  # some (SmolVLM's) require the argument
    return ImageTextProcessor(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def load_processor(name_or_path: str):
    """AutoProcessor for a VLM; without torchvision, an image-and-text processor built from its parts."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        if hasattr(processor, "image_processor"):
            return processor
        reason = f"AutoProcessor gave a {type(processor).__name__}, not an image-text processor"
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    settings = _processor_settings(name_or_path)
    class_name = settings.pop("processor_class", None)
    if class_name not in _PROCESSOR_CLASSES.values():
        try:
            class_name = _PROCESSOR_CLASSES.get(AutoConfig.from_pretrained(name_or_path).model_type)
        except (OSError, ValueError):
            class_name = None
    if class_name is None:
        raise QuantkitError(f"cannot load the processor of {name_or_path}: {reason}")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    settings.setdefault("chat_template", getattr(tokenizer, "chat_template", None))
    return image_only_processor(getattr(transformers, class_name), image_processor, tokenizer, **settings)


# Families whose processor needs a video processor (and so torchvision) to be built whole.
_PROCESSOR_CLASSES = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
    "internvl": "InternVLProcessor",
    "smolvlm": "SmolVLMProcessor",
}


def _processor_settings(name_or_path: str) -> dict:
    """The processor's own settings (processor_config.json, chat template file) of a local model dir."""
    directory = Path(name_or_path)
    settings: dict = {}
    config_file = directory / "processor_config.json"
    if config_file.is_file():
        settings = {k: v for k, v in json.loads(config_file.read_text()).items() if k not in ("video_processor", "image_processor")}
    for name in ("chat_template.jinja", "chat_template.json"):
        template = directory / name
        if template.is_file() and "chat_template" not in settings:
            text = template.read_text()
            settings["chat_template"] = json.loads(text)["chat_template"] if name.endswith(".json") else text
    return settings


def image_token_id(processor) -> int:
    """The id of the tokens the processor expands an image into: the tokenizer's own image token where it names one
    (Gemma 3's soft tokens, between the begin/end-of-image tokens the processor's image_token stands for), else the
    processor's."""
    token_id = getattr(processor.tokenizer, "image_token_id", None)
    if token_id is None:
        token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


def load_image(path: Path, where: str):
    """Open an image as RGB; a missing or unreadable file raises QuantkitError naming `where` and the path."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise QuantkitError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise QuantkitError(f"{where}: cannot read image {path}: {err}") from err


def _in_rgb(image, where: str):
    """A PIL image of in-memory data as RGB; one that cannot be read (closed, its lazy file gone) is one QuantkitError."""
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise QuantkitError(f"{where}: its PIL image cannot be read ({first_line(err)}); pass an open image, "
                            "or its path") from None


def _conversation(record: dict, where: str) -> list[dict]:
    """The record as chat messages with content lists and one image part."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise QuantkitError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    elif isinstance(record.get("text"), str):
        if not record["text"].strip():
            raise QuantkitError(f"{where}: field 'text' is empty; give the caption or drop the record")
        messages = [{"role": "user", "content": []}, {"role": "assistant", "content": record["text"]}]
    else:
        raise QuantkitError(f"{where}: a record needs a 'text' string (caption) or a 'messages' list")
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str) and not (isinstance(content, list) and all(isinstance(p, dict) for p in content)):
            raise QuantkitError(f"{where}: the {message['role']} message's content must be a string or a list of parts "
                                "({'type': 'text', 'text': ...} or {'type': 'image'})")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]
        bare = next((p for p in parts if p.get("type") == "text" and not isinstance(p.get("text"), str)), None)
        if bare is not None:
            raise QuantkitError(f"{where}: a text part of the {message['role']} message has no 'text' string ({bare}); "
                                "give its text or drop the part")
        out.append({"role": message["role"], "content": parts})
    if not any(m["role"] == "assistant" for m in out):
        raise QuantkitError(f"{where}: no assistant turn; the loss mask needs an answer or caption")
    has_image = any(p.get("type") == "image" for m in out for p in m["content"])
    if not has_image:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise QuantkitError(f"{where}: no user turn to hold the image")
        first_user["content"].insert(0, {"type": "image"})
    return out


def _process(processor, text: str, image, where: str = "record") -> dict:
    """Processor outputs for one text, with the image when the text holds its placeholder."""
    images = [image] if processor.image_token in text else None
    if images and 0 in (getattr(image, "width", 1), getattr(image, "height", 1)):  # processors divide by its sides
        raise QuantkitError(f"{where}: its image is {image.width}x{image.height} pixels, no picture to calibrate on; "
                            "fix or drop the record")
    try:
        features = processor(text=[text], images=images, return_tensors="pt")
    except (ValueError, TypeError, IndexError) as err:  # an image the processor cannot resize (extreme aspect ratio)
        size = f" ({image.width}x{image.height} px)" if hasattr(image, "width") else ""
        raise QuantkitError(f"{where}: the processor cannot take this record's image{size}: {first_line(err)}; "
                            "fix or drop the record") from None
    return dict(features)


def render_record(record: dict, image, processor, where: str = "record") -> dict:
    """One sample dict: the processor's outputs for the conversation, plus loss_mask and vision_mask."""
    if getattr(processor, "chat_template", None) is None:
        raise QuantkitError(f"{where}: the processor has no chat template; image-text records are rendered through it")
    from quantkit.data.chat import apply_template

    messages = _conversation(record, where)
    full_text = apply_template(processor, messages, where, tokenize=False)
    sample = _process(processor, full_text, image, where)
    ids = sample["input_ids"][0]
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = apply_template(processor, messages[:turn], where, tokenize=False, add_generation_prompt=True)
        upto = apply_template(processor, messages[: turn + 1], where, tokenize=False)
        start = _common_prefix(_process(processor, prompt, image)["input_ids"][0], ids)
        end = _common_prefix(_process(processor, upto, image)["input_ids"][0], ids)
        loss_mask[start:end] = True
    if not loss_mask.any():
        raise QuantkitError(f"{where}: the answer or caption renders to no tokens")
    sample["loss_mask"] = loss_mask.unsqueeze(0)
    sample["vision_mask"] = (ids == image_token_id(processor)).unsqueeze(0)
    if not sample["vision_mask"].any():
        raise QuantkitError(f"{where}: the rendered text holds no image tokens; check the chat template")
    return sample


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


def truncate_sample(sample: dict, max_length: int, where: str = "record") -> dict:
    """Cut the per-token tensors to max_length; the image tokens must all fit."""
    length = sample["input_ids"].shape[-1]
    if length <= max_length:
        return sample
    if sample["vision_mask"][0, max_length:].any():
        raise QuantkitError(
            f"{where}: max_length {max_length} would cut image tokens (the sample has {length} tokens); raise max_length"
        )
    if not sample["loss_mask"][0, :max_length].any():
        raise QuantkitError(f"{where}: max_length {max_length} cuts every answer token; raise max_length")
    out = dict(sample)
    for key in _PER_TOKEN_KEYS:
        if key in out and isinstance(out[key], torch.Tensor) and out[key].shape[-1] == length:
            out[key] = out[key][..., :max_length]
    return out


def read_image_records(jsonl_path: str | Path) -> list[tuple[str, dict, Path]]:
    """(file:line, record, image path) for every record of an image-text JSONL file."""
    path = Path(jsonl_path).expanduser()  # its images are relative to where ~ leads
    records = []
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise QuantkitError(f"{where}: no 'image' path; each record needs an 'image' string")
        records.append((where, record, path.parent / record["image"]))
    if not records:
        raise QuantkitError(f"{path} holds no records")
    return records


def check_image_files(jsonl_path: str | Path) -> None:
    """Every record of an image-text file names an image file that exists; else a QuantkitError naming the record
    (checked before any model loads)."""
    for where, _, image in read_image_records(jsonl_path):
        if not image.is_file():
            raise QuantkitError(f"{where}: image {image} not found; every image-text record needs its image")


def image_text_samples(
    jsonl_path: str | Path, processor, nsamples: int, seed: int = 0, max_length: int | None = None
) -> list[dict]:
    """`nsamples` seeded image-text calibration samples (processor outputs + loss_mask + vision_mask).

    The records are drawn without replacement with random.Random(seed) (all of them, in file order,
    when nsamples equals their number). Every record's image must exist; a missing or unreadable
    image raises QuantkitError naming file:line and the image path.
    """
    return sample_records(read_image_records(jsonl_path), processor, nsamples, seed, max_length, str(jsonl_path))


def memory_image_records(records: list[dict]) -> list[tuple[str, dict, object]]:
    """(where, record, image) for in-memory records whose 'image' is a path or a PIL image."""
    out = []
    for number, record in enumerate(records, start=1):
        where = f"data record {number}"
        image = record.get("image") if isinstance(record, dict) else None
        if isinstance(image, str):
            image = Path(image)
        if not isinstance(image, Path) and not hasattr(image, "convert"):
            raise QuantkitError(f"{where}: 'image' must be a path or a PIL image, got {type(image).__name__}")
        out.append((where, record, image))
    if not out:
        raise QuantkitError("data holds no records")
    return out


def sample_records(records: list[tuple[str, dict, object]], processor, nsamples: int, seed: int = 0,
                   max_length: int | None = None, source: str = "the data") -> list[dict]:
    """Seeded samples of (where, record, image path or PIL image) records: see image_text_samples."""
    if nsamples <= 0:
        raise QuantkitError(f"nsamples must be positive, got {nsamples}")
    if nsamples > len(records):
        raise QuantkitError(f"{source} holds {len(records)} records, fewer than nsamples={nsamples}")
    for where, _, image in records:
        if isinstance(image, Path) and not image.is_file():
            raise QuantkitError(f"{where}: image {image} not found")
    chosen = records if nsamples == len(records) else random.Random(seed).sample(records, nsamples)
    samples = []
    for where, record, image in chosen:
        picture = load_image(image, where) if isinstance(image, Path) else _in_rgb(image, where)
        sample = render_record(record, picture, processor, where)
        if max_length is not None:
            sample = truncate_sample(sample, max_length, where)
        samples.append(sample)
    return samples
