"""Model families: everything that differs between Stable Diffusion generations, behind one seam.

A family is chosen from the base model's own `model_index.json` (its `_class_name`, the pipeline
diffusers would build), never from its name. The loop, class images, samples, saving, the model
card and Generate ask the family; none of them names a text-encoder or pipeline class.

Adding a family: a module here with a `ModelFamily` subclass, listed in FAMILIES.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub.errors import GatedRepoError

from trainer.config import UserError
from trainer.families.base import Components, Conditioning, ModelFamily, ModelLoadError, first_line
from trainer.families.flow import Flux, StableDiffusion3
from trainer.families.sd import StableDiffusion
from trainer.families.sdxl import StableDiffusionXL
from trainer.model_files import PIPELINE_INDEX

FAMILIES: tuple[ModelFamily, ...] = (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())

# Pipelines people try as a base that we recognise but do not train, with the reason.
_NOT_TRAINED: dict[str, str] = {
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner or image-to-image model: train the base model; "
    "the refiner only polishes its images",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting model (its UNet takes a mask and a masked image)",
    "StableDiffusionInpaintPipeline": "an inpainting model (its UNet takes a mask and a masked image)",
    "StableDiffusionImg2ImgPipeline": "an image-to-image pipeline",
    "StableDiffusionXLInstructPix2PixPipeline": "an image-editing model",
    "StableDiffusionDepth2ImgPipeline": "a depth-to-image model",
    "StableDiffusionUpscalePipeline": "an upscaler",
    "StableDiffusion3Img2ImgPipeline": "an SD 3 image-to-image pipeline: train the text-to-image model",
    "StableDiffusion3InpaintPipeline": "an SD 3 inpainting pipeline (its transformer takes a mask)",
    "StableDiffusion3ControlNetPipeline": "an SD 3 ControlNet pipeline: train the base model",
    "FluxKontextPipeline": "FLUX.1 Kontext, an image-editing model: it learns from pairs of images, not a "
    "subject's photos",
    "FluxKontextInpaintPipeline": "FLUX.1 Kontext inpainting, an image-editing model",
    "FluxFillPipeline": "FLUX.1 Fill, an inpainting/outpainting model (its transformer takes a mask)",
    "FluxPriorReduxPipeline": "FLUX.1 Redux, an image-variation adapter, not a text-to-image model",
    "FluxControlPipeline": "a FLUX.1 Control model (Canny/Depth: its transformer takes a control image)",
    "FluxControlNetPipeline": "a FLUX.1 ControlNet pipeline: train the base model",
    "FluxImg2ImgPipeline": "a FLUX.1 image-to-image pipeline: train the text-to-image model",
    "FluxInpaintPipeline": "a FLUX.1 inpainting pipeline: train the text-to-image model",
    "Flux2Pipeline": "FLUX.2, a different architecture (one Mistral text encoder, a new VAE) not yet trained here",
    "Flux2KleinPipeline": "FLUX.2 klein, a different architecture not yet trained here",
}


class UnsupportedModelError(UserError, ValueError):
    """The base model is of a family this engine does not train; the message says which."""


def supported_families() -> str:
    return "; ".join(f"{f.label} ({', '.join(f.pipeline_names)})" for f in FAMILIES)


def family_by_name(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_for_class(class_name: str | None, source: str) -> ModelFamily:
    """The family whose pipeline `class_name` is; UnsupportedModelError naming it otherwise."""
    for family in FAMILIES:
        if class_name in family.pipeline_names:
            return family
    if not class_name:
        found = "names no pipeline (no `_class_name` in its model_index.json)"
    else:
        why = _NOT_TRAINED.get(class_name)
        found = f"is a {class_name}" + (f" ({why})" if why else "")
    raise UnsupportedModelError(
        f"`pretrained_model`: {source} {found}. DreamBooth Studio trains {supported_families()}."
    )


def read_model_index(source: str, revision: str | None = None, *, cached_only: bool = False) -> dict:
    """The base model's model_index.json: from the folder, else from the Hub (or its cache).
    `cached_only` never goes to the network: a Hub id not in the local cache is a ModelLoadError."""
    local = Path(source).expanduser()
    looks_local = local.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if looks_local and not local.is_dir():
        raise ModelLoadError(f"`pretrained_model`: could not load {source!r}: there is no such folder")
    try:
        if local.is_dir():
            path = local / PIPELINE_INDEX
        elif cached_only:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, PIPELINE_INDEX, revision=revision)
            if not isinstance(cached, str):
                raise ModelLoadError(f"`pretrained_model`: {source!r} is not in the local Hub cache")
            path = Path(cached)
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, PIPELINE_INDEX, revision=revision))
        data = json.loads(path.read_text(encoding="utf-8"))
    except GatedRepoError:
        raise ModelLoadError(f"`pretrained_model`: {gated_words(source)}") from None
    except (OSError, ValueError) as err:  # not found, offline, unknown repo, not JSON
        raise ModelLoadError(
            f"`pretrained_model`: could not load the {PIPELINE_INDEX} of {source!r}: {first_line(err)}"
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"`pretrained_model`: the {PIPELINE_INDEX} of {source!r} is not a JSON object")
    return data


def gated_words(repo_id: str) -> str:
    """What to do about a gated Hub model (FLUX.1-dev, SD 3.5) that the token may not read."""
    return (f"{repo_id} is gated: open https://huggingface.co/{repo_id}, log in and accept its license, then "
            "give a token of that account (the HF_TOKEN variable, `hf auth login`, or the token field)")


def detect_family(source: str, revision: str | None = None) -> ModelFamily:
    """The family of a base model (Hub id or folder), read from its model_index.json before anything loads."""
    return family_for_class(read_model_index(source, revision).get("_class_name"), source)


__all__ = [
    "FAMILIES",
    "Components",
    "Conditioning",
    "ModelFamily",
    "ModelLoadError",
    "Flux",
    "StableDiffusion",
    "StableDiffusion3",
    "StableDiffusionXL",
    "UnsupportedModelError",
    "detect_family",
    "family_by_name",
    "family_for_class",
    "gated_words",
    "read_model_index",
    "supported_families",
]
