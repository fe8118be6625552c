"""Shared by the cache tests: a call counter for the blocks a cache should skip, and tiny
random models of each transformer class with an adapter (built here, nothing downloaded)."""

from __future__ import annotations

import torch


class CallCounter:
    """Counts the forward calls of a module (a leaf inside a block: it runs only if the block does)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(lambda *_: self._hit())

    def _hit(self) -> None:
        self.calls += 1


def tiny_transformers():
    """(model, call(t), a leaf inside a later block) for SD3, FLUX and DiT transformers."""
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                                  num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                norm_num_groups=2).eval()   # no label dropout

    def call_sd3(t):
        return sd3(torch.ones(1, 4, 8, 8), encoder_hidden_states=torch.ones(1, 3, 16),
                   pooled_projections=torch.ones(1, 8), timestep=t, return_dict=False)[0]

    def call_flux(t):
        return flux(torch.ones(1, 16, 16), encoder_hidden_states=torch.ones(1, 3, 16),
                    pooled_projections=torch.ones(1, 8), timestep=t / 1000, img_ids=torch.zeros(16, 3),
                    txt_ids=torch.zeros(3, 3), return_dict=False)[0]

    def call_dit(t):
        return dit(torch.ones(1, 4, 8, 8), timestep=t, class_labels=torch.tensor([1]), return_dict=False)[0]

    return [(sd3, call_sd3, sd3.transformer_blocks[1].attn.to_q),
            (flux, call_flux, flux.single_transformer_blocks[0].attn.to_q),
            (dit, call_dit, dit.transformer_blocks[1].ff.net[0])]


def assert_exact(generate, pipe, spec: str, steps: int = 6) -> None:
    """``spec`` (a setting that refreshes every step) gives the uncached images exactly;
    ``generate(pipe, steps=N)`` makes the images."""
    import sdinfer

    base = generate(pipe, steps=steps)
    handle = sdinfer.accelerate(pipe, spec)
    try:
        assert torch.equal(generate(pipe, steps=steps), base), spec
    finally:
        handle.remove()


def assert_new_generation_starts_clean(generate, pipe, spec: str) -> None:
    """A 5-step generation right after a 7-step one equals a 5-step one under a fresh install."""
    import sdinfer

    handle = sdinfer.accelerate(pipe, spec)
    try:
        generate(pipe, steps=7)
        second = generate(pipe, steps=5)
        handle.remove()
        handle = sdinfer.accelerate(pipe, spec)
        fresh = generate(pipe, steps=5)
    finally:
        handle.remove()
    assert torch.equal(second, fresh), spec
