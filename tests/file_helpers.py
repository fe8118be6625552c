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


def check_generate_on_grid_file(capsys, monkeypatch, tmp_path, spacing: str, kind: str, grid_file,
                                steps: int, hint: str) -> list[str]:
    """``generate --spacing SPACING`` names the calibration (``hint``) while the model has no grid
    file and runs once the model's artifact ``kind`` is ``grid_file``; returns the command."""
    from sdinfer.models import artifacts

    real_find = artifacts.find

    def found_at(path):
        return lambda folder, k, cfg=None: (path if path.is_file() else None) if k == kind else real_find(folder, k, cfg)

    gen = ["generate", "a red circle in the top left", "--model", "unet", "--steps", str(steps), "--quiet",
           "--spacing", spacing]
    monkeypatch.setattr(artifacts, "find", found_at(tmp_path / "missing.safetensors"))
    code, _, err = run(capsys, *gen, "-o", str(tmp_path / "a.png"))
    assert code == 2 and hint in err, err
    monkeypatch.setattr(artifacts, "find", found_at(grid_file))
    code, _, err = run(capsys, *gen, "-o", str(tmp_path / "a.png"))
    assert code == 0 and (tmp_path / "a.png").exists(), err
    return gen
