"""Does the training-level estimator recover D on models the law never saw? (issue #16 item 4)

Fits the unified law per bit width on the sweep's seed-0 models (one method), then inverts it
for every checkpoint of the seed-1 models from their measured QiD and its standard error
(quantkit.qid.estimate.training_level, the code behind `quantkit qid training-level`), and
compares the estimate with the checkpoint's known D. Prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/qid_estimator.py benchmarks/results/qid_sweep.csv
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from common import emit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Fit on the fit seed's rows, estimate D for the other seed's checkpoints, print the errors as JSON."""
    from quantkit.qid.estimate import training_level
    from quantkit.qid.fit import fit_table
    from quantkit.qid.laws import law_and_draws
    from quantkit.qid.table import QidTable, read_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--fit-seed", default="0", help="models whose path holds seed{N} are fitted; the others are held out")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("-o", "--output", help="also write the JSON here")
    args = ap.parse_args(argv)

    table = read_table(args.csv)

    def seed_of(row: dict) -> str:
        found = re.search(r"seed(\d+)", str(row.get("model")))
        return found.group(1) if found else "?"

    fit_rows = [r for r in table.rows if seed_of(r) == args.fit_seed and r["method"] == args.method]
    held_rows = [r for r in table.rows if seed_of(r) != args.fit_seed and r["method"] == args.method]
    fit = fit_table(QidTable(rows=fit_rows, error_rows=[]), method=args.method, by_bits=True, laws=("unified",),
                    bootstrap=args.bootstrap)
    out: dict = {"csv": args.csv, "method": args.method, "fit_seed": args.fit_seed, "by_bits": {}}
    with tempfile.TemporaryDirectory() as tmp:
        law_file = Path(tmp) / "fit.json"
        law_file.write_text(json.dumps(fit, default=str))
        for bits in (int(b) for b in args.bits.split(",")):
            law, draws, entry = law_and_draws(law_file, method=args.method, bits=bits)
            points = []
            for r in held_rows:
                if r["bits"] != bits or not r["qid"] > 0:
                    continue
                est = training_level(law, r["N"], r["qid"], bits, qid_se=r.get("qid_se"), draws=draws)
                ratio = est["tokens"] / r["D"]
                inside = est["ci"] is not None and est["ci"][0] <= r["D"] <= est["ci"][1]
                points.append({"model": r["model"], "N": r["N"], "D": r["D"], "qid": r["qid"], "qid_se": r.get("qid_se"),
                               "D_estimate": est["tokens"], "ci": est["ci"], "ratio": ratio, "D_in_ci": inside})
            ratios = sorted(abs(math.log2(p["ratio"])) for p in points)
            out["by_bits"][bits] = {
                "law": law.to_dict(), "r2_log": entry.get("r2"), "points": points, "n": len(points),
                "within_2x": sum(r <= 1 for r in ratios), "share_within_2x": sum(r <= 1 for r in ratios) / max(len(points), 1),
                "median_abs_log2_ratio": ratios[len(ratios) // 2] if ratios else None,
                "share_D_in_ci": sum(p["D_in_ci"] for p in points) / max(len(points), 1),
            }
    emit(out, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
