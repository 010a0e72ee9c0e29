"""Issue #23 item 3: do quantkit's GPTQ exports of mixture-of-experts models load in GPTQModel (and in plain
transformers + optimum + gptqmodel) with quantkit's logits?

GPTQModel needs torch 2.14.1 and cannot live in quantkit's venv, so this script writes the exports (tiny random
models of each MoE family, every decoder-layer linear but the routers rounded to 4 bits in groups of 32, fp16)
and runs benchmarks/gptqmodel_runner.py in GPTQModel's venv on each. Prints one JSON object: per family, the
relative max logit difference of GPTQModel.load and of AutoModelForCausalLM.from_pretrained against the exported
weights run in float32 (GPTQModel's CPU kernels compute in fp16: differences of a few 1e-3 are its rounding),
or the error each raised.

    python benchmarks/moe_gptqmodel.py --gptqmodel /tmp/gptqm-venv/bin/python -o benchmarks/results/moe_gptqmodel.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import emit  # noqa: E402
from helpers import MOE_FAMILIES  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "gptqmodel_runner.py"
# tests/helpers' tiny MoE models (tiny_moe), widened: every width a multiple of 32 and no fused width equal to
# the hidden width (GPTQModel's kernels and its transposed-layout detection need both); one token id for all
WIDTHS = dict(intermediate_size=64, moe_intermediate_size=64, bos_token_id=0, eos_token_id=0)
WIDER = {
    "deepseek_v3": dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, qk_head_dim=32, num_key_value_heads=4),
    "llama4_text": dict(intermediate_size_mlp=128),
}


def config_for(family: str):
    """The tiny `family` config of tests/helpers' MoE models with GPTQModel's widths."""
    from helpers import MOE_FIELDS, tiny_config

    fields = dict(vocab_size=64, max_position_embeddings=64) | MOE_FIELDS.get(family, {}) | WIDTHS
    return tiny_config(family, **fields | WIDER.get(family, {}))


def export(family: str, root: Path) -> Path:
    """A tiny `family` model, every decoder-layer linear but routers and gates rounded (RTN, 4 bits, g32),
    exported as GPTQ with a word tokenizer; ref.pt holds token ids and the float32 logits of those weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from quantkit.export import save_quantized
    from quantkit.models.experts import unfuse_experts
    from quantkit.quant.rtn import rtn_solve
    from quantkit.quant.spec import QuantSpec

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(family))
    model = model.half().float().eval()
    unfuse_experts(model)
    results = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and not name.endswith(("router", "gate")):
            results[name] = rtn_solve(module.weight.data.float(), None, QuantSpec(bits=4, group_size=32))
            module.weight.data.copy_(results[name].dequantize())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits.float()
    out = save_quantized(model.half(), results, root / family, fmt="gptq")
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(63)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(out)
    torch.save({"ids": ids, "logits": logits}, out / "ref.pt")
    return out


def main() -> None:
    """Export every family, load each in GPTQModel's venv, print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gptqmodel", required=True, help="python of a venv with gptqmodel and optimum")
    parser.add_argument("--families", nargs="+", default=MOE_FAMILIES, choices=MOE_FAMILIES)
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            path = export(family, Path(tmp))
            done = subprocess.run([args.gptqmodel, str(RUNNER), str(path)], capture_output=True, text=True,
                                  env={"OMP_NUM_THREADS": "1", "GPTQMODEL_CPU_WORKERS": "2", "PATH": "/usr/bin:/bin",
                                       "HOME": str(Path.home())})
            line = next((x for x in done.stdout.splitlines() if x.startswith("GPTQMODEL_RESULT ")), None)
            found[family] = json.loads(line[len("GPTQMODEL_RESULT "):]) if line else {"error": done.stderr[-500:]}
    emit({"benchmark": "moe_gptqmodel", "bits": 4, "group_size": 32, "results": found}, args.output)


if __name__ == "__main__":
    main()
