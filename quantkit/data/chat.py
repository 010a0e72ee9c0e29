"""Chat calibration samples for instruct LMs: ``{"messages": [...]}`` records rendered with a chat template.

Record form (one JSON object per line of a .jsonl file, or a dict in a list / a datasets.Dataset
row)::

    {"messages": [{"role": "system", "content": "be brief"},
                  {"role": "user", "content": "what is 2+2?"},
                  {"role": "assistant", "content": "4"}]}

Each record is one sample: the token ids of ``tokenizer.apply_chat_template(messages)`` (the
model's template, or a Jinja template given with ``--chat-template FILE``), cut to ``max_length``
tokens, plus a [1, T] bool ``loss_mask`` that is True on the tokens each assistant turn
produces: its content and the end of its turn, i.e. every token after the generation prompt
(the rendering of the turns before it with ``add_generation_prompt=True``) up to the end of the
rendering that includes that turn. This is the convention of image-text samples
(quantkit.data.images); TLQ's token importance scores only those predictions, while the
Hessians still see every token.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from quantkit.data.sources import jsonl_records
from quantkit.errors import QuantkitError, first_line, one_line

CHAT_FIELD = "messages"
CHAT_ROLES = ("system", "user", "assistant")  # the roles docs/commands.md names for chat records
NO_TEMPLATE_HINT = ("pass a model whose tokenizer has a chat template, or --chat-template FILE "
                    "(chat_template= in quantkit.quantize) with a Jinja template")


def is_chat_record(record: object) -> bool:
    """True for a dict holding a 'messages' list and no image (an image makes it an image-text record)."""
    return isinstance(record, dict) and CHAT_FIELD in record and "image" not in record


def is_chat_jsonl(source: object) -> bool:
    """True for a file of chat records ({"messages": [...]}, no image), whatever its suffix (JSON lines or one
    JSON array)."""
    from quantkit.data.sources import record_kind

    return isinstance(source, (str, os.PathLike)) and record_kind(source) == "chat"


def read_chat_template(path: str | os.PathLike) -> str:
    """The text of a Jinja chat template file, checked to parse; else a QuantkitError naming the file."""
    import jinja2

    file = Path(path).expanduser()
    if not file.is_file():
        raise QuantkitError(f"--chat-template {one_line(path)} not found; give a Jinja template file (chat_template= "
                            "names a file; write a template's text to one)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise QuantkitError(f"--chat-template {file} cannot be read as UTF-8 text: {err}") from None
    if not text.strip():
        raise QuantkitError(f"--chat-template {file} is empty; give a Jinja chat template")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise QuantkitError(f"--chat-template {file} is not a valid Jinja template (line {err.lineno}: {err.message})") from None
    return text


def template_for(tokenizer, chat_template: str | None, model_name: str = "the model") -> str:
    """The template to render with: the given one, else the tokenizer's; a QuantkitError when there is neither."""
    if chat_template is not None:
        return chat_template
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise QuantkitError(f"the tokenizer of {model_name} has no chat template to render 'messages' records; "
                            + NO_TEMPLATE_HINT)
    return own if isinstance(own, str) else own.get("default", next(iter(own.values())))


def chat_messages(record: object, where: str) -> list[dict]:
    """The record's messages, checked: a non-empty list of {'role', 'content'} with an assistant turn."""
    if not isinstance(record, dict) or CHAT_FIELD not in record:
        raise QuantkitError(f"{where}: no 'messages' list; each record must be {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
    messages = record[CHAT_FIELD]
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
        for m in messages
    ):
        raise QuantkitError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}} objects")
    other = next((m["role"] for m in messages if m["role"] not in CHAT_ROLES), None)
    if other is not None:
        raise QuantkitError(f"{where}: role {other!r} is not one of {', '.join(CHAT_ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise QuantkitError(f"{where}: no assistant turn; the loss mask covers the assistant's tokens")
    if "text" in record:
        raise QuantkitError(f"{where}: holds both 'text' and 'messages', and a chat record is rendered from its "
                            "messages alone; keep one of the two")
    parts = [part for m in messages if isinstance(m["content"], list) for part in m["content"]]
    if any(not isinstance(part, dict) or part.get("type", "text") != "text" for part in parts):
        raise QuantkitError(f"{where}: a message holds a part that is not text (an image?), which a text chat "
                            "record cannot carry; give image-text records to a vision-language model, or drop it")
    return messages


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render_ids(tokenizer, messages: list[dict], template: str, where: str, generation_prompt: bool = False) -> list[int]:
    """Token ids of the conversation rendered with `template`, as apply_chat_template gives them."""
    if not messages:
        return []
    ids = apply_template(tokenizer, messages, where, chat_template=template, tokenize=True, return_dict=False,
                         add_generation_prompt=generation_prompt)
    return [int(i) for i in ids]


def apply_template(owner, messages: list[dict], where: str, **options):
    """owner.apply_chat_template(messages, **options) of a tokenizer or processor. The template is code from the
    model's files or --chat-template: whatever it raises while rendering is one QuantkitError naming the record."""
    import jinja2

    try:
        return owner.apply_chat_template(messages, **options)
    except jinja2.TemplateError as err:
        raise QuantkitError(f"{where}: the chat template refused the conversation: {err}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise QuantkitError(f"{where}: the chat template failed on the conversation ({type(err).__name__}: "
                            f"{first_line(err)}); fix the template or the record") from None


def render_chat(record: object, tokenizer, chat_template: str | None = None, where: str = "record") -> dict:
    """One sample {"input_ids": [1, T], "loss_mask": [1, T] bool} for a chat record (see the module doc)."""
    messages = chat_messages(record, where)
    template = template_for(tokenizer, chat_template)
    ids = _render_ids(tokenizer, messages, template, where)
    loss_mask = torch.zeros(len(ids), dtype=torch.bool)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Common prefixes, not lengths: a token may merge across a turn boundary.
        start = common_prefix_length(_render_ids(tokenizer, messages[:turn], template, where, generation_prompt=True), ids)
        end = common_prefix_length(_render_ids(tokenizer, messages[: turn + 1], template, where), ids)
        loss_mask[start:end] = True
    if not loss_mask.any():
        raise QuantkitError(f"{where}: the assistant turns render to no tokens; check the chat template")
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "loss_mask": loss_mask.unsqueeze(0)}


def truncate_chat(sample: dict, max_length: int, where: str = "record") -> dict:
    """The sample cut to its first max_length tokens; some assistant token must remain."""
    if sample["input_ids"].shape[-1] <= max_length:
        return sample
    if not sample["loss_mask"][0, :max_length].any():
        raise QuantkitError(f"{where}: --seqlen {max_length} cuts every assistant token (the conversation has "
                            f"{sample['input_ids'].shape[-1]} tokens); raise --seqlen")
    return {key: value[..., :max_length] for key, value in sample.items()}


def read_chat_records(jsonl_path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(file:line, record) for every record of a chat JSONL file, each checked to hold messages."""
    path = Path(jsonl_path).expanduser()
    records = []
    for where, record in jsonl_records(path):
        chat_messages(record, where)
        records.append((where, record))
    if not records:
        raise QuantkitError(f"{path} holds no records")
    return records


def memory_chat_records(records: list) -> list[tuple[str, dict]]:
    """(where, record) for in-memory chat records, each checked to hold messages."""
    out = []
    for number, record in enumerate(records, start=1):
        where = f"data record {number}"
        chat_messages(record, where)
        out.append((where, record))
    return out


def chat_samples(
    records: str | os.PathLike | list[tuple[str, dict]],
    tokenizer,
    nsamples: int,
    seed: int = 0,
    max_length: int | None = None,
    chat_template: str | None = None,
    model_name: str = "the model",
) -> list[dict]:
    """`nsamples` seeded chat samples from a JSONL path or (where, record) pairs (see the module doc).

    Records are drawn without replacement with random.Random(seed) (all of them, in order, when
    nsamples equals their number); chat_template is the text of a Jinja template used instead of
    the tokenizer's own.
    """
    source = str(records) if isinstance(records, (str, os.PathLike)) else "the data"
    pairs = read_chat_records(records) if isinstance(records, (str, os.PathLike)) else records
    template = template_for(tokenizer, chat_template, model_name)
    if nsamples <= 0:
        raise QuantkitError(f"nsamples must be positive, got {nsamples}")
    if nsamples > len(pairs):
        raise QuantkitError(f"{source} holds {len(pairs)} conversations, fewer than --nsamples {nsamples}; "
                            "give more or lower --nsamples")
    chosen = pairs if nsamples == len(pairs) else random.Random(seed).sample(pairs, nsamples)
    samples = []
    for where, record in chosen:
        sample = render_chat(record, tokenizer, template, where)
        if max_length is not None:
            sample = truncate_chat(sample, max_length, where)
        samples.append(sample)
    return samples
