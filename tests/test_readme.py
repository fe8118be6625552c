"""The README as a newcomer follows it: every ```python snippet runs as written, and every
`sdinfer` command of its ```bash blocks parses, writes a file name of its own and has the extras
the set-up line installs; the cheap commands also run.

Everything runs in a temporary folder.  Where the README names a user's file by a relative
path, the test puts a tiny stand-in at that very path, so the text runs unchanged:

    path/to/sd15            a tiny random-weight StableDiffusionPipeline (tiny_pipelines.py),
    path/to/saved_pipeline  saved with save_pretrained
    sd15-gits.safetensors   a GITS grid (OptimalGrid) over 21 nodes, saved with OptimalGrid.save

A snippet that loads a shipped model and samples it for many steps, and the commands run for
real, are marked slow.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

README = Path(__file__).parents[1] / "README.md"
TEXT = README.read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
BASH = re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S)
PIPELINE_STAND_INS = ("path/to/sd15", "path/to/saved_pipeline")
GRID_STAND_IN = "sd15-gits.safetensors"
OUTPUT_FLAGS = ("-o", "--output", "--json", "--plot", "--out")


def commands() -> list[list[str]]:
    """Every ``sdinfer ...`` of the bash blocks (also after ``&&``), as argv without ``sdinfer``."""
    found = []
    for block in BASH:
        for line in block.splitlines():
            tokens = shlex.split(line, comments=True)
            segments, current = [], []
            for token in tokens:
                if token == "&&":
                    segments.append(current)
                    current = []
                else:
                    current.append(token)
            segments.append(current)
            found += [seg[1:] for seg in segments if seg[:1] == ["sdinfer"]]
    return found


COMMANDS = commands()


def outputs(argv: list[str]) -> list[str]:
    """The files a command writes (``generate`` without ``-o`` writes out.png)."""
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS]
    if argv[:1] == ["generate"] and not any(a in ("-o", "--output") for a in argv):
        named.append("out.png")
    return named


def stand_ins(folder: Path, tiny_sd: Path) -> None:
    """The user's files the README names, made tiny (see the module docstring)."""
    from sdinfer.samplers.optimal_grid import OptimalGrid

    for rel in PIPELINE_STAND_INS:
        shutil.copytree(tiny_sd, folder / rel)
    nodes = torch.linspace(1.0, 0.0, 21, dtype=torch.float64)
    cost = (nodes[:, None] - nodes[None, :]) ** 2   # a larger jump costs more
    OptimalGrid(nodes, cost).save(folder / GRID_STAND_IN)


def test_the_readme_has_what_this_test_reads():
    assert len(SNIPPETS) >= 3 and len(COMMANDS) >= 20
    assert any("path/to/sd15" in s for s in SNIPPETS)


def _runs_a_shipped_model(snippet: str) -> bool:
    named = re.findall(r"from_pretrained\(\"([^\"]+)\"", snippet)
    return any(not name.startswith("path/to/") for name in named)


@pytest.mark.parametrize("snippet", [
    pytest.param(s, id=f"snippet{i + 1}", marks=[pytest.mark.slow] if _runs_a_shipped_model(s) else [])
    for i, s in enumerate(SNIPPETS)])
def test_every_python_snippet_runs_as_written(snippet, tiny_sd, tmp_path, monkeypatch):
    stand_ins(tmp_path, tiny_sd)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, str(README), "exec"), {"__name__": "__readme__"})


def test_every_command_parses():
    from sdinfer.cli import build_parser

    for argv in COMMANDS:
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as stop:
                build_parser().parse_args(argv)
            assert stop.value.code == 0
            continue
        try:
            build_parser().parse_args(argv)
        except SystemExit as err:
            pytest.fail(f"`sdinfer {shlex.join(argv)}` does not parse (exit {err.code})")


def test_following_the_commands_in_order_never_writes_a_file_twice():
    written = [name for argv in COMMANDS for name in outputs(argv)]
    repeated = sorted({name for name in written if written.count(name) > 1})
    assert not repeated, f"the README's commands write {repeated} more than once"


def test_the_set_up_line_installs_what_the_commands_need():
    setup = next(block for block in BASH if "pip install -e" in block and "sdinfer generate" in block)
    extras = set()
    for spec in re.findall(r"pip install -e \"?\.(?:\[([^\]]*)\])?", setup):
        extras |= {e.strip() for e in spec.split(",") if e.strip()}
    if any("--plot" in argv for argv in COMMANDS):
        assert "plot" in extras, "a command uses --plot (matplotlib) but the set-up line leaves out the [plot] extra"
    assert setup.index("pip install torch") < setup.index("pip install -e"), "torch goes in before sdinfer"


QUANTIZED = {argv[argv.index("--out") + 1] for argv in COMMANDS if argv[:1] == ["quantize"]}


def _cheap(argv: list[str]) -> bool:
    """generate on a shipped model on one process (no --parallel, no --size beyond the model's,
    no learned grid, auto-sampler table, preset or quantized folder, which the minutes-long
    calibration, tune or quantization before it makes), models, --help."""
    if argv[:1] == ["models"] or argv == ["--help"]:
        return True
    if "--model" in argv[:-1] and argv[argv.index("--model") + 1] in QUANTIZED:
        return False
    sampler = argv[argv.index("--sampler") + 1] if "--sampler" in argv[:-1] else None
    return (argv[:1] == ["generate"] and "--parallel" not in argv and "--size" not in argv
            and "learned" not in argv and "--preset" not in argv and sampler != "auto")


@pytest.mark.slow
def test_the_cheap_commands_run_in_order(tmp_path, monkeypatch, capsys):
    from sdinfer.cli import main

    monkeypatch.chdir(tmp_path)
    ran = 0
    for argv in filter(_cheap, COMMANDS):
        if argv == ["--help"]:
            with pytest.raises(SystemExit) as stop:
                main(argv)
            assert stop.value.code == 0
            continue
        code = main(argv)
        assert code == 0, f"`sdinfer {shlex.join(argv)}` exited {code}: {capsys.readouterr().err}"
        for name in outputs(argv):
            assert (tmp_path / name).is_file(), f"`sdinfer {shlex.join(argv)}` wrote no {name}"
        ran += 1
    assert ran >= 8
