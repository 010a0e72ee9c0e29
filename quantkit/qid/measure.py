"""Measure QiD over a grid of checkpoints x bit widths x methods, appending one CSV row per cell.

N (non-embedding parameters) is counted from the loaded model: every parameter once (tied
weights once), minus the weights of every nn.Embedding (token and learned position embeddings)
and minus the output head when it is not tied to the input embedding. Norms and biases count.
QiD's standard error comes from a paired bootstrap over the eval windows: each resample draws
windows with replacement and takes loss_q - loss_fp on the same windows, so the noise both losses
share (which text is hard) cancels, as it does in the QiD itself.
D (training tokens) comes, in order, from: a --tokens override for that checkpoint; a
training.json beside the checkpoint (tokens_seen); a Pythia hub id with revision stepN
(N x 2,097,152 tokens); any revision stepN with --tokens-per-step; otherwise a QuantkitError.
"""

from __future__ import annotations

import copy
import gc
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError, unknown_choice
from quantkit.qid.laws import PYTHIA_TOKENS_PER_STEP
from quantkit.qid.table import TableWriter, cell_key, read_table
from quantkit.qid.texts import cached_ids, check_text_amounts, load_tokenizer, tokenizer_fingerprint
from quantkit.quant.methods import METHODS as ENGINE_REGISTRY
from quantkit.readers import read_json_object

ENGINE_METHODS = tuple(ENGINE_REGISTRY)
BNB_METHODS = {"bnb-nf4": 4, "bnb-fp4": 4, "bnb-int8": 8}
METHODS = ENGINE_METHODS + tuple(BNB_METHODS)
BNB_BLOCKSIZE = 64  # bitsandbytes 4-bit blocks; LLM.int8 is per-row (-1)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of the grid: a local directory or a hub id with an optional revision."""

    spec: str  # as given, e.g. EleutherAI/pythia-160m-deduped@step143000
    name: str  # path or hub id
    revision: str | None

    @property
    def local_dir(self) -> Path | None:
        """The directory when the checkpoint is local."""
        p = Path(self.name).expanduser()
        return p if p.is_dir() else None


def parse_checkpoint(spec: str) -> Checkpoint:
    """Split 'id@revision' (an existing local path is taken whole, even with an '@' in it)."""
    text = spec.strip()
    if not text:
        raise QuantkitError("empty checkpoint name; give a model directory or a hub id[@revision]")
    if Path(text).expanduser().exists() or "@" not in text:
        return Checkpoint(text, text, None)
    name, _, revision = text.rpartition("@")
    if not name or not revision:
        raise QuantkitError(f"cannot parse checkpoint {spec!r}; write it as hub-id@revision, e.g. EleutherAI/pythia-70m@step3000")
    return Checkpoint(text, name, revision)


def count_parameters(model) -> tuple[int, int]:
    """(all parameters, non-embedding parameters) by the rule in this module's docstring."""
    from torch import nn

    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    excluded: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            excluded.add(id(module.weight))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        excluded.add(id(head.weight))
    embedding = sum(p.numel() for p in model.parameters() if id(p) in excluded)
    return total, total - embedding


def _step_from(text: str | None) -> int | None:
    """N from a revision or directory name like 'step143000'."""
    m = re.fullmatch(r"step(\d+)", text or "")
    return int(m.group(1)) if m else None


def resolve_tokens(ckpt: Checkpoint, override: int | None = None, tokens_per_step: int | None = None) -> tuple[int, int | None, str]:
    """(D, step, where D came from) for a checkpoint, or a QuantkitError saying how to supply D."""
    info: dict = {}
    local = ckpt.local_dir
    if local is not None and (local / "training.json").is_file():
        info = read_json_object(local / "training.json", "fix it or pass --tokens")
    step = info.get("step")
    if step is None:
        step = _step_from(ckpt.revision) if ckpt.revision else (_step_from(local.name) if local else None)
    if override is not None:
        return int(override), step, "--tokens"
    if "tokens_seen" in info:
        return int(info["tokens_seen"]), step, "training.json"
    if step is not None and ckpt.revision and "pythia" in ckpt.name.lower() and tokens_per_step is None:
        return step * PYTHIA_TOKENS_PER_STEP, step, "pythia step x 2,097,152"
    if step is not None and tokens_per_step is not None:
        return step * int(tokens_per_step), step, "step x --tokens-per-step"
    raise QuantkitError(
        f"cannot tell how many tokens {ckpt.spec} was trained on: no training.json with tokens_seen beside it "
        "and no Pythia stepN revision; pass --tokens MODEL=TOKENS (or --tokens-per-step with a stepN revision)"
    )


def parse_token_overrides(values: Sequence[str]) -> tuple[dict[str, int], int | None]:
    """--tokens values: 'MODEL=TOKENS' per checkpoint, or a bare number for every checkpoint."""
    per: dict[str, int] = {}
    default = None
    for value in values:
        key, sep, num = value.rpartition("=")
        try:
            tokens = int(float(num))
        except ValueError:
            raise QuantkitError(f"--tokens {value!r}: {num!r} is not a number; write TOKENS or MODEL=TOKENS") from None
        if tokens <= 0:
            raise QuantkitError(f"--tokens {value!r}: the token count must be positive")
        target = key if sep else "every checkpoint"
        if (sep and key in per) or (not sep and default is not None):
            raise QuantkitError(f"--tokens {value!r}: a second count for {target}; "
                                "give one TOKENS for all checkpoints or one MODEL=TOKENS per checkpoint")
        if sep:
            per[key] = tokens
        else:
            default = tokens
    return per, default


def check_local_checkpoint(ckpt: Checkpoint):
    """A local checkpoint is a full-precision model with no revision, checked before the sweep (a broken one would
    otherwise fail in the middle of the progress bar, after a CSV was started); returns what was read of its files
    (config and tokenizer: quantkit.models.files.ModelFiles)."""
    from quantkit.data.checks import model_for_data

    if ckpt.revision is not None:
        raise QuantkitError(f"checkpoint {ckpt.spec}: {ckpt.name} is a local directory, which has no revisions; "
                            "give the directory of that revision, or a hub id@revision")
    return model_for_data(ckpt.name)


def _load(ckpt: Checkpoint, config=None, tokenizer=None):
    """(model, tokenizer) for a checkpoint, on CPU in float32; `config` and `tokenizer` where already read."""
    from quantkit.models import load_model

    model = load_model(ckpt.name, dtype="float32", revision=ckpt.revision, config=config)
    return model, tokenizer if tokenizer is not None else load_tokenizer(ckpt.name, ckpt.revision, ckpt.spec)


def _load_bnb(ckpt: Checkpoint, method: str):
    """The checkpoint loaded through transformers' BitsAndBytesConfig (nf4, fp4 or LLM.int8) on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "bnb-int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=method.split("-")[1], bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(
        ckpt.name, revision=ckpt.revision, quantization_config=config, dtype=torch.float32, device_map="cpu",
    )
    model.eval()
    return model


BOOTSTRAP_DRAWS = 1000


def paired_bootstrap_se(fp_window_nll: Sequence[float], q_window_nll: Sequence[float], window_tokens: Sequence[int],
                        draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> float:
    """Standard error of QiD = mean nll(quantized) - mean nll(FP), resampling the same windows for both."""
    import numpy as np

    fp = np.asarray(fp_window_nll, dtype=float)
    q = np.asarray(q_window_nll, dtype=float)
    tokens = np.asarray(window_tokens, dtype=float)
    if not (len(fp) == len(q) == len(tokens)):
        raise QuantkitError(f"FP and quantized evals scored different windows ({len(fp)} vs {len(q)}); evaluate both on the same stream")
    if len(fp) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(fp), size=(draws, len(fp)))
    # QiD of a resample: summed per-window differences over its token count (token-weighted, as the loss is)
    qid = (q - fp)[idx].sum(axis=1) / tokens[idx].sum(axis=1)
    return float(qid.std(ddof=1))


class _Cell:
    """Quantize-and-evaluate of one (checkpoint, method, bits) cell."""

    def __init__(self, measure: Measurement, ckpt: Checkpoint, model, tokenizer):
        """Bind the grid's settings to a loaded FP checkpoint."""
        self.m, self.ckpt, self.model, self.tokenizer = measure, ckpt, model, tokenizer
        self._samples = None

    def samples(self) -> list[dict]:
        """Calibration windows (drawn once per checkpoint)."""
        if self._samples is None:
            from quantkit.data import draw_windows

            # Same windows as quantkit.data.calibration_samples, with the tokenization cached.
            ids = cached_ids(self.m.calib, self.m.calib_part, self.tokenizer)
            self._samples = draw_windows(ids, self.m.nsamples, self.m.calib_seqlen, self.m.seed)
        return self._samples

    def evaluate(self, model) -> dict:
        """Held-out loss of a model under the grid's eval settings (= quantkit.eval.evaluate_loss)."""
        from quantkit.eval.loss import loss_on_ids

        ids = cached_ids(self.m.eval_text, self.m.eval_part, self.tokenizer)
        if self.m.eval_tokens is not None:
            ids = ids[: self.m.eval_tokens]
        return loss_on_ids(model, ids, seqlen=self.m.eval_seqlen, progress=False, per_window=True)

    def quantized_loss(self, method: str, bits: int) -> dict:
        """Quantize a copy of the FP model (or load it through bitsandbytes) and evaluate it."""
        if method in BNB_METHODS:
            qmodel = _load_bnb(self.ckpt, method)
        else:
            from quantkit.calibrate import QuantizationSpec, calibrate_loaded
            from quantkit.quant.methods import method_for
            from quantkit.quant.spec import QuantSpec

            chosen = method_for(method)
            spec = QuantSpec(bits=bits, group_size=self.m.group_size, sym=self.m.sym, act_bits=self.m.act_bits)
            qmodel = copy.deepcopy(self.model)
            # evaluated as calibrated: with act_bits the quantized linears' inputs are quantized too
            calibrate_loaded(qmodel, self.samples(), QuantizationSpec(weights=spec, method=chosen,
                                                                      fp_target=chosen.fp_target_on(None)),
                             progress=False)
        try:
            return self.evaluate(qmodel)
        finally:
            del qmodel
            gc.collect()


@dataclass
class Measurement:
    """Settings of a QiD grid (see `quantkit qid measure --help`)."""

    eval_text: str
    calib: str | None = None  # default: eval_text's train part
    eval_part: str = "heldout"
    calib_part: str = "train"
    eval_tokens: int = 20_000
    eval_seqlen: int = 256
    nsamples: int = 32
    calib_seqlen: int = 128
    group_size: int = 128
    sym: bool = True
    seed: int = 0
    tokens_per_step: int | None = None
    act_bits: int | None = None  # also quantize the quantized linears' inputs per token (W{bits}A{act_bits})

    def __post_init__(self) -> None:
        """Calibrate on the eval source's train part unless told otherwise."""
        if self.calib is None:
            self.calib = self.eval_text

    def label(self, method: str) -> str:
        """The method column of a cell: the method, with "-a{act_bits}" when the inputs are quantized too."""
        return method if self.act_bits is None or method in BNB_METHODS else f"{method}-a{self.act_bits}"


def plan_cells(checkpoints: Sequence[str], bits: Sequence[int], methods: Sequence[str]) -> list[tuple[Checkpoint, str, int]]:
    """Every (checkpoint, method, bits) cell, each once (a checkpoint, method or width given twice, a local checkpoint
    under two spellings of its path included, is measured once, under its first spelling); bitsandbytes methods have
    their own fixed bit width."""
    if not methods:
        raise QuantkitError(f"no method given; choose from {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise unknown_choice("method", unknown[0], METHODS)
    cells: dict[tuple, tuple[Checkpoint, str, int]] = {}
    for spec in checkpoints:
        ckpt = parse_checkpoint(spec)
        where = (str(ckpt.local_dir.resolve()) if ckpt.local_dir is not None else ckpt.name, ckpt.revision)
        for method in methods:
            for b in [BNB_METHODS[method]] if method in BNB_METHODS else bits:
                cells.setdefault((where, method, b), (ckpt, method, b))
    return list(cells.values())


def measure_grid(
    checkpoints: Sequence[str],
    bits: Sequence[int],
    methods: Sequence[str],
    out_csv: str | Path,
    settings: Measurement,
    tokens: Sequence[str] = (),
    retry_errors: bool = False,
    progress: bool = True,
) -> dict:
    """Measure every cell not yet in `out_csv` (append, flush per row); return counts of done/skipped/failed."""
    from quantkit.qid.table import locked_table

    with locked_table(out_csv):
        return _measure_grid(checkpoints, bits, methods, Path(out_csv), settings, tokens, retry_errors, progress)


def _measure_grid(checkpoints: Sequence[str], bits: Sequence[int], methods: Sequence[str], out_csv: Path,
                  settings: Measurement, tokens: Sequence[str], retry_errors: bool, progress: bool) -> dict:
    from tqdm.auto import tqdm

    per_model_tokens, default_tokens = parse_token_overrides(tokens)
    cells = plan_cells(checkpoints, bits, methods)
    out_csv = Path(out_csv)
    done: set[tuple] = set()
    fp_cache: dict[tuple, dict] = {}  # the FP eval (with its windows) of the checkpoint in hand
    if out_csv.exists() and out_csv.stat().st_size:
        table = read_table(out_csv, required=("model", "method", "bits", "group_size", "eval_text"))
        done = {cell_key(r) for r in table.rows}
        if not retry_errors:
            done |= {cell_key(r) for r in table.error_rows}

    def group_for(method: str) -> int:
        return BNB_BLOCKSIZE if method in ("bnb-nf4", "bnb-fp4") else (-1 if method == "bnb-int8" else settings.group_size)

    todo = [c for c in cells if (c[0].spec, settings.label(c[1]), c[2], group_for(c[1]), settings.eval_text) not in done]
    # Resolve D for every checkpoint before any work, so a missing token count fails fast.
    meta: dict[str, tuple[int, int | None]] = {}
    sources: set[str] = set()
    for ckpt, _, _ in todo:
        if ckpt.spec not in meta:
            override = per_model_tokens.get(ckpt.spec, per_model_tokens.get(ckpt.name, default_tokens))
            d, step, source = resolve_tokens(ckpt, override, settings.tokens_per_step)
            meta[ckpt.spec] = (d, step)
            sources.add(source)
    if settings.tokens_per_step is not None and todo and "step x --tokens-per-step" not in sources:
        raise QuantkitError(f"--tokens-per-step {settings.tokens_per_step} sets D only for hub checkpoints with a "
                            f"stepN revision and no tokens_seen; every checkpoint here takes D from {' / '.join(sorted(sources))}: "
                            "drop --tokens-per-step")
    from quantkit.data.checks import check_data

    # a missing file or too little text would otherwise fail every cell, one CSV row at a time
    check_data(settings.eval_text, "--eval")
    check_data(settings.calib)
    read: dict[str, tuple] = {}  # (config or None, tokenizer) of each checkpoint, for its load
    tokenizers: dict[str, object] = {}  # one object per tokenizer definition (a run's checkpoints share theirs)
    first = todo[0][0] if todo else None
    for ckpt in dict.fromkeys(c[0] for c in todo):
        # a local checkpoint's config, tensor names, shapes and dtypes (headers), checked here; its values are
        # checked as it loads (load_model), each tensor read once
        files = check_local_checkpoint(ckpt) if ckpt.local_dir is not None else None
        tokenizer = files.tokenizer if files is not None else load_tokenizer(ckpt.name, ckpt.revision, ckpt.spec)
        tokenizer = tokenizers.setdefault(tokenizer_fingerprint(tokenizer), tokenizer)
        calibrates = any(c[0] == ckpt and c[1] not in BNB_METHODS for c in todo)
        check_text_amounts(tokenizer, ckpt.spec, settings, calibrates)
        read[ckpt.spec] = (None if files is None else files.config, tokenizer)
    stats = {"cells": len(cells), "skipped": len(cells) - len(todo), "measured": 0, "failed": 0}
    if not todo:
        return stats
    current = _Cell(settings, first, *_load(first, *read[first.spec]))  # refused here: before the CSV opens
    params = count_parameters(current.model)
    # the bar is closed (its line ended) before an error leaves, so the error line stands on its own
    with TableWriter(out_csv) as writer, tqdm(total=len(todo), desc="qid cells", unit="cell", disable=not progress) as bar:
        for ckpt, method, nbits in todo:
            bar.set_postfix_str(f"{Path(ckpt.name).name}{'@' + ckpt.revision if ckpt.revision else ''} {method} w{nbits}")
            if current.ckpt != ckpt:
                current = None
                gc.collect()
                try:
                    current = _Cell(settings, ckpt, *_load(ckpt, *read[ckpt.spec]))
                except QuantkitError:
                    writer.discard()  # a later checkpoint refused (a NaN weight): no row of this run is left
                    raise
                params = count_parameters(current.model)
            d, step = meta[ckpt.spec]
            key = (ckpt.spec, settings.eval_text)
            if key not in fp_cache:
                fp_cache.clear()  # checkpoints come grouped: one FP eval in memory at a time
                fp_cache[key] = current.evaluate(current.model)
            fp = fp_cache[key]
            row = {
                "model": ckpt.spec, "N": params[1], "params": params[0], "D": d, "step": step, "bits": nbits,
                "method": settings.label(method), "group_size": group_for(method), "loss_fp": fp["loss"],
                "eval_tokens": fp["tokens"],
                "eval_text": settings.eval_text, "eval_windows": len(fp["window_nll"]),
            }
            started = time.perf_counter()
            try:
                q = current.quantized_loss(method, nbits)
                row.update(loss_q=q["loss"], qid=q["loss"] - fp["loss"],
                           qid_se=paired_bootstrap_se(fp["window_nll"], q["window_nll"], fp["window_tokens"], seed=settings.seed))
                if not math.isfinite(q["loss"]):
                    raise QuantkitError(f"quantized loss is {q['loss']}")
                stats["measured"] += 1
            except Exception as err:  # one failed cell (e.g. bitsandbytes on CPU) must not stop the grid
                row.update(loss_q=None, qid=None, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
                stats["failed"] += 1
                bar.write(f"cell {ckpt.spec} {method} w{nbits} failed: {row['error']}")
            row["seconds"] = round(time.perf_counter() - started, 3)
            writer.write(row)
            bar.update(1)
    return stats


def measure_model(spec: str, method: str, bits: int, settings: Measurement) -> dict:
    """QiD of one model at one (method, bits) with its paired-bootstrap SE, N and the eval's size."""
    [(ckpt, method, nbits)] = plan_cells([spec], [bits], [method])
    from quantkit.data.checks import check_data

    check_data(settings.eval_text, "--data")
    check_data(settings.calib)
    model, tokenizer = _load(ckpt)
    cell = _Cell(settings, ckpt, model, tokenizer)
    params, non_embedding = count_parameters(model)
    fp = cell.evaluate(model)
    q = cell.quantized_loss(method, nbits)
    return {
        "model": spec, "N": non_embedding, "params": params, "bits": nbits, "method": settings.label(method),
        "group_size": settings.group_size, "loss_fp": fp["loss"], "loss_q": q["loss"], "qid": q["loss"] - fp["loss"],
        "qid_se": paired_bootstrap_se(fp["window_nll"], q["window_nll"], fp["window_tokens"], seed=settings.seed),
        "eval_tokens": fp["tokens"], "eval_windows": len(fp["window_nll"]),
    }


def model_size(spec: str) -> tuple[int, int]:
    """(all parameters, non-embedding N) of a checkpoint, loaded once on CPU."""
    model, _ = _load(parse_checkpoint(spec))
    try:
        return count_parameters(model)
    finally:
        del model
        gc.collect()
