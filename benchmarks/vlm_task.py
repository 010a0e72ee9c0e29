"""A generated image-text task for measuring VLM quantization: coloured shapes in a 2x2 grid.

Images are 56x56 with one to three shapes (square or circle, four colours) in distinct cells of a
2x2 grid, at jittered positions, on a noisy dark background. Questions (one word answers):

- ``how many shapes ?`` -> ``one`` / ``two`` / ``three``
- ``what is at the top left ?`` -> ``red`` ``square`` / ``nothing``  (two or one answer words)
- ``what colour is the circle ?`` -> ``blue`` (asked only when exactly one circle is present)
- ``describe the picture`` -> ``a red square at the top left and a blue circle ...`` (training and
  calibration only; not scored)

That is the ``shapes`` task (the default). The ``relations`` task (``task="relations"``) draws one to
four shapes and asks questions that make the language model combine what the image tokens hold:
counting by colour or shape (``how many red shapes ?``, ``how many circles ?``), the neighbour of a
named shape (``what is right of the red square ?``), a yes/no relation between two named shapes
(``is the red square above the blue circle ?``) and ``what is at the top left ?``. It appends its few
extra words to the vocabulary, so ``shapes`` models and examples are unchanged.

Everything is seeded. The model family is LLaVA (CLIP vision tower, MLP projector, Llama text
model), built from a config with a word-level tokenizer and LlavaProcessor (no torchvision needed).
Accuracy: a question counts as right when the argmax prediction of every answer token and of the
closing ``<|im_end|>`` is right under teacher forcing, which is exactly when greedy decoding would
produce the answer.

With ``lm=DIR`` (a Llama causal LM trained on real text, HF format, with its byte-level BPE tokenizer;
e.g. /work/bench-models/ref-lm-c) the language model is that LM's weights and the text is in its
tokenizer with one added ``<image>`` token, rendered as plain text the LM has read before:
``<image>\nQuestion: what colour is the circle ?\nAnswer: blue<|endoftext|>`` (answer tokens: the
answer and the closing ``<|endoftext|>``). The questions and answers are the same; only the text
model and its vocabulary differ, so quantization meets weights shaped by real text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

SIZE = 56
CELL = SIZE // 2
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 70, 230), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle")
POSITIONS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
NUMBERS = ("one", "two", "three")
QUESTION_KINDS = ("count", "where", "colour")
# The "relations" task: one to four shapes, and questions the language model has to compose from
# the image tokens (find a shape by its description, then its neighbour or its relation to another).
RELATION_KINDS = ("count_attr", "neighbour", "relation", "where")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}  # (row, column) step
COUNTS = ("zero", "one", "two", "three", "four")
PLURALS = {"square": "squares", "circle": "circles"}
TASKS = ("shapes", "relations")

# Example seed ranges; disjoint so no image is both trained on and scored. Training batch `step` of
# training seed s uses seed s * TRAIN_STRIDE + step; calibration pools use CALIB_SEED + calibration
# seed; VAL_SEED is for training curves, model choice and TLQ option comparisons; EVAL_SEED is the
# held-out set, scored only by the final benchmark.
TRAIN_STRIDE = 1_000_003
CALIB_SEED = 1_000_000
EVAL_SEED = 2_000_000
VAL_SEED = 3_000_000


def train_seeds(seed: int, steps: int) -> range:
    """The example seeds that training seed `seed` run for `steps` steps draws its batches from."""
    return range(seed * TRAIN_STRIDE, seed * TRAIN_STRIDE + steps)

SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
WORDS = [
    "user", "assistant", "?", ".", "a", "and", "at", "the", "is", "what", "how", "many", "shapes",
    "colour", "describe", "picture", "nothing", *COLOURS, *SHAPES, "top", "bottom", "left", "right", *NUMBERS,
]
# Appended only for the "relations" task, so the "shapes" vocabulary (and its models) stay as they were.
RELATION_WORDS = ["zero", "four", "yes", "no", "of", "above", "below", *PLURALS.values()]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for c in m.content %}{% if c.type == 'image' %}<image> {% else %}{{ c.text }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The template of a pretrained text LM (make_processor's lm): plain "Question: ... Answer:" text, the generation
# prompt inside the user turn, so the answer follows "Answer:" as in text the LM has read.
LM_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' %}{% for c in m.content %}{% if c.type == 'image' %}<image>"
    "{% else %}\nQuestion: {{ c.text }}\nAnswer:{% endif %}{% endfor %}"
    "{% else %}{% for c in m.content %} {{ c.text }}{% endfor %}<|endoftext|>{% endif %}{% endfor %}"
)


@dataclass
class Example:
    """One image with a question (or caption request) and its answer."""

    image: Image.Image
    question: str
    answer: str
    kind: str

    def messages(self) -> list[dict]:
        """The chat form used by quantkit.data.images (the image goes first in the user turn)."""
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


def draw_scene(rng: random.Random, max_count: int = 3) -> tuple[Image.Image, dict[int, tuple[str, str]]]:
    """A random image with one to `max_count` shapes and its content: cell index -> (colour, shape)."""
    image = Image.new("RGB", (SIZE, SIZE), (rng.randint(0, 40), rng.randint(0, 40), rng.randint(0, 40)))
    draw = ImageDraw.Draw(image)
    count = rng.randint(1, max_count)
    cells = rng.sample(range(4), count)
    content = {}
    for cell in cells:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        side = rng.randint(14, 20)
        x0 = (cell % 2) * CELL + rng.randint(1, CELL - side - 1)
        y0 = (cell // 2) * CELL + rng.randint(1, CELL - side - 1)
        fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
        box = (x0, y0, x0 + side, y0 + side)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=fill)
        content[cell] = (colour, shape)
    return image, content


def caption(content: dict[int, tuple[str, str]]) -> str:
    """'a red square at the top left and a blue circle at the bottom right .'"""
    parts = [f"a {c} {s} at the {' '.join(POSITIONS[cell])}" for cell, (c, s) in sorted(content.items())]
    return " and ".join(parts) + " ."


def make_examples(n: int, seed: int, captions: float = 0.0, task: str = "shapes") -> list[Example]:
    """n seeded examples of `task`; a `captions` fraction are caption requests, the rest questions."""
    if task == "relations":
        return _relation_examples(n, seed, captions)
    if task != "shapes":
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        image, content = draw_scene(rng)
        if rng.random() < captions:
            out.append(Example(image, "describe the picture", caption(content), "caption"))
            continue
        kind = rng.choice(QUESTION_KINDS)
        if kind == "count":
            out.append(Example(image, "how many shapes ?", NUMBERS[len(content) - 1], kind))
        elif kind == "where":
            cell = rng.randrange(4)
            answer = " ".join(content[cell]) if cell in content else "nothing"
            out.append(Example(image, f"what is at the {' '.join(POSITIONS[cell])} ?", answer, kind))
        else:
            shape = rng.choice(SHAPES)
            matches = [c for c, s in content.values() if s == shape]
            if len(matches) == 1:
                out.append(Example(image, f"what colour is the {shape} ?", matches[0], kind))
    return out


def _relation_examples(n: int, seed: int, captions: float) -> list[Example]:
    """The "relations" task: 1-4 shapes; questions that name a shape by colour and shape.

    - ``how many red shapes ?`` / ``how many circles ?`` -> ``zero`` .. ``four``
    - ``what is right of the red square ?`` -> ``blue circle`` / ``nothing`` (the neighbouring cell)
    - ``is the red square above the blue circle ?`` -> ``yes`` / ``no`` (row or column strictly before)
    - ``what is at the top left ?`` -> ``red square`` / ``nothing``

    A shape is named only when no other shape in the image has the same colour and shape.
    """
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        image, content = draw_scene(rng, max_count=4)
        if rng.random() < captions:
            out.append(Example(image, "describe the picture", caption(content), "caption"))
            continue
        kind = rng.choice(RELATION_KINDS)
        named = [cell for cell, item in content.items() if list(content.values()).count(item) == 1]
        if kind == "count_attr":
            if rng.random() < 0.5:
                colour = rng.choice(list(COLOURS))
                number = sum(c == colour for c, _ in content.values())
                question = f"how many {colour} shapes ?"
            else:
                shape = rng.choice(SHAPES)
                number = sum(s == shape for _, s in content.values())
                question = f"how many {PLURALS[shape]} ?"
            out.append(Example(image, question, COUNTS[number], kind))
        elif kind == "neighbour":
            if not named:
                continue
            cell = rng.choice(sorted(named))
            row, col = divmod(cell, 2)
            # Each cell has one neighbour across (left or right) and one up or down.
            relation = rng.choice([r for r, (dr, dc) in RELATIONS.items() if 0 <= row + dr < 2 and 0 <= col + dc < 2])
            dr, dc = RELATIONS[relation]
            other = (row + dr) * 2 + col + dc
            answer = " ".join(content[other]) if other in content else "nothing"
            out.append(Example(image, f"what is {relation} the {' '.join(content[cell])} ?", answer, kind))
        elif kind == "relation":
            if len(named) < 2:
                continue
            a, b = rng.sample(sorted(named), 2)
            relation = rng.choice(list(RELATIONS))
            dr, dc = RELATIONS[relation]
            # "a left of b": a's column is before b's (dc = -1 means a is one step left of b).
            (ra, ca), (rb, cb) = divmod(a, 2), divmod(b, 2)
            truth = (ra - rb == dr) if dr else (ca - cb == dc)
            question = f"is the {' '.join(content[a])} {relation} the {' '.join(content[b])} ?"
            out.append(Example(image, question, "yes" if truth else "no", kind))
        else:
            cell = rng.randrange(4)
            answer = " ".join(content[cell]) if cell in content else "nothing"
            out.append(Example(image, f"what is at the {' '.join(POSITIONS[cell])} ?", answer, kind))
    return out


def write_jsonl(examples: Sequence[Example], directory: str | Path) -> Path:
    """Save the images and an image-text JSONL of messages records (quantkit.data.images format)."""
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(examples):
        name = f"images/{i:05d}.png"
        ex.image.save(root / name)
        lines.append(json.dumps({"image": name, "messages": ex.messages()}))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_tokenizer(task: str = "shapes", lm: str | None = None):
    """Word-level tokenizer over the task vocabulary with the chat and image tokens; with `lm`, that LM's own
    tokenizer plus an ``<image>`` token (its end-of-text token pads and closes the answers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if lm is not None:
        tokenizer = AutoTokenizer.from_pretrained(lm)
        tokenizer.add_tokens(["<image>"], special_tokens=True)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        return tokenizer
    words = WORDS + (RELATION_WORDS if task == "relations" else [])
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        additional_special_tokens=SPECIALS[2:], padding_side="right",
    )


def make_processor(task: str = "shapes", lm: str | None = None):
    """LlavaProcessor: CLIP preprocessing at 56x56, 16 image tokens (4x4 patches of 14, CLS dropped); with `lm`,
    that LM's tokenizer and the plain-text template."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return LlavaProcessor(
        image_processor, make_tokenizer(task, lm), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE if lm is None else LM_TEMPLATE,
    )


def make_model(tokenizer, seed: int = 0, hidden: int = 128, layers: int = 4, lm: str | None = None):
    """A tiny LLaVA: CLIP tower (2 layers, width 64), projector, Llama text model (with `lm`: that LM's config and
    weights, its embedding grown by the <image> row, which is zero: image positions never read it, and a zero row
    of the tied head gives <image> a constant logit of 0)."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

    text_config = dict(
        model_type="llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    if lm is not None:
        text_config = {**AutoConfig.from_pretrained(lm).to_dict(), "vocab_size": len(tokenizer),
                       "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        text_config.pop("architectures", None)
    config = LlavaConfig(
        text_config=text_config,
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, image_size=SIZE, patch_size=14, projection_dim=64,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    if lm is not None:
        config.tie_word_embeddings = text_config.get("tie_word_embeddings", False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if lm is not None:
        _load_lm(model, lm, len(tokenizer))
    return model


def _load_lm(model, lm: str, vocab: int) -> None:
    """Copy a pretrained Llama causal LM's weights into the LLaVA's text model and head."""
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32)
    state = source.model.state_dict()
    embed = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(vocab - embed.shape[0], embed.shape[1])])
    model.model.language_model.load_state_dict(state)
    head = source.get_output_embeddings().weight
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.cat([head, head.new_zeros(vocab - head.shape[0], head.shape[1])]))


def encode(processor, examples: Sequence[Example], with_answer: bool = True) -> dict[str, torch.Tensor]:
    """Batch processor outputs (right-padded) plus `labels`: answer and closing <|im_end|> tokens, else -100."""
    texts = [processor.apply_chat_template(_chat(ex), tokenize=False) for ex in examples]
    batch = dict(processor(text=texts, images=[ex.image for ex in examples], padding=True, return_tensors="pt"))
    ids = batch["input_ids"]
    tok = processor.tokenizer
    labels = torch.full_like(ids, -100)
    if "<|im_start|>" not in tok.get_vocab():
        # The pretrained LM's plain-text template: the answer's own tokens (byte-level BPE splits " blue" from
        # "Answer:" alike in and out of context) and <|endoftext|> end each row's unpadded tokens.
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, ex in enumerate(examples):
            stop = int(lengths[row])
            first = stop - len(tok(" " + ex.answer, add_special_tokens=False)["input_ids"]) - 1
            labels[row, first:stop] = ids[row, first:stop]
        batch["labels"] = labels
        return batch
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    for row in range(ids.shape[0]):
        starts = (ids[row] == start).nonzero().reshape(-1)
        first = int(starts[-1]) + 2  # <|im_start|> assistant (the tokenizer drops the "\n")
        stop = first + int((ids[row, first:] == end).nonzero()[0]) + 1
        labels[row, first:stop] = ids[row, first:stop]
    batch["labels"] = labels
    return batch


def _chat(ex: Example) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]},
        {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]},
    ]


@torch.no_grad()
def accuracy(model, processor, examples: Sequence[Example], batch_size: int = 64, per_example: bool = False) -> dict:
    """Exact-match accuracy of the answers (teacher-forced argmax), per kind, and answer-token NLL (nats).

    per_example adds ``correct`` (0/1 per example, in order) and ``nll_sums`` (each example's answer-token NLL
    summed), so two methods can be compared pairwise on the same examples: the paired difference has far less
    noise than two independent accuracies. answer_nll (and nll_<kind>, per question kind) is kept to 7 decimals
    (gaps of 1e-4 nats are compared).
    """
    model.eval()
    right: dict[str, list[int]] = {}
    correct: list[int] = []
    nll_sums: list[float] = []
    kind_nll: dict[str, list] = {}  # kind -> [answer-token NLL sum, answer tokens]
    nll, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = encode(processor, chunk)
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits
        pred = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        ok = ((pred == target) | (target == -100)).all(dim=1)
        scored = target != -100
        token_nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp_min(0),
                                                      reduction="none") * scored
        nll += float(token_nll.sum())
        count += int(scored.sum())
        nll_sums.extend(token_nll.sum(dim=1).tolist())
        for ex, good, ex_nll, ex_tokens in zip(chunk, ok.tolist(), token_nll.sum(dim=1).tolist(), scored.sum(dim=1).tolist()):
            right.setdefault(ex.kind, []).append(int(good))
            correct.append(int(good))
            kind_nll.setdefault(ex.kind, [0.0, 0])
            kind_nll[ex.kind][0] += ex_nll
            kind_nll[ex.kind][1] += ex_tokens
    total = [v for vals in right.values() for v in vals]
    out = {"accuracy": sum(total) / len(total), "n": len(total), "answer_nll": round(nll / count, 7),
           "answer_tokens": count}
    out.update({f"acc_{k}": round(sum(v) / len(v), 4) for k, v in sorted(right.items())})
    out.update({f"nll_{k}": round(v[0] / v[1], 7) for k, v in sorted(kind_nll.items()) if v[1]})
    if per_example:
        out["correct"] = correct
        out["nll_sums"] = nll_sums  # answer-token NLL summed per example: paired NLL differences
    return out
