"""Benchmark tasks through lm-evaluation-harness (`quantkit eval --tasks`), on a model quantkit has loaded.

The model is handed to the harness's HF model class as an object, so a quantkit export of any
format (loaded by quantkit.export.load_quantized with its dequantized weights) is evaluated the
same way as a plain model; the harness only sees a transformers model and its tokenizer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from unittest import mock

import torch

from quantkit.errors import QuantkitError, first_line
from quantkit.eval.load import on_device

INSTALL_HINT = "--tasks needs lm-evaluation-harness; run `pip install quantkit[lmeval]`"
# The harness's per-task keys that are bookkeeping rather than metrics.
_NON_METRIC_KEYS = {"alias", "name", "sample_len", "samples"}

logger = logging.getLogger(__name__)


def import_harness():
    """The lm_eval package, or a QuantkitError saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - its dependencies (accelerate) must import too
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as err:
        raise QuantkitError(f"{INSTALL_HINT} ({err.name or err} is missing)") from None
    return lm_eval


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from `T1,T2` or a list; a QuantkitError when none is named."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise QuantkitError("--tasks names no task; give comma-separated lm-evaluation-harness task names")
    return names


def task_manager(include_path: Sequence[str | os.PathLike] = (), names: Sequence[str] = ()):
    """The harness's TaskManager over the task YAML folders of include_path and its built-in tasks; only over
    include_path when that holds every task in `names` (indexing the thousands of built-in YAMLs takes seconds)."""
    import_harness()
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path]
    for path in paths:
        if not os.path.isdir(path):
            raise QuantkitError(f"--include-path {path} is not a directory of task YAML files")
    if paths and names:
        own = TaskManager(include_path=paths, include_defaults=False)
        if all(name in set(own.all_tasks) for name in names):
            return own
    return TaskManager(include_path=paths or None)


def check_tasks(names: Sequence[str], manager) -> None:
    """Every name is a task, group or tag the harness knows; else one line naming the first unknown one."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known and not manager.match_tasks([name]):
            raise QuantkitError(f"unknown lm-evaluation-harness task {name!r}; list them with `lm-eval ls tasks`, "
                                "or give the folder of your task YAML with --include-path")


# datasets' packaged builders: a task naming one reads local files (dataset_kwargs' data_files), not the hub.
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder", "webdataset"}


def task_datasets(names: Sequence[str], manager) -> list[str]:
    """The hub datasets (dataset_path) that the named tasks, groups and tags read, as far as their configs say."""
    index = manager.task_index
    seen: set[str] = set()
    paths: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if isinstance(name, dict):
            name = name.get("task")
        if not isinstance(name, str) or name in seen:
            continue
        seen.add(name)
        entry = index.get(name)
        if entry is None:
            continue
        cfg = entry.cfg or {}
        if isinstance(cfg.get("dataset_path"), str):
            paths.add(cfg["dataset_path"])
        kind = getattr(entry.kind, "name", str(entry.kind))
        if kind == "GROUP":
            sub = cfg.get("task")
            todo.extend(sub if isinstance(sub, list) else [sub])
        elif kind == "TAG":
            todo.extend(n for n, e in index.items() if name in (getattr(e, "tags", None) or ()))
    return sorted(p for p in paths if p not in _LOCAL_BUILDERS and not os.path.exists(os.path.expanduser(p)))


def _cached_dataset(name: str) -> bool:
    """Whether the hub cache (or datasets' own cache) holds dataset `name` (no network)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, repo_type="dataset", local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - not cached (or no huggingface_hub)
        pass
    try:
        import datasets

        return (Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")).is_dir()
    except Exception:  # noqa: BLE001
        return False


def check_task_datasets(names: Sequence[str], manager) -> None:
    """Before the model loads: every hub dataset the tasks read is cached or reachable (one quick look-up each),
    so an offline run fails in one line instead of after the harness's half-minute of retries."""
    from quantkit.models.files import check_hub, hub_offline

    for name in task_datasets(names, manager):
        if _cached_dataset(name):
            continue
        if hub_offline():
            raise QuantkitError(f"--tasks {','.join(names)} reads dataset {name}, which the cache does not hold, and "
                                "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE forbid fetching it; fetch it once online, or give "
                                "a local task with --include-path")
        try:
            check_hub(name, "dataset")
        except QuantkitError as err:
            raise QuantkitError(f"--tasks {','.join(names)} reads {err}") from None


def _clean(value: object) -> object:
    """A JSON-safe metric value: floats as floats (NaN as None), everything else as its string."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    try:
        number = float(value)  # numpy scalars
    except (TypeError, ValueError):
        return str(value)
    return None if math.isnan(number) else number


def run_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    include_path: Sequence[str | os.PathLike] = (),
    manager=None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Evaluate `model` (moved to `device`) on lm-evaluation-harness tasks; return their metrics.

    Returns {"tasks": {task: {metric: value}}, "groups": {...}, "n-shot", "versions", "n-samples"} with
    the harness's metric names ("acc,none", "acc_stderr,none"...). limit caps the examples per task
    (a fraction when below 1), as the harness's --limit does; manager is a TaskManager already built
    (else one over the built-in tasks and include_path).
    """
    lm_eval = import_harness()
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    manager = manager if manager is not None else task_manager(include_path, names)
    check_tasks(names, manager)
    if batch_size < 1:
        raise QuantkitError(f"--batch-size must be at least 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise QuantkitError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise QuantkitError(f"--limit must be positive, got {limit}")
    model = on_device(model, device).eval()
    try:
        with _quiet_libraries():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with _no_environment_record(), _quiet_libraries():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
    except QuantkitError:
        raise
    except Exception as err:  # noqa: BLE001 - a task's YAML or data fails inside the harness in many ways
        _close_progress_bars()
        raise QuantkitError(f"lm-evaluation-harness could not run --tasks {','.join(names)}{_defined_in(names, manager)}:"
                            f" {_reason(err)}; check the task's YAML and its data") from None
    if results is None:  # only ranks other than 0 of a distributed harness run get None
        raise QuantkitError("lm-evaluation-harness returned no results")
    groups = {name for name, subtasks in (results.get("group_subtasks") or {}).items() if subtasks}
    for task, values in results.get("results", {}).items():  # a metric the harness does not know is only logged
        if task not in groups and not any(isinstance(v, (int, float)) and not k.partition(",")[0].endswith("_stderr")
                   for k, v in values.items() if k not in _NON_METRIC_KEYS):
            raise QuantkitError(f"--tasks {task}{_defined_in([task], manager)} yielded no metric: the harness knows "
                                "none in its metric_list; name metrics it has (acc, exact_match, perplexity...)")

    def metrics(by_task: dict) -> dict:
        return {task: {k: _clean(v) for k, v in values.items() if k not in _NON_METRIC_KEYS}
                for task, values in by_task.items()}

    return {
        "tasks": metrics(results.get("results", {})),
        "groups": metrics(results.get("groups", {})),
        "n-shot": {k: _clean(v) for k, v in results.get("n-shot", {}).items()},
        "versions": {k: _clean(v) for k, v in results.get("versions", {}).items()},
        "n-samples": results.get("n-samples", {}),
    }


def _defined_in(names: Sequence[str], manager) -> str:
    """' (defined in FILE, ...)' for the named tasks whose YAML the harness indexed, else ''."""
    files = []
    for name in names:
        entry = getattr(manager, "task_index", {}).get(name)
        path = getattr(entry, "yaml_path", None) or (entry.get("yaml_path") if isinstance(entry, dict) else None)
        if path and str(path) not in files:
            files.append(str(path))
    return f" (defined in {', '.join(files)})" if files else ""


def _reason(err: BaseException) -> str:
    """What failed, with the first cause that says more than a wrapper's words (datasets' DatasetGenerationError
    wraps the JSON reader's error); an empty data file stops the harness's document iterator (StopIteration)."""
    if isinstance(err, StopIteration):
        return "the task's data yields no documents"
    words = f"{type(err).__name__}: {first_line(err)}" if str(err).strip() else type(err).__name__
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in words:
        words += f" ({type(cause).__name__}: {first_line(cause)})"
    return words


def _close_progress_bars() -> None:
    """End the harness's unfinished progress bars with their line: the error line must start a line of its own."""
    with contextlib.suppress(Exception):
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def format_table(results: dict) -> list[str]:
    """One line per task and metric (its stderr beside it when the harness gives one)."""
    lines = []
    for task, values in sorted(results["tasks"].items()):
        for key, value in sorted(values.items()):
            metric, _, flt = key.partition(",")
            if metric.endswith("_stderr") or not isinstance(value, float):
                continue
            stderr = values.get(f"{metric}_stderr,{flt}")
            spread = f" +- {stderr:.4f}" if isinstance(stderr, float) else ""
            lines.append(f"{task:<24} {metric + ('' if flt in ('', 'none') else ',' + flt):<20} {value:.4f}{spread}")
    return lines


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """The harness's and the hub client's warnings off for the run (the harness warns that it was handed a model
    object, which is how quantkit calls it; the hub client prints a line per retry), and datasets' progress bars:
    what fails reaches the CLI as its one line. --debug (the quantkit logger at DEBUG) keeps them."""
    if logging.getLogger("quantkit").isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "huggingface_hub", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        # the harness logs a failure (an unknown metric) and goes on: run_tasks refuses what it leaves, in one line
        lg.setLevel(logging.CRITICAL)
    bars = None
    with contextlib.suppress(ImportError):  # datasets' bars ("Generating test split") count no known total
        import datasets as bars
    shown = bars is not None and not bars.are_progress_bars_disabled()
    if shown:
        bars.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if shown:
            bars.enable_progress_bars()


@contextlib.contextmanager
def _no_environment_record() -> Iterator[None]:
    """Run the harness without forking this process: no environment record (git hash, torch's
    collect_env) and bootstrap standard errors in-process (its DISABLE_MULTIPROC switch).

    A child forked from a process running torch's thread pool can hang on a lock held by a thread
    that does not exist in it (seen in our test suite: the harness's git call and its bootstrap
    Pool); quantkit's results carry no environment record.
    """
    import lm_eval.evaluator as evaluator

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}))
        for name, stub in (("get_git_commit_hash", lambda: None), ("add_env_info", lambda storage: None)):
            if hasattr(evaluator, name):
                stack.enter_context(mock.patch.object(evaluator, name, stub))
        yield
