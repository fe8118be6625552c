"""Checks shared by the tests of files kept beside a model (grids, predictors)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from test_cli import run


def check_bad_files_refused(load, tmp_path, missing: str, foreign: str, junk: str,
                            error=ValueError, missing_error=FileNotFoundError) -> None:
    """``load`` refuses a missing file, a safetensors file of another kind and a non-safetensors
    file, each with an error whose message matches ``missing`` / ``foreign`` / ``junk``."""
    with pytest.raises(missing_error, match=missing):
        load(tmp_path / "none.safetensors")
    save_file({"other": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(error, match=foreign):
        load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(error, match=junk):
        load(tmp_path / "junk.safetensors")


def check_generate_on_grid_file(capsys, monkeypatch, tmp_path, spacing: str, path_function: str, grid_file,
                                steps: int, hint: str) -> list[str]:
    """``generate --spacing SPACING`` names the calibration (``hint``) while the model has no grid
    file and runs once ``calibrate.PATH_FUNCTION`` finds ``grid_file``; returns the command."""
    import sdinfer.calibrate as calibrate

    gen = ["generate", "a red circle in the top left", "--model", "unet", "--steps", str(steps), "--quiet",
           "--spacing", spacing]
    monkeypatch.setattr(calibrate, path_function, lambda model_path, cfg: tmp_path / "missing.safetensors")
    code, _, err = run(capsys, *gen, "-o", str(tmp_path / "a.png"))
    assert code == 2 and hint in err, err
    monkeypatch.setattr(calibrate, path_function, lambda model_path, cfg: grid_file)
    code, _, err = run(capsys, *gen, "-o", str(tmp_path / "a.png"))
    assert code == 0 and (tmp_path / "a.png").exists(), err
    return gen
