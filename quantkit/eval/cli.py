"""`quantkit eval MODEL_OR_DIR --data PATH`: held-out loss and perplexity."""

from __future__ import annotations

import json

import click

from quantkit.data.sources import PARTS


@click.command("eval")
@click.argument("model_or_dir")
@click.option("--data", "data", required=True, help="Text source: file, dir, glob, jsonl, hf:NAME[:CONFIG][:SPLIT][:FIELD], or a comma list.")
@click.option("--part", type=click.Choice(PARTS), default="all", show_default=True, help="Which part of each file: heldout = last 10% of its characters.")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Window length in tokens.")
@click.option("--stride", type=int, default=None, help="Window step (default: seqlen, non-overlapping).")
@click.option("--max-tokens", type=int, default=None, help="Evaluate only the first N tokens.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model_or_dir: str, data: str, part: str, seqlen: int, stride: int | None, max_tokens: int | None, batch_size: int, as_json: bool) -> None:
    """Mean token cross-entropy (nats) and perplexity of a model or a quantkit export on text."""
    from quantkit.data import load_texts
    from quantkit.eval.load import load_for_eval
    from quantkit.eval.loss import evaluate_loss
    from quantkit.validate import check_data, check_eval_options, preflight_eval

    check_eval_options(seqlen, stride, batch_size, max_tokens)
    check_data(data, "--data")
    texts = load_texts(data, part=part)  # bad data fails before the model is loaded
    preflight_eval(model_or_dir, seqlen=seqlen, stride=stride, batch_size=batch_size, max_tokens=max_tokens)
    model, tokenizer = load_for_eval(model_or_dir)
    res = evaluate_loss(model, tokenizer, texts, seqlen=seqlen, stride=stride, max_tokens=max_tokens, progress=not as_json, batch_size=batch_size)
    res = {"model": model_or_dir, "data": data, "part": part, **res}
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"loss {res['loss']:.4f} nats  ppl {res['ppl']:.3f}  ({res['tokens']} tokens, seqlen {res['seqlen']}, stride {res['stride']})")
