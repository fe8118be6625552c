"""Cache calibration files: found beside the model or by path, written as safetensors, and each
way of being absent or wrong is a clear error that says how to make one."""

from __future__ import annotations

import pytest
import torch

from sdinfer.cache.calibration import CALIBRATION_DIR, Calibration, default_path, load_for


class Saved(torch.nn.Linear):
    def __init__(self, folder):
        super().__init__(2, 2)
        self.config = type("Config", (), {"_name_or_path": str(folder)})()


def test_a_calibration_is_found_beside_the_model_and_round_trips(tmp_path):
    model = Saved(tmp_path)
    assert default_path(model, "teacache") == tmp_path / CALIBRATION_DIR / "teacache.safetensors"
    Calibration("teacache", {"coefficients": torch.tensor([1.0, 2.0])}, {"steps": 50}).save(
        default_path(model, "teacache"))
    loaded = load_for(model, "teacache")
    assert torch.equal(loaded.tensors["coefficients"], torch.tensor([1.0, 2.0]))
    assert loaded.meta == {"steps": 50}


def test_missing_or_wrong_calibration_is_a_clear_error(tmp_path):
    model = Saved(tmp_path)
    with pytest.raises(ValueError, match="teacache needs calibration data.*sdinfer calibrate --method teacache"):
        load_for(model, "teacache")
    with pytest.raises(ValueError, match="not loaded from a folder"):
        load_for(torch.nn.Linear(2, 2), "magcache")
    other = Calibration("magcache", {"ratios": torch.ones(3)}).save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="holds calibration for 'magcache', not 'teacache'"):
        load_for(model, "teacache", str(other))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors calibration file"):
        load_for(model, "teacache", str(junk))


def test_calibrate_names_the_methods_it_knows(capsys):
    from test_cli import run

    code, _, err = run(capsys, "calibrate", "--method", "nosuch")
    assert code == 2 and "unknown calibration method 'nosuch'" in err and "dpm-solver-v3" in err
