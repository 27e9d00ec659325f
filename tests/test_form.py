"""Units of the UI that need no server: form → TrainConfig, presets, prompts, the JobManager."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ui_fixtures import A100, CPU, GPU16

from space.form import PRESETS, Concept, form_to_config, new_run_dir, preset_values, prompts_for
from space.hardware import Hardware, hub_offline
from space.jobs import JobManager, PublishRequest
from space.presets import (
    KNOWN_MODELS,
    TOY_MODEL,
    ToyModel,
    default_resolution,
    model_choices,
    model_settings,
    safe_defaults,
)
from trainer.config import ConfigError, TrainConfig
from trainer.events import CancelToken, PhaseEvent, RunResult, SampleEvent, StepEvent, WarningEvent
from trainer.publish.hub import HubError
from trainer.toyworld import (
    EXAMPLE_INSTANCE_PROMPT,
    EXAMPLE_PROMPTS,
    EXAMPLE_SETTINGS,
    TOY_MODEL_DIR,
    TOY_MODEL_LABEL,
    TOY_RESOLUTION,
    example_config,
)


def form(images: list[str], **changes: Any) -> dict[str, Any]:
    """The Train form as the tab hands it over: keys as in space.form.FORM."""
    values: dict[str, Any] = {
        "images": images,
        "identifier": "sks",
        "class_noun": "dog",
        "concept": "object",
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
        "method": "lora",
        "base_model": "some/model",
        "with_prior_preservation": False,
        "num_class_images": 50,
        "max_train_steps": 6.0,
        "learning_rate": 1e-4,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "train_text_encoder": True,
        "text_encoder_steps_fraction": 0.3,
        "resolution": 32,
        "use_8bit_adam": True,
        "gradient_checkpointing": False,
        "mixed_precision": "no",
        "seed": 7,
        "checkpointing_steps": 3,
        "validation_prompt": "",
        "validation_steps": 2,
    }
    values.update(changes)
    return values


@pytest.fixture
def four_images(tmp_path: Path) -> list[str]:
    return [str(tmp_path / f"{i}.png") for i in range(4)]


def test_form_maps_every_field(tmp_path: Path, four_images: list[str]) -> None:
    config = form_to_config(form(four_images), tmp_path / "runs")
    assert isinstance(config, TrainConfig)
    assert config.instance_data == tuple(four_images)
    assert (config.pretrained_model, config.identifier, config.method) == ("some/model", "sks", "lora")
    assert (config.max_train_steps, config.learning_rate, config.gradient_accumulation_steps) == (6, 1e-4, 2)
    assert config.train_text_encoder and config.text_encoder_steps_fraction == 0.3
    assert (config.resolution, config.seed, config.checkpointing_steps, config.validation_steps) == (32, 7, 3, 2)
    assert config.use_8bit_adam and not config.gradient_checkpointing
    assert config.validation_prompts == ("a photo of sks dog",)  # empty validation prompt = instance prompt
    assert Path(config.output_dir).parent == tmp_path / "runs" and "sks" in Path(config.output_dir).name


def test_form_accepts_client_file_dicts_and_resolves_the_toy_model(tmp_path: Path, four_images: list[str]) -> None:
    values = form([{"path": p, "meta": {"_type": "gradio.FileData"}} for p in four_images], base_model=TOY_MODEL)
    config = form_to_config(values, tmp_path, resolve_model=lambda m: "/models/toy" if m == TOY_MODEL else m)
    assert config.instance_data == tuple(four_images) and config.pretrained_model == "/models/toy"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"instance_prompt": "a photo of a dog"}, "`instance_prompt` must contain the identifier 'sks'"),
        ({"identifier": "two words", "instance_prompt": "two words"}, "`identifier` must be one word"),
        ({"resolution": 33}, "`resolution` must be a positive multiple of 8, got 33"),
        ({"max_train_steps": 2.5}, "`max_train_steps` must be a whole number"),
        ({"learning_rate": "fast"}, "`learning_rate` must be a number"),
        ({"with_prior_preservation": True, "class_prompt": "a photo of sks dog"}, "`class_prompt` must not contain"),
        ({"base_model": " "}, "`pretrained_model` is required"),
    ],
)
def test_form_errors_are_the_engines_words(tmp_path: Path, four_images: list[str], changes: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        form_to_config(form(four_images, **changes), tmp_path)


@pytest.mark.parametrize("n", [0, 2, 21])
def test_form_wants_3_to_20_images(tmp_path: Path, n: int) -> None:
    with pytest.raises(ConfigError, match=f"`instance_data` needs 3 to 20 images, got {n}"):
        form_to_config(form([f"{i}.png" for i in range(n)]), tmp_path)


def test_every_form_row_names_a_trainconfig_field_and_starts_from_its_default() -> None:
    import dataclasses

    from space.form import FORM, checkpoint_every, initial_values
    from space.presets import safe_defaults

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {f.config for f in FORM if f.config} <= fields
    assert len({f.key for f in FORM}) == len(FORM)
    first = initial_values(safe_defaults(CPU))
    assert set(first) == {f.key for f in FORM}
    untouched = {"num_class_images", "gradient_accumulation_steps", "seed", "validation_steps"}
    assert {key: first[key] for key in untouched} == {key: getattr(TrainConfig(), key) for key in untouched}
    # The app scores each checkpoint (the engine does not by default), so checkpoints follow the steps.
    assert first["score_checkpoints"] and first["checkpointing_steps"] == checkpoint_every(first["max_train_steps"])
    assert (first["instance_prompt"], first["base_model"], first["resolution"]) == ("a photo of zwx dog", TOY_MODEL, 32)


def test_presets_follow_the_training_spaces() -> None:
    assert {c: p.text_encoder_fraction for c, p in PRESETS.items()} == {
        Concept.OBJECT: 0.30,
        Concept.PERSON: 0.65,
        Concept.STYLE: 0.15,
    }
    values = preset_values("person", 5, "full")
    assert values == {
        "max_train_steps": 1000,
        "learning_rate": 5e-6,
        "train_text_encoder": True,
        "text_encoder_steps_fraction": 0.65,
    }
    assert preset_values("style", 4, "lora")["learning_rate"] == 1e-4


def test_prompts_and_run_dirs(tmp_path: Path) -> None:
    assert prompts_for("zwx", "backpack", "object") == ("a photo of zwx backpack", "a photo of backpack")
    assert prompts_for("zwx", "painting", "style") == ("a painting in the style of zwx", "a painting")
    first = new_run_dir(tmp_path, "zwx / é")
    first.mkdir()
    second = new_run_dir(tmp_path, "zwx / é")
    assert first != second and first.name.endswith("-zwx") and not second.exists()


def test_safe_defaults_fit_the_hardware() -> None:
    cpu = safe_defaults(Hardware("cpu", "CPU", None))
    assert cpu["base_model"] == TOY_MODEL and cpu["mixed_precision"] == "no" and not cpu["use_8bit_adam"]
    assert cpu["resolution"] == default_resolution(TOY_MODEL) == 32
    # On a GPU the memory model picks (tests/test_memory.py checks it is the best that fits): a T4
    # (15 GB) fine-tunes SD 1.5 fully in fp16 (the target: full DreamBooth in 10 GB with
    # 8-bit Adam and checkpointing); an A100 has room for it all in bf16, no savings needed.
    t4 = safe_defaults(Hardware("cuda", "Tesla T4", 15.0))
    assert (t4["method"], t4["mixed_precision"], t4["resolution"]) == ("full", "fp16", 512)
    a100 = safe_defaults(Hardware("cuda", "A100", 80.0, bf16=True))
    assert (a100["method"], a100["mixed_precision"], a100["use_8bit_adam"], a100["gradient_checkpointing"]) == (
        "full",
        "bf16",
        False,
        False,
    )


# --- SDXL: the model table, family presets, hardware presets, the memory note --------------------
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def test_known_models_name_their_family_and_native_size() -> None:
    from trainer.families import FAMILIES

    families = {f.name: f for f in FAMILIES}
    assert {known.family for known in KNOWN_MODELS.values()} == {"sd", "sdxl"} <= set(families)
    sdxl = [model_id for model_id, known in KNOWN_MODELS.items() if known.family == "sdxl"]
    assert sdxl[0] == SDXL_BASE and KNOWN_MODELS[SDXL_BASE].resolution == 1024 == default_resolution(SDXL_BASE)
    assert families["sdxl"].default_resolution == 1024
    assert default_resolution("stabilityai/stable-diffusion-2-1") == 768  # SD 2.1-v: its own size, not the family's
    assert next(iter(KNOWN_MODELS)) == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD first: least memory
    assert (SDXL_BASE, SDXL_BASE) in model_choices(A100, offline=False)


def test_a_base_models_family_is_read_without_the_network(tmp_path: Path) -> None:
    import json

    from space.presets import model_family, model_resolution

    assert (model_family(TOY_MODEL), model_family(SDXL_BASE), model_family(next(iter(KNOWN_MODELS)))) == (
        "sd",
        "sdxl",
        "sd",
    )
    folders = {"xl": "StableDiffusionXLPipeline", "sd": "StableDiffusionPipeline", "flux": "FluxPipeline"}
    for name, class_name in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    assert model_family(str(tmp_path / "xl")) == "sdxl" and model_resolution(str(tmp_path / "xl")) == 1024
    assert model_family(str(tmp_path / "sd")) == "sd" and model_resolution(str(tmp_path / "sd")) == 512
    assert model_family(str(tmp_path / "flux")) is None  # not a family we train: the engine says so at Start
    # A Hub id neither known nor in the Hub cache, a folder that is not there: unknown, nothing fetched.
    assert model_family("nobody-here/never-downloaded-model") is None
    assert model_resolution("nobody-here/never-downloaded-model") is None
    assert model_family(str(tmp_path / "missing")) is None and model_family("") is None


def test_family_presets_set_the_learning_rate_and_rank() -> None:
    from space.presets import FAMILY_PRESETS, lora_rank_for

    assert preset_values("person", 5, "full") == preset_values("person", 5, "full", "sd")  # SD as before
    xl_lora, xl_full = preset_values("object", 4, "lora", "sdxl"), preset_values("object", 4, "full", "sdxl")
    assert (xl_lora["learning_rate"], xl_full["learning_rate"]) == (1e-4, 5e-6)
    assert xl_lora["max_train_steps"] == 800 and xl_lora["text_encoder_steps_fraction"] == 0.30  # the concept's
    assert FAMILY_PRESETS["sd"].lora_rank == TrainConfig().lora_rank == lora_rank_for(next(iter(KNOWN_MODELS)))
    assert lora_rank_for(SDXL_BASE) == FAMILY_PRESETS["sdxl"].lora_rank == 16
    assert lora_rank_for(TOY_MODEL) == EXAMPLE_SETTINGS["lora_rank"] and lora_rank_for("nobody/x") is None


def _memory_form(base_model: str, **changes) -> dict:
    """The form fields the memory line reads, LoRA with every saving by default."""
    return {"base_model": base_model, "method": "lora", "resolution": 1024, "use_8bit_adam": True,
            "gradient_checkpointing": True, "mixed_precision": "fp16", "train_batch_size": 1,
            "train_text_encoder": False, "with_prior_preservation": False, "lora_rank": 16, "preservation": "class-images",
            **changes}


def test_safe_defaults_for_sdxl_on_a_16gb_card() -> None:
    from space.memory import form_memory_note

    xl = safe_defaults(GPU16, family="sdxl")
    assert xl["base_model"] == SDXL_BASE and (xl["resolution"], xl["lora_rank"]) == (1024, 16)
    assert (xl["method"], xl["mixed_precision"], xl["cache_latents"]) == ("lora", "fp16", True)
    picked = {key: xl[key] for key in ("method", "resolution", "use_8bit_adam", "gradient_checkpointing",
                                       "mixed_precision", "train_batch_size", "train_text_encoder")}
    assert "Fits your GPU" in form_memory_note(GPU16, _memory_form(SDXL_BASE, **picked))  # the preset fits
    # with scores on (the app's default) too: the picker sized it with the scoring models loaded
    assert "Fits your GPU" in form_memory_note(GPU16, _memory_form(SDXL_BASE, **picked, score_checkpoints=True))
    sd = safe_defaults(GPU16)  # SD 1.5: its first known model at 512 px, SD's LoRA rank
    first = next(iter(KNOWN_MODELS))
    assert (sd["base_model"], sd["resolution"], sd["lora_rank"]) == (first, 512, 4)
    big = safe_defaults(A100, family="sdxl")  # 80 GB: room to fine-tune the whole SDXL UNet
    assert (big["method"], big["mixed_precision"]) == ("full", "bf16")
    assert safe_defaults(GPU16, offline=True, family="sdxl")["base_model"] == TOY_MODEL  # no Hub: the toy model
    assert safe_defaults(CPU, family="sdxl")["base_model"] == TOY_MODEL


@pytest.mark.parametrize(
    ("hardware", "changes", "words"),
    [
        (GPU16, {"method": "full", "use_8bit_adam": False, "gradient_checkpointing": False}, "Use LoRA"),
        (GPU16, {"gradient_checkpointing": False, "train_batch_size": 4}, "Turn on gradient checkpointing"),
        (Hardware("cuda", "RTX 3060", 11.7), {"method": "full", "train_text_encoder": True}, "Use LoRA"),
        (Hardware("cuda", "small", 2.0), {}, "use a GPU with more memory"),
    ],
)
def test_the_memory_line_says_what_does_not_fit_and_what_would(hardware: Hardware, changes: dict, words: str) -> None:
    from space.memory import form_memory_note

    note = form_memory_note(hardware, _memory_form(SDXL_BASE, **changes))
    assert note is not None and "Does not fit your GPU" in note and words in note
    assert f"of {hardware.memory_gb:.1f} GB" in note


@pytest.mark.parametrize(
    ("hardware", "base_model", "changes"),
    [
        (CPU, SDXL_BASE, {"method": "full"}),  # no CUDA: nothing to size
        (Hardware("mps", "Apple GPU (MPS)", None), SDXL_BASE, {}),
        (GPU16, "nobody/unknown-model", {}),  # an unknown family
        (GPU16, TOY_MODEL, {"method": "full"}),  # the toy model fits anywhere
        (GPU16, SDXL_BASE, {"resolution": None}),  # a number box being edited
    ],
)
def test_the_memory_line_is_silent_when_there_is_nothing_to_size(hardware: Hardware, base_model: str,
                                                                 changes: dict) -> None:
    from space.memory import form_memory_note

    assert form_memory_note(hardware, _memory_form(base_model, **changes)) is None


def test_a_new_base_model_brings_its_familys_presets() -> None:
    from space.presets import base_model_values, memory_settings

    kind, values = base_model_values(GPU16, SDXL_BASE, previous="sd")
    picked = memory_settings(GPU16, "sdxl", SDXL_BASE)  # what fits this card best (tests/test_memory.py)
    assert kind == "sdxl" and values == {"lora_rank": 16, "learning_rate": 1e-4, **picked}
    assert (values["resolution"], values["method"], values["cache_latents"]) == (1024, "lora", True)
    back, values = base_model_values(A100, next(iter(KNOWN_MODELS)), previous="sdxl")
    assert back == "sd" and (values["method"], values["learning_rate"], values["lora_rank"]) == ("full", 5e-6, 4)
    # Within a family only the size follows the model, as before; the toy model brings its size and rank.
    assert base_model_values(GPU16, "stabilityai/stable-diffusion-2-1", previous="sd") == ("sd", {"resolution": 768})
    assert base_model_values(GPU16, TOY_MODEL, previous="sdxl") == (
        "toy",  # and its class-image batch: 32 px images, many at once
        {
            "resolution": TOY_RESOLUTION,
            "lora_rank": EXAMPLE_SETTINGS["lora_rank"],
            "sample_batch_size": EXAMPLE_SETTINGS["sample_batch_size"],
        },
    )
    assert base_model_values(GPU16, "nobody/unknown-model", previous="sd") == (None, {})  # not guessed


def test_the_train_tabs_base_model_and_memory_handlers(tmp_path: Path) -> None:
    import gradio as gr

    from space.train_tab import BASE_MODEL_FIELDS, MEMORY_FIELDS, TrainDeps, memory_hint, on_base_model, on_preset

    deps = TrainDeps(JobManager(), tmp_path, ToyModel(), GPU16)
    *fields, kind, why = on_base_model(deps, SDXL_BASE, "sd")
    assert kind == "sdxl" and dict(zip(BASE_MODEL_FIELDS, fields, strict=True))["resolution"] == 1024
    assert why["visible"] and "Picked for your GPU" in why["value"]
    skipped = on_base_model(deps, "nobody/unknown-model", "sd")
    assert all(isinstance(value, type(gr.skip())) for value in skipped)
    _steps, lr, text_encoder, _fraction = on_preset(deps, None, "object", "full", SDXL_BASE)
    assert lr == 5e-6 and text_encoder is True  # LoRA with the text encoders fits 16 GB: the preset's stays
    small = TrainDeps(JobManager(), tmp_path, ToyModel(), Hardware("cuda", "8 GB card", 7.4))
    assert on_preset(small, None, "object", "lora", SDXL_BASE)[2] is False  # there it does not: frozen
    assert on_preset(deps, None, "object", "full", TOY_MODEL)[2] is True  # the toy model: as the preset says
    line = memory_hint(deps, *(_memory_form(SDXL_BASE, method="full", gradient_checkpointing=False, cache_latents=True,
                                            gradient_accumulation_steps=1, sample_batch_size=4, score_checkpoints=True)[key]
                               for key in MEMORY_FIELDS))
    assert line["visible"] and "Does not fit your GPU" in line["value"]


def test_the_form_sets_lora_rank_and_cache_latents(tmp_path: Path, four_images: list[str]) -> None:
    config = form_to_config(form(four_images, lora_rank=16.0, cache_latents=False), tmp_path)
    assert (config.lora_rank, config.cache_latents) == (16, False)
    empty = form_to_config(form(four_images, lora_rank=None), tmp_path)  # empty: TrainConfig's default
    assert (empty.lora_rank, empty.cache_latents) == (TrainConfig().lora_rank, TrainConfig().cache_latents)
    toy = form_to_config(form(four_images, base_model=TOY_MODEL, lora_rank=2), tmp_path, model_settings=model_settings)
    assert toy.lora_rank == 2  # what the form shows wins over the toy model's hidden rank
    with pytest.raises(ConfigError, match="`lora_rank` must be a whole number"):
        form_to_config(form(four_images, lora_rank=2.5), tmp_path)


def test_generate_samples_sdxl_runs_and_repos_at_1024(tmp_path: Path, toy: ToyModel) -> None:
    import gradio as gr

    from space.generate_tab import GenerateDeps, on_model
    from trainer.inference import PipelineCache
    from trainer.run_folder import write_status

    deps = GenerateDeps(JobManager(), tmp_path, toy, GPU16, PipelineCache())
    runs = {}
    for name, base, family in (("xl", SDXL_BASE, "sdxl"), ("sd", "some/sd-model", "sd"), ("old", "some/sd", None)):
        run = runs[name] = tmp_path / name
        run.mkdir()
        config = TrainConfig(pretrained_model=base, instance_prompt="a photo of sks dog", resolution=768)
        config.save(run / "config.json")
        if family is not None:  # a run from before families records none
            write_status(run, "completed", 1, 1, family=family)
    prompt, width, height, _ = on_model(deps, str(runs["xl"]))
    assert (prompt, width, height) == ("a photo of sks dog", 1024, 1024)
    assert on_model(deps, SDXL_BASE)[1:3] == (1024, 1024)  # a known Hub id: the table's size
    assert on_model(deps, "stabilityai/stable-diffusion-2-1")[1] == 768
    # SD runs, unknown Hub repos, an old LoRA run (whose family would need the network): size left alone.
    for source in (str(runs["sd"]), str(runs["old"]), "someone/unknown-lora", ""):
        assert isinstance(on_model(deps, source)[1], type(gr.skip())), source
    assert on_model(deps, TOY_MODEL)[1] == TOY_RESOLUTION  # the toy model, as before


# --- the toy model and the toy world's example -------------------------------------------------
@pytest.fixture
def toy(toy_stand_in: Path) -> ToyModel:
    """A ToyModel whose folder is there (an empty stand-in: nothing here loads it)."""
    return ToyModel(toy_stand_in)


def test_the_toy_model_comes_first_without_a_gpu_or_the_hub(tmp_path: Path, toy: ToyModel) -> None:
    entry = (TOY_MODEL_LABEL, TOY_MODEL)
    assert model_choices(CPU, offline=False)[0] == entry
    assert model_choices(A100, offline=True)[0] == entry
    online = model_choices(A100, offline=False)
    assert online[0] == (next(iter(KNOWN_MODELS)),) * 2 and online[-1] == entry
    assert (safe_defaults(CPU)["base_model"], safe_defaults(CPU)["resolution"]) == (
        TOY_MODEL,
        TOY_RESOLUTION,
    )
    offline_gpu = safe_defaults(A100, offline=True)
    assert (offline_gpu["base_model"], offline_gpu["resolution"], offline_gpu["mixed_precision"]) == (
        TOY_MODEL,
        TOY_RESOLUTION,
        "bf16",
    )
    assert toy.resolve(TOY_MODEL) == str(toy.folder) and toy.is_toy(TOY_MODEL) and not toy.is_toy("a/b")
    assert toy.native_size(TOY_MODEL) == TOY_RESOLUTION and toy.native_size("a/b") is None

    # Without its folder the toy model is still the one offered; using it says what is missing.
    missing = ToyModel(tmp_path / "no-toy")
    assert not missing.installed and model_choices(CPU, offline=False)[0] == entry
    with pytest.raises(ConfigError, match="toy model is not installed"):
        missing.resolve(TOY_MODEL)


def test_hub_offline_reads_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()


def test_the_example_fills_the_form_with_what_example_config_trains(tmp_path: Path) -> None:
    from space.example import example_form, example_images

    photos = example_images(tmp_path / "example")
    assert len(photos) == 5 and all(Path(p).is_file() for p in photos)
    assert example_images(tmp_path / "example") == photos  # written once, then reused
    values = example_form(photos)
    assert values["base_model"] == TOY_MODEL and values["instance_prompt"] == EXAMPLE_INSTANCE_PROMPT
    assert values["validation_prompt"] == EXAMPLE_PROMPTS[1]

    config = form_to_config(
        values,
        tmp_path / "runs",
        resolve_model=lambda m: "/models/toy" if m == TOY_MODEL else m,
        model_settings=model_settings,
    )
    expected = example_config("/models/toy", tmp_path / "example", config.output_dir).to_dict()
    differ = {field for field, value in config.to_dict().items() if expected[field] != value}
    # Files rather than their folder; one sample prompt; scored like the app's runs, at four checkpoints.
    assert differ == {"instance_data", "validation_prompts", "score_checkpoints", "checkpointing_steps"}
    assert config.score_checkpoints and config.checkpointing_steps == config.max_train_steps // 4
    assert config.instance_data == tuple(photos) and config.validation_prompts == (EXAMPLE_PROMPTS[1],)


def test_the_toy_models_hidden_settings_never_override_the_form(tmp_path: Path, four_images: list[str]) -> None:
    toy_run = form_to_config(form(four_images, base_model=TOY_MODEL), tmp_path, model_settings=model_settings)
    assert toy_run.lora_rank == EXAMPLE_SETTINGS["lora_rank"] != TrainConfig().lora_rank
    assert (toy_run.max_train_steps, toy_run.learning_rate, toy_run.identifier) == (6, 1e-4, "sks")
    other = form_to_config(form(four_images), tmp_path, model_settings=model_settings)
    assert other.lora_rank == TrainConfig().lora_rank and other.report_to == TrainConfig().report_to


def test_suggested_prompts_for_the_toy_model_and_the_example_run(tmp_path: Path, toy: ToyModel) -> None:
    from space.example import TOY_PROMPTS, suggested_prompts

    assert suggested_prompts(TOY_MODEL, toy) == list(TOY_PROMPTS)
    assert "a photo of a red star on a white background" in TOY_PROMPTS
    example_run, other_run = tmp_path / "example-run", tmp_path / "other-run"
    for run, prompt in ((example_run, EXAMPLE_INSTANCE_PROMPT), (other_run, "a photo of sks dog")):
        run.mkdir()
        TrainConfig(pretrained_model=str(toy.folder), instance_prompt=prompt, resolution=64).save(run / "config.json")
    assert suggested_prompts(str(example_run), toy) == list(EXAMPLE_PROMPTS)
    assert suggested_prompts(str(other_run), toy) == [] and suggested_prompts("user/model", toy) == []
    assert toy.is_toy(str(example_run)) and toy.native_size(str(example_run)) == 64  # a run of the toy model
    assert toy.native_size(str(other_run)) == 64 and not toy.is_toy("user/model")  # samples at its size


def test_the_shipped_toy_model_is_installed() -> None:
    import json

    toy = ToyModel()  # the real trainer/assets/toy-sd
    assert toy.installed and model_choices(CPU, offline=False)[0] == (TOY_MODEL_LABEL, TOY_MODEL)
    assert toy.resolve(TOY_MODEL) == str(TOY_MODEL_DIR)
    unet = json.loads((TOY_MODEL_DIR / "unet" / "config.json").read_text())
    vae = json.loads((TOY_MODEL_DIR / "vae" / "config.json").read_text())
    native = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert native == TOY_RESOLUTION == default_resolution(TOY_MODEL)


def fake_train(release: threading.Event, fail: Exception | None = None):
    """A train() stand-in: emits the engine's events, waits for `release`, honours cancel."""

    def train(config: TrainConfig, on_event, cancel: CancelToken) -> RunResult:
        on_event(PhaseEvent("loading"))
        if fail is not None:
            raise fail
        on_event(WarningEvent("careful"))
        on_event(PhaseEvent("training"))
        step = 0
        for step in range(1, config.max_train_steps + 1):
            on_event(StepEvent(step, config.max_train_steps, 1.0 / step, 1e-4, 1.0))
            release.wait(5)
            if cancel.cancelled:
                break
        on_event(SampleEvent(step, (Path("s.png"),)))
        status = "cancelled" if cancel.cancelled else "completed"
        return RunResult(Path(config.output_dir), status, step, config.max_train_steps, None, None)

    return train


def test_job_manager_runs_one_job_at_a_time_and_cancels(tmp_path: Path) -> None:
    release = threading.Event()
    jobs = JobManager(fake_train(release), gpu_count=0)
    config = TrainConfig(output_dir=str(tmp_path / "a"), max_train_steps=50, instance_prompt="sks")
    snap = jobs.start(config)
    assert snap.active and snap.job_id == 1
    queued = jobs.start(config.replace(output_dir=str(tmp_path / "b"), max_train_steps=2))  # queued, not refused
    assert queued.state == "queued" and queued.queue_position == 1 and not queued.active
    with pytest.raises(ConfigError, match="already the folder of a queued or running training"):
        jobs.start(config)
    assert jobs.gpu_lock.acquire(blocking=False)  # no GPU: generation shares the cores with the training
    jobs.gpu_lock.release()
    assert jobs.cancel()
    release.set()
    jobs.wait(10)
    done = jobs.snapshot(1)
    assert done.state == "cancelled" and done.warnings == ("careful",) and done.samples == ("s.png",)
    assert done.losses[0] == (1, 1.0) and done.step < 50
    assert jobs.snapshot(2).state == "completed"  # the queued job started by itself once the first ended
    assert jobs.gpu_lock.acquire(blocking=False)
    jobs.gpu_lock.release()


def test_the_train_tabs_poll_redraws_only_what_changed(tmp_path: Path) -> None:
    import gradio as gr

    from space.presets import ToyModel
    from space.train_tab import PollState, TrainDeps, cancel_training, poll

    release = threading.Event()
    deps = TrainDeps(JobManager(fake_train(release)), tmp_path, ToyModel(), CPU)
    idle, status, *_ = poll(deps, PollState())
    assert idle == PollState(0, 0, 0, 0) and "No training yet" in status
    assert all(isinstance(value, type(gr.skip())) for value in poll(deps, idle))  # nothing changed
    assert cancel_training(deps) == "No training is running."

    deps.jobs.start(TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=50, instance_prompt="sks"))
    running, status, _, samples, warnings, finished, _, *_ = poll(deps, idle)
    assert running.job_id == 1 and "step" in status and warnings == "careful"
    assert samples == [] and isinstance(finished, type(gr.skip()))  # a new job: its samples redrawn, empty
    assert cancel_training(deps) == "Cancelling at the next step…"
    release.set()
    deps.jobs.wait(10)
    done, status, _, samples, warnings, finished, _, *_ = poll(deps, running)
    assert "Cancelled" in status and samples == ["s.png"] and isinstance(warnings, type(gr.skip()))
    assert finished == str(tmp_path / "run")


def test_job_manager_raises_engine_errors_from_start(tmp_path: Path) -> None:
    jobs = JobManager(fake_train(threading.Event(), fail=ConfigError("`mixed_precision` fp16 needs a CUDA GPU")))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        jobs.start(TrainConfig(output_dir=str(tmp_path)))
    assert jobs.snapshot().state == "failed" and jobs.snapshot().error == "`mixed_precision` fp16 needs a CUDA GPU"
    assert not jobs.snapshot().active  # a failed job does not block the next one


def test_uploads_are_copied_into_the_run_folder(tmp_path: Path, four_images: list[str]) -> None:
    from space.jobs import keep_uploads

    for i, name in enumerate(four_images):
        Path(name).write_bytes(bytes([i]) * 10)

    config = TrainConfig(output_dir=str(tmp_path / "run"), instance_data=tuple(four_images))
    kept = keep_uploads(config)
    copies = [Path(p) for p in kept.instance_data]
    assert [p.parent for p in copies] == [tmp_path / "run" / "instance_images"] * 4
    assert [p.read_bytes() for p in copies] == [Path(p).read_bytes() for p in four_images]
    assert keep_uploads(kept) == kept  # already in place: nothing copied twice
    folder = config.replace(instance_data=(str(tmp_path),))
    assert keep_uploads(folder) == folder  # a folder (CLI-style) is used where it is


def test_uploaded_captions_follow_their_photos(tmp_path: Path, four_images: list[str]) -> None:
    """Gradio keeps each upload in its own folder; the copies put each caption beside its photo."""
    from space.jobs import keep_uploads

    for i, name in enumerate(four_images):
        Path(name).write_bytes(bytes([i]) * 10)
    caption = tmp_path / "gradio-tmp-123" / f"{Path(four_images[2]).stem}.txt"
    stray = tmp_path / "gradio-tmp-456" / "nobody.txt"
    for path, text in ((caption, "a photo of sks dog on a sofa"), (stray, "a photo of sks dog")):
        path.parent.mkdir()
        path.write_text(text)
    uploads = (four_images[0], str(caption), *four_images[1:], str(stray))
    values = form(list(uploads))
    config = form_to_config(values, tmp_path / "runs")  # 4 photos counted, the captions not
    kept = keep_uploads(config)
    copies = [Path(p) for p in kept.instance_data]
    photos = [p for p in copies if p.suffix == ".png"]
    assert len(photos) == 4 and all(p.parent.name == "instance_images" for p in photos)
    assert photos[2].with_suffix(".txt").read_text() == "a photo of sks dog on a sofa"
    assert [p.with_suffix(".txt").exists() for p in photos] == [False, False, True, False]
    assert copies[-1] == stray  # matches no photo: left named, for the engine to report by its name

    with pytest.raises(ConfigError, match="needs 3 to 20 images, got 2"):
        form_to_config(form([*four_images[:2], str(caption)]), tmp_path / "runs")


# --- publish when training finishes ----------------------------------------------------------
SECRET = "hf_secretTokenOfTheJobManagerTests"


class FakePublish:
    """A publish() stand-in: records its calls, waits for `release`, then succeeds or raises `fail`."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[Path, PublishRequest]] = []
        self.entered, self.release, self.fail = threading.Event(), threading.Event(), fail

    def __call__(self, run_dir: Path, request: PublishRequest) -> SimpleNamespace:
        self.calls.append((run_dir, request))
        self.entered.set()
        self.release.wait(5)
        if self.fail is not None:
            raise self.fail
        return SimpleNamespace(repo_id=request.repo_id, url=f"https://hub.test/{request.repo_id}", commit="abc1234")


def test_job_manager_publishes_a_completed_training(tmp_path: Path) -> None:
    release, publish = threading.Event(), FakePublish()
    release.set()
    jobs = JobManager(fake_train(release), publish_fn=publish)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=3, instance_prompt="sks")
    jobs.start(config, publish=PublishRequest("tester/sks-dog", private=True, token=SECRET))

    assert publish.entered.wait(10)
    during = jobs.snapshot()
    assert during.active and during.publishing and during.phase == "publishing" and during.step == 3
    assert "publishing to tester/sks-dog" in during.message
    assert not jobs.cancel()  # an upload under way is not interrupted
    assert jobs.gpu_lock.acquire(blocking=False)  # generation may use the GPU meanwhile
    jobs.gpu_lock.release()
    nxt = jobs.start(config.replace(output_dir=str(tmp_path / "next")))  # so may the next training: not queued
    assert nxt.state != "queued" and nxt.queue_position is None
    publish.release.set()
    jobs.wait(10)
    done = jobs.snapshot(1)

    assert done.state == "completed" and done.phase == "done" and done.publish_error is None
    assert done.hub_url == "https://hub.test/tester/sks-dog"
    assert "Published to [tester/sks-dog](https://hub.test/tester/sks-dog) (private)" in done.message
    (run_dir, request), = publish.calls
    assert run_dir == tmp_path / "run" and request.token == SECRET and request.private
    assert SECRET not in repr(request) + repr(done) + repr(done.as_dict()) + repr(jobs._jobs)
    assert jobs._jobs[1].publish is None  # the token is dropped once used


@pytest.mark.parametrize("fail", [HubError("Cannot create x: 403 Forbidden."), RuntimeError(f"boom {SECRET}")])
def test_a_failed_publish_leaves_a_completed_run(
    tmp_path: Path, fail: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    release, publish = threading.Event(), FakePublish(fail)
    release.set()
    publish.release.set()
    jobs = JobManager(fake_train(release), publish_fn=publish)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=2, instance_prompt="sks")
    jobs.start(config, publish=PublishRequest("tester/sks-dog", token=SECRET))
    done = jobs.wait(10)

    assert done.state == "completed" and done.run_dir == str(tmp_path / "run") and done.hub_url is None
    assert done.publish_error in ("Cannot create x: 403 Forbidden.", "RuntimeError: boom hf_***")
    assert "publish it from the Publish tab" in done.message
    assert SECRET not in caplog.text + repr(done) and "Publishing run 1 failed" in caplog.text


def test_a_cancelled_training_is_not_published(tmp_path: Path) -> None:
    release, publish = threading.Event(), FakePublish()
    jobs = JobManager(fake_train(release), publish_fn=publish)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=50, instance_prompt="sks")
    jobs.start(config, publish=PublishRequest("tester/sks-dog", token=SECRET))
    assert jobs.cancel()
    release.set()
    done = jobs.wait(10)
    assert done.state == "cancelled" and publish.calls == [] and done.hub_url is None


def test_publish_request_needs_a_name_and_a_token_before_asking_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    from space.train_tab import publish_request, repo_suggestion

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert publish_request({"publish_to_hub": False, "hub_token": SECRET}, None) is None
    with pytest.raises(HubError, match="repo name to publish to is missing"):
        publish_request({"publish_to_hub": True, "hub_repo": " "}, None)
    with pytest.raises(HubError, match="Invalid repo id 'bad--name'"):
        publish_request({"publish_to_hub": True, "hub_repo": "bad--name", "hub_token": SECRET}, None)
    with pytest.raises(HubError, match="No Hugging Face token found"):
        publish_request({"publish_to_hub": True, "hub_repo": "sks-dog", "hub_token": ""}, None)
    assert repo_suggestion("zwx", "dog") == "zwx-dog-dreambooth"
    assert repo_suggestion("zwx", "toy car", "alice") == "alice/zwx-toy-car-dreambooth"


def test_scores_take_no_gpu_memory_from_the_training_only_ram() -> None:
    from space.memory import form_config, model_shapes
    from trainer.memory.estimate import SCORER_BYTES, SCORERS, estimate

    shapes = model_shapes(SDXL_BASE, "sdxl")
    plain = estimate(form_config(_memory_form(SDXL_BASE)), "cuda", shapes=shapes)
    scored = estimate(form_config(_memory_form(SDXL_BASE, score_checkpoints=True)), "cuda", shapes=shapes)
    assert SCORERS not in scored.weights_by_part  # the scorers run on the CPU
    assert scored.peak_ram - plain.peak_ram == SCORER_BYTES
    assert scored.peak_accelerator >= plain.peak_accelerator  # the scoring phase draws a prompt's images at once
