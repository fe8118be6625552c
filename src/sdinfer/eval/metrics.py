"""Image-quality metrics against a reference: PSNR and SSIM (Wang et al. 2004).

Images are float tensors in [0, 1] of shape (B, C, H, W).  PSNR of identical
images is infinite; it is reported capped at ``PSNR_CAP_DB`` so that JSON stays
standard and means stay finite.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

PSNR_CAP_DB = 100.0


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of each image's PSNR in dB (data range 1), capped at PSNR_CAP_DB."""
    _check(images, reference)
    mse = (images.double() - reference.double()).square().flatten(1).mean(1)
    values = [PSNR_CAP_DB if m == 0 else min(PSNR_CAP_DB, -10 * math.log10(float(m))) for m in mse]
    return float(sum(values) / len(values))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, data range 1)."""
    _check(images, reference)
    size = min(11, images.shape[-1], images.shape[-2])
    size -= 1 - size % 2  # odd window
    return float(structural_similarity_index_measure(
        images.float(), reference.float(), data_range=1.0, kernel_size=size))


def _check(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} "
                         "differ in shape; compare runs of the same size and prompt set")
