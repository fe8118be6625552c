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
