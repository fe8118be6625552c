import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from sdinfer.cli import main


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_generate_default_writes_png_with_metadata(tmp_path, capsys):
    out = tmp_path / "out.png"
    code, stdout, _ = run(capsys, "generate", "a red circle in the top left", "-o", str(out),
                          "--steps", "3", "--quiet")
    assert code == 0 and out.exists()
    image = Image.open(out)
    assert image.size == (32, 32)
    assert image.text["prompt"] == "a red circle in the top left"
    assert image.text["steps"] == "3" and image.text["sampler"] == "ddim"
    assert "seed: 0" in image.text["parameters"]
    assert str(out) in stdout and " s " in stdout


@pytest.mark.slow
def test_generate_batch_and_other_model(tmp_path, capsys):
    out = tmp_path / "b.png"
    code, _, _ = run(capsys, "generate", "a blue square in the center", "-o", str(out), "--model",
                     "dit", "--batch", "2", "--steps", "2", "--seed", "5", "--quiet")
    assert code == 0
    assert Image.open(tmp_path / "b-1.png").text["seed"] == "6"


def test_generate_from_saved_pipeline_path(tiny_sd, tmp_path, capsys):
    out = tmp_path / "sd.png"
    code, _, err = run(capsys, "generate", "a cat", "-o", str(out), "--model", str(tiny_sd),
                       "--steps", "2", "--size", "16", "--quiet")
    assert code == 0, err
    assert Image.open(out).size == (16, 16)


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-model"], "neither a shipped model"),
    (["--model", "/nonexistent/folder"], "neither a shipped model"),
    (["--sampler", "warp-drive"], "unknown sampler"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--size", "30"], "multiple of 4"),
    (["--size", "64", "--model", "dit"], "larger than model"),
    (["--cfg", "-1"], "cfg"),
    (["-o", "/nonexistent/dir/x.png"], "does not exist"),
    (["-o", "image.jpg"], "must end in .png"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "a red circle in the top left", "--steps", "2", "--quiet"]
    if "-o" not in args:
        argv += ["-o", "out.png"]
    code, _, err = run(capsys, *argv, *args)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("sdinfer: error:") and message in lines[0], err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.tmp"))


def test_not_a_model_folder_and_truncated_weights(tmp_path, capsys, tiny_sd):
    import shutil

    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "generate", "x", "-o", str(tmp_path / "a.png"), "--model",
                       str(tmp_path / "empty"))
    assert code == 2 and "not a diffusers model" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    w = next((broken / "vae").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:100])
    code, _, err = run(capsys, "generate", "x", "-o", str(tmp_path / "a.png"), "--model", str(broken))
    assert code == 2 and "safetensors" in err
    assert not (tmp_path / "a.png").exists()


def test_unwritable_folder(tmp_path, capsys):
    if os.geteuid() == 0:
        target = Path("/proc/sdinfer-test.png")  # not writable even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "a.png"
    code, _, err = run(capsys, "generate", "x", "-o", str(target))
    assert code == 2 and "not writable" in err


@pytest.mark.slow
def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    code, _, err = run(capsys, "generate", "a red circle in the top left", "-o", str(out), "--steps", "2")
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"precious"
    code, _, _ = run(capsys, "generate", "a red circle in the top left", "-o", str(out), "--steps", "2",
                     "--overwrite", "--quiet")
    assert code == 0 and Image.open(out).size == (32, 32)


@pytest.mark.slow
def test_models_lists_both(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "UNet2DConditionModel" in out and "SD3Transformer2DModel" in out


def test_help_reads_for_newcomers(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--sampler", "--steps", "--cfg", "--seed", "--batch", "--size", "--overwrite"):
        assert flag in out


@pytest.mark.slow
def test_bench_writes_json_and_self_baseline_is_exact(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    code, out, err = run(capsys, "bench", "--model", "unet", "--steps", "3", "--prompts", "quick",
                         "--limit", "4", "--batch", "2", "--repeats", "3", "--json", str(js), "--plot", str(png))
    assert code == 0, err
    report = json.loads(js.read_text())
    base, same = report["records"]
    for key in ("config", "nfe", "macs", "wall_s", "peak_mem_mb", "psnr", "ssim", "adherence",
                "speedup_wall", "speedup_macs"):
        assert key in same
    assert same["psnr"] == report["meta"]["psnr_cap_db"] and same["ssim"] == pytest.approx(1.0)
    assert same["speedup_macs"] == 1.0 and same["nfe"] == 3 and same["macs"] > 0
    # timing noise is measured in BENCHMARKS.md, not asserted here
    assert len(same["wall_s_runs"]) == 3 and same["speedup_wall"] > 0
    assert png.exists() and "speedup_wall" in out


@pytest.mark.slow
def test_bench_with_other_baseline(tmp_path, capsys):
    js = tmp_path / "b.json"
    code, _, err = run(capsys, "bench", "--model", "dit", "--steps", "2", "--baseline", "ddim:4",
                       "--prompts", "quick", "--limit", "2", "--repeats", "1", "--json", str(js))
    assert code == 0, err
    base, rec = json.loads(js.read_text())["records"]
    assert base["steps"] == 4 and rec["steps"] == 2
    assert rec["speedup_macs"] == pytest.approx(2.0, rel=0.05) and rec["psnr"] < 100


def test_bench_bad_prompt_set(capsys):
    code, _, err = run(capsys, "bench", "--prompts", "/no/such/file.txt")
    assert code == 2 and "prompt set" in err


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "dit"])
def test_dpm_solver_v3_uses_the_shipped_statistics(model, tmp_path, capsys):
    out = tmp_path / "v3.png"
    code, _, err = run(capsys, "generate", "a red circle in the top left", "-o", str(out), "--model",
                       model, "--sampler", "dpm-solver-v3", "--steps", "6", "--quiet")
    assert code == 0 and out.exists(), err
    code, _, err = run(capsys, "generate", "a red circle in the top left", "-o", str(tmp_path / "x.png"),
                       "--model", model, "--sampler", "dpm-solver-v3", "--steps", "6", "--cfg", "7", "--quiet")
    assert code == 2 and "sdinfer calibrate --model" in err and "--cfg 7" in err
    code, _, err = run(capsys, "generate", "a red circle", "-o", str(tmp_path / "y.png"), "--model", model,
                       "--sampler", f"dpm-solver-v3:stats={tmp_path / 'none.safetensors'}", "--quiet")
    assert code == 2 and "no DPM-Solver-v3 statistics at" in err


@pytest.mark.slow
def test_calibrate_writes_statistics_and_keeps_existing_files(tmp_path, capsys, monkeypatch):
    import sdinfer.calibrate as calibrate
    from sdinfer.samplers.ems import EMS

    # a quick, coarse reference (10 Runge-Kutta steps): the command is what is tested
    monkeypatch.setattr(calibrate, "REFERENCE_TOLERANCE", 1.0)
    monkeypatch.setattr(calibrate, "REFERENCE_STEP", 2.0)

    out = tmp_path / "ems.safetensors"
    args = ["calibrate", "--model", "unet", "--cfg", "3", "--samples", "2", "--points", "10",
            "--validation", "1", "--out", str(out)]
    code, stdout, err = run(capsys, *args)
    assert code == 0 and out.exists(), err
    ems = EMS.load(out)
    assert ems.shape == (3, 1, 1) and ems.lam.shape == (11,)
    assert ems.meta["guidance_scale"] == 3.0 and ems.meta["samples"] == 2
    # the corrector settings chosen on the validation trajectory, and the errors they rest on
    selection = ems.meta["corrector_selection"]
    assert selection["trajectories"] == 1 and set(selection["rms"]) == {"on", "half", "off"}
    log_mean = {mode: sum(math.log(v) for v in errors) for mode, errors in selection["rms"].items()}
    assert log_mean[ems.meta["use_corrector"]] == min(log_mean.values())
    assert selection["nfe"] == [5, 6, 8, 10, 12, 15, 20] and "corrector by NFE: 5 " in stdout
    for i, n in enumerate(selection["nfe"]):
        chosen = ems.meta["corrector_by_steps"][str(n)]
        assert selection["rms"][chosen][i] == min(errors[i] for errors in selection["rms"].values())
    # chosen again on more trajectories, the statistics kept
    code, _, err = run(capsys, *args[:-4], "--validation", "2", "--validate-only", "--out", str(out))
    assert code == 2 and "--validate-only" in err and "--overwrite" in err
    code, stdout, err = run(capsys, *args[:-4], "--validation", "2", "--validate-only", "--overwrite",
                            "--out", str(out))
    assert code == 0 and "statistics kept" in stdout, err
    import torch
    again = EMS.load(out)
    assert torch.equal(again.l, ems.l) and again.meta["corrector_selection"]["trajectories"] == 2
    code, _, err = run(capsys, *args[:-4], "--validation", "2", "--validate-only", "--overwrite",
                       "--out", str(tmp_path / "none.safetensors"))
    assert code == 2 and "there is no" in err
    code, _, err = run(capsys, *args[:-2], "--validation", "-1", "--out", str(tmp_path / "c.safetensors"))
    assert code == 2 and "--validation must be >= 0" in err
    before = out.read_bytes()
    code, _, err = run(capsys, *args)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == before
    code, _, err = run(capsys, *args[:-1], str(tmp_path / "ems.png"))
    assert code == 2 and "safetensors" in err
    code, _, err = run(capsys, *args[:-2], "--points", "5", "--out", str(tmp_path / "b.safetensors"))
    assert code == 2 and "at least 10" in err


@pytest.mark.parametrize("device,message", [("gpu0", "unknown torch device"),
                                            ("cuda", "no CUDA GPU")])
def test_train_default_bad_device(device, message, tmp_path, capsys):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run(capsys, "train-default", "--arch", "dit", "--steps", "2", "--device", device,
                       "--run-dir", str(tmp_path / "run"))
    assert code == 2 and message in err and not (tmp_path / "run").exists()


# ---- the command line's shape: fast help, calibrate's subcommands, device, dtype, memory, files --
def _sdinfer_env() -> dict:
    import sdinfer

    src = str(Path(sdinfer.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}


def test_help_and_a_bad_flag_answer_without_loading_torch():
    import subprocess
    import sys
    import time

    env = _sdinfer_env()
    probe = ("import sys, sdinfer, sdinfer.cli; sdinfer.cli.build_parser(); "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    # measured 0.2 s on a 2-core machine shared with other jobs (torch alone takes 3-8 s there)
    for argv, code in ((["--help"], 0), (["generate", "x", "--no-such-flag"], 2), (["--bogus"], 2)):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sdinfer", *argv], env=env, capture_output=True, text=True)
        assert done.returncode == code and time.perf_counter() - start < 2.0, (argv, done.stderr)
    assert "COMMAND" in subprocess.run([sys.executable, "-m", "sdinfer", "--help"], env=env,
                                       capture_output=True, text=True).stdout


def test_sdinfer_package_is_lazy_and_keeps_its_names():
    import subprocess
    import sys

    probe = ("import sys, sdinfer; assert 'torch' not in sys.modules; import sdinfer.accelerate; "
             "from sdinfer import Denoiser, NoiseSchedule, StepContext, UserError, current_step, sample; "
             "assert callable(sdinfer.accelerate) and callable(sample) and UserError.__module__ == 'sdinfer.errors'; "
             "print('ok')")
    done = subprocess.run([sys.executable, "-c", probe], env=_sdinfer_env(), capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_calibrate_old_spelling_is_an_alias():
    from sdinfer.cli.calibrate import alias_argv

    assert alias_argv(["calibrate", "--method", "gits", "--cfg", "3"]) == ["calibrate", "gits", "--cfg", "3"]
    assert alias_argv(["calibrate", "--model", "dit", "--method=teacache"]) == ["calibrate", "teacache",
                                                                               "--model", "dit"]
    assert alias_argv(["calibrate", "--cfg", "7"]) == ["calibrate", "dpm-solver-v3", "--cfg", "7"]
    assert alias_argv(["calibrate"]) == ["calibrate", "dpm-solver-v3"]
    for kept in (["calibrate", "gits", "--points", "6"], ["calibrate", "--help"], ["generate", "--method", "x"]):
        assert alias_argv(kept) == kept


def test_calibrate_subcommands_have_their_own_options(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    out = capsys.readouterr().out
    for name in ("dpm-solver-v3", "gits", "learned-grid", "teacache", "magcache", "blockcache", "l2c"):
        assert name in out
    with pytest.raises(SystemExit):
        main(["calibrate", "gits", "--help"])
    out = capsys.readouterr().out
    assert "--points" in out and "(default: 60)" in out and "--step-counts" not in out and "--device" in out
    with pytest.raises(SystemExit):
        main(["calibrate", "dpm-solver-v3", "--help"])
    out = capsys.readouterr().out
    assert "(default: 250)" in out and "(default: 64)" in out and "--validate-only" in out
    with pytest.raises(SystemExit) as exit_:       # an option of another procedure is refused
        main(["calibrate", "gits", "--step-counts", "5"])
    assert exit_.value.code == 2
    capsys.readouterr()
    # checked before the model loads, in both spellings
    for argv in (["calibrate", "gits", "--points", "1"], ["calibrate", "--method", "gits", "--points", "1"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "--points must be >= 2" in err


@pytest.mark.parametrize("flags,message", [(["--device", "cuda"], "no CUDA GPU"),
                                           (["--device", "gpu0"], "unknown torch device"),
                                           (["--dtype", "float64"], "unknown dtype 'float64'")])
def test_bad_device_or_dtype_is_one_clear_error(flags, message, tmp_path, capsys):
    import torch

    if flags[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for command in (["generate", "x", "-o", str(tmp_path / "a.png")], ["bench", "--steps", "2"],
                    ["calibrate", "gits", "--out", str(tmp_path / "g.safetensors")]):
        code, _, err = run(capsys, *command, *flags)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sdinfer: error:") and message in err, err
    assert not list(tmp_path.iterdir())


def test_generate_in_bfloat16_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "bf16.png"
    code, _, err = run(capsys, "generate", "a red circle in the top left", "-o", str(out), "--steps", "3",
                       "--dtype", "bfloat16", "--device", "cpu", "--quiet")
    assert code == 0, err
    image = Image.open(out)
    assert image.size == (32, 32) and image.text["dtype"] == "bfloat16"
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10          # an image, not a constant or NaN-black square
    top_left = pixels[:16, :16].mean(axis=(0, 1))
    assert top_left[0] > top_left[1] + 30 and top_left[0] > top_left[2] + 30   # red, where asked


@pytest.mark.parametrize("flags", [["--size", "100000"], ["--size", "4096"], ["--size", "1024", "--batch", "64"]])
def test_a_size_or_batch_beyond_memory_is_refused_before_allocating(flags, tmp_path, capsys, monkeypatch):
    import time

    from sdinfer import memory

    # at most what this machine has, so that the outcome does not depend on the machine's size
    free = min(memory._available_ram() or 2**40, 24 * 2**30)
    monkeypatch.setattr(memory, "_available_ram", lambda: free)
    start = time.perf_counter()
    code, _, err = run(capsys, "generate", "x", "-o", str(tmp_path / "big.png"), "--steps", "1", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "GiB" in lines[0] and "size of" in lines[0], err
    assert time.perf_counter() - start < 60 and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_huge_size_fails_without_a_large_allocation(tmp_path):
    import subprocess
    import sys

    script = ("import resource, sys; from sdinfer.cli import main; "
              f"code = main(['generate', 'x', '-o', {str(tmp_path / 'x.png')!r}, '--size', '100000', '--steps', '1']); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script], env=_sdinfer_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "sdinfer: error: size 100000" in done.stderr, done.stderr
    assert int(done.stdout.split()[-1]) < 1.5 * 2**20     # KiB: the model and libraries, not the image


def test_generation_config_is_checked_once_as_made():
    from sdinfer.errors import UserError
    from sdinfer.generation_config import GenerationConfig

    for bad, message in [({"steps": 0}, "steps must be >= 1"), ({"guidance_scale": -1}, "cfg"),
                         ({"sampler": "warp-drive"}, "unknown sampler"), ({"final": "far"}, "unknown final"),
                         ({"steps": 1, "analytic_first_step": True}, "at least 2 steps"),
                         ({"size": 0}, "size must be"), ({"steps": 2.5}, "whole number")]:
        with pytest.raises(UserError, match=message):
            GenerationConfig(**bad)
    auto = GenerationConfig(steps="auto", sampler="ddim")
    assert auto.with_steps(7).steps == 7 and auto.make_sampler() is not auto.make_sampler()
    with pytest.raises(UserError, match="steps must be >= 1"):
        auto.with_steps(0)


def test_pipeline_takes_a_generation_config():
    from sdinfer.generation_config import GenerationConfig
    from sdinfer.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("unet", device="cpu")
    config = GenerationConfig(steps=2, sampler="ddim", guidance_scale=3.0, seed=4)
    result = pipe("a red circle in the top left", config=config)
    again = pipe("a red circle in the top left", steps=2, sampler="ddim", guidance_scale=3.0, seed=4)
    assert result.params == again.params and result.nfe == 2
    assert (result.pixels == again.pixels).all()


def test_written_pngs_follow_the_umask(tmp_path, capsys):
    out = tmp_path / "u.png"
    old = os.umask(0o022)
    try:
        code, _, err = run(capsys, "generate", "a red circle in the top left", "-o", str(out), "--steps", "2",
                           "--quiet")
        assert code == 0, err
        assert out.stat().st_mode & 0o777 == 0o644
        code, _, err = run(capsys, "generate", "a red circle in the top left", "-o", str(out), "--steps", "2",
                           "--quiet", "--overwrite")
        assert code == 0 and out.stat().st_mode & 0o777 == 0o644, err
        os.umask(0o077)
        code, _, err = run(capsys, "generate", "a red circle in the top left", "-o", str(out), "--steps", "2",
                           "--quiet", "--overwrite")
        assert code == 0 and out.stat().st_mode & 0o777 == 0o600, err
    finally:
        os.umask(old)
    assert not list(tmp_path.glob("*.tmp"))
