import pytest
import torch

from sdinfer.models.default.train import TrainConfig, Trainer


def _weights(tr):
    return {k: v.detach().clone() for k, v in tr._params().items()}


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = TrainConfig(arch="dit", steps=4, batch_size=4, checkpoint_every=2, warmup=2)
    straight = Trainer(cfg, tmp_path / "a")
    for _ in range(4):
        straight.train_step()

    first = Trainer(cfg, tmp_path / "b")
    first.train_step(), first.train_step()
    first.save()
    resumed = Trainer(cfg, tmp_path / "b")
    assert resumed.try_resume() and resumed.step == 2
    resumed.train_step(), resumed.train_step()
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    for k in straight.ema:
        torch.testing.assert_close(straight.ema[k], resumed.ema[k], rtol=0, atol=0)


def test_resume_refuses_another_configuration(tmp_path):
    import pytest

    done = Trainer(TrainConfig(arch="dit", steps=4, batch_size=2, warmup=1), tmp_path)
    done.train_step(), done.train_step()
    done.save()
    for other in (TrainConfig(arch="dit", steps=4, batch_size=4, warmup=1),   # other data
                  TrainConfig(arch="dit", steps=8, batch_size=2, warmup=1)):  # other learning rates
        with pytest.raises(SystemExit, match="another configuration"):
            Trainer(other, tmp_path).try_resume()


def test_a_restart_extends_a_finished_run_without_changing_its_past(tmp_path):
    first = TrainConfig(arch="dit", steps=3, batch_size=2, warmup=1)
    extended = TrainConfig(arch="dit", steps=6, batch_size=2, warmup=1, restarts=(3,))
    assert [first.learning_rate(s) for s in range(3)] == [extended.learning_rate(s) for s in range(3)]
    assert extended.learning_rate(3) == first.lr  # the new cycle starts at the peak again
    straight = Trainer(extended, tmp_path / "a")
    for _ in range(6):
        straight.train_step()
    short = Trainer(first, tmp_path / "b")
    for _ in range(3):
        short.train_step()
    short.save()
    longer = Trainer(extended, tmp_path / "b")
    assert longer.try_resume() and longer.step == 3
    for _ in range(3):
        longer.train_step()
    a, b = _weights(straight), _weights(longer)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_restarts_must_lie_inside_the_run():
    import pytest

    with pytest.raises(ValueError, match="restarts"):
        TrainConfig(steps=10, restarts=(10,))
    with pytest.raises(ValueError, match="restarts"):
        TrainConfig(steps=10, restarts=(5, 3))


def test_train_default_command_exports_a_loadable_model(tmp_path, capsys):
    from sdinfer.cli import main
    from sdinfer.pipeline import Pipeline

    out = tmp_path / "model"
    code = main(["train-default", "--arch", "dit", "--steps", "2", "--batch-size", "2",
                 "--run-dir", str(tmp_path / "run"), "--export-to", str(out)])
    assert code == 0 and "wrote the model" in capsys.readouterr().out
    result = Pipeline.from_pretrained(out)(["a red circle in the top left"], steps=2)
    assert result.pixels.shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_data_workers_render_the_same_batches(tmp_path):
    cfg = TrainConfig(arch="dit", steps=6, batch_size=3)
    alone = Trainer(cfg, tmp_path / "a")
    helped = Trainer(cfg, tmp_path / "b", data_workers=2)
    try:
        for step in (0, 1, 5, 2):
            (x, c), (y, d) = alone.batch(step), helped.batch(step)
            assert c == d
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert not torch.equal(alone.batch(0)[0], alone.batch(1)[0])
    finally:
        helped.close()


@pytest.mark.slow
def test_fine_tuning_at_another_resolution_starts_from_the_given_model(tmp_path):
    """``--init-from dit --resolution 64``: every parameter (and the text encoder) starts as the
    shipped model's; the positional table is the 64x64 one; the batches are 64x64."""
    from safetensors.torch import load_file

    from sdinfer.models.loading import DEFAULT_MODELS

    cfg = TrainConfig(arch="dit", steps=2, batch_size=2, resolution=64, init_from="dit")
    trainer = Trainer(cfg, tmp_path)
    shipped = load_file(str(DEFAULT_MODELS["dit"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param, shipped[name].float(), rtol=0, atol=0)
        torch.testing.assert_close(trainer.ema[f"model.{name}"], shipped[name].float(), rtol=0, atol=0)
    table = trainer.model.pos_embed.pos_embed[0].view(32, 32, -1)
    # interpolated: every other row and column is the 32x32 model's table
    torch.testing.assert_close(table[::2, ::2].reshape(256, -1), shipped["pos_embed.pos_embed"][0].float(),
                               rtol=0, atol=1e-3)
    assert trainer.batch(0)[0].shape == (2, 3, 64, 64)


def test_fine_tuning_refuses_a_model_of_another_architecture_and_a_bad_resolution(tmp_path):
    import pytest

    from sdinfer.errors import UserError

    with pytest.raises(UserError, match="transformer.*is missing.*same architecture"):
        Trainer(TrainConfig(arch="dit", steps=2, init_from="unet"), tmp_path)
    with pytest.raises(ValueError, match="multiple of 4"):
        TrainConfig(resolution=30)


def test_train_default_resolution_option_is_checked(tmp_path, capsys):
    from sdinfer.cli import main

    assert main(["train-default", "--arch", "unet", "--resolution", "30", "--run-dir", str(tmp_path)]) == 2
    assert "--resolution as a multiple of 4" in capsys.readouterr().err
