"""Peak RSS of --low-memory calibration: 8 vs 32 layers of the same width (target: 32 <= 1.3x 8).

Each size is built as a safetensors model dir and calibrated in a fresh subprocess; prints JSON
with each run's peak RSS (whole command, and of the calibration before the export), the weight
bytes on disk and the ratio of the whole-command peaks.

The peak is the child's VmHWM (/proc/self/status), not getrusage's ru_maxrss: Linux carries the
parent's peak RSS over a fork/exec into the child's ru_maxrss, so a parent that had built the
32-layer model in memory made every child report its ~1.95 GB. The models are also built in a
subprocess of their own, which keeps this parent small (ru_maxrss is still reported, for reference).

    python benchmarks/bench_lowmem.py [--layers 8,32] [--width 1024] [--nsamples 8] [--seqlen 128]
                                      [-o benchmarks/results/bench_lowmem.json]

With --nproc N every size runs on N ranks (each streams the layers): the ratio is of the largest
rank's peak (`--nproc 2 --width 512`: benchmarks/results/bench_lowmem_ranks.json).

With --fp-target every size runs GPTQ with the FP target twice, without and with --offload-dir, to
show where the FP linear inputs live (benchmarks/results/bench_lowmem_fp.json:
`--layers 4 --nsamples 32 --seqlen 256 --fp-target`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import emit, environment  # noqa: E402

BUILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bench_distributed import build
build(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
"""

RUN = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from quantkit.calibrate import build_job, run_job
from quantkit.export import streamed
from quantkit.memory import peak_rss_mb as hwm_mb

calibration_peak = {}
export = streamed.export_streamed
def export_after_peak(*args, **kwargs):  # the calibration's own peak, before the export starts
    calibration_peak["mb"] = hwm_mb()
    return export(*args, **kwargs)
streamed.export_streamed = export_after_peak
model, text, out, nsamples, seqlen, fp_target, offload_dir, nproc = sys.argv[1:9]
start_mb = hwm_mb()
started = time.perf_counter()
job = build_job(model, text, method="gptq", bits=4, group_size=128, output_dir=out, nsamples=int(nsamples),
                seqlen=int(seqlen), progress=False, low_memory=True, fp_target=fp_target == "1",
                offload_dir=offload_dir or None, nproc=int(nproc))
report = run_job(job).report
print(json.dumps({"peak_rss_mb": hwm_mb(), "calibration_peak_rss_mb": calibration_peak.get("mb"),
                  "rank_peak_rss_mb": report.get("rank_peak_rss_mb", [report["peak_rss_mb"]]),
                  "peak_rss_at_start_mb": start_mb, "calibration_seconds": report["seconds"],
                  "command_seconds": round(time.perf_counter() - started, 2),
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _python(code: str, *args: object) -> str:
    """Run `code` in a fresh interpreter (one torch thread); its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return proc.stdout


def main() -> None:
    """Build each size, calibrate with --low-memory, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="8,32")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--fp-target", action="store_true", help="GPTQ with the FP target, without and with --offload-dir")
    parser.add_argument("--nproc", type=int, default=1, help="ranks (each streams the layers)")
    parser.add_argument("-o", "--output", help="also write the JSON here (e.g. benchmarks/results/bench_lowmem.json)")
    args = parser.parse_args()
    runs = []
    for layers in [int(x) for x in args.layers.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-lowmem-") as tmp:
            root = Path(tmp)
            _python(BUILD, HERE, root, layers, args.width)
            model, text = root / "model", root / "calib.txt"
            weight_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
            for offload in ([False, True] if args.fp_target else [False]):
                out = root / f"out{int(offload)}"
                rep = json.loads(_python(RUN, model, text, out, args.nsamples, args.seqlen, int(args.fp_target),
                                         root / "acts" if offload else "", args.nproc).strip().splitlines()[-1])
                runs.append({"layers": layers, "nproc": args.nproc, "weight_mb": round(weight_mb, 1), "fp_target": args.fp_target,
                             "offload_dir": offload, **{k: round(v, 1) if isinstance(v, float) else v for k, v in rep.items()}})
    out = {"benchmark": "lowmem", "width": args.width, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "peak": "VmHWM of the calibrating process", "runs": runs}
    if args.fp_target:
        out["offload_saves_mb"] = {str(a["layers"]): round(a["calibration_peak_rss_mb"] - b["calibration_peak_rss_mb"], 1)
                                   for a, b in zip(runs[::2], runs[1::2])}
    else:
        if args.nproc > 1:  # the spawned ranks' own peaks (the parent only waits)
            ratio = max(runs[-1]["rank_peak_rss_mb"]) / max(runs[0]["rank_peak_rss_mb"])
        else:
            ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
        out.update({"ratio_peak_rss": round(ratio, 3), "target": 1.3, "pass": ratio <= 1.3})
    emit({**out, "env": environment(), "loadavg_at_end": os.getloadavg(), "time": time.ctime()}, args.output)

if __name__ == "__main__":
    main()
