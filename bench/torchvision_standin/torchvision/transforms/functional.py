"""torchvision.transforms.functional for PIL images: the functions the stand-in's transforms need."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from enum import Enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(Enum):
    """torchvision's interpolation names and values."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def _pil_filter(interpolation) -> int:
    if interpolation is None:
        return Image.Resampling.BILINEAR
    if isinstance(interpolation, InterpolationMode):
        return _PIL_FILTERS[interpolation]
    return int(interpolation)  # a PIL constant, as old torchvision accepted


def resize(img: Image.Image, size, interpolation=InterpolationMode.BILINEAR, max_size: int | None = None,
           antialias: bool | None = True) -> Image.Image:
    """An int (or 1-sequence) is the short side's new length, aspect kept; a pair is (height, width)."""
    width, height = img.size
    if isinstance(size, numbers.Number) or (isinstance(size, Sequence) and len(size) == 1):
        side = int(size if isinstance(size, numbers.Number) else size[0])
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = side, int(side * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_h, new_w = int(size[0]), int(size[1])
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), _pil_filter(interpolation))


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    return img.crop((left, top, left + width, top + height))


def center_crop(img: Image.Image, output_size) -> Image.Image:
    if isinstance(output_size, numbers.Number):
        output_size = (int(output_size), int(output_size))
    elif len(output_size) == 1:
        output_size = (output_size[0], output_size[0])
    th, tw = output_size
    width, height = img.size
    if tw > width or th > height:
        img = pad_to(img, max(width, tw), max(height, th), 0)
        width, height = img.size
    top = int(round((height - th) / 2.0))
    left = int(round((width - tw) / 2.0))
    return crop(img, top, left, th, tw)


def pad_to(img: Image.Image, width: int, height: int, fill=0) -> Image.Image:
    """Pad evenly (constant fill) to at least width x height, as center_crop and pad_if_needed do."""
    canvas = Image.new(img.mode, (width, height), fill)
    canvas.paste(img, ((width - img.size[0]) // 2, (height - img.size[1]) // 2))
    return canvas


def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_tensor(pic: Image.Image) -> torch.Tensor:
    if isinstance(pic, np.ndarray):
        array = pic if pic.ndim == 3 else pic[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor
    if pic.mode == "I;16":
        pic = pic.convert("I")
    array = np.array(pic, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(array.transpose(2, 0, 1).copy())
    return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor.float()


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> torch.Tensor:
    if not inplace:
        tensor = tensor.clone()
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)
