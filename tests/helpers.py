"""What tests share: tiny models (text and VLM) and tokenizers (word, printable, char), calibration text and
image data, export comparisons, fault hooks, CLI commands. Test modules import only this and conftest."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer():
    """A word-level tokenizer over WORDS (ids 2..61; <unk> 0, <eos> 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def config_of(model_type: str, **fields):
    """transformers' own config class of `model_type` with exactly `fields` (the class's defaults for the rest)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **fields)


def require_type(model_type: str) -> None:
    """Skip the test where the installed transformers has no `model_type` (CI's floors: an older release)."""
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {__version__} has no model type {model_type!r} (a later release adds it)")


def random_model(config, seed: int | None = None, dtype: torch.dtype | None = None):
    """The random model transformers builds from `config` (image-text where it has a vision config, else a causal
    LM; train mode, as from_config gives it): every tiny model of the tests is built here. `seed` reseeds torch
    first (None: the test's own random state)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if seed is not None:
        torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    return auto.from_config(config, **({} if dtype is None else {"dtype": dtype}))


def tiny_model(model_type: str, seed: int | None = None, dtype: torch.dtype | None = None, **fields):
    """random_model of config_of(model_type, **fields): exactly the fields a test states (tiny_causal_lm gives
    any type tiny defaults instead)."""
    return random_model(config_of(model_type, **fields), seed, dtype)


def tiny_vlm(model_type: str, seed: int | None = None, **fields):
    """random_model of config_of(model_type, **fields) for a vision-language type (text_config and vision_config
    as dicts)."""
    return random_model(config_of(model_type, **fields), seed)


def save_tiny_llama(root: Path, hidden: int = 32, layers: int = 2, max_positions: int = 64, seed: int = 0,
                    **config) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) with its tokenizer, saved as a model directory."""
    tiny_model("llama", seed, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=max_positions,
               **config).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


def write_text(path: Path, words: int = 2000, seed: int = 0) -> Path:
    """Random text over the tokenizer's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (words,), generator=generator)
    path.write_text(" ".join(WORDS[i] for i in picks))
    return path


def byte_level_tokenizer(text: Path):
    """A byte-level BPE tokenizer trained on `text` over its own characters only (under 120 tokens: every tiny
    vocabulary holds it), for the types whose own tokenizer class (Qwen2's, GPT-2's) rebuilds a byte-level BPE
    from the saved vocabulary and merges, and so reads no word of a word-level one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=110, special_tokens=["<unk>", "<eos>"], initial_alphabet=[],
                                               show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_tokenizer(model_dir: Path, text: Path):
    """make_tokenizer saved beside a model, or byte_level_tokenizer where transformers loads the saved files as the
    type's own tokenizer class, which reads none of the words; the tokenizer transformers loads back."""
    from transformers import AutoTokenizer

    make_tokenizer().save_pretrained(model_dir)
    loaded = AutoTokenizer.from_pretrained(model_dir)
    if not loaded(" ".join(WORDS[1:3]))["input_ids"]:
        byte_level_tokenizer(text).save_pretrained(model_dir)
        loaded = AutoTokenizer.from_pretrained(model_dir)
    return loaded


def printable_tokenizer():
    """A 96-symbol character tokenizer built offline (printable ASCII + <unk>)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<unk>"] = 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def char_tokenizer():
    """One token per character (ids 1..96), eos '<eos>' = 0: token counts equal character counts."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])), eos_token="<eos>")


def char_ids(text: str) -> list[int]:
    """The char tokenizer's ids, computed without it."""
    return [CHARS.index(c) + 1 for c in text]


def make_model_dir(root: Path, layers: int = 3, width: int = 64, inter: int = 128, tie: bool = False) -> Path:
    """Save a random Llama with the printable tokenizer under root/model (sharded when large)."""
    model = tiny_model("llama", 0, vocab_size=96, hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    out = root / "model"
    model.save_pretrained(out, max_shard_size="20MB")
    printable_tokenizer().save_pretrained(out)
    return out


def make_text(root: Path) -> Path:
    """A text file of random words, plenty for a few 32-token windows."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(2, 8))) for _ in range(800)]
    path = root / "calib.txt"
    path.write_text(" ".join(words))
    return path


def files_and_tensors(out: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Exported file names and every tensor of the export's safetensors files."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in out.iterdir())
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return names, tensors


def assert_same_files(ref: Path, other: Path) -> None:
    """The same file names, and every safetensors file the same bytes."""
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    weights = [name for name in names if name.endswith(".safetensors")]
    assert weights
    for name in weights:
        assert (ref / name).read_bytes() == (other / name).read_bytes(), name


# Fault tests: exit code 2, one `error:` line, nothing added, removed or changed under the test's folder.


def tree(root: Path) -> dict[str, str]:
    """relative path -> content hash (or 'dir') of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def dynamic_rule(qc: dict, name: str) -> dict | bool | None:
    """How GPTQModel and vLLM read a GPTQ config's `dynamic` (written from their documentation): the first key
    whose regex re.match-es the module decides, "-:" leaving it unquantized (False), "+:" or no prefix overriding
    fields; None: no rule."""
    import re

    for key, fields in qc.get("dynamic", {}).items():
        if key.startswith("-:"):
            if re.match(key[2:], name):
                return False
        elif re.match(key.removeprefix("+:"), name):
            return fields
    return None


def run_cli(*args):
    """`quantkit ARGS` in-process (click's CliRunner; stderr kept apart)."""
    from click.testing import CliRunner

    from quantkit.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def replaced(base: list, extra: tuple) -> list:
    """`base` options ("--opt value" pairs and flags) less those `extra` gives again (an option twice is refused)."""
    out, i = [], 0
    while i < len(base):
        size = 2 if i + 1 < len(base) and not str(base[i + 1]).startswith("--") else 1
        if base[i] not in extra:
            out += base[i:i + size]
        i += size
    return out


def one_error_line(stderr: str) -> str:
    """The single stderr line, which must start with `error:`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@contextlib.contextmanager
def unchanged(root: Path) -> Iterator[None]:
    """Assert that nothing under root is added, removed or modified by the block (the source stays intact too)."""
    before = tree(root)
    yield
    after = tree(root)
    assert after == before, {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                             "changed": sorted(k for k in before if k in after and before[k] != after[k])}


def assert_fault(root: Path, args: list, fragment: str, code: int = 2) -> str:
    """Run the CLI in-process: exit code, one `error:` line naming `fragment`, nothing changed under root."""
    with unchanged(root):
        result = run_cli(*args)
    assert result.exit_code == code, (result.exit_code, result.output)
    line = one_error_line(result.stderr)
    assert fragment in line, line
    return line


def ct_divisor(bits: int) -> float:
    """compressed-tensors' symmetric scale divisor (its own fake-quantization, what transformers applies when it
    loads an export): half the integer range, (2**bits - 1) / 2."""
    return ((1 << bits) - 1) / 2


def observing(on_hessian):
    """A one-process Comm whose hooks show every Hessian (and FP-target cross term) a solver is given:
    on_hessian(full_linear_name, normalised_hessian, cross_term_or_None)."""
    from quantkit.engine.comm import Comm, Hooks

    return Comm(hooks=Hooks(on_hessian=on_hessian))


@dataclass(frozen=True)
class FailAt:
    """Hooks.on_layer fault: rank `rank` raises (or, with kill, dies by SIGKILL) on entering layer `layer`."""

    rank: int
    layer: int
    kill: bool = False

    def __call__(self, rank: int, layer: int) -> None:
        if (rank, layer) != (self.rank, self.layer):
            return
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at rank {rank}, layer {layer}")


@dataclass(frozen=True)
class Delay:
    """Hooks.on_layer: sleep `seconds` on entering every layer, so a test can stop a run mid-way."""

    seconds: float

    def __call__(self, rank: int, layer: int) -> None:
        time.sleep(self.seconds)


@dataclass(frozen=True)
class SignalAt:
    """Hooks.on_layer: the process sends itself `signum` on entering layer `layer` (a signal at a known point)."""

    layer: int
    signum: int = signal.SIGINT

    def __call__(self, rank: int, layer: int) -> None:
        if layer == self.layer:
            os.kill(os.getpid(), self.signum)


def with_hooks(monkeypatch, **hooks) -> None:
    """Make quantkit.calibrate.run.run_job (quantize, run_calibration and the in-process CLI) run with
    Hooks(**hooks) on every rank."""
    from quantkit.calibrate import run
    from quantkit.engine.comm import Hooks

    real = getattr(run.run_job, "unhooked", run.run_job)  # a second call replaces the first one's hooks

    def hooked(job):
        return real(replace(job, run=replace(job.run, hooks=Hooks(**hooks))))

    hooked.unhooked = real
    monkeypatch.setattr(run, "run_job", hooked)


def run_calibration(model, output, spec, *, calib=None, method: str = "gptq", **options) -> dict:
    """One calibration job in this process, `spec`'s settings (a QuantSpec) and build_job's `options`, exported to
    `output`; GPTQ unless `method` says otherwise. Returns the report."""
    from quantkit.calibrate import build_job
    from quantkit.calibrate import run as runner
    from quantkit.calibrate.job import WEIGHT_OPTIONS

    weights = {name: getattr(spec, name) for name in WEIGHT_OPTIONS}
    job = build_job(model, calib, method=method, output_dir=output, **weights, **options)
    return runner.run_job(job).report


def cli_command(*args, hooks: str | None = None, prelude: str = "") -> list[str]:
    """`python -m quantkit.cli ARGS`; with `hooks`, a Python expression over helpers' names (for example
    "Hooks(on_layer=Delay(2))"), the CLI runs with those hooks on every rank; `prelude` (statements) runs first."""
    if hooks is None and not prelude:
        return [sys.executable, "-m", "quantkit.cli", *map(str, args)]
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n{prelude}\n"
        "from helpers import *\nfrom quantkit.engine.comm import Hooks\nfrom quantkit.calibrate import run\n"
        "from dataclasses import replace\n"
        f"real = run.run_job\nrun.run_job = lambda job: real(replace(job, run=replace(job.run, hooks={hooks})))\n"
        "from quantkit.cli import main\nsys.argv[0] = 'quantkit'\nmain()\n"
    )
    return [sys.executable, "-c", code, *map(str, args)]


# Tiny VLMs: a word-level tokenizer with the chat and image special tokens of every processor family.
VLM_WORDS = "a an the red green blue yellow square circle what colour is of ? . , left right top bottom at one two three how many shapes picture describe".split()
VLM_SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<image>", "<video>"]
VLM_ROLES = ["user", "assistant", "system"]
VLM_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision", "qwen3_vl", "gemma3", "idefics3", "internvl",
                "llava_next"]
# Image tokens of the newer processor families (after the older ones' vocabulary, whose ids stay as they were), and
# the ones their tokenizers name: a processor reads its image token from the tokenizer where the tokenizer names one.
VLM_NEW_SPECIALS = ["<start_of_image>", "<image_soft_token>", "<end_of_image>", "<img>", "</img>", "<IMG_CONTEXT>",
                    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
VLM_NAMED_TOKENS = {
    "gemma3": {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"},
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
}
VLM_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
IMAGE_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def vlm_tokenizer(family: str | None = None):
    """A word-level tokenizer holding the chat and image special tokens of the processor families (the newer
    families' after the older ones' vocabulary), naming `family`'s image tokens as its own tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    newer = family in VLM_FAMILIES[4:]
    extra = VLM_NEW_SPECIALS if newer else []
    vocab = {t: i for i, t in enumerate(VLM_SPECIALS + VLM_ROLES + VLM_WORDS + ["\n"] + extra)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    named = VLM_NAMED_TOKENS.get(family)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        additional_special_tokens=VLM_SPECIALS[2:] + extra, **({"extra_special_tokens": named} if named else {}),
    )


def vlm_chat_template(image: str) -> str:
    """A ChatML template whose image part renders as `image` (the family's placeholder)."""
    return (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content is string %}{{ m.content }}"
        "{% else %}{% for c in m.content %}{% if c.type == 'image' %}" + image + " {% else %}{{ c.text }}"
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def build_vlm(family: str):
    """A tiny random VLM of `family` (one of VLM_FAMILIES; 3 text layers of hidden 32) and a processor that
    matches it. The image processors are the PIL ones: callers skip without PIL."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        LlavaProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    from quantkit.data.images import image_only_processor

    tok = vlm_tokenizer(family)
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(0)
    if family in VLM_FAMILIES[4:]:
        config, processor = _newer_vlm(family, tok)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        qwen_tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        text = dict(VLM_TEXT, vocab_size=len(tok), rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
        if family == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)
            config = Qwen2VLConfig(text_config=text, vision_config=vision, **qwen_tokens)
            proc_class = Qwen2VLProcessor
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56)
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **qwen_tokens)
            proc_class = Qwen2_5_VLProcessor
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)
        processor = image_only_processor(proc_class, image_processor, tok, chat_template=vlm_chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    elif family == "llava":
        config = LlavaConfig(
            text_config=dict(VLM_TEXT, model_type="llama", vocab_size=len(tok)),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
            image_token_id=ids("<image>"),
            vision_feature_layer=-1,
        )
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        processor = LlavaProcessor(image_processor, tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=vlm_chat_template("<image>"))
    elif family == "llava_onevision":
        pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
        config = LlavaOnevisionConfig(
            text_config=dict(VLM_TEXT, model_type="qwen2", vocab_size=len(tok)),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
            image_token_id=ids("<image>"),
            video_token_id=ids("<video>"),
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints, do_pad=True)
        processor = image_only_processor(LlavaOnevisionProcessor, image_processor, tok, num_image_tokens=4, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=vlm_chat_template("<image>"))
    else:
        raise ValueError(family)
    return random_model(config).eval(), processor


def save_vlm(family: str, path: Path) -> tuple:
    """build_vlm(family), saved to `path` with its processor as a model folder; returns (model, processor)."""
    model, processor = build_vlm(family)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def _newer_vlm(family: str, tok) -> tuple:
    """Config and processor of the newer VLM families (3 text layers of hidden 32, one- or two-layer towers of 32,
    28-pixel images; the processors without their video processors, which need torchvision)."""
    import transformers as hf

    from quantkit.data.images import image_only_processor

    ids = tok.convert_tokens_to_ids
    text = dict(VLM_TEXT, vocab_size=len(tok), head_dim=8)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                 patch_size=14)
    if family == "qwen3_vl":  # deepstack: the tower's first block's features are added after text layer 0
        config = hf.Qwen3VLConfig(
            text_config=dict(text, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                               num_position_embeddings=16),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        image_processor = hf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                                      temporal_patch_size=2)
        return config, image_only_processor(hf.Qwen3VLProcessor, image_processor, tok,
                                            chat_template=vlm_chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    if family == "gemma3":  # sliding and full attention layers, bidirectional attention over the image tokens
        config = hf.Gemma3Config(
            text_config=dict(text, model_type="gemma3_text", sliding_window=8,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
            vision_config=dict(tower, model_type="siglip_vision_model"), mm_tokens_per_image=4,
            boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
            image_token_index=ids("<image_soft_token>"))
        return config, hf.Gemma3Processor(hf.Gemma3ImageProcessorPil(size={"height": 28, "width": 28}), tok,
                                          image_seq_length=4, chat_template=vlm_chat_template("<start_of_image>"))
    if family == "idefics3":
        config = hf.Idefics3Config(text_config=dict(text, model_type="llama"), vision_config=tower, scale_factor=1,
                                   image_token_id=ids("<image>"))
        image_processor = hf.Idefics3ImageProcessorPil(size={"longest_edge": 28}, max_image_size={"longest_edge": 28},
                                                       do_image_splitting=False)
        return config, hf.Idefics3Processor(image_processor, tok, image_seq_len=4, chat_template=vlm_chat_template("<image>"))
    if family == "internvl":
        config = hf.InternVLConfig(text_config=dict(text, model_type="qwen2"),
                                   vision_config=dict(tower, image_size=[28, 28], patch_size=[14, 14]),
                                   image_token_id=ids("<IMG_CONTEXT>"), downsample_ratio=1.0)
        image_processor = hf.GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=False)
        return config, image_only_processor(hf.InternVLProcessor, image_processor, tok, image_seq_length=4,
                                            chat_template=vlm_chat_template("<IMG_CONTEXT>"))
    if family == "llava_next":  # any-resolution tiles
        pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
        config = hf.LlavaNextConfig(text_config=dict(text, model_type="llama"),
                                    vision_config=dict(tower, model_type="clip_vision_model", num_hidden_layers=2,
                                                       projection_dim=32),
                                    image_token_index=ids("<image>"), image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
        image_processor = hf.LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                        image_grid_pinpoints=pinpoints)
        return config, hf.LlavaNextProcessor(image_processor, tok, patch_size=14, vision_feature_select_strategy="default",
                                             num_additional_image_tokens=1, chat_template=vlm_chat_template("<image>"))
    raise ValueError(family)


def write_image_dataset(root: Path, n: int = 6, size: int = 56) -> str:
    """n coloured-square images with caption and question records under root; returns the JSONL path."""
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    names = list(IMAGE_COLOURS)
    lines = []
    for i in range(n):
        colour = names[i % len(names)]
        image = Image.new("RGB", (size, size), (0, 0, 0))
        x = (i * 7) % (size // 2)
        image.paste(IMAGE_COLOURS[colour], (x, 4, x + size // 3, 4 + size // 3))
        image.save(root / "img" / f"{i}.png")
        if i % 2:
            lines.append({"image": f"img/{i}.png", "text": f"a {colour} square ."})
        else:
            lines.append({"image": f"img/{i}.png", "messages": [{"role": "user", "content": "what colour is the square ?"}, {"role": "assistant", "content": colour}]})
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return str(path)


def execute_notebook(notebook: Path, tmp_path: Path, monkeypatch, **env: str) -> str:
    """Execute every cell of `notebook` in a kernel on this interpreter (with `env` set); return the
    text its cells printed."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # A kernel spec for exactly this interpreter, so the test never picks up another Python.
    spec_dir = tmp_path / "jupyter" / "kernels" / "quantkit-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "quantkit test", "language": "python",
    }))
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="quantkit-test", timeout=120,
                                     resources={"metadata": {"path": str(notebook.parent)}})
    client.execute()
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))



# Tiny mixture-of-experts models of the families quantkit unfuses: tiny_config with 4 experts of width 32 (2 routed
# per token; Llama 4 routes 1), dense width 32, 2 layers (DeepSeek-V3's first is dense), vocabulary 64.
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe", "llama4_text"]
MOE_FIELDS = {  # where a family's tiny MoE differs from tiny_config's fields
    "mixtral": dict(sliding_window=None),
    "deepseek_v3": dict(first_k_dense_replace=1, intermediate_size=64),
    "gpt_oss": dict(sliding_window=128),
    "llama4_text": dict(num_experts_per_tok=1, intermediate_size_mlp=64),
}


@functools.cache
def _moe_state(model_type: str, seed: int) -> dict:
    fields = dict(intermediate_size=32, vocab_size=64, max_position_embeddings=64) | MOE_FIELDS.get(model_type, {})
    model = random_model(tiny_config(model_type, **fields), seed)
    return {"config": model.config, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def tiny_moe(model_type: str, seed: int = 0):
    """A tiny random mixture-of-experts model of `model_type` (MOE_FAMILIES), fused as transformers builds it,
    in eval mode; built once per (type, seed) and copied, so tests share the work."""
    made = _moe_state(model_type, seed)
    model = random_model(made["config"])
    model.load_state_dict(made["state"])
    return model.eval()


# Tiny models of any causal-LM type: these fields get these values wherever the type's default config has them
# (AutoConfig.for_model), so one table builds a two-layer, hidden-64 model of most of transformers' families. The
# vocabulary (120) is large enough for the word tokenizer (62 ids) to cover most of it, with room for image ids.
TINY_FIELDS = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=120, unpadded_vocab_size=120, max_position_embeddings=128, sliding_window=8,
    # mixture of experts
    moe_intermediate_size=32, num_experts_per_tok=2, n_routed_experts=4, num_experts=4, num_local_experts=4,
    moe_num_experts=4, shared_expert_intermediate_size=64, n_group=1, topk_group=1, moe_k=2, moe_topk=2,
    num_experts_per_token=2, num_expert_group=1, expert_ffn_hidden_size=32, shared_experts_intermediate_size=64,
    moe_shared_expert_intermediate_size=64, dense_intermediate_size=128, first_dense_intermediate_size=128,
    shared_intermediate_size=64, index_topk=8, index_head_dim=16,
    index_n_heads=2, vocab_size_per_layer_input=120,
    encoder_hash_byte_group_vocab=128,  # BLT's hash embeddings (500002 rows per hash size by default)
    indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4,  # Qwen4-Exp's QSA
    # multi-head latent attention (DeepSeek)
    q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=16,
    # GPT-2 / OPT / Falcon style names
    n_embd=64, n_layer=2, n_head=4, n_positions=128, d_model=64, num_layers=2, num_heads=4, n_heads=4, n_layers=2,
    ffn_dim=128, ffn_hidden_size=128, rotary_dim=8, kv_channels=16,
    # BART-style decoders (the causal LM of an encoder-decoder family: Blenderbot's is 24 x 10240 wide by default)
    decoder_layers=2, decoder_ffn_dim=128, decoder_attention_heads=4, encoder_layers=2, encoder_ffn_dim=128,
    encoder_attention_heads=4,
    # state-space and linear-attention mixers
    mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_head_dim=16, mamba_num_heads=4, state_size=8,
    ssm_state_size=8, time_step_rank=8, mamba_dt_rank=8, n_groups=1, chunk_size=16, mamba_chunk_size=16,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    expand=1, mamba_expand=1, mamba_d_ssm=64, attn_layer_period=2, attn_layer_offset=1,
)


# Types whose default config does not build (or builds no expert layer) at two layers: the fields their published
# checkpoints set, shrunk (DBRX's config.json gives attn_config the rope_theta and clip_qkv its attention reads; dots.llm1
# has shared experts; LFM2-MoE lists its layer types and starts with dense layers; Zamba's layer pattern is
# computed for 3+ layers, so two hybrid layers here share their attention block as the checkpoints' do).
TINY_TYPE_FIELDS = {
    "dbrx": dict(attn_config={"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}),
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"], attention_head_dim=16),
    "zamba2": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"], attention_head_dim=16),
}


def tiny_config(model_type: str, **overrides):
    """A tiny config of `model_type` built by transformers' own config class: TINY_FIELDS where the type has
    them, special token ids inside the vocabulary, per-layer lists (layer_types) recomputed for two layers,
    TINY_TYPE_FIELDS for the types that need more."""
    built = config_of(model_type)
    defaults = built.to_dict()
    fields = _tiny_fields(defaults, TINY_FIELDS)
    fields.update(_tiny_subconfigs(built))
    for key, value in TINY_TYPE_FIELDS.get(model_type, {}).items():
        fields[key] = {**fields[key], **value} if isinstance(fields.get(key), dict) else value
    fields.update(overrides)
    layer_types = defaults.get("layer_types")
    try:
        config = config_of(model_type, **fields)
        if getattr(config, "layer_types", 0) is not None or not isinstance(layer_types, list) or "layer_types" in overrides:
            return config
    except Exception:
        if "layer_types" in overrides or not isinstance(layer_types, list):
            raise
    # a type that does not recompute its layer types: the first ones of its default pattern
    return config_of(model_type, **{**fields, "layer_types": layer_types[: fields["num_hidden_layers"]]})


def _tiny_subconfigs(config) -> dict:
    """The nested configs of a causal-LM type shrunk too (Gemma 4's text_config, Emu3's VQ-VAE, an audio tower):
    a text config as tiny_config makes one, any other as a tiny vision tower."""
    from transformers import PretrainedConfig

    fields = {}
    for key, sub in vars(config).items():
        if not isinstance(sub, PretrainedConfig) or sub is config:
            continue
        table = TINY_FIELDS if key in ("text_config", "decoder_config", "encoder_config", "global_config") else TINY_VISION_FIELDS
        shrunk = _tiny_fields(sub.to_dict(), table) if table is TINY_FIELDS else {
            k: v for k, v in table.items() if k in sub.to_dict()}
        fields[key] = {**({"model_type": sub.model_type} if getattr(sub, "model_type", "") else {}), **shrunk}
    return fields


# A tiny vision tower for image-text types (the fields its vision config has get these values).
TINY_VISION_FIELDS = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, depth=1, embed_dim=32,
    num_heads=2, out_hidden_size=64, projection_dim=32, num_key_value_heads=2, head_dim=16,
)


def _tiny_fields(defaults: dict, table: dict) -> dict:
    fields = {k: v for k, v in table.items() if k in defaults}
    if "qk_rope_head_dim" in defaults:
        fields.pop("head_dim", None)  # latent attention derives its head widths from the qk_* fields
        if "head_dim" in defaults:  # where the config keeps one, its rotary width (LongCat-Flash's table)
            fields["head_dim"] = fields["qk_rope_head_dim"]
        fields["num_key_value_heads"] = fields.get("num_attention_heads", 4)  # and expands its one latent to every head
    fields.update({k: v for k, v in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)) if k in defaults})
    if "layer_types" in defaults:
        fields["layer_types"] = _tiny_layer_types(defaults["layer_types"], table.get("num_hidden_layers", 2))
    if isinstance(defaults.get("attention_types"), list) and defaults["attention_types"]:  # GPT-Neo: [[pattern, repeats]]
        pattern = defaults["attention_types"][0][0]
        fields["attention_types"] = [[pattern, max(1, table.get("num_layers", 2) // len(pattern))]]
    rope = defaults.get("rope_parameters")
    if isinstance(rope, dict) and _uses_mrope(defaults.get("model_type", "")):
        fields["rope_parameters"] = {**rope, "mrope_section": [2, 3, 3]}  # multimodal rotary over the tiny head's half
    return fields


def _tiny_layer_types(types, layers: int) -> list[str] | None:
    """None (the config recomputes its types for the tiny depth), unless the first `layers` of a hybrid's default
    pattern hold no attention layer (Qwen3.5: full attention every 4th layer): then its last layer is its first
    attention type, since a model whose cache holds only linear-attention layers cannot build its attention mask."""
    attention = [t for t in types if "attention" in t and "linear" not in t] if isinstance(types, list) else []
    if not attention or any(t in attention for t in types[:layers]):
        return None
    return types[: layers - 1] + attention[:1]


def _uses_mrope(model_type: str) -> bool:
    """Whether the type's modeling code splits its rotary table into multimodal sections (Qwen2-VL's mrope)."""
    import importlib
    import inspect

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    try:
        module = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}")
        modeling = importlib.import_module(f"{module.__name__}.modeling_{module.__name__.rsplit('.', 1)[-1]}")
    except ImportError:
        return False
    return "mrope_section" in inspect.getsource(modeling)


def tiny_vlm_config(model_type: str, **overrides):
    """A tiny config of image-text `model_type`: its text config as tiny_config makes one, a one-layer vision
    tower of width 32 (TINY_VISION_FIELDS), and image token ids inside the tiny vocabulary."""
    defaults = config_of(model_type)
    text, vision = defaults.get_text_config(), getattr(defaults, "vision_config", None)
    # an audio tower as a tiny vision tower; a text config kept at the top level (Phi-4-multimodal) shrunk there
    fields: dict = {k: v for k, v in _tiny_subconfigs(defaults).items() if "audio" in k}
    if text is not defaults:
        fields["text_config"] = {"model_type": text.model_type, **_tiny_fields(text.to_dict(), TINY_FIELDS)}
    else:
        fields.update(_tiny_fields(defaults.to_dict(), TINY_FIELDS))
    if vision is not None:
        fields["vision_config"] = {"model_type": vision.model_type,
                                   **{k: v for k, v in TINY_VISION_FIELDS.items() if k in vision.to_dict()}}
    top = defaults.to_dict()
    for offset, key in enumerate(k for k in top if k.endswith(("image_token_id", "image_token_index", "video_token_id",
                                                                  "video_token_index", "boi_token_index", "eoi_token_index",
                                                                  "vision_start_token_id", "vision_end_token_id"))):
        fields[key] = 100 + offset
    fields.update(overrides)
    return config_of(model_type, **fields)


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides):
    """random_model of tiny_config(model_type, **overrides), in eval mode with the cache off (the test skips where
    the installed transformers lacks the type)."""
    require_type(model_type)
    model = random_model(tiny_config(model_type, **overrides), seed).eval()
    model.config.use_cache = False
    return model


def save_tiny_causal_lm(root: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """tiny_causal_lm saved under root/model_type with the word-level tokenizer (its ids fit every tiny vocabulary)."""
    out = root / model_type
    tiny_causal_lm(model_type, seed, **overrides).save_pretrained(out)
    make_tokenizer().save_pretrained(out)
    return out


def whole_model_gradients(model, layers, sample: dict) -> list[torch.Tensor]:
    """Reference: dL/dy_l at every decoder layer output from one full forward + backward of the mean
    cross-entropy on the sample's scored next tokens (its loss mask and padding respected)."""
    outputs: list[torch.Tensor] = []

    def keep(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output  # OpenAI GPT's layers return a list
        hidden.retain_grad()
        outputs.append(hidden)

    hooks = [layer.register_forward_hook(keep) for layer in layers]
    forward = {k: v for k, v in sample.items() if k not in ("loss_mask", "vision_mask")}
    logits = model(**forward).logits[0]
    for hook in hooks:
        hook.remove()
    ids = sample["input_ids"][0]
    targets = torch.ones_like(ids, dtype=torch.bool) if "loss_mask" not in sample else sample["loss_mask"][0].bool()
    if "attention_mask" in sample:
        real = sample["attention_mask"][0].bool()
        targets = targets & real & torch.cat([real[:1], real[:-1]])
    keep_pos = targets[1:]  # position t predicts token t + 1
    if "attention_mask" in sample:
        keep_pos = keep_pos & sample["attention_mask"][0].bool()[:-1]
    torch.nn.functional.cross_entropy(logits[:-1][keep_pos], ids[1:][keep_pos]).backward()
    return [o.grad[0].detach() for o in outputs]
