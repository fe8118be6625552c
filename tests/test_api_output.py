"""What the Python API and the parallel launcher print: nothing from the libraries while sdinfer
loads a model, a one-line handle from ``sdinfer.accelerate``, and an error every rank meets
alike printed once."""

import subprocess
import sys
import textwrap

import diffusers
import pytest
import transformers

import sdinfer
from sdinfer.parallel.launch import already_said, launch_local
from sdinfer.pipeline import Pipeline
from tiny_pipelines import build_tiny_sd


@pytest.fixture
def chatty_libraries():
    """The libraries as a user's process has them: warnings on, progress bars on."""
    logs = [lib.utils.logging for lib in (diffusers, transformers)]
    saved = [(log.get_verbosity(), log.is_progress_bar_enabled()) for log in logs]
    for log in logs:
        log.set_verbosity_warning()
        log.enable_progress_bar()
    yield logs
    for log, (level, bar) in zip(logs, saved):
        log.set_verbosity(level)
        log.enable_progress_bar() if bar else log.disable_progress_bar()


def test_loading_a_pipeline_prints_nothing_and_leaves_the_users_logging_as_it_was(
        tiny_sd, chatty_libraries, capfd):
    capfd.readouterr()
    Pipeline.from_pretrained(tiny_sd)
    err = capfd.readouterr().err
    assert "low cpu memory usage" not in err and "Loading weights" not in err, err
    assert err.strip() == "", err
    for log in chatty_libraries:
        assert log.get_verbosity() == log.WARNING
        assert log.is_progress_bar_enabled()


def test_the_accelerate_handle_is_one_short_line():
    pipe = build_tiny_sd()
    handle = sdinfer.accelerate(pipe, "deepcache:interval=3,branch=0+tgate:gate=0.4")
    try:
        text = repr(handle)
        assert len(text.splitlines()) == 1 and len(text) < 300, text
        assert text.startswith("Accelerated(deepcache:interval=3,branch=0,")
        assert "+ tgate:gate=0.4," in text and text.endswith(" on UNet2DConditionModel)")
        assert str(handle) == text
    finally:
        handle.remove()
    assert repr(handle) == "Accelerated(nothing installed on UNet2DConditionModel)"


def test_a_rank_stays_quiet_when_another_already_reported_the_same_failure():
    message = "ulysses shards a diffusion transformer's image tokens"
    assert not already_said(None, 1, message)                                  # no store: each says it
    assert not already_said(f"rank 1 failed: {message}", 1, message)          # its own note won
    assert already_said(f"rank 0 failed: {message}", 1, message)              # the same, said by rank 0
    assert not already_said("rank 0 failed: another thing", 1, message)       # a failure of its own
    assert not already_said("rank 0 was killed by SIGKILL", 1, message)


WORKER = """
from sdinfer.errors import UserError
from sdinfer.parallel import launch

def main():
    launch.init_process_group("gloo")
    raise UserError("the strategy refuses this model")

raise SystemExit(launch.run_rank(main))
"""


@pytest.mark.slow
def test_an_error_every_rank_meets_is_printed_once(tmp_path, capfd):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    codes = launch_local([sys.executable, str(worker)], 2)
    err = capfd.readouterr().err
    assert codes == [2, 2]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sdinfer: error: rank ") and lines[0].endswith(": the strategy refuses this model")


@pytest.mark.slow
def test_a_strategy_the_model_refuses_is_one_error_line_from_the_cli(tmp_path):
    run = subprocess.run([sys.executable, "-m", "sdinfer", "generate", "a red circle", "--parallel", "ulysses",
                          "--world-size", "2", "--steps", "1", "-o", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "UNet2DConditionModel is not one of them" in lines[0], run.stderr
