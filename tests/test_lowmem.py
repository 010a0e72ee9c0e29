"""--low-memory: the streamed engine matches the in-memory one and stays under a memory limit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import char_tokenizer, make_text
from transformers import AutoModelForCausalLM, LlamaConfig

from quantkit.calibrate import run_calibration, work_dir_for
from quantkit.errors import QuantkitError
from quantkit.quant import QuantSpec

SPEC = QuantSpec(bits=4, group_size=32)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: tiny matmuls on 2 shared cores are far faster without thread handoffs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_model_dir(root: Path, layers: int = 3, width: int = 64, inter: int = 128, tie: bool = False) -> Path:
    """Save a random Llama with a character tokenizer under root/model (sharded when large)."""
    config = LlamaConfig(vocab_size=96, hidden_size=width, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = root / "model"
    model.save_pretrained(out, max_shard_size="20MB")
    char_tokenizer().save_pretrained(out)
    return out


def tensors_of(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export's safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("tie", [False, True])
def test_low_memory_export_equals_in_memory_export(tmp_path: Path, tie: bool) -> None:
    model = make_model_dir(tmp_path, tie=tie)
    text = make_text(tmp_path)
    kw = dict(method="gptq", calib=str(text), nsamples=4, seqlen=32, progress=False)
    run_calibration(str(model), str(tmp_path / "plain"), SPEC, **kw)
    report = run_calibration(str(model), str(tmp_path / "low"), SPEC, low_memory=True,
                             offload_dir=str(tmp_path / "acts"), **kw)
    assert report["low_memory"] and not work_dir_for(str(tmp_path / "low")).exists()
    assert list((tmp_path / "acts").glob("hidden_*.pt"))  # activations really went to disk
    plain, low = tensors_of(tmp_path / "plain"), tensors_of(tmp_path / "low")
    assert plain.keys() == low.keys()
    for key in plain:
        assert torch.equal(plain[key], low[key]), key
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == sorted(p.name for p in (tmp_path / "low").iterdir())


def test_only_one_layer_is_materialised_at_a_time(tmp_path: Path, monkeypatch) -> None:
    import quantkit.engine.streaming as streaming

    model = make_model_dir(tmp_path, layers=4)
    seen = []
    original_release = streaming.release_layer

    def release(model_, adapter, index):
        """Spy: count the decoder-layer parameters that are real (not meta) when a layer is done."""
        layers = adapter.decoder_layers(model_)
        real = sum(p.numel() for p in layers.parameters() if p.device.type != "meta")
        seen.append((index, real, sum(p.numel() for p in layers[index].parameters())))
        original_release(model_, adapter, index)

    monkeypatch.setattr(streaming, "release_layer", release)
    run_calibration(str(model), str(tmp_path / "o"), SPEC, method="gptq", calib=str(make_text(tmp_path)),
                    nsamples=4, seqlen=32, progress=False, low_memory=True)
    assert [index for index, _, _ in seen] == [0, 1, 2, 3]
    assert all(real == own for _, real, own in seen)  # only the current layer holds real tensors


def test_low_memory_rejects_tlq_without_calibration_set(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path)
    with pytest.raises(QuantkitError, match="calib-set"):
        run_calibration(str(model), str(tmp_path / "o"), SPEC, method="tlq", calib=str(make_text(tmp_path)),
                        nsamples=4, seqlen=32, progress=False, low_memory=True)


MEASURED = textwrap.dedent("""
    import json, resource, sys
    import torch
    from quantkit.calibrate import run_calibration
    from quantkit.engine.streaming import build_skeleton
    from quantkit.quant import QuantSpec, gptq_solve
    torch.set_num_threads(1)
    model, text, out, low = sys.argv[1:5]
    # Warm up first (lazy imports, BLAS/LAPACK work buffers) so the figure measures the run itself.
    build_skeleton(model)
    x = torch.randn(64, 768)
    gptq_solve(torch.randn(256, 768), x.T @ x, QuantSpec(bits=4, group_size=128))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run_calibration(model, out, QuantSpec(bits=4, group_size=128), calib=text, nsamples=4, seqlen=32,
                    progress=False, low_memory=low == "1")
    print(json.dumps({"peak_above_start_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}))
""")


@pytest.mark.slow
def test_streamed_peak_memory_stays_well_below_the_weights(tmp_path: Path) -> None:
    # 40 layers of width 256: ~120 MiB of float32 weights, each layer ~3 MiB.
    model = make_model_dir(tmp_path, layers=40, width=256, inter=768)
    weight_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
    text = make_text(tmp_path)
    peaks = {}
    for low in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", MEASURED, str(model), str(text), str(tmp_path / f"out{low}"), low],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[low] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_above_start_mb"]
    assert peaks["0"] > weight_mb  # the in-memory path holds the whole model
    assert peaks["1"] < 0.6 * weight_mb, (peaks, weight_mb)  # the streamed one about a layer plus the results
    assert (tmp_path / "out1" / "config.json").is_file()
