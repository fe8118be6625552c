"""Pipeline's per-step callback: called once per step, in order, with the latents of that step."""

import torch

from sdinfer.pipeline import Pipeline


def test_callback_sees_every_step_and_the_final_latents():
    pipe = Pipeline.from_pretrained("unet")
    seen = []
    out = pipe("a red circle on the left", steps=4, seed=3, callback=lambda i, x: seen.append((i, x.clone())))
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    plain = pipe("a red circle on the left", steps=4, seed=3)
    assert torch.equal(out.pixels, plain.pixels)
    assert torch.allclose(pipe.decode(seen[-1][1]), plain.pixels)
