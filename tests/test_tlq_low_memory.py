"""TLQ under --low-memory: the gradient pass reads one decoder layer at a time from the safetensors files
(quantkit.importance.layers.FileLayers) and gives the in-memory pass's token weights and output-side factors, so
`calibrate --low-memory` runs TLQ itself (it fell back to GPTQ before) and `importance --low-memory` makes the set a
whole model would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import (
    FailAt,
    assert_same_files,
    make_model_dir,
    make_text,
    run_calibration,
    save_tiny_causal_lm,
)

from quantkit.engine.comm import Hooks
from quantkit.errors import QuantkitError
from quantkit.fsutil import work_dir_for
from quantkit.importance import tlq_token_weights
from quantkit.quant import QuantSpec

SPEC = QuantSpec(bits=4, group_size=32)


def _samples(count: int = 5, length: int = 24, vocab: int = 60) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (1, length), generator=generator)} for _ in range(count)]


@pytest.mark.parametrize("family, settings", [
    ("llama", dict(output_side=32)),  # the text default's factors
    ("llama", dict(guidance="linear", row_groups=2, loss="fisher", draws=2, output_side=None)),  # per-linear scores
    ("tied", dict(output_side=16)),  # lm_head is the embedding: the skeleton ties them as the loader does
    ("qwen2_moe", dict(output_side=32)),  # routed experts: fused in the files, per-expert linears on the skeleton
])
def test_streamed_pass_equals_the_in_memory_pass(tmp_path: Path, monkeypatch, family: str, settings: dict) -> None:
    """Token weights, raw scores, per-linear scores and output-side factors of the streamed pass equal (exactly) the
    in-memory pass's on the model loaded whole: each layer's forward and recomputed backward runs the same operations
    on the same stored inputs, whichever object holds the layer (the in-memory pass keeps the whole graph here on CPU,
    the streamed one recomputes: the same numbers, as importance.backward.chunk_through_layers says and
    test_importance checks against a whole-model backward). Only one layer is held at a time, each read twice (the
    top one once, layer 0 once more for the batching probe)."""
    from quantkit.engine import streaming
    from quantkit.importance import layers as seam
    from quantkit.importance.layers import FileLayers
    from quantkit.models import load_model
    from quantkit.models.streamed import build_skeleton

    if family == "qwen2_moe":
        model_dir = save_tiny_causal_lm(tmp_path, "qwen2_moe")
    else:
        model_dir = make_model_dir(tmp_path, layers=3, tie=family == "tied")
    samples = _samples()
    reference = tlq_token_weights(load_model(str(model_dir), dtype="float32"), samples, progress=False, **settings)
    skeleton, adapter, source = build_skeleton(str(model_dir), "float32")
    held: set[int] = set()
    reads: list[int] = []
    most = [0]
    load, release = seam.load_layer, streaming.release_layer

    def counted_load(model, adapter, source, index, dtype):
        reads.append(index)
        held.add(index)
        most[0] = max(most[0], len(held))
        return load(model, adapter, source, index, dtype)

    def counted_release(model, adapter, index):
        held.discard(index)
        release(model, adapter, index)

    monkeypatch.setattr(seam, "load_layer", counted_load)
    monkeypatch.setattr(seam, "release_layer", counted_release)
    streamed = tlq_token_weights(skeleton, samples, progress=False, offload_dir=tmp_path / "acts",
                                 layers_from=FileLayers(skeleton, adapter, source, "cpu", "float32"), **settings)
    assert reference.report["kept_graph"] and not streamed.report["kept_graph"]
    assert torch.equal(reference.stacked("weights"), streamed.stacked("weights"))
    assert torch.equal(reference.stacked("scores"), streamed.stacked("scores"))
    if settings.get("guidance") == "linear":
        assert reference.linear_scores and len(reference.linear_scores) == len(streamed.linear_scores)
        for mine, theirs in zip(reference.linear_scores, streamed.linear_scores):
            assert mine.keys() == theirs.keys() and all(torch.equal(a, b) for n in mine for a, b in zip(mine[n], theirs[n]))
    else:
        assert reference.linear_factors and len(reference.linear_factors) == len(streamed.linear_factors)
        for mine, theirs in zip(reference.linear_factors, streamed.linear_factors):
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    n = len(adapter.decoder_layers(skeleton))
    hooked = settings.get("guidance") == "linear" or settings.get("output_side") is not None
    # probe, forward of 0..n-2, top layer, backward n-2..1 (and 0 where the linears' gradients are read)
    assert sorted(reads) == sorted([0, *range(n - 1), n - 1, *range(1, n - 1), *([0] if hooked else [])])
    assert most[0] == 1 and not held
    assert all(p.device.type == "meta" for p in adapter.decoder_layers(skeleton).parameters())
    assert not list((tmp_path / "acts").iterdir())  # the stored inputs went to disk and are gone


def test_importance_low_memory_makes_the_in_memory_set(tmp_path: Path) -> None:
    """`quantkit importance --low-memory` writes the set `quantkit importance` writes: the same samples and weights
    files byte for byte, and the same manifest but for its timings and how the pass ran (its weights fingerprint of
    the first and last layers included: they are read for it)."""
    from click.testing import CliRunner

    from quantkit.cli import main

    model, text = make_model_dir(tmp_path), make_text(tmp_path)
    args = ["importance", str(model), "--calib", str(text), "--nsamples", "4", "--seqlen", "32"]
    for name, extra in (("memory", []), ("low", ["--low-memory"])):
        made = CliRunner().invoke(main, [*args, "-o", str(tmp_path / name), *extra])
        assert made.exit_code == 0, made.output
    for name in ("samples.safetensors", "weights.safetensors"):
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "low" / name).read_bytes(), name
    memory, low = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("memory", "low"))
    assert memory["weights_fingerprint"] and len(memory["weights_fingerprint"]) > 1
    how = {"seconds", "kept_graph"}
    assert {k: v for k, v in memory.items() if k not in {"seconds", "report"}} == \
        {k: v for k, v in low.items() if k not in {"seconds", "report"}}
    assert {k: v for k, v in memory["report"].items() if k not in how} == \
        {k: v for k, v in low["report"].items() if k not in how}


def test_resumed_tlq_low_memory_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    """The token weights are not kept in the work area: a resumed run recomputes them with the settings its
    fingerprint holds (the pass is deterministic), so the layers solved before and after the interruption share one
    set of weights and the export is the uninterrupted run's; other TLQ settings are refused, not paired."""
    torch.set_num_threads(1)
    model, text = make_model_dir(tmp_path, layers=3), make_text(tmp_path)
    kw = dict(method="tlq", calib=str(text), nsamples=4, seqlen=32, progress=False, low_memory=True)
    run_calibration(str(model), str(tmp_path / "full"), SPEC, **kw)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected"):
        run_calibration(str(model), str(out), SPEC, hooks=Hooks(on_layer=FailAt(0, 2)), **kw)
    assert json.loads((work_dir_for(str(out)) / "state.json").read_text())["layers_done"] == 2
    with pytest.raises(QuantkitError, match="other settings"):
        run_calibration(str(model), str(out), SPEC, resume=True, importance={"lam": 0.5}, **kw)
    report = run_calibration(str(model), str(out), SPEC, resume=True, **kw)
    assert report["resumed_from_layer"] == 2 and report["method"] == "tlq"
    assert_same_files(tmp_path / "full", out)


MEASURED = textwrap.dedent("""
    import json, sys
    import torch
    from quantkit.importance import tlq_token_weights
    from quantkit.importance.layers import FileLayers
    from quantkit.memory import peak_rss_mb  # VmHWM: ru_maxrss would hold the parent's peak
    from quantkit.models import load_model
    from quantkit.models.streamed import build_skeleton
    torch.set_num_threads(1)
    model = sys.argv[1]
    samples = [{"input_ids": torch.randint(0, 90, (1, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    skeleton, adapter, source = build_skeleton(model, "float32")  # the warm-up (imports, the files' headers)
    base = peak_rss_mb()
    tlq_token_weights(skeleton, samples, progress=False, layers_from=FileLayers(skeleton, adapter, source, "cpu", "float32"))
    streamed = peak_rss_mb() - base
    # then the model loaded whole: the peak only grows, so its rise over base is at least the whole pass's
    tlq_token_weights(load_model(model, dtype="float32"), samples, progress=False)
    print(json.dumps({"streamed": streamed, "memory": peak_rss_mb() - base}))
""")


def test_streamed_pass_peak_memory_stays_below_the_weights(tmp_path: Path) -> None:
    """In a fresh process, the streamed pass's peak rises by well under half the weights (about one layer, 1/24 of
    them, plus the pass's activations), the in-memory pass's after it by more than the weights. Without output-side
    factors: they are float64 blocks of every linear's rows, kept to the end (not a layer's worth), alike in both."""
    model = make_model_dir(tmp_path, layers=24, width=256, inter=768)  # ~72 MiB of float32 weights, 3 MiB a layer
    weight_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
    proc = subprocess.run([sys.executable, "-c", MEASURED, str(model)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["memory"] > weight_mb, (peaks, weight_mb)  # the whole model held
    assert peaks["streamed"] < 0.4 * weight_mb, (peaks, weight_mb)
