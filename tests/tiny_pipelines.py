"""Tiny random-weight diffusers pipelines, built and saved offline by the tests."""

from __future__ import annotations

from pathlib import Path

import torch


def _char_vocab() -> dict[str, int]:
    chars = list("abcdefghijklmnopqrstuvwxyz ") + [c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    return vocab


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=16)


def save_tiny_sd(path: Path) -> Path:
    """A StableDiffusionPipeline with tiny random weights, saved with save_pretrained."""
    build_tiny_sd().save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sd():
    """A StableDiffusionPipeline with tiny random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2)
    vocab = _char_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab) + 2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=32, projection_dim=16,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_tiny_pixart(path: Path) -> Path:
    """A PixArtAlphaPipeline with tiny random weights and a tiny T5 encoder, saved."""
    build_tiny_pixart().save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_pixart():
    """A PixArtAlphaPipeline with tiny random weights and a tiny T5 encoder."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        norm_type="ada_norm_single", use_additional_conditions=False)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=pieces, model_max_length=24, extra_ids=0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=16, d_kv=8, d_ff=32,
                                           num_layers=1, num_heads=2)).eval()  # no dropout
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def _tiny_t5(width: int):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=pieces, model_max_length=24, extra_ids=0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=width, d_kv=8, d_ff=32,
                                      num_layers=1, num_heads=2)).eval()
    return encoder, tokenizer


def _tiny_clip(width: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = _char_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    config = CLIPTextConfig(vocab_size=len(vocab) + 2, hidden_size=width, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                            projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval(), tokenizer


def tiny_flow_vae(latent_channels: int):
    """A tiny VAE with a latent shift (as FLUX's and SD3's)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1, sample_size=16,
                         scaling_factor=1.5, shift_factor=0.1)


def build_tiny_flux(guidance_embeds: bool = False):
    """A FluxPipeline with tiny random weights: a CLIP and a T5 encoder, 2x2-packed latents,
    FLUX's resolution-dependent flow shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    clip, clip_tokenizer = _tiny_clip(16)
    t5, t5_tokenizer = _tiny_t5(32)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(scheduler=scheduler, vae=tiny_flow_vae(4), text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)


def save_tiny_flux(path: Path) -> Path:
    build_tiny_flux().save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sd3():
    """A StableDiffusion3Pipeline with tiny random weights: two CLIP encoders and a T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    clip_l, tokenizer_l = _tiny_clip(16, projection=True)
    clip_g, tokenizer_g = _tiny_clip(16, projection=True)
    t5, t5_tokenizer = _tiny_t5(32)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_flow_vae(4), text_encoder=clip_l, tokenizer=tokenizer_l,
                                    text_encoder_2=clip_g, tokenizer_2=tokenizer_g,
                                    text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def save_tiny_sd3(path: Path) -> Path:
    build_tiny_sd3().save_pretrained(path, safe_serialization=True)
    return path
