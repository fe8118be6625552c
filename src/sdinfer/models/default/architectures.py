"""Configurations of the two default models and of their text encoder.

Configs are plain data: each function returns the diffusers / transformers
model built from a dict that is also written into the saved model folder.

Both denoisers are given two coordinate channels (x and y in [-1, 1]) next to
their three image channels ("CoordConv", Liu et al. 2018): an SD-style UNet has
no positional encoding, and the DiT's sine-cosine table alone left its x0
prediction at high noise without any spatial structure after 1,000 steps; with
the coordinates both learn to place a shape where the caption says.  The
pipeline appends the channels; the model's own config records them
(``in_channels = out_channels + 2``).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from . import shapes

TEXT_DIM = 64
MAX_TOKENS = 16
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
COORD_CHANNELS = 2

UNET_CONFIG = dict(
    sample_size=shapes.RESOLUTION,
    in_channels=3 + COORD_CHANNELS,
    out_channels=3,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    # Cross-attention only at 16x16: self-attention there costs a third of a step on a CPU.
    only_cross_attention=(False, True, False),
    norm_num_groups=8,
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=4,  # diffusers' UNet reads this as the number of heads
    # the attention-pooled text joins the timestep embedding: a first-order path from the
    # caption to every ResNet block, where cross-attention alone learned no positions
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
)

# Patch 2 (256 tokens at 32x32), as DiT's own /2 models on their 32x32 latents: with patch 4
# the 8x8 tokens drew shapes as scattered blocks after 2,500 steps.
DIT_PATCH = 2
DIT_CONFIG = dict(
    sample_size=shapes.RESOLUTION,
    patch_size=DIT_PATCH,
    in_channels=3 + COORD_CHANNELS,
    out_channels=3,
    num_layers=4,
    num_attention_heads=4,
    attention_head_dim=24,
    joint_attention_dim=TEXT_DIM,
    caption_projection_dim=96,
    pooled_projection_dim=TEXT_DIM,
    pos_embed_max_size=shapes.RESOLUTION // DIT_PATCH,
)

# Training settings that differ per architecture (the rest: TrainConfig's defaults).
TRAIN_OVERRIDES = {
    # the UNet's first 2,000 steps are one cosine cycle, then the schedule restarts
    "unet": dict(steps=8500, batch_size=32, min_snr_gamma=None, restarts=(2000,)),
    # the DiT trained on a GPU: 4,100 steps of batch 128, then a restart to 8,100; the shipped
    # DiT is that model fine-tuned at batch 1,024 (--init-from, BENCHMARKS.md "Default models")
    "dit": dict(steps=8100, batch_size=128, min_snr_gamma=None, restarts=(4100,)),
}

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="v_prediction",
    clip_sample=False,
)


def text_encoder_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(shapes.VOCABULARY),
        hidden_size=TEXT_DIM,
        intermediate_size=TEXT_DIM * 2,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the captions' vocabulary."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(shapes.VOCABULARY))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>", model_max_length=MAX_TOKENS, do_lower_case=True)


def build_text_encoder(seed: int) -> CLIPTextModel:
    """A small CLIP text encoder with unit-variance token embeddings.

    CLIP's own initialisation (std 0.02) makes every caption's states nearly the
    same (cosine 0.97 between "top left" and "bottom right"); trained jointly from
    there, the encoder separated colours but after 1,800 steps still gave position
    and kind words cosine 0.99, and neither model learned where to draw.  With
    token embeddings of std 1 the words are distinct from the first step, and with
    the special tokens at zero so is the pooled state."""
    torch.manual_seed(seed)
    model = CLIPTextModel(text_encoder_config())
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        torch.nn.init.normal_(embeddings, std=1.0)
        # special tokens start at zero, so the pooled (end-of-text) state is what attention
        # gathers from the words rather than the <eos> embedding itself
        embeddings[: len(SPECIAL_TOKENS)] = 0.0
    return model


def build_denoiser(arch: str, seed: int, resolution: int = shapes.RESOLUTION) -> torch.nn.Module:
    """A default architecture, freshly initialised, for ``resolution`` x ``resolution`` images.

    The DiT's sin-cos positional table then has resolution / DIT_PATCH rows and columns, spaced
    so that they span the positions of the 32x32 model's (PixArt's ``interpolation_scale``):
    a model fine-tuned from the 32x32 one at another resolution finds each place in the image
    at the position it learned for it.  The table is a saved buffer, so it loads with the
    weights."""
    torch.manual_seed(seed)
    if arch == "unet":
        return UNet2DConditionModel(**{**UNET_CONFIG, "sample_size": resolution})
    if arch == "dit":
        grid = resolution // DIT_PATCH
        model = SD3Transformer2DModel(**{**DIT_CONFIG, "sample_size": resolution, "pos_embed_max_size": grid})
        table = get_2d_sincos_pos_embed(model.inner_dim, grid, base_size=shapes.RESOLUTION // DIT_PATCH,
                                        output_type="pt")
        model.pos_embed.pos_embed.copy_(table.float().unsqueeze(0))
        return dit_init(model)
    raise ValueError(f"unknown default architecture {arch!r}; choose 'unet' or 'dit'")


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def dit_init(model: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """DiT's initialisation (Peebles & Xie 2023, sec. 3.2 "adaLN-Zero"): Xavier-uniform
    linear layers, N(0, 0.02) timestep MLP, and zero adaLN modulations and output
    projection, so that every block starts as the identity.  diffusers builds the
    class with PyTorch's default initialisation instead."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
        proj = model.pos_embed.proj
        torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        proj.bias.zero_()
        for linear in (model.time_text_embed.timestep_embedder.linear_1,
                       model.time_text_embed.timestep_embedder.linear_2):
            torch.nn.init.normal_(linear.weight, std=0.02)
        zeroed = [model.norm_out.linear, model.proj_out]
        for block in model.transformer_blocks:
            zeroed += [block.norm1.linear, block.norm1_context.linear]
        for linear in zeroed:
            linear.weight.zero_()
            linear.bias.zero_()
    return model
