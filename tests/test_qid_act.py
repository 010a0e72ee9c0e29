"""`qid measure --act-bits`: cells quantize the linears' inputs too, checked against a hand-built W8A8 model."""

from __future__ import annotations

import copy

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.qid.cli import check_act_bits_cells
from quantkit.qid.measure import Measurement, measure_grid
from quantkit.qid.table import read_table


def rtn_w8_by_hand(weight: torch.Tensor) -> torch.Tensor:
    """Per-channel symmetric 8-bit round-to-nearest: fp16 scale 2 max|w| / 255, codes around 128."""
    scale = (2 * weight.abs().amax(dim=1, keepdim=True) / 255).half().float()
    return (torch.clamp(torch.round(weight / scale) + 128, 0, 255) - 128) * scale


def a8_by_hand(module: torch.nn.Module, args: tuple) -> tuple:
    x = args[0]
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.clamp(torch.round(x / scale), -128, 127) * scale,)


def test_w8a8_rtn_cell_matches_a_hand_built_model(ref_lm, text_dir, tmp_path):
    from transformers import AutoTokenizer

    from quantkit.eval import evaluate_loss
    from quantkit.models import load_model

    text = tmp_path / "small.txt"
    text.write_text((text_dir / "tinyshakespeare.txt").read_text()[:60_000])
    ckpt = ref_lm / "steps" / "step125"
    settings = Measurement(eval_text=str(text), eval_tokens=600, eval_seqlen=128, nsamples=2, calib_seqlen=64,
                           group_size=-1, act_bits=8)
    out = tmp_path / "q.csv"
    assert measure_grid([str(ckpt)], [8], ["rtn"], out, settings, progress=False)["measured"] == 1
    [row] = read_table(out).rows
    assert row["method"] == "rtn-a8" and row["group_size"] == -1

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = load_model(str(ckpt), dtype="float32")
    fp = evaluate_loss(model, tok, str(text), seqlen=128, max_tokens=600, part="heldout", progress=False)
    q = copy.deepcopy(model)
    for name, module in q.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.weight.data = rtn_w8_by_hand(module.weight.data)
            module.register_forward_pre_hook(a8_by_hand)
    ql = evaluate_loss(q, tok, str(text), seqlen=128, max_tokens=600, part="heldout", progress=False)
    assert row["qid"] == pytest.approx(ql["loss"] - fp["loss"], abs=1e-5)


def test_act_bits_refuses_bnb_and_grouped_weights():
    with pytest.raises(QuantkitError, match="bitsandbytes"):
        check_act_bits_cells(8, [8], ["gptq", "bnb-int8"], -1, True)
    with pytest.raises(QuantkitError, match="per-channel symmetric"):
        check_act_bits_cells(8, [4], ["gptq"], 128, True)
    check_act_bits_cells(8, [4, 8], ["rtn", "gptq"], -1, True)
