"""The model-family seam: a base model's family comes from its own model_index.json, and a family
we do not train is refused, naming what was found, before anything loads or is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_config

from trainer import train
from trainer.families import StableDiffusion, UnsupportedModelError, detect_family
from trainer.run_folder import load_pipeline, read_status

REFUSED = {
    "StableDiffusionXLImg2ImgPipeline": "refiner",
    "StableDiffusionXLInpaintPipeline": "inpainting",
    "FluxKontextPipeline": "Kontext",
    "FluxFillPipeline": "inpainting",
    "FluxPriorReduxPipeline": "Redux",
    "FluxControlPipeline": "control image",
    "Flux2Pipeline": "FLUX.2",
    "StableDiffusionInpaintPipeline": "inpainting",
    "SomeCommunityPipeline": "SomeCommunityPipeline",
}


def _model_of_class(folder: Path, class_name: str | None) -> Path:
    folder.mkdir(parents=True)
    index = {"_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"]}
    if class_name is not None:
        index["_class_name"] = class_name
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_sd_models_are_detected_from_their_model_index(tiny_model_dir: Path, tiny_vpred_model_dir: Path) -> None:
    family = detect_family(str(tiny_model_dir))
    assert isinstance(family, StableDiffusion)
    assert isinstance(detect_family(str(tiny_vpred_model_dir)), StableDiffusion)
    parts = family.load_components(str(tiny_vpred_model_dir), None, None)
    assert parts.family is family and parts.noise_scheduler.config.prediction_type == "v_prediction"
    assert family.native_resolution(parts) == 32  # a 16x16-latent UNet behind a 2x VAE
    ids = family.tokenize(parts, "a photo of sks dog")
    assert ids.shape == (parts.tokenizer.model_max_length,)
    cond = family.encode(parts, ids[None])
    assert cond.hidden_states.shape == (1, 77, parts.text_encoder.config.hidden_size) and cond.added == {}


def test_the_name_of_a_folder_does_not_decide_its_family(tiny_model_dir: Path, tmp_path: Path) -> None:
    sdxl_named = tmp_path / "stable-diffusion-xl-base-1.0"
    shutil.copytree(tiny_model_dir, sdxl_named)
    assert isinstance(detect_family(str(sdxl_named)), StableDiffusion)
    sd15_named = _model_of_class(tmp_path / "stable-diffusion-v1-5", "StableDiffusionXLPipeline")
    assert detect_family(str(sd15_named)).name == "sdxl"
    refiner = _model_of_class(tmp_path / "sdxl-base", "StableDiffusionXLImg2ImgPipeline")
    with pytest.raises(UnsupportedModelError, match="StableDiffusionXLImg2ImgPipeline .*refiner"):
        detect_family(str(refiner))


@pytest.mark.parametrize("class_name", sorted(REFUSED))
def test_unsupported_families_are_refused_before_anything_is_written(
    class_name: str, subject_images: Path, tmp_path: Path
) -> None:
    model = _model_of_class(tmp_path / "model", class_name)
    with pytest.raises(UnsupportedModelError) as err:
        train(tiny_config(model, subject_images, tmp_path / "run"))
    message = str(err.value)
    assert message.startswith("`pretrained_model`")
    assert class_name in message and REFUSED[class_name] in message
    assert "Stable Diffusion 1.x/2.x (StableDiffusionPipeline)" in message  # the families we do train
    assert "Stable Diffusion XL (StableDiffusionXLPipeline)" in message
    assert "FLUX.1 (FluxPipeline)" in message and "Stable Diffusion 3 (StableDiffusion3Pipeline)" in message
    assert not (tmp_path / "run").exists()


def test_a_model_index_naming_no_pipeline_is_refused(tiny_model_dir: Path, subject_images: Path,
                                                     tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    del index["_class_name"]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="names no pipeline"):
        train(tiny_config(model, subject_images, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_generate_refuses_an_unsupported_pipeline_folder(tmp_path: Path) -> None:
    model = _model_of_class(tmp_path / "kontext", "FluxKontextPipeline")
    with pytest.raises(UnsupportedModelError, match="FluxKontextPipeline"):
        load_pipeline(model, torch.float32)


def test_a_run_records_its_family_and_its_card_and_output_follow_it(
    tiny_model_dir: Path, subject_images: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", max_train_steps=1)
    result = train(config)
    assert read_status(result.run_dir) == {
        "status": "completed", "step": 1, "total_steps": 1, "family": "sd", "processes": 1, "weights_step": 1,
        "effective_batch": config.train_batch_size * config.gradient_accumulation_steps}
    card = (result.run_dir / "README.md").read_text()
    assert "- stable-diffusion\n" in card and "from diffusers import StableDiffusionPipeline" in card
    pipe = load_pipeline(tiny_model_dir, torch.float32, lora_dir=result.run_dir)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.get_list_adapters()  # the run's LoRA is loaded onto the base
