"""Load one GPTQ export with GPTQModel and with transformers + optimum + gptqmodel, in GPTQModel's own venv
(it imports nothing from quantkit); print GPTQMODEL_RESULT and a JSON object (see benchmarks/moe_gptqmodel.py)."""

from __future__ import annotations

import json
import sys

import torch


def relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max())


def main() -> None:
    """Both loads of the export at argv[1], against its ref.pt."""
    path = sys.argv[1]
    ref = torch.load(f"{path}/ref.pt")
    out: dict = {}
    try:
        from gptqmodel import GPTQModel

        model = GPTQModel.load(path, device="cpu")
        with torch.no_grad():
            out["gptqmodel_rel"] = relative(model.model(ref["ids"]).logits, ref["logits"])
    except Exception as err:  # noqa: BLE001 - reported, not raised
        out["gptqmodel_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    try:
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", output_loading_info=True)
        missing = sorted(info.get("missing_keys") or [])
        if missing:  # transformers initialises them randomly and only warns
            out["transformers_missing"] = missing[:4]
        with torch.no_grad():
            out["transformers_rel"] = relative(model(ref["ids"]).logits, ref["logits"])
    except Exception as err:  # noqa: BLE001
        out["transformers_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    import gptqmodel
    import transformers

    out["versions"] = {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__}
    print("GPTQMODEL_RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
