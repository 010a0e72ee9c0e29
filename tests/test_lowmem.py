"""--low-memory: the streamed engine matches the in-memory one and stays under a memory limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from helpers import assert_same_files, make_model_dir, make_text, run_calibration
from safetensors.torch import load_file

from quantkit.fsutil import work_dir_for
from quantkit.quant import QuantSpec

SPEC = QuantSpec(bits=4, group_size=32)


def tensors_of(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export's safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("method, tie, fp_target, lm_head", [("gptq", False, False, False), ("gptq", True, False, False),
                                                              ("gptq", False, True, True), ("tlq", True, True, False)])
def test_low_memory_export_equals_in_memory_export(tmp_path: Path, method: str, tie: bool, fp_target: bool,
                                                   lm_head: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed engine writes the in-memory engine's bytes; with TLQ (its output-side factors, on text) the
    gradient pass streams too, reading each layer from the files, its stored inputs under --offload-dir."""
    model = make_model_dir(tmp_path, tie=tie)
    text = make_text(tmp_path)
    kw = dict(method=method, calib=str(text), nsamples=4, seqlen=32, progress=False, fp_target=fp_target,
              lm_head=lm_head)
    run_calibration(str(model), str(tmp_path / "plain"), SPEC, **kw)
    from quantkit.importance import backward

    stored_at: set = set()
    put = backward.StoredInputs.put

    def spy_put(self, layer, hidden):
        stored_at.add(self.root)
        put(self, layer, hidden)

    monkeypatch.setattr(backward.StoredInputs, "put", spy_put)
    from quantkit.engine import layerwise

    fp_entries: list = []
    record = layerwise.record_fp_inputs

    def spy(*args, **kwargs):
        kept = record(*args, **kwargs)
        fp_entries.extend(e for entries in kept.values() for e in entries)
        return kept

    monkeypatch.setattr(layerwise, "record_fp_inputs", spy)
    from quantkit.engine import streaming

    offloaded: set[Path] = set()
    save_hidden = streaming.DiskHidden.__setitem__

    def spy_hidden(self, index, value):
        offloaded.add(self.dir)
        save_hidden(self, index, value)

    monkeypatch.setattr(streaming.DiskHidden, "__setitem__", spy_hidden)
    report = run_calibration(str(model), str(tmp_path / "low"), SPEC, low_memory=True,
                             offload_dir=str(tmp_path / "acts"), **kw)
    # The FP target's linear inputs went to files under the offload folder, and each is gone once used.
    assert bool(fp_entries) is fp_target
    assert all(isinstance(e, Path) and e.parent == tmp_path / "acts" / "fp_linear" for e in fp_entries)
    assert not list((tmp_path / "acts").glob("fp_linear/*"))
    assert report["low_memory"] and not work_dir_for(str(tmp_path / "low")).exists()
    assert report["fp_target"] is fp_target and (report["lm_head"] is not None) is lm_head
    assert tmp_path / "acts" in offloaded  # activations really went to disk
    assert (tmp_path / "acts" / "fp" in offloaded) is fp_target  # and the FP stream beside them
    assert not (tmp_path / "acts").exists()  # the offload folder, made for the run, went with it
    # TLQ's stored layer inputs went to a folder of their own under it (removed with it), not to RAM
    assert len(stored_at) == (method == "tlq") and all(root.parent == tmp_path / "acts" for root in stored_at)
    plain, low = tensors_of(tmp_path / "plain"), tensors_of(tmp_path / "low")
    assert plain.keys() == low.keys()
    assert ("lm_head.weight_packed" in low) is lm_head
    for key in plain:
        assert torch.equal(plain[key], low[key]), key
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == sorted(p.name for p in (tmp_path / "low").iterdir())
    for path in (tmp_path / "plain").glob("*.safetensors"):  # the streamed writer lays files out as save_file does
        assert path.read_bytes() == (tmp_path / "low" / path.name).read_bytes(), path.name


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "compressed-tensors", "fake"])
@pytest.mark.parametrize("shard", ["5GB", "20KB"])
def test_streamed_writer_matches_in_memory_writer_byte_for_byte(tmp_path: Path, fmt: str, shard: str) -> None:
    """write_checkpoint_streamed (a layer at a time, spooled to disk) == write_checkpoint (one piece in memory):
    files, bytes, index."""
    from quantkit.export import Checkpoint, Layout, write_checkpoint, write_checkpoint_streamed
    from quantkit.quant import method_for

    torch.manual_seed(0)
    spec = QuantSpec(bits=4, group_size=32, sym=fmt != "gptq")
    outside = {"model.embed_tokens.weight": torch.randn(96, 64).half(), "model.norm.weight": torch.ones(64).half(),
               "lm_head.weight": torch.randn(96, 64).half(), "model.rotary.step": torch.tensor(3, dtype=torch.int64)}
    layers = []
    for i in range(11):  # 11 layers: natural order (2 < 10) differs from safetensors' name order
        fp = {f"model.layers.{i}.input_layernorm.weight": torch.rand(64).half(),
              f"model.layers.{i}.mlp.up_proj.bias": torch.rand(96).half()}
        res = {f"model.layers.{i}.{n}": method_for("rtn").solve(torch.randn(o, 64), None, spec)
               for n, o in (("self_attn.q_proj", 64), ("mlp.up_proj", 96))}
        layers.append((fp, res))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    layout = Layout(("self_attn.q_proj", "mlp.up_proj"), 11, ("lm_head",))
    all_fp = dict(outside)
    all_results = {}
    for fp, res in layers:
        all_fp.update(fp)
        all_results.update(res)
    ckpt = Checkpoint(config=config, manifest={}, fp_tensors=all_fp, results=all_results, layout=layout)
    write_checkpoint(ckpt, tmp_path / "mem", fmt=fmt, max_shard_size=shard)
    write_checkpoint_streamed(config, iter([(outside, {}), *layers]), tmp_path / "stream", fmt=fmt, layout=layout,
                              max_shard_size=shard)
    names = sorted(p.name for p in (tmp_path / "mem").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "stream").iterdir())
    assert (shard == "20KB") == ("model.safetensors.index.json" in names)
    for name in names:
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes(), name


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


def _hand_made_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A file mixing dtypes, a scalar, an empty tensor and metadata; returns what went in."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(5, 7).bfloat16(), "b.fp16": torch.randn(3, 1, 4).half(), "c.fp32": torch.randn(11),
        "d.fp64": torch.randn(2, 2).double(), "e.int64": torch.arange(6).reshape(2, 3), "f.int8": torch.tensor([-3, 4], dtype=torch.int8),
        "g.uint8": torch.arange(9, dtype=torch.uint8), "h.bool": torch.tensor([True, False, True]),
        "i.scalar": torch.tensor(2.5), "j.empty": torch.empty(0, 4),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_read_safetensors_matches_load_file_and_maps_nothing(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from quantkit.models.streamed import WeightSource, read_safetensors

    path = tmp_path / "model.safetensors"
    written = _hand_made_safetensors(path)
    ours = read_safetensors(path)
    if Path("/proc/self/maps").is_file():
        assert not _mapped(path)  # copied out: the tensors own their memory
    theirs = load_file(str(path))
    assert set(ours) == set(theirs) == set(written)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key
    some = read_safetensors(path, ["j.empty", "a.bf16"])
    assert list(some) == ["j.empty", "a.bf16"] and torch.equal(some["a.bf16"], written["a.bf16"])
    del theirs, value  # load_file's tensors are views into its mapping: drop them before looking again
    source = WeightSource(tmp_path)  # the low-memory reader of a model directory goes the same way
    loaded = source.load(["c.fp32", "b.fp16"])
    assert torch.equal(loaded["c.fp32"], written["c.fp32"]) and torch.equal(loaded["b.fp16"], written["b.fp16"])
    loaded["c.fp32"].add_(1)  # writable, and the file is untouched
    assert torch.equal(read_safetensors(path, ["c.fp32"])["c.fp32"], written["c.fp32"])
    if Path("/proc/self/maps").is_file():
        assert not _mapped(path)


def test_low_memory_default_method_on_text_is_tlq_as_in_memory(tmp_path: Path) -> None:
    """No --method under --low-memory: the default, TLQ with the FP target, as in memory (its gradient pass streams
    the layers from the files), with no notice of another method, and the files the in-memory default writes."""
    from click.testing import CliRunner

    from quantkit.cli import main

    model, text = make_model_dir(tmp_path), make_text(tmp_path)
    args = ["calibrate", str(model), "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--group-size", "32"]
    low = CliRunner().invoke(main, [*args, "--low-memory", "-o", str(tmp_path / "low"), "--json"])
    assert low.exit_code == 0, low.output
    assert "instead of" not in low.stderr and "--calib-set" not in low.stderr, low.stderr
    report = json.loads(low.stdout.strip().splitlines()[-1])
    assert report["method"] == "tlq" and report["fp_target"] and report["low_memory"]
    plain = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert_same_files(tmp_path / "plain", tmp_path / "low")


MEASURED = textwrap.dedent("""
    import json, sys
    import torch
    import quantkit
    from quantkit.memory import peak_rss_mb as peak_mb  # VmHWM: ru_maxrss holds pytest's peak
    from quantkit.models.streamed import build_skeleton
    from quantkit.quant import QuantSpec, gptq_solve
    torch.set_num_threads(1)
    model, text, out, low = sys.argv[1:5]

    # Warm up first (lazy imports, BLAS/LAPACK work buffers) so the figure measures the run itself.
    build_skeleton(model)
    x = torch.randn(64, 768)
    gptq_solve(torch.randn(256, 768), x.T @ x, QuantSpec(bits=4, group_size=128))
    base = peak_mb()
    quantkit.quantize(model, data=text, method="gptq", bits=4, group_size=128, output_dir=out, nsamples=4,
                      seqlen=32, progress=False, low_memory=low == "1", reload=False)
    print(json.dumps({"peak_above_start_mb": peak_mb() - base}))
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


# ---------------------------------------------------------------- a real memory limit (cgroup)
# --low-memory under a real memory limit: a cgroup caps the process below the model's weight bytes.
# RLIMIT_AS cannot do this (safetensors maps whole files, so the address space exceeds any useful
# limit); a cgroup memory limit counts resident anonymous memory, while clean file-backed pages
# (the mapped safetensors, the page cache) are reclaimable and do not push the process over it.
# Needs root and a writable memory cgroup (v1 `memory` controller or v2 with `memory` delegated);
# skips with the reason elsewhere (CI containers usually cannot create cgroups).

LIMIT_MB = 450  # about 250 MiB is python + torch + transformers; the streamed run needs ~100 MiB more


def _cgroup_dirs() -> list[tuple[str, Path]]:
    """(version, directory) of this process's memory cgroup(s) that could hold a child cgroup."""
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, rel = line.split(":", 2)
        if hid == "0" and controllers == "":
            root = Path("/sys/fs/cgroup")
            if not (root / "cgroup.controllers").is_file():
                root = Path("/sys/fs/cgroup/unified")
            controllers_file = root / "cgroup.controllers"
            if controllers_file.is_file() and "memory" in controllers_file.read_text().split():
                found.append(("v2", root / rel.lstrip("/")))
        elif "memory" in controllers.split(","):
            found.append(("v1", Path("/sys/fs/cgroup/memory") / rel.lstrip("/")))
    return found


class MemoryCgroup:
    """A child memory cgroup with a hard limit (and no swap); processes join it at start."""

    def __init__(self, limit_bytes: int) -> None:
        if os.geteuid() != 0:
            pytest.skip("memory-limit test needs root to create a cgroup")
        reasons = []
        for version, parent in _cgroup_dirs():
            path = parent / f"quantkit-test-{uuid.uuid4().hex[:8]}"
            try:
                path.mkdir()
            except OSError as err:
                reasons.append(f"{version} {parent}: cannot create a child cgroup ({err.strerror})")
                continue
            try:
                if version == "v1":
                    (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
                    if (path / "memory.memsw.limit_in_bytes").is_file():
                        try:
                            (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
                        except OSError:
                            pass  # no swap accounting: fine when there is no swap
                else:
                    (path / "memory.max").write_text(str(limit_bytes))
                    if (path / "memory.swap.max").is_file():
                        (path / "memory.swap.max").write_text("0")
            except OSError as err:
                path.rmdir()
                reasons.append(f"{version} {path}: cannot set a memory limit ({err.strerror})")
                continue
            self.version, self.path = version, path
            return
        pytest.skip("no writable memory cgroup: " + ("; ".join(reasons) or "no memory controller in /proc/self/cgroup"))

    def join(self) -> None:
        """preexec_fn: move the starting child process into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int | None:
        """The cgroup's peak usage so far (v1 max_usage_in_bytes, v2 memory.peak where present)."""
        name = "memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError):
            return None

    def reset_peak(self) -> None:
        try:
            if self.version == "v1":
                (self.path / "memory.max_usage_in_bytes").write_text("0")
            elif (self.path / "memory.peak").is_file():
                (self.path / "memory.peak").write_text("0")
        except OSError:
            pass

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def _run(cgroup: MemoryCgroup, model: Path, text: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "quantkit.cli", "calibrate", str(model), "--calib", str(text), "--nsamples", "4",
           "--seqlen", "32", "--group-size", "32", "-o", str(out), "--json", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, preexec_fn=cgroup.join)


@pytest.mark.slow
def test_low_memory_calibrates_a_model_larger_than_the_memory_limit(tmp_path: Path) -> None:
    limit = LIMIT_MB * 2**20
    cgroup = MemoryCgroup(limit)
    try:
        # 56 layers of width 512: ~630 MiB of float32 weights, well over the limit; ~13 MiB a layer.
        model = make_model_dir(tmp_path, layers=56, width=512, inter=1408)
        text = make_text(tmp_path)
        weight_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        assert weight_bytes > 1.3 * limit

        cgroup.reset_peak()
        low = _run(cgroup, model, text, tmp_path / "low", "--low-memory")
        low_peak = cgroup.peak_bytes()
        assert low.returncode == 0, (low.returncode, low.stderr[-3000:])
        assert json.loads(low.stdout.strip().splitlines()[-1])["low_memory"]
        assert (tmp_path / "low" / "config.json").is_file()

        cgroup.reset_peak()
        plain = _run(cgroup, model, text, tmp_path / "plain")
        # The in-memory path must load every weight: the limit kills it (SIGKILL from the OOM killer)
        # or it fails on an allocation; either way nothing is exported.
        assert plain.returncode != 0, f"plain run fit under {LIMIT_MB} MiB (low-memory peak {low_peak})"
        assert not (tmp_path / "plain").exists()
        print(json.dumps({"limit_mb": LIMIT_MB, "weight_mb": round(weight_bytes / 2**20, 1),
                          "low_memory_cgroup_peak_mb": None if low_peak is None else round(low_peak / 2**20, 1),
                          "low_memory_peak_rss_mb": json.loads(low.stdout.strip().splitlines()[-1]).get("peak_rss_mb"),
                          "plain_returncode": plain.returncode}))
    finally:
        cgroup.remove()
