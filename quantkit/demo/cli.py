"""`quantkit demo`: train a tiny LM (or take yours), quantize with RTN and GPTQ at 4 and 3 bits, compare."""

from __future__ import annotations

import json

import click

from quantkit.cli_options import bounded, output_option
from quantkit.export.formats import FORMATS


@click.command("demo")
@click.option("--model", default=None, help="Your model (dir or hub id) instead of training one; needs --data.")
@click.option("--data", default=None, help="Your text source (calibrate on its train part, evaluate on its heldout part).")
@output_option("out", default="./quantkit-demo", show_default=True, help="Output directory (`make demo` writes runs/demo, which git ignores).")
@click.option("--train-seconds", type=bounded("train_seconds"), default=60.0, show_default=True, help="Training time for the demo model.")
@click.option("--seed", type=bounded("seed"), default=0, show_default=True, help="Seed for corpus, training and calibration samples.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="gptq_v2", show_default=True, help="Export format.")
@click.option("--seqlen", type=bounded("seqlen"), default=128, show_default=True, help="Tokens per training, calibration and evaluation window.")
@click.option("--nsamples", type=bounded("nsamples"), default=64, show_default=True, help="Calibration windows.")
@click.option("--threads", type=bounded("threads"), default=None, help="torch CPU threads (default: torch's choice; 1 helps on busy shared machines).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def demo(model: str | None, data: str | None, out: str, train_seconds: float, seed: int, fmt: str, nsamples: int, seqlen: int, threads: int | None, overwrite: bool, as_json: bool) -> None:
    """Train (or load) a small LM, quantize it with RTN and GPTQ at 4 and 3 bits, and compare held-out loss."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from quantkit.demo.run import format_table, run_demo

    preflight_demo(model, data, out, overwrite=overwrite, seqlen=seqlen, fmt=fmt, nsamples=nsamples)
    result = run_demo(model, data, out, train_seconds=train_seconds, seed=seed, overwrite=overwrite, fmt=fmt, nsamples=nsamples, seqlen=seqlen)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(format_table(result))
        click.echo(f"\nresults: {out}/results.json  ({result['seconds']:.0f}s)")


def preflight_demo(model: str | None, data: str | None, out: str, *, overwrite: bool, seqlen: int,
                   fmt: str = "gptq_v2", nsamples: int = 1) -> None:
    """`quantkit demo`'s checks before training or loading: your model and data, the windows against the generated
    corpus, and the output with room for what the demo writes there (a disk that cannot hold it is one line before
    any of the demo's progress lines)."""
    from quantkit.data.checks import check_data, data_paths, model_for_data
    from quantkit.demo.run import DemoSettings, disk_bytes
    from quantkit.fsutil import check_output
    from quantkit.models.files import check_seqlen

    files = None
    if model is not None and data is not None:
        check_data(data, "--data")
        files = model_for_data(model)
        check_seqlen(files.config, seqlen)
    if model is None and data is None:
        check_corpus_windows(DemoSettings().corpus_chars, seqlen=seqlen, nsamples=nsamples)
    if model is None or data is not None:
        need = disk_bytes(files, DemoSettings(fmt=fmt), corpus=data is None)
        check_output(out, overwrite=overwrite, sources=[model, *data_paths(data)], need_bytes=need)


def check_corpus_windows(corpus_chars: int, *, seqlen: int, nsamples: int) -> None:
    """Refuse windows the generated corpus cannot hold, before training. It is about `corpus_chars` ASCII characters
    in one document (one paragraph over at most), and its byte-level tokenizer makes at most one token per byte:
    its training part (the first 90%) holds fewer than `corpus_chars` tokens for --nsamples x --seqlen calibration
    tokens, its held-out part (the last 10%) fewer than corpus_chars / 5 for one --seqlen window."""
    from quantkit.errors import QuantkitError

    where = f"the demo corpus (about {corpus_chars} characters, at most a token each)"
    if nsamples * seqlen > corpus_chars:
        raise QuantkitError(f"--nsamples {nsamples} x --seqlen {seqlen} = {nsamples * seqlen} tokens is more than "
                            f"the training part of {where} holds; lower --nsamples or --seqlen")
    if seqlen > corpus_chars // 5:
        raise QuantkitError(f"--seqlen {seqlen} is longer than the held-out part (the last 10%) of {where} holds; "
                            "lower --seqlen")
