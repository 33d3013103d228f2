"""Image -> encoder input. Training and serving share this, so a model sees the same pixels in both."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def model_sized(image: Image.Image, size: int) -> Image.Image:
    """An RGB PIL image at the model's input size, resized with bilinear filtering when needed."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image


def image_to_uint8(image: Image.Image, size: int) -> np.ndarray:
    """An RGB PIL image -> (3, size, size) uint8 (`model_sized`)."""
    return np.asarray(model_sized(image, size), dtype=np.uint8).transpose(2, 0, 1).copy()


def normalize(pixels_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> floats in [-1, 1], the ViT's expected range (mean 0.5, std 0.5)."""
    return pixels_uint8.to(dtype) / 127.5 - 1.0


def images_to_tensor(images: list[Image.Image], size: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    batch = torch.from_numpy(np.stack([image_to_uint8(image, size) for image in images]))
    return normalize(batch.to(device), dtype)
