"""`quantkit export`: convert a quantkit output between formats, keeping the exact codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from quantkit.cli_options import output_option
from quantkit.export.formats import FORMATS, REGISTRY, format_for


@click.command("export")
@click.argument("in_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS),
              help="Output format: " + "; ".join(f"{n}: {REGISTRY[n].help}" for n in FORMATS) + ".")
@output_option("out", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors file, e.g. 5GB or 500MB.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO", default=None, help="Upload the new export (model card included) to this hub model repo, OWNER/NAME.")
@click.option("--private", is_flag=True, default=None, help="With --push-to-hub: create the repo private.")
def export(in_dir: Path, fmt: str, out: Path, overwrite: bool, max_shard_size: str, push_to_hub: str | None,
           private: bool | None) -> None:
    """Rewrite the quantkit output IN_DIR (any format) in --format, without re-quantizing."""
    from quantkit.errors import QuantkitError
    from quantkit.export.common import REPORT, SOURCE_FILES
    from quantkit.export.reader import read_checkpoint
    from quantkit.export.spool import parse_size
    from quantkit.export.writer import write_checkpoint
    from quantkit.fsutil import check_output, check_output_dir

    limit = parse_size(max_shard_size)
    if private is not None and push_to_hub is None:
        raise QuantkitError("--private makes the hub repo of --push-to-hub private; give --push-to-hub OWNER/NAME or "
                            "drop --private")
    if push_to_hub is not None:
        from quantkit.export.hub import check_repo_id

        check_repo_id(push_to_hub)
    check_output_dir(out, overwrite)
    if out.resolve() == in_dir.resolve():
        raise QuantkitError(f"output {out} is the input directory; choose another -o")
    check_output(out, overwrite=overwrite, sources=[in_dir], need_bytes=export_size(in_dir, fmt))
    ckpt = read_checkpoint(in_dir)
    report = None
    if (in_dir / REPORT).is_file():
        report = json.loads((in_dir / REPORT).read_text())
    extra = {f: (in_dir / f).read_bytes() for f in SOURCE_FILES if (in_dir / f).is_file()}
    write_checkpoint(ckpt, out, fmt=fmt, report=report, overwrite=overwrite, max_shard_size=limit, extra_files=extra)
    names = len(ckpt.results)
    click.echo(f"wrote {fmt} checkpoint with {names} quantized linears to {out}")
    if push_to_hub is not None:
        from quantkit.export.hub import push_export

        click.echo(f"pushed to {push_export(out, push_to_hub, private=private)}")


def export_size(in_dir: str | os.PathLike, fmt: str) -> int:
    """A rough size of `quantkit export IN_DIR --format fmt`: the input's, 4x where fake unpacks the codes."""
    root = Path(in_dir)
    size = sum(p.stat().st_size for p in root.glob("*.safetensors")) if root.is_dir() else 0
    try:
        source_fmt = json.loads((root / "quantkit.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        source_fmt = None
    source = REGISTRY.get(source_fmt) if isinstance(source_fmt, str) else None
    unpacks = format_for(fmt).stores_dense_weights and not (source is not None and source.stores_dense_weights)
    return size * 4 if unpacks else size
