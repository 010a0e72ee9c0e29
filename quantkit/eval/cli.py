"""`quantkit eval MODEL_OR_DIR --data PATH | --tasks T1,T2`: held-out loss and perplexity, lm-evaluation-harness tasks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.cli_options import bounded, output_option
from quantkit.data.sources import PARTS
from quantkit.errors import QuantkitError, first_line, one_line
from quantkit.export.reader import check_export_dir, is_quantkit_output
from quantkit.fsutil import check_output_file

PART_WORDS = {"heldout": "the held-out part (last 10% of each file's characters)",
              "train": "the train part (first 90% of each file's characters)", "all": "all the text"}


def check_eval_text(texts: dict[str, list[str]], model_or_dir: str, data: str, part: str, seqlen: int,
                    max_tokens: int | None) -> dict[str, list[str]]:
    """The sources to score, before the model loads: those holding one --seqlen window (sources_with_a_window)."""
    from quantkit.data.samples import tokenize_documents
    from quantkit.eval.load import load_tokenizer
    from quantkit.eval.loss import sources_with_a_window

    tokenizer = load_tokenizer(model_or_dir)
    counts = {label: int(tokenize_documents(docs, tokenizer)[:max_tokens].numel()) for label, docs in texts.items()}
    return {label: texts[label] for label in sources_with_a_window(counts, seqlen, f"{PART_WORDS[part]} of {data}")}


@click.command("eval")
@click.argument("model_or_dir")
@click.option("--data", "data", default=None, help="Text source for loss and perplexity: file, dir, glob, jsonl, hf:NAME[:CONFIG][:SPLIT][:FIELD], or a comma list.")
@click.option("--tasks", default=None, help="Comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc_easy (needs `pip install quantkit[lmeval]`).")
@click.option("--include-path", "include_path", multiple=True, type=click.Path(file_okay=False), help="With --tasks: a folder of your own task YAML files (repeatable).")
@click.option("--num-fewshot", type=bounded("num_fewshot"), default=None, help="With --tasks: few-shot examples per prompt (default: each task's own).")
@click.option("--limit", type=bounded("limit"), default=None, help="With --tasks: at most N examples per task (a fraction of each task when below 1).")
@click.option("--part", type=click.Choice(PARTS), default="heldout", show_default=True, help="Which part of each file to score: heldout = the last 10% of its characters (the part calibration leaves out with --part train), train = the first 90%, all = everything.")
@click.option("--seqlen", type=bounded("seqlen"), default=256, show_default=True, help="Window length in tokens.")
@click.option("--stride", type=bounded("stride"), default=None, help="Window step (default: seqlen, non-overlapping).")
@click.option("--max-tokens", type=bounded("max_tokens"), default=None, help="Evaluate only the first N tokens of each source (file or dataset).")
@click.option("--batch-size", type=bounded("batch_size"), default=8, show_default=True, help="Windows (or task requests) per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="Where the model runs: cpu, cuda, cuda:1.")
@output_option(default=None, type=click.Path(dir_okay=False), help="Also write the results as one JSON file here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model_or_dir: str, data: str | None, tasks: str | None, part: str, seqlen: int, stride: int | None,
             max_tokens: int | None, batch_size: int, device: str, output: str | None, as_json: bool,
             **task_options) -> None:
    """Mean token cross-entropy (nats) and perplexity of a model or a quantkit export on text.

    The text is scored overall and per source: each file of a directory, glob or list, and each dataset.

    --tasks runs lm-evaluation-harness tasks on the same loaded model (any quantkit export format too).
    """
    from quantkit.engine.distributed import check_device

    # the harness's options: which examples --tasks runs
    include_path, num_fewshot, limit = task_options["include_path"], task_options["num_fewshot"], task_options["limit"]

    if data is None and tasks is None:
        raise QuantkitError("nothing to evaluate; give --data (loss and perplexity on text) or --tasks "
                            "(lm-evaluation-harness tasks), or both")
    if tasks is None and (include_path or num_fewshot is not None or limit is not None):
        raise QuantkitError("--include-path, --num-fewshot and --limit choose --tasks' examples; give --tasks")
    check_device(device)
    if output is not None:
        from quantkit.data.checks import data_paths

        check_output_file(output, inputs=[model_or_dir, *(data_paths(data) if data is not None else [])])
    texts = manager = None
    if data is not None:
        from quantkit.data import load_texts_by_source
        from quantkit.data.checks import check_data

        check_stride(seqlen, stride)
        check_data(data, "--data")
        texts = load_texts_by_source(data, part=part)  # bad data fails before the model is loaded
    if tasks is not None:
        from quantkit.eval.harness import (
            check_task_datasets,
            check_tasks,
            parse_tasks,
            task_manager,
        )

        names = parse_tasks(tasks)
        manager = task_manager(include_path, names)  # a missing lm-eval, or an unknown task, fails before the model loads
        check_tasks(names, manager)
        check_task_datasets(names, manager)  # offline: one line now, not the harness's retries after the model loads
    preflight_eval(model_or_dir, seqlen=seqlen if data is not None else None, stride=stride)
    if texts is not None:
        texts = check_eval_text(texts, model_or_dir, data, part, seqlen, max_tokens)
    from quantkit.eval.load import load_for_eval, on_device

    model, tokenizer = load_for_eval(model_or_dir)
    model = on_device(model, device)
    res: dict = {"model": model_or_dir, "device": device}
    lines = []
    if texts is not None:
        from quantkit.eval.loss import evaluate_sources

        loss = evaluate_sources(model, tokenizer, texts, seqlen=seqlen, stride=stride, max_tokens=max_tokens,
                                progress=not as_json, batch_size=batch_size, device=device)
        res |= {"data": data, "part": part, **loss}
        lines.append(f"loss {loss['loss']:.4f} nats  ppl {loss['ppl']:.3f}  ({loss['tokens']} tokens, seqlen {loss['seqlen']}, stride {loss['stride']})")
        lines.append(f"scored: {PART_WORDS[part]} of {data}")
        if len(loss["by_source"]) > 1:
            lines.extend(f"  {one['loss']:.4f} nats  ppl {one['ppl']:.3f}  ({one['tokens']} tokens)  {label}"
                         for label, one in loss["by_source"].items())
    if tasks is not None:
        from quantkit.eval.harness import format_table, run_tasks

        found = run_tasks(model, tokenizer, names, manager=manager, num_fewshot=num_fewshot, limit=limit,
                          batch_size=batch_size, device=device)
        res |= {"num_fewshot": num_fewshot, "limit": limit, **found}
        lines.extend(format_table(found))
    if output is not None:
        from quantkit.fsutil import atomic_file

        with atomic_file(output) as tmp:
            tmp.write_text(json.dumps(res, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(res))
    else:
        for line in lines:
            click.echo(line)
        if output is not None:
            click.echo(f"results -> {output}")


def check_stride(seqlen: int, stride: int | None) -> None:
    """--stride within --seqlen, before anything is loaded (each option on its own: its type's bound)."""
    if stride is not None and stride > seqlen:
        raise QuantkitError(f"--stride must be between 1 and --seqlen ({seqlen}), got {stride}")


def preflight_eval(model_or_dir: str, *, seqlen: int | None, stride: int | None) -> None:
    """Everything `quantkit eval` can check before it loads the model (seqlen None: no text windows)."""
    if seqlen is not None:
        check_stride(seqlen, stride)
    from quantkit.models.files import check_model_files, check_seqlen, check_tokenizer

    if is_quantkit_output(model_or_dir):
        from transformers import AutoConfig

        root = Path(model_or_dir).expanduser()
        check_export_dir(root)
        try:
            config = AutoConfig.from_pretrained(str(root))
        except Exception as err:  # noqa: BLE001
            raise QuantkitError(f"cannot read the config of {one_line(model_or_dir)}: {first_line(err)}") from None
        check_tokenizer(str(root), config)
    else:
        config = check_model_files(model_or_dir).config
    if seqlen is not None:
        check_seqlen(config, seqlen)
