"""The files kept beside a model (models/artifacts.py): one layout named by (model, kind, guidance
scale), one safetensors reader and writer with clear errors, and folders of the old layout still
found, on copies of a shipped model folder."""

from __future__ import annotations

import shutil

import pytest
import torch

from sdinfer.errors import UserError
from sdinfer.models import artifacts
from sdinfer.models.loading import DEFAULT_MODELS

# where each shipped artifact of the unet lived before models/artifacts.py
OLD_LAYOUT = {("dpm-solver-v3", 4.0): "dpm_solver_v3/cfg4.safetensors", ("gits", 4.0): "gits/cfg4.safetensors",
              ("stepsaver", None): "stepsaver.safetensors",
              ("teacache", None): "unet/sdinfer_calibration/teacache.safetensors"}


def test_paths_are_named_by_model_kind_and_guidance_scale(tmp_path):
    assert artifacts.path(tmp_path, "gits", 4.0) == tmp_path / "sdinfer_calibration" / "gits-cfg4.safetensors"
    assert artifacts.path(tmp_path, "dpm-solver-v3", 7.5).name == "dpm-solver-v3-cfg7.5.safetensors"
    assert artifacts.path(tmp_path, "teacache") == tmp_path / "sdinfer_calibration" / "teacache.safetensors"
    with pytest.raises(ValueError, match="'gits' needs a guidance scale"):
        artifacts.path(tmp_path, "gits")
    with pytest.raises(ValueError, match="'stepsaver' is not kept per guidance scale"):
        artifacts.path(tmp_path, "stepsaver", 4.0)
    assert artifacts.find(tmp_path, "gits", 4.0) is None and artifacts.find(None, "teacache") is None


def test_the_shipped_models_keep_every_artifact_in_the_current_layout():
    for name in ("unet", "dit"):
        folder = DEFAULT_MODELS[name]
        for kind, scale in [*OLD_LAYOUT, ("magcache", None), ("blockcache", None), ("l2c", None)]:
            assert artifacts.find(folder, kind, scale) == artifacts.path(folder, kind, scale), (name, kind)
            assert not artifacts.old_paths(folder, kind, scale)


def test_write_then_read_round_trips_tensors_and_json_metadata(tmp_path):
    file = tmp_path / "deep" / "a.safetensors"
    x = torch.arange(6.0).reshape(2, 3).t()           # not contiguous
    artifacts.write(file, {"x": x}, {"kind": "test", "meta": {"steps": [5, 6]}})
    tensors, meta = artifacts.read(file, "test", "make it", json_keys=("meta", "absent"))
    assert torch.equal(tensors["x"], x) and meta == {"kind": "test", "meta": {"steps": [5, 6]}}
    assert sorted(p.name for p in file.parent.iterdir()) == ["a.safetensors"]   # no partial file left


def test_missing_truncated_and_foreign_files_are_one_clear_error(tmp_path):
    with pytest.raises(artifacts.MissingArtifact, match=r"no gits grid at .*none.safetensors .the file does not "
                                                       r"exist.; make it with `sdinfer calibrate --method gits`"):
        artifacts.read(tmp_path / "none.safetensors", "gits grid", "sdinfer calibrate --method gits")
    assert issubclass(artifacts.MissingArtifact, FileNotFoundError) and issubclass(artifacts.MissingArtifact, UserError)
    good = artifacts.write(tmp_path / "good.safetensors", {"x": torch.ones(1000)}, {"meta": {"a": 1}})
    data = good.read_bytes()
    cases = {"truncated": data[:len(data) // 2], "header cut": data[:20], "pickle": b"\x80\x04not safetensors",
             "empty": b""}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(UserError, match=r"is not a readable safetensors gits grid file .*; make it again with "
                                            r"`sdinfer calibrate --method gits`"):
            artifacts.read(bad, "gits grid", "sdinfer calibrate --method gits")
    bad_json = artifacts.write(tmp_path / "json.safetensors", {"x": torch.ones(1)}, {"meta": "{not json"})
    with pytest.raises(UserError, match="not a readable safetensors"):
        artifacts.read(bad_json, "gits grid", "sdinfer calibrate --method gits", json_keys=("meta",))


def _old_layout_copy(tmp_path):
    """A copy of the shipped unet folder with its artifacts where the old layout kept them."""
    folder = tmp_path / "unet-old"
    shutil.copytree(DEFAULT_MODELS["unet"], folder)
    for (kind, scale), old in OLD_LAYOUT.items():
        (folder / old).parent.mkdir(parents=True, exist_ok=True)
        artifacts.path(folder, kind, scale).rename(folder / old)
    shutil.rmtree(folder / artifacts.ARTIFACT_DIR)   # the other caches' calibrations go too
    return folder


def test_a_model_folder_of_the_old_layout_still_loads(tmp_path):
    from sdinfer.cache.calibration import load_for
    from sdinfer.pipeline import Pipeline
    from sdinfer.stepsaver import predictor_for

    folder = _old_layout_copy(tmp_path)
    for (kind, scale), old in OLD_LAYOUT.items():
        assert artifacts.find(folder, kind, scale) == folder / old
    pipe = Pipeline.from_pretrained(folder)
    shipped = Pipeline.from_pretrained("unet")
    for spec in (dict(sampler="dpm-solver-v3", steps=3), dict(sampler="ddim", steps=3, spacing="gits")):
        old = pipe(["a red circle"], seed=1, **spec).pixels
        assert torch.equal(old, shipped(["a red circle"], seed=1, **spec).pixels), spec
    assert predictor_for(pipe).levels == predictor_for(shipped).levels
    assert torch.equal(load_for(pipe.model.denoiser, "teacache").tensors["coefficients"],
                       load_for(shipped.model.denoiser, "teacache").tensors["coefficients"])
    with pytest.raises(ValueError, match=r"magcache needs calibration data, and there is none at "
                                         r".*unet-old/sdinfer_calibration/magcache.safetensors"):
        load_for(pipe.model.denoiser, "magcache")


def test_calibrating_an_old_layout_folder_moves_the_file_to_the_current_one(tmp_path):
    folder = _old_layout_copy(tmp_path)
    old = folder / OLD_LAYOUT["gits", 4.0]
    content = old.read_bytes()
    out = artifacts.writable_path(folder, "gits", 4.0)
    assert out == artifacts.path(folder, "gits", 4.0) and out.read_bytes() == content and not old.exists()
    assert artifacts.find(folder, "gits", 4.0) == out
    fresh = artifacts.writable_path(folder, "learned-grid", 4.0)
    assert fresh == artifacts.path(folder, "learned-grid", 4.0) and not fresh.exists()


def test_calibrate_on_an_old_layout_folder_replaces_the_old_file_only_with_overwrite(tmp_path, capsys):
    from test_cli import run

    folder = _old_layout_copy(tmp_path)
    old = folder / OLD_LAYOUT["gits", 4.0]
    content = old.read_bytes()
    code, _, err = run(capsys, "calibrate", "--method", "gits", "--model", str(folder), "--samples", "1",
                       "--points", "4")
    current = artifacts.path(folder, "gits", 4.0)
    assert code == 2 and f"{current} exists; pass --overwrite" in err, err
    assert current.read_bytes() == content and not old.exists()


def test_a_stock_pipeline_component_names_its_pipeline_folder(tiny_sd, tmp_path):
    from pathlib import Path

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    assert artifacts.model_folder(pipe.unet) == Path(tiny_sd)
    pipe.unet.save_pretrained(tmp_path / "alone")
    alone = UNet2DConditionModel.from_pretrained(tmp_path / "alone")
    assert artifacts.model_folder(alone) == tmp_path / "alone"
    assert artifacts.model_folder(torch.nn.Linear(2, 2)) is None
