"""What tests share: tiny models and tokenizers, calibration text, export comparisons, fault hooks, CLI commands."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


def save_tiny_llama(root: Path, hidden: int = 32, layers: int = 2, max_positions: int = 64, seed: int = 0,
                    **config) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) with its tokenizer, saved as a model directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=max_positions, **config)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


def write_text(path: Path, words: int = 2000, seed: int = 0) -> Path:
    """Random text over the tokenizer's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (words,), generator=generator)
    path.write_text(" ".join(WORDS[i] for i in picks))
    return path


def printable_tokenizer():
    """A 96-symbol character tokenizer built offline (printable ASCII + <unk>)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<unk>"] = 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def make_model_dir(root: Path, layers: int = 3, width: int = 64, inter: int = 128, tie: bool = False) -> Path:
    """Save a random Llama with the printable tokenizer under root/model (sharded when large)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=96, hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
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


def with_hooks(monkeypatch, **hooks) -> None:
    """Make quantkit.calibrate.calibrate_job (run_calibration, quantize and the in-process CLI) run with
    Hooks(**hooks) on every rank."""
    from quantkit import calibrate
    from quantkit.engine.comm import Hooks

    monkeypatch.setattr(calibrate, "calibrate_job", functools.partial(calibrate.calibrate_job, hooks=Hooks(**hooks)))


def cli_command(*args, hooks: str | None = None) -> list[str]:
    """`python -m quantkit.cli ARGS`; with `hooks`, a Python expression over helpers' names (for example
    "Hooks(on_layer=Delay(2))"), the CLI runs with those hooks on every rank."""
    if hooks is None:
        return [sys.executable, "-m", "quantkit.cli", *map(str, args)]
    code = (
        f"import functools, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from helpers import *\nfrom quantkit.engine.comm import Hooks\nfrom quantkit import calibrate\n"
        f"calibrate.calibrate_job = functools.partial(calibrate.calibrate_job, hooks={hooks})\n"
        "from quantkit.cli import main\nsys.argv[0] = 'quantkit'\nmain()\n"
    )
    return [sys.executable, "-c", code, *map(str, args)]
