"""Every command the README and docs/ show is run, in page order, on tiny local stand-ins.

The pages' examples use the paths `make demo` leaves (runs/demo/fp-model, runs/demo/corpus/corpus.txt) and a
few inputs of the reader's own (chat records, a vision-language model, image-text records); a sandbox
holds tiny stand-ins at those paths, and `benchmarks/` of this repository. Then, block by block:
- bash: each `quantkit ...` command runs in-process and must exit 0; one marked `# needs the hub` or
  `# needs a GPU` is only parsed (its options type-checked by click), and a command that names a hub id,
  an `hf:` dataset or a CUDA device must carry that mark; `make TARGET` is dry-run (`make -n`, the
  targets' commands are what the suite and CI run); `torchrun ... -m quantkit.cli ...` and `vllm` need
  GPUs and are parsed or named only;
- python: run in the sandbox (compiled only when its first line says `# needs the hub`);
- yaml whose first line is `# PATH`: written to PATH, for the commands after it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
from helpers import WORDS, make_tokenizer, run_cli, save_tiny_llama, write_image_dataset, write_text

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/commands.md", "docs/python.md", "docs/formats.md", "docs/tlq.md",
         "docs/distributed.md", "docs/qid.md", "docs/development.md"]
MARKS = ("# needs the hub", "# needs a GPU", "# needs the hub and a GPU")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, blank and comment-only lines dropped."""
    out: list[str] = []
    pending = ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def split_mark(command: str) -> tuple[list[str], str | None]:
    """The command's words and its trailing `# ...` mark, if any."""
    mark = None
    if " # " in command or "  #" in command:
        command, _, comment = command.partition(" #")
        mark = "#" + comment.rstrip()
    return shlex.split(command), mark


def needs_more_than_this_machine(words: list[str], sandbox: Path) -> bool:
    """Whether a command reads the hub or a GPU: an hf: source, a hub id that is no local path, CUDA, a push."""
    for before, word in zip(["", *words], words):
        if word.startswith("hf:") or word.startswith("cuda") or word == "--push-to-hub":
            return True
        written = before in ("-o", "--output", "--offload-dir")  # a path the command creates
        if HUB_ID.match(word) and not written and not (sandbox / word.split("@")[0]).exists():
            return True
    return False


def parse_only(args: list[str]) -> None:
    """Parse a quantkit command line with click, as the CLI would, without running it."""
    from quantkit.cli import main

    ctx = main.make_context("quantkit", list(args))
    group: click.Group = main
    rest = [*ctx._protected_args, *ctx.args]
    while True:
        name, command, rest = group.resolve_command(ctx, rest)
        if isinstance(command, click.Group):
            ctx = command.make_context(name, rest, parent=ctx)
            group, rest = command, [*ctx._protected_args, *ctx.args]
            continue
        command.make_context(name, rest, parent=ctx)
        return


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sandbox: the demo's model and text, chat records and a template, a VLM and image-text records."""
    root = tmp_path_factory.mktemp("docs")
    save_tiny_llama(root / "runs/demo/fp-model", hidden=128, max_positions=1024)
    (root / "runs/demo/corpus").mkdir(parents=True)
    write_text(root / "runs/demo/corpus/corpus.txt", words=20_000)
    words = WORDS
    chats = [{"messages": [{"role": "user", "content": f"{words[i % 9]} {words[i % 7]}"},
                           {"role": "assistant", "content": f"{words[i % 5]} {words[i % 3]} {words[i % 8]}"}]}
             for i in range(8)]
    (root / "runs/chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (root / "runs/chat.jinja").write_text(
        "{% for m in messages %}{{ m.content }} <eos> {% endfor %}{% if add_generation_prompt %}w0 {% endif %}")
    pytest.importorskip("PIL")
    from helpers import save_vlm

    save_vlm("llava", root / "runs/vlm-model")
    write_image_dataset(root / "runs/shapes", n=6)
    (root / "benchmarks").symlink_to(REPO / "benchmarks")
    assert make_tokenizer()  # the stand-in's tokenizer (helpers.make_tokenizer) is saved with it
    return root


@pytest.mark.parametrize("page", PAGES)
def test_every_command_shown_runs(page: str, stand_ins: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    sandbox = tmp_path / "sandbox"
    shutil.copytree(stand_ins, sandbox, symlinks=True)
    monkeypatch.chdir(sandbox)
    ran, parsed = [], []
    for language, body in fenced_blocks((REPO / page).read_text()):
        if language == "bash":
            for command in commands(body):
                words, mark = split_mark(command)
                if needs_more_than_this_machine(words, sandbox):
                    assert mark in MARKS, f"{page}: `{command}` needs the hub or a GPU: mark it so"
                if words[0] == "make":
                    done = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True)
                    assert done.returncode == 0, (command, done.stderr)
                    parsed.append(command)
                elif words[0] == "torchrun":
                    assert mark in MARKS, f"{page}: `{command}` runs several processes on GPUs: mark it so"
                    parse_only(words[words.index("quantkit.cli") + 1:])
                    parsed.append(command)
                elif words[0] == "vllm":
                    assert mark in MARKS, f"{page}: `{command}` needs a GPU: mark it so"
                    parsed.append(command)
                elif words[0] == "quantkit" and mark in MARKS:
                    parse_only(words[1:])
                    parsed.append(command)
                else:
                    assert words[0] == "quantkit", f"{page}: `{command}` is no command this test knows how to run"
                    result = run_cli(*words[1:])
                    assert result.exit_code == 0, f"{page}: `{command}` failed:\n{result.output[-3000:]}"
                    ran.append(command)
        elif language == "python":
            if body.startswith("# needs the hub"):
                compile(body, page, "exec")
                parsed.append("python block")
            else:
                exec(compile(body, page, "exec"), {"__name__": "__docs__"})  # noqa: S102 - the page's own example
                ran.append("python block")
        elif language == "yaml" and body.startswith("# "):
            target = sandbox / body.splitlines()[0][2:].strip()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
    assert ran or parsed, f"{page} shows no command"
    print(f"{page}: {len(ran)} run, {len(parsed)} parsed only")
