"""torchvision.transforms, as far as diffusers' DreamBooth scripts use it: PIL in, tensor out."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from . import functional
from .functional import InterpolationMode

__all__ = [
    "CenterCrop", "Compose", "InterpolationMode", "Normalize", "RandomCrop", "RandomHorizontalFlip", "Resize",
    "ToTensor", "functional",
]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a 1- or 2-sequence, as torchvision reads crop sizes."""
    if isinstance(size, numbers.Number):
        return int(size), int(size)
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img):
        for transform in self.transforms:
            img = transform(img)
        return img


class Resize:
    """An int resizes the short side to it (aspect kept); a pair is (height, width)."""

    def __init__(self, size, interpolation: InterpolationMode | int = InterpolationMode.BILINEAR,
                 max_size: int | None = None, antialias: bool | None = True):
        self.size, self.interpolation, self.max_size = size, interpolation, max_size

    def __call__(self, img: Image.Image) -> Image.Image:
        return functional.resize(img, self.size, self.interpolation, self.max_size)


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        return functional.center_crop(img, self.size)


class RandomCrop:
    """A crop at a uniformly random offset, drawn with torch.randint as torchvision draws it."""

    def __init__(self, size, padding=None, pad_if_needed: bool = False, fill=0, padding_mode: str = "constant"):
        if padding is not None:
            raise NotImplementedError("the torchvision stand-in does not pad")
        self.size, self.pad_if_needed, self.fill = _pair(size), pad_if_needed, fill

    @staticmethod
    def get_params(img: Image.Image, output_size: tuple[int, int]) -> tuple[int, int, int, int]:
        width, height = img.size
        th, tw = output_size
        if height < th or width < tw:
            raise ValueError(f"Required crop size {(th, tw)} is larger than input image size {(height, width)}")
        if width == tw and height == th:
            return 0, 0, height, width
        top = torch.randint(0, height - th + 1, size=(1,)).item()
        left = torch.randint(0, width - tw + 1, size=(1,)).item()
        return top, left, th, tw

    def __call__(self, img: Image.Image) -> Image.Image:
        th, tw = self.size
        width, height = img.size
        if self.pad_if_needed and (width < tw or height < th):
            img = functional.pad_to(img, max(width, tw), max(height, th), self.fill)
        return functional.crop(img, *self.get_params(img, self.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return functional.hflip(img) if torch.rand(1) < self.p else img


class ToTensor:
    """PIL image (H x W x C, 0..255) to a float tensor C x H x W in [0, 1]."""

    def __call__(self, pic: Image.Image) -> torch.Tensor:
        return functional.to_tensor(pic)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False):
        self.mean, self.std, self.inplace = mean, std, inplace

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return functional.normalize(tensor, self.mean, self.std, self.inplace)

