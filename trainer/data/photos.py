"""Training images: find them, check every one before training, load them as RGB, turn them into tensors."""

from __future__ import annotations

import hashlib
import random
import warnings
from collections import Counter, OrderedDict
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.config import UserError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_SIDE = 64  # below this an image carries too little of the subject to be worth upscaling
# DreamBooth's paper and every tool after it teach a subject from 3-5 photos, rarely more than 20: the
# app takes that many; the engine trains on whatever it is given and says what that means.
MIN_PHOTOS, MAX_PHOTOS = 3, 20
SIXTEEN_BIT_MODES: tuple[str, ...] = ("I;16", "I;16L", "I;16B", "I;16N", "I")




class ImageProblem(NamedTuple):
    path: Path
    reason: str


class ImageDataError(UserError, ValueError):
    """Images the run cannot use; `problems` holds every one and str() lists them one per line."""

    def __init__(self, problems: Sequence[ImageProblem], field: str | None = None) -> None:
        self.problems = list(problems)
        self.field = field
        super().__init__("\n".join(_describe(self.problems, field)))


def _describe(problems: list[ImageProblem], field: str | None) -> list[str]:
    if field is not None:  # a source path is wrong: its reason already names the full path
        return [f"`{field}`: {p.reason}" for p in problems]
    # The file name is what the user recognises; the full path only where two names collide.
    names = Counter(p.path.name for p in problems)
    return [f"{p.path.name if names[p.path.name] == 1 else p.path}: {p.reason}" for p in problems]


def collect_image_paths(sources: Sequence[str | Path], field: str = "instance_data") -> list[Path]:
    """Expand folders (non-recursive, sorted) and keep files named explicitly, whatever their suffix."""
    paths: list[Path] = []
    problems: list[ImageProblem] = []
    for source in sources:
        if str(source).strip() == "":  # Path("") is the working directory: never what was meant
            problems.append(ImageProblem(Path(), "an empty path was given"))
            continue
        path = Path(source).expanduser()
        try:
            if path.is_dir():
                found = sorted(
                    (p for p in path.iterdir() if _is_image_name(p.name) and p.is_file()),
                    key=lambda p: (p.name.casefold(), p.name),
                )
                if not found:
                    problems.append(
                        ImageProblem(path, f"folder {path} has no images ({', '.join(IMAGE_SUFFIXES)})")
                    )
                paths.extend(found)
            elif path.exists():
                paths.append(path)  # named explicitly: check_images reports it if it is no image
            else:
                problems.append(ImageProblem(path, f"{path} does not exist"))
        except OSError as err:  # a folder that cannot be listed, a path the system refuses
            problems.append(ImageProblem(path, f"{path} cannot be read ({err.strerror or err})"))
    if problems:
        raise ImageDataError(problems, field)
    unique: dict[Path, Path] = {}  # a file given both alone and inside its folder trains once
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _is_image_name(name: str) -> bool:
    # Hidden files include macOS "._photo.jpg" resource forks, which look like images but are not.
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def check_images(paths: Sequence[Path], resolution: int) -> list[str]:
    """Decode every image; raise one ImageDataError listing all problems, else return warnings."""
    problems: list[ImageProblem] = []
    notes: list[str] = []
    first_with_hash: dict[str, Path] = {}
    for path in paths:
        try:
            data = path.read_bytes()
        except PermissionError:
            problems.append(ImageProblem(path, "cannot be read (permission denied)"))
            continue
        except OSError as err:
            problems.append(ImageProblem(path, f"cannot be read ({err.strerror or err})"))
            continue
        if not data:
            problems.append(ImageProblem(path, "empty file (0 bytes)"))
            continue
        try:
            image = _decode_rgb(BytesIO(data), still_only=True)
        except _ImageRejected as err:
            problems.append(ImageProblem(path, str(err)))
            continue
        width, height = image.size
        if min(width, height) < MIN_SIDE:
            problems.append(
                ImageProblem(path, f"is {width}x{height} px; at least {MIN_SIDE} px on each side is needed")
            )
            continue
        if min(width, height) < resolution:
            notes.append(
                f"{path.name} is {width}x{height} px, smaller than the training resolution {resolution}: "
                "it will be upscaled"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest in first_with_hash:
            notes.append(
                f"{path.name} has the same content as {first_with_hash[digest].name}: "
                "it will weigh twice in training"
            )
        first_with_hash.setdefault(digest, path)
    if problems:
        raise ImageDataError(problems)
    return notes


def photo_count_note(n_photos: int, steps: int, rows_per_step: int) -> str | None:
    """What the engine does with fewer or more photos than a DreamBooth run is made for, or None."""
    if MIN_PHOTOS <= n_photos <= MAX_PHOTOS:
        return None
    seen = steps * rows_per_step / n_photos
    if n_photos < MIN_PHOTOS:
        return (f"{n_photos} photo{'s' if n_photos > 1 else ''} of the subject: DreamBooth learns one from "
                f"{MIN_PHOTOS}-{MAX_PHOTOS} (the app takes no fewer). Training on {'both' if n_photos == 2 else 'it'} "
                f"anyway, each seen about {seen:.0f} times: expect the model to copy the pose and background; "
                "more photos in other places and poses help more than more steps.")
    return (f"{n_photos} photos of the subject: DreamBooth is made for {MIN_PHOTOS}-{MAX_PHOTOS} (the app takes no "
            f"more). Training on all {n_photos}, each seen about {seen:.1f} times in {steps} steps: if the subject "
            "comes out weak, raise max_train_steps (about 100-200 per photo is usual).")


class _ImageRejected(Exception):
    """Internal: the reason a file cannot be decoded, phrased for the user."""


def _decode_rgb(source: Path | BytesIO, still_only: bool) -> Image.Image:
    """Fully decode under the decompression-bomb limit, turn upright, convert to RGB."""
    # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; a warning lost in a log is no check,
    # so it becomes an error here, locally, without touching the global limit.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as opened:
                frames = getattr(opened, "n_frames", 1)
                if still_only and frames > 1:
                    raise _ImageRejected(f"is animated ({frames} frames); use a still image")
                opened.load()  # decodes all pixel data: a truncated file fails here, not mid-training
                upright = ImageOps.exif_transpose(opened)  # a copy, so it outlives the closed file
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _ImageRejected("is too large (decompression-bomb limit)") from None
        except UnidentifiedImageError:
            what = _looks_like(_head(source))
            raise _ImageRejected(f"is not an image: it looks like {what}" if what
                                 else "is not an image (Pillow cannot identify its format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:  # what Pillow's decoders raise
            raise _ImageRejected(f"is truncated or corrupt ({err})") from None
    return _to_rgb(upright)


def _head(source: Path | BytesIO, size: int = 64) -> bytes:
    if isinstance(source, BytesIO):
        return source.getvalue()[:size]
    try:
        with open(source, "rb") as file:
            return file.read(size)
    except OSError:
        return b""


_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


def _looks_like(head: bytes) -> str | None:
    """What a file Pillow cannot read most likely is, when its first bytes say so."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page (a web page saved under an image name, or a failed download)"
    if text.startswith((b"<svg", b"<?xml")):
        return "an SVG or XML file; export it as PNG or JPEG"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "a HEIC/AVIF photo, which cannot be read here; export it as JPEG or PNG"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255 instead of scaling, which turns most
        # 16-bit photos white; divide by 256 so 65535 -> 255 and 32768 -> 128.
        values = np.asarray(image).astype(np.int64).clip(0, 65535) // 256
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        raise _ImageRejected("has 32-bit float pixels, which cannot be trained on; save it as 8 or 16 bit")
    if image.has_transparency_data:
        # Transparent pixels keep arbitrary colour values (often black); show them on white instead.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, P, 1, CMYK, YCbCr, LAB, ...; a no-op copy for RGB
    except ValueError:
        raise _ImageRejected(f"has pixel mode {image.mode}, which cannot be converted to RGB") from None


def load_rgb(path: Path) -> Image.Image:
    """Load an image checked by check_images as an upright, fully loaded RGB image."""
    try:
        return _decode_rgb(path, still_only=False)
    except _ImageRejected as err:
        raise ImageDataError([ImageProblem(path, str(err))]) from None


def _resize_short_side(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    if min(width, height) == side:
        return image
    scale = side / min(width, height)
    size = (max(side, round(width * scale)), max(side, round(height * scale)))
    # LANCZOS keeps detail when shrinking; it rings when enlarging, where BICUBIC does not.
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(size, resample)


def prepare_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    flip: bool,
    crop_rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, maybe mirror; float [3, res, res] in [-1, 1]."""
    return prepare_image_and_crop(image, resolution, center_crop, flip, crop_rng)[0]


def prepare_image_and_crop(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    flip: bool,
    crop_rng: random.Random | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """prepare_image, and the (top, left) of the square taken, in the resized (and mirrored) image:
    what SDXL's crop micro-conditioning is told."""
    if image.mode != "RGB":
        raise ValueError(f"prepare_image expects an RGB image (see load_rgb), got mode {image.mode}")
    image = _resize_short_side(image, resolution)
    width, height = image.size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        # Without a generator, the `random` module: accelerate's set_seed seeds it, too.
        randint = crop_rng.randint if crop_rng is not None else random.randint
        left, top = randint(0, width - resolution), randint(0, height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = width - resolution - left  # the same square, seen in the mirrored image
    pixels = torch.from_numpy(np.array(image, dtype=np.float32))  # a writable copy, [H, W, 3] in 0..255
    return (pixels.permute(2, 0, 1) / 127.5 - 1.0).contiguous(), (top, left)


def is_caption_file(path: str | Path, extension: str) -> bool:
    """Whether `path` is named as a caption file (dog1.txt); an empty extension means no captions."""
    return bool(extension) and Path(path).suffix.lower() == extension.lower()


def split_caption_files(sources: Sequence[str | Path], extension: str) -> tuple[list[str | Path], list[Path]]:
    """Separate caption files named explicitly (an upload of photos and their .txt files) from the rest."""
    if not extension:
        return list(sources), []
    is_caption = [is_caption_file(s, extension) and Path(s).is_file() for s in sources]
    images = [s for s, c in zip(sources, is_caption, strict=True) if not c]
    if not images:
        raise ImageDataError([ImageProblem(Path(), "only caption files were given, no images")], "instance_data")
    return images, [Path(s) for s, c in zip(sources, is_caption, strict=True) if c]


def read_captions(paths: Sequence[Path], extension: str, identifier: str,
                  named: Sequence[Path] = ()) -> list[str | None]:
    """Each image's own prompt (kohya's convention): the text file beside it with the caption
    extension, else a caption file named explicitly with the image's stem; None where there is none.

    Raises one ImageDataError naming every caption file that cannot be used: unreadable, not
    UTF-8 text, empty, without the identifier (the image would not teach it), or matching no image.
    """
    if not extension:
        return [None] * len(paths)
    by_stem = {p.stem: p for p in named}
    problems = [ImageProblem(p, f"caption file matches no image (expected an image named {p.stem}.*)")
                for p in named if p.stem not in {q.stem for q in paths}]
    captions: list[str | None] = []
    for path in paths:
        beside = path.with_suffix(extension)
        caption_path = beside if beside.is_file() else by_stem.get(path.stem)
        text = None
        if caption_path is not None:
            text, problem = _read_caption(caption_path, identifier)
            if problem:
                problems.append(ImageProblem(caption_path, problem))
        captions.append(text)
    if problems:
        raise ImageDataError(problems)
    return captions


def _read_caption(path: Path, identifier: str) -> tuple[str | None, str | None]:
    try:
        text = " ".join(path.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError:
        return None, "caption is not UTF-8 text"
    except OSError as err:
        return None, f"caption cannot be read ({err.strerror or err})"
    if not text:
        return None, "caption is empty; delete it to use the instance prompt"
    if identifier not in text.replace(",", " ").split():
        return None, f"caption {text!r} does not contain the identifier {identifier!r} as a word"
    return text, None


class ImageSet:
    """Checked image paths, loaded on first use and kept in a small least-recently-used cache.

    Pass `short_side=resolution` to cache images already shrunk to the training size: prepare_image
    then skips its resize, and 20 phone photos take ~20 MB instead of ~700 MB.
    """

    def __init__(self, paths: Sequence[Path], cache_size: int = 32, short_side: int | None = None) -> None:
        self.paths = list(paths)
        self.cache_size = cache_size
        self.short_side = short_side
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()
        self._sizes: dict[int, tuple[int, int]] = {}  # (height, width) of each file, before any resize

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Image.Image:
        """The i-th image as RGB; shared with the cache, so treat it as read-only."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        image = load_rgb(self.paths[i])
        self._sizes[i] = (image.height, image.width)
        if self.short_side is not None and min(image.size) > self.short_side:  # never enlarge here
            image = _resize_short_side(image, self.short_side)
        if self.cache_size > 0:
            self._cache[i] = image
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image

    def original_size(self, i: int) -> tuple[int, int]:
        """(height, width) of the i-th image as its file holds it (after EXIF rotation)."""
        if i not in self._sizes:
            self.image(i)
        return self._sizes[i]
