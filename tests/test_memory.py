"""The memory model (trainer/memory/estimate.py): parameter counts from configs, the optimizer's bytes, the
order of the estimates, a real step measured against the prediction, the check that refuses a
training that will not fit, and the app's preset picker and memory line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ui_fixtures import GPU16

from space.hardware import Hardware
from trainer.config import ConfigError, TrainConfig
from trainer.memory.estimate import TRAINING, GiB, estimate, needed, optimizer_state_bytes, weights_and_trainables
from trainer.memory.shapes import KNOWN_CONFIGS, known_shapes, parameter_counts, read_shapes

SD15, SDXL = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"


def _real_counts(folder: Path, encoders: tuple[str, ...]) -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
    }
    for name in encoders:
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        parts[name] = cls.from_pretrained(folder, subfolder=name)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


def test_parameter_counts_come_from_the_configs_alone(tiny_model_dir: Path, tiny_sdxl_model_dir: Path) -> None:
    for folder, encoders in (
        (tiny_model_dir, ("text_encoder",)),
        (tiny_sdxl_model_dir, ("text_encoder", "text_encoder_2")),
    ):
        shapes = read_shapes(str(folder))
        assert shapes.fallback is None and shapes.text_encoder_names == list(encoders)
        assert parameter_counts(shapes) == _real_counts(folder, encoders)
    # The releases' published sizes, from the known configs (what stands in offline).
    sd = {k: round(v / 1e6, 1) for k, v in parameter_counts(known_shapes("sd", "test")).items()}
    xl = {k: round(v / 1e6, 1) for k, v in parameter_counts(known_shapes("sdxl", "test")).items()}
    assert sd == {"unet": 859.5, "text_encoder": 123.1, "vae": 83.7}
    assert xl == {"unet": 2567.5, "text_encoder": 123.1, "text_encoder_2": 694.7, "vae": 83.7}


def test_unreadable_configs_fall_back_to_the_family_and_say_so(tmp_path: Path) -> None:
    shapes = read_shapes("nobody-here/never-downloaded", local_only=True, family="sdxl")
    assert shapes.fallback is not None and "SDXL" in shapes.fallback and shapes.configs == KNOWN_CONFIGS["sdxl"]
    assert shapes == known_shapes("sdxl", "another reason")  # the same architecture, whatever the reason
    with pytest.raises(Exception, match="not in the local Hub cache"):
        read_shapes("nobody-here/never-downloaded", local_only=True)  # no family to go by


@pytest.mark.parametrize("eight_bit", [False, True])
def test_optimizer_state_is_what_the_engines_optimizer_holds(tiny_model_dir: Path, eight_bit: bool) -> None:
    from diffusers import UNet2DConditionModel

    from trainer.optim import make_optimizer

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    params = list(unet.parameters())
    optimizer = make_optimizer(params, [], TrainConfig(use_8bit_adam=eight_bit), print)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    storages = {
        id(v.untyped_storage()): v.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    }
    assert optimizer_state_bytes([p.numel() for p in params], eight_bit) == sum(storages.values())


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_weights_and_gradients_are_those_of_the_engines_setup(
    tiny_model_dir: Path, tiny_sdxl_model_dir: Path, method: str, precision: str
) -> None:
    """The model counts bytes from the configs; the engine's prepare_for_training, run on the meta
    device, says what they are: every part's bytes and every trainable tensor must agree."""
    from trainer.memory.profiles import training_parts

    for folder in (tiny_model_dir, tiny_sdxl_model_dir):
        for text_encoder in (False, True):
            config = TrainConfig(
                pretrained_model=str(folder),
                method=method,
                mixed_precision=precision,
                train_text_encoder=text_encoder,
                lora_rank=3,
                resolution=32,
            )
            shapes = read_shapes(str(folder))
            parts = training_parts(shapes, config)
            modules = {
                "unet": parts.denoiser,
                "vae": parts.vae,
                **dict(zip(shapes.text_encoder_names, parts.text_encoders, strict=True)),
            }
            engine = {
                name: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
                for name, m in modules.items()
            }
            trained = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
            by_part, trainable = weights_and_trainables(config, shapes)
            assert by_part == engine
            assert sorted(trainable) == sorted(p.numel() for p in trained)
            assert all(p.dtype == torch.float32 for p in trained)  # hence 4-byte gradients


def _tiny(folder: Path, **changes) -> TrainConfig:
    return TrainConfig(
        pretrained_model=str(folder),
        resolution=128,
        method="full",
        use_8bit_adam=False,
        gradient_checkpointing=False,
        mixed_precision="no",
        cache_latents=False,
    ).replace(**changes)


def test_the_estimate_moves_the_right_way(tiny_model_dir: Path) -> None:
    base = _tiny(tiny_model_dir)
    plain = estimate(base, "cpu")
    checkpointed = estimate(base.replace(gradient_checkpointing=True), "cpu")
    assert checkpointed.activations < plain.activations * 0.8 and checkpointed.peak_accelerator < plain.peak_accelerator
    eight_bit = estimate(base.replace(use_8bit_adam=True), "cpu")
    assert eight_bit.optimizer_state < plain.optimizer_state * 0.4
    bigger = estimate(base.replace(resolution=256), "cpu")
    assert bigger.activations > 3 * plain.activations  # 4x the pixels
    batch = estimate(base.replace(train_batch_size=3), "cpu")
    assert 2.5 * plain.activations < batch.activations < 3.5 * plain.activations
    assert (
        estimate(base.replace(with_prior_preservation=True, class_prompt="a square"), "cpu").activations
        > 1.8 * plain.activations
    )  # instance and class rows


def test_parts_off_the_gpu_during_the_steps_are_what_the_engine_parks(
    tiny_model_dir: Path, tiny_sdxl_model_dir: Path, monkeypatch
) -> None:
    """On CUDA the training step's phase leaves out the VAE and frozen text encoders (trainer/memory/parking.py):
    the model's parked bytes are the bytes of the modules the engine's Parking moves, set up as the
    engine sets them up, and the phase is lower by exactly those."""
    import trainer.memory.estimate as memory
    from trainer.memory.parking import Parking
    from trainer.memory.profiles import training_parts

    for folder in (tiny_model_dir, tiny_sdxl_model_dir):
        shapes = read_shapes(str(folder))
        for changes in ({}, {"train_text_encoder": True}, {"cache_latents": False}):
            config = _tiny(folder, mixed_precision="fp16", **({"cache_latents": True} | changes))
            parts = training_parts(shapes, config)
            parking = Parking.for_run(config, parts, torch.device("cuda"))  # decides; moves nothing yet
            names = ["text_encoder", "text_encoder_2"]
            engine = {name: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
                      for name, m in (parking.modules.items() if parking else ())}
            predicted = estimate(config, "cuda", shapes=shapes)
            assert predicted.parked == engine and engine, (folder.name, changes)
            assert set(engine) == ({"vae"} if config.cache_latents else set()) | (
                set() if config.train_text_encoder else set(names[: len(shapes.text_encoder_names)]))
            if not changes:
                with monkeypatch.context() as patched:
                    patched.setattr(memory, "parked_parts", lambda *args: [])
                    kept = estimate(config, "cuda", shapes=shapes)
                assert kept.phases[TRAINING] - predicted.phases[TRAINING] == sum(engine.values())
                assert estimate(config, "cpu", shapes=shapes).parked == {}  # on the CPU nothing moves


def test_lora_is_far_below_full_fine_tuning_on_sd15() -> None:
    shapes = known_shapes("sd", "test")
    full = TrainConfig(method="full", mixed_precision="fp16", resolution=512)
    lora = full.replace(method="lora")
    big, small = estimate(full, "cuda", shapes=shapes), estimate(lora, "cuda", shapes=shapes)
    assert small.gradients + small.optimizer_state < 0.01 * (big.gradients + big.optimizer_state)
    assert big.gradients == 4 * 859_520_964  # every UNet weight, fp32
    assert needed(small) < 0.6 * needed(big)


def test_the_prediction_matches_a_real_steps_tensors(tiny_model_dir: Path) -> None:
    """A real engine step (the tiny model, as prepare_for_training sets it up, the engine's optimizer,
    the second step: optimizer state allocated), measured by torch's own MemTracker; the model's
    training-step bytes must be within 15%. Tensors, not RSS: at ~10 MB the tiny model's tensors
    would drown in the 500 MB process and the allocator's noise."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from trainer.families import detect_family
    from trainer.models import prepare_for_training
    from trainer.optim import make_optimizer

    config = _tiny(tiny_model_dir, resolution=64, train_batch_size=2, use_8bit_adam=True)
    parts = detect_family(str(tiny_model_dir)).load_components(str(tiny_model_dir), None, None)
    prepare_for_training(parts, config, torch.device("cpu"))
    params = [p for p in parts.denoiser.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, [], config, print)
    ids = torch.zeros(2, 77, dtype=torch.long)
    with torch.no_grad():
        cond = parts.family.encode(parts, ids)

    def step() -> None:
        latents = torch.randn(2, 4, 32, 32)
        pred = parts.family.predict(parts.denoiser, latents, torch.tensor([3, 500]), cond, torch.zeros(2, 6))
        torch.nn.functional.mse_loss(pred.float(), latents).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from here on
    tracker = MemTracker()
    tracker.track_external(parts.denoiser, parts.vae, parts.text_encoder, optimizer)
    with tracker:
        step()
    measured = max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    predicted = estimate(config, "cpu").phases[TRAINING] - estimate(config, "cpu").caches
    assert 0.85 < predicted / measured < 1.15, (predicted, measured)


def test_check_fits_refuses_with_what_to_change(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.memory import advice as memory

    config = _tiny(tiny_model_dir, resolution=256)
    need = needed(estimate(config, "cpu"))
    with_savings = needed(estimate(config.replace(gradient_checkpointing=True), "cpu"))
    assert with_savings < need
    capacity = (need + with_savings) // 2  # fits with checkpointing, not without
    monkeypatch.setattr(memory, "device_capacity", lambda device: (capacity, "a small machine"))
    with pytest.raises(ConfigError) as refused:
        memory.check_fits(config, torch.device("cpu"))
    message = str(refused.value)
    assert "does not fit a small machine" in message and f"{need / GiB:.1f} GiB" in message
    assert "turn on gradient checkpointing (`gradient_checkpointing`)" in message
    memory.check_fits(config.replace(gradient_checkpointing=True), torch.device("cpu"))  # fits: no error
    monkeypatch.setattr(memory, "device_capacity", lambda device: (1, "a tiny machine"))
    with pytest.raises(ConfigError, match="Even with every saving"):
        memory.check_fits(config, torch.device("cpu"))


@pytest.mark.parametrize("launch", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_a_deepspeed_or_fsdp_launch_is_not_refused_by_a_model_of_one_gpu(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, launch: str) -> None:
    """ZeRO-Offload exists to train on cards the one-GPU estimate says are too small; the memory model
    does not model sharding or offload, so under those launches it warns instead of refusing."""
    from trainer.events import CancelToken, WarningEvent
    from trainer.loop import Run, check_memory
    from trainer.memory import advice as memory

    config = _tiny(tiny_model_dir, resolution=256)
    monkeypatch.setattr(memory, "device_capacity", lambda device: (1, "a tiny GPU"))
    events: list = []
    run = Run(config, events.append, CancelToken())
    with pytest.raises(ConfigError, match="does not fit a tiny GPU"):
        check_memory(run, torch.device("cuda"))
    monkeypatch.setenv(launch, "true")
    check_memory(run, torch.device("cuda"))
    (warning,) = [e.message for e in events if isinstance(e, WarningEvent)]
    assert warning.startswith("Memory not estimated before loading: the memory model does not know how DeepSpeed")


def test_the_cli_prints_the_estimate_and_the_advice(tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from trainer.__main__ import main

    args = [
        "memory",
        "--pretrained-model",
        str(tiny_model_dir),
        "--resolution",
        "256",
        "--method",
        "full",
        "--no-gradient-checkpointing",
        "--no-use-8bit-adam",
        "--no-cache-latents",
        "--device",
        "cpu",
    ]
    assert main([*args, "--memory-gib", "64"]) == 0
    out = capsys.readouterr().out
    assert "| optimizer state |" in out and "fits (" in out and "does not fit" not in out
    assert main([*args, "--memory-gib", "0.001"]) == 0
    assert "does not fit" in capsys.readouterr().out


# --- the app: the preset picker and the memory line ------------------------------------------------
CARDS = (8, 12, 16, 24, 48, 80)  # GB as sold; torch reports ~93% of it in GiB
RANKS = {"sd": 4, "sdxl": 16}  # the app's LoRA rank per family (space.presets.FAMILY_PRESETS)


@pytest.mark.parametrize(("family", "model"), [("sd", SD15), ("sdxl", SDXL)])
def test_the_picker_takes_the_best_setting_that_fits(family: str, model: str) -> None:
    from space.hardware_fit import PICKER_PRIOR, candidates, pick

    shapes = known_shapes(family, "test")
    native, rank = shapes.native_resolution, RANKS[family]
    ranked = list(candidates(native, "fp16"))

    def fits(settings: dict, capacity: float) -> bool:
        config = TrainConfig(pretrained_model=model, lora_rank=rank, **PICKER_PRIOR, **settings)
        return needed(estimate(config, "cuda", shapes=shapes)) <= capacity

    for gb in CARDS:
        capacity = gb * 0.93 * GiB
        chosen = pick(Hardware("cuda", f"{gb} GB card", gb * 0.93), family, model, rank)
        if "Nothing fits" in chosen.why:  # then nothing does, down to the smallest setting
            assert not any(fits(settings, capacity) for settings in ranked) and chosen.settings == ranked[-1]
            continue
        position = ranked.index(chosen.settings)
        assert [fits(settings, capacity) for settings in ranked[: position + 1]] == [False] * position + [True]
        assert "Picked for your GPU" in chosen.why


def test_what_the_picker_takes_on_common_cards() -> None:
    from space.hardware_fit import pick

    def take(gb: float, family: str, model: str) -> dict:
        return pick(Hardware("cuda", "card", gb), family, model, RANKS[family]).settings

    assert take(7.5, "sd", SD15)["method"] == "lora"  # 8 GB: LoRA (diffusers: SD LoRA fits 8 GB)
    assert take(11.2, "sd", SD15)["method"] == "full"  # 12 GB: full DreamBooth fits in 10 GB with the savings
    best = take(79.2, "sd", SD15)
    assert (
        best["method"],
        best["train_text_encoder"],
        best["use_8bit_adam"],
        best["gradient_checkpointing"],
        best["resolution"],
        best["train_batch_size"],
    ) == ("full", True, False, False, 512, 2)
    assert take(14.6, "sdxl", SDXL)["resolution"] == 1024  # 16 GB: SDXL LoRA at 1024 px (diffusers' recipe)
    assert take(22.0, "sdxl", SDXL)["method"] == "lora"  # full SDXL needs ~40 GB even with 8-bit Adam
    assert take(79.2, "sdxl", SDXL)["method"] == "full"


def test_the_app_says_whether_the_form_fits_the_gpu() -> None:
    from space.hardware_fit import form_memory_note

    form = {
        "base_model": SDXL,
        "method": "full",
        "resolution": 1024,
        "use_8bit_adam": False,
        "gradient_checkpointing": False,
        "mixed_precision": "fp16",
        "train_batch_size": 1,
        "train_text_encoder": True,
        "with_prior_preservation": True,
        "lora_rank": 16,
        "cache_latents": True,
    }
    too_big = form_memory_note(GPU16, form)
    assert too_big is not None and "Does not fit your GPU" in too_big and "of 15.8 GB" in too_big
    assert "Sized as SDXL base 1.0" in too_big  # its config files are not on this machine
    small = {
        **form,
        "method": "lora",
        "train_text_encoder": False,
        "use_8bit_adam": True,
        "gradient_checkpointing": True,
    }
    # SDXL decodes its class images in an fp32 VAE: four 1024 px images at once do not fit 16 GB
    assert "Generate class images one at a time" in form_memory_note(GPU16, small)
    assert "Fits your GPU" in form_memory_note(GPU16, {**small, "sample_batch_size": 1})
    assert form_memory_note(GPU16, {**small, "resolution": None}) is None  # a number box being edited
    assert form_memory_note(Hardware("cpu", "CPU", None), small) is None  # no GPU: nothing to size


@pytest.mark.slow
def test_the_shipped_profiles_are_the_engines_of_today() -> None:
    """The app's SD 1.5 profiles ship (trainer/assets/memory-profiles.json); a change to the engine's
    setup or step must remake them (`python -m trainer.memory.profiles --fresh`). One, traced afresh."""
    from trainer.memory import profiles as memory_profiles
    from trainer.memory.profiles import step_profile

    shapes = known_shapes("sd", "test")
    config = TrainConfig(
        method="lora", lora_rank=4, mixed_precision="fp16", gradient_checkpointing=True, resolution=512
    )
    shipped = step_profile(shapes, config, "cuda", one_row=False)
    memory_profiles._CACHE.clear()  # forget it: the next call traces
    fresh = step_profile(shapes, config, "cuda", one_row=False)
    memory_profiles._SHIPPED_LOADED = False  # let the next test load the file again
    memory_profiles._CACHE.clear()
    for rows, side in ((2, 64), (4, 64), (2, 96)):
        assert shipped.peak(rows, side * side) == fresh.peak(rows, side * side)
