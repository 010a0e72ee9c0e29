"""Peak RSS of --low-memory calibration: 8 vs 32 layers of the same width (target: 32 <= 1.3x 8).

Each size is built as a safetensors model dir and calibrated in a fresh subprocess; prints JSON
with the peak RSS, the weight bytes on disk and the ratio.

    python benchmarks/bench_lowmem.py [--layers 8,32] [--width 1024] [--nsamples 8] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distributed import build, run_one  # noqa: E402


def main() -> None:
    """Build each size, calibrate with --low-memory, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="8,32")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()
    runs = []
    for layers in [int(x) for x in args.layers.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-lowmem-") as tmp:
            root = Path(tmp)
            model, text = build(root, layers, args.width)
            weight_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
            rep = run_one(model, text, root / "out", 1, args.nsamples, args.seqlen, low=True)
            runs.append({"layers": layers, "weight_mb": round(weight_mb, 1), "peak_rss_mb": round(rep["parent_peak_rss_mb"], 1),
                         "calibration_seconds": rep["seconds"]})
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    print(json.dumps({"width": args.width, "runs": runs, "ratio_peak_rss": round(ratio, 3), "target": 1.3,
                      "pass": ratio <= 1.3, "loadavg_at_end": os.getloadavg(), "time": time.ctime()}, indent=1))


if __name__ == "__main__":
    main()
