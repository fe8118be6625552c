"""Prompts to text conditioning for pipelines with several text encoders (FLUX, SD3).

A pipeline with one text encoder takes its token states and pooled output
(``Pipeline.encode``).  FLUX (Black Forest Labs 2024) takes the token states of
its T5 encoder and the pooled output of its CLIP encoder; SD3 (Esser et al.
2024, Sec. 5.1) concatenates the penultimate token states of its two CLIP
encoders along the width, pads them to the T5 width and puts them before the
T5 tokens, and concatenates the two CLIP pooled outputs.  Which recipe a
pipeline takes is declared by its class in ``ENCODINGS``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError
from .calling import TextConditioning

# diffusers' defaults for the T5 token count
FLUX_T5_TOKENS = 512
SD3_T5_TOKENS = 256


def _ids(tokenizer, encoder, texts: list[str], cap: int | None = None) -> torch.Tensor:
    limit = int(getattr(encoder.config, "max_position_embeddings", 0) or 10**6) if encoder is not None else 10**6
    max_len = min(int(tokenizer.model_max_length), limit, cap or 10**6)
    texts = [t.lower() for t in texts] if getattr(tokenizer, "do_lower_case", False) else texts
    ids = tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
    if encoder is not None:
        ids = ids.to(next(encoder.parameters()).device)
    return ids


def _pooled(out) -> torch.Tensor:
    """A CLIP encoder's pooled output: the projected one where the encoder has a projection."""
    pooled = getattr(out, "text_embeds", None)
    return pooled if pooled is not None else out.pooler_output


def encode_flux(model, prompts: list[str]) -> TextConditioning:
    clip = model.text_encoder(_ids(model.tokenizer, model.text_encoder, prompts))
    t5 = model.text_encoder_2(_ids(model.tokenizer_2, model.text_encoder_2, prompts, FLUX_T5_TOKENS))
    return TextConditioning(t5[0], _pooled(clip))


def encode_sd3(model, prompts: list[str]) -> TextConditioning:
    states, pooled = [], []
    for encoder, tokenizer in ((model.text_encoder, model.tokenizer), (model.text_encoder_2, model.tokenizer_2)):
        out = encoder(_ids(tokenizer, encoder, prompts), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(_pooled(out))
    clip = torch.cat(states, dim=-1)
    width = int(model.denoiser.config.joint_attention_dim)
    if model.text_encoder_3 is not None:
        t5 = model.text_encoder_3(_ids(model.tokenizer_3, model.text_encoder_3, prompts, SD3_T5_TOKENS))[0]
    else:   # SD3 without its T5: zeros in its place, as diffusers
        t5 = clip.new_zeros(clip.shape[0], SD3_T5_TOKENS, width)
    if clip.shape[-1] > t5.shape[-1]:
        raise UserError(f"the CLIP encoders' states ({clip.shape[-1]} wide) are wider than the T5 encoder's "
                        f"({t5.shape[-1]}); the pipeline's text encoders do not fit together: re-save it")
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return TextConditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))


ENCODINGS: dict[str, Callable] = {
    "FluxPipeline": encode_flux,
    "StableDiffusion3Pipeline": encode_sd3,
}


@torch.no_grad()
def encode_prompts(model, prompts: list[str]) -> TextConditioning:
    """The conditioning of ``prompts`` for a ``LoadedModel`` with more than one text encoder."""
    recipe = ENCODINGS.get(model.pipeline_class)
    if recipe is None:
        raise UserError(f"pipeline {model.path} ({model.pipeline_class or 'no class named'}) has several text "
                        f"encoders and sdinfer knows how to combine them for {', '.join(ENCODINGS)} only; "
                        "declare its recipe in sdinfer.models.text_encoding.ENCODINGS")
    return recipe(model, prompts)
