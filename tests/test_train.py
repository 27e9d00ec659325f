"""Tiny-model DreamBooth trainings on CPU: they check that something was learned or moved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_base_of
from train_helpers import denoising_loss, max_abs_diff, safetensors_dir, tiny_config

from trainer import CancelToken, train
from trainer.events import CheckpointEvent, PhaseEvent, ProgressEvent, SampleEvent, StepEvent


def test_full_with_prior_8bit_and_checkpointing_moves_the_denoiser_not_vae(tiny_full_base, subject_images, tmp_path):
    tiny_base = tiny_full_base
    events = []
    config = tiny_config(
        tiny_base.path, subject_images, tmp_path / "run", method="full", learning_rate=1e-3,
        with_prior_preservation=True, class_prompt="a photo of a square", num_class_images=3,
        class_cache_dir=str(tmp_path / "class-cache"), use_8bit_adam=True, gradient_checkpointing=True,
        validation_prompts=("a photo of sks square",), validation_steps=3, report_to="tensorboard",
    )
    result = train(config, on_event=events.append)

    assert result.status == "completed" and result.step == 6
    run = result.run_dir
    denoiser = tiny_base.denoiser
    base_denoiser, new_denoiser = safetensors_dir(tiny_base.path / denoiser), safetensors_dir(run / denoiser)
    assert max_abs_diff(base_denoiser, new_denoiser) > 1e-4, f"the {denoiser} did not move"
    for frozen in ("vae", *tiny_base.text_encoders):
        assert max_abs_diff(safetensors_dir(tiny_base.path / frozen), safetensors_dir(run / frozen)) == 0.0, frozen

    # The run folder describes itself: config, metrics, samples, TensorBoard events, card.
    assert json.loads((run / "config.json").read_text())["with_prior_preservation"] is True
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(m["prior_loss"] is not None for m in metrics)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000003-p0-0.png", "step-000006-p0-0.png"]
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "instance_prompt: a photo of sks square" in (run / "README.md").read_text()

    phases = [e.phase for e in events if isinstance(e, PhaseEvent)]
    # Two "loading" lines: the model, then (once the class images are made) how checkpointing runs.
    assert phases[:5] == ["loading", "class-images", "loading", "caching", "training"] and phases[-1] == "done"
    assert [e.message for e in events if isinstance(e, PhaseEvent)][2].startswith("Memory: gradient checkpointing")
    assert [e.step for e in events if isinstance(e, StepEvent)] == list(range(1, 7))
    assert [e.step for e in events if isinstance(e, SampleEvent)] == [3, 6]

    # Plain diffusers loads the output (a pipeline of the base's own class) and generates.
    pipe = tiny_base.pipeline_class.from_pretrained(run)
    image = pipe("a photo of sks square", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_class_image_cache_is_reused(tiny_base, subject_images, tmp_path):
    tiny_model_dir = tiny_base.path
    cache = tmp_path / "cache"
    common = dict(with_prior_preservation=True, class_prompt="a photo of a square", num_class_images=3,
                  class_cache_dir=str(cache), max_train_steps=1)
    first: list = []
    train(tiny_config(tiny_model_dir, subject_images, tmp_path / "a", **common), on_event=first.append)
    made = sorted(cache.rglob("class-*.png"))
    assert len(made) == 3 and len(list(cache.rglob("manifest.json"))) == 1
    stamps = {p: p.stat().st_mtime_ns for p in made}

    second: list = []
    train(tiny_config(tiny_model_dir, subject_images, tmp_path / "b", **common), on_event=second.append)
    assert not [e for e in second if isinstance(e, ProgressEvent) and e.phase == "class-images"]
    assert {p: p.stat().st_mtime_ns for p in sorted(cache.rglob("class-*.png"))} == stamps

    # Asking for more generates only the missing ones.
    third: list = []
    train(tiny_config(tiny_model_dir, subject_images, tmp_path / "c", **{**common, "num_class_images": 5}),
          on_event=third.append)
    progress = [e for e in third if isinstance(e, ProgressEvent) and e.phase == "class-images"]
    assert progress[-1].total == 2
    assert len(list(cache.rglob("class-*.png"))) == 5


def test_overfitting_lowers_the_loss_on_the_instance_images(tiny_base, subject_images, tmp_path):
    tiny_model_dir = tiny_base.path
    prompt = "a photo of sks square"
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", method="lora", learning_rate=1e-2,
                         lora_rank=8, max_train_steps=40, train_batch_size=2)
    result = train(config)
    before = denoising_loss(tiny_model_dir, subject_images, prompt)
    after = denoising_loss(tiny_model_dir, subject_images, prompt, lora_dir=result.run_dir)
    assert after < 0.8 * before, f"loss {before:.4f} -> {after:.4f}"


def test_lora_output_loads_in_plain_diffusers_and_changes_the_image(tiny_base, subject_images, tmp_path):
    tiny_model_dir = tiny_base.path
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", learning_rate=1e-2, max_train_steps=8,
                         train_text_encoder=True)
    result = train(config)
    assert result.weights == result.run_dir / "pytorch_lora_weights.safetensors"

    def image(with_lora: bool):
        pipe = tiny_base.pipeline_class.from_pretrained(tiny_model_dir)
        if with_lora:
            pipe.load_lora_weights(result.run_dir)
        out = pipe("a photo of sks square", num_inference_steps=3, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        return torch.from_numpy(out.images[0])

    plain, tuned = image(False), image(True)
    assert (plain - tuned).abs().mean() > 1e-3


def test_lora_with_checkpointing_trains_as_without_it(tiny_model_dir, subject_images, tmp_path):
    """Checkpointing recomputes, it does not change the arithmetic: 6 steps with and without it end
    with the same adapters, in fp32 to float rounding; in bf16 well inside what bf16 itself changes
    against fp32."""
    weights = {}
    for precision in ("no", "bf16"):
        for checkpointing in (False, True):
            config = tiny_config(tiny_model_dir, subject_images, tmp_path / f"run-{precision}-{checkpointing}",
                                 learning_rate=1e-3, gradient_checkpointing=checkpointing, mixed_precision=precision,
                                 use_8bit_adam=False)
            weights[precision, checkpointing] = safetensors_dir(train(config).run_dir)
    moved = max(w.float().abs().max().item() for k, w in weights["no", True].items() if ".lora.up." in k)
    assert moved > 1e-4, "the LoRA up (B) matrices, zero at the start, did not move"
    assert max_abs_diff(weights["no", False], weights["no", True]) < 1e-6
    bf16_itself = max_abs_diff(weights["no", False], weights["bf16", False])
    assert max_abs_diff(weights["bf16", False], weights["bf16", True]) < 0.5 * bf16_itself


def test_text_encoder_stops_training_after_its_fraction(tiny_model_dir, subject_images, tmp_path):
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", method="full", learning_rate=1e-3,
                         train_text_encoder=True, text_encoder_steps_fraction=0.5, checkpointing_steps=3,
                         checkpoints_total_limit=None)
    result = train(config)
    from safetensors.torch import load_file

    te_at_3 = load_file(result.run_dir / "checkpoints" / "checkpoint-000003" / "text_encoder.safetensors")
    te_final = safetensors_dir(result.run_dir / "text_encoder")
    te_base = safetensors_dir(tiny_model_dir / "text_encoder")
    moved = max((te_final[k] - te_base[k]).abs().max().item() for k in te_at_3)
    changed_after_3 = max((te_final[k] - te_at_3[k]).abs().max().item() for k in te_at_3)
    assert moved > 1e-5, "the text encoder never trained"
    assert changed_after_3 == 0.0, "the text encoder kept training after its fraction of the steps"


def _trainable(run: Path) -> dict[str, torch.Tensor]:
    return safetensors_dir(run / "checkpoints" / sorted(p.name for p in (run / "checkpoints").iterdir())[-1])


@pytest.mark.parametrize(("family", "method"), [(family, method) for family in ("sd", "sdxl", "sd3", "flux")
                                                 for method in ("lora", "full") if (family, method) != ("flux", "full")])
def test_resume_after_cancel_ends_with_the_same_weights(request, subject_images, tmp_path, family, method):
    tiny_model_dir = tiny_base_of(request, family).path
    common = dict(method=method, learning_rate=1e-3, max_train_steps=8, checkpointing_steps=8,
                  train_text_encoder=True, random_flip=True, with_prior_preservation=True,
                  class_prompt="a photo of a square", num_class_images=2, class_cache_dir=str(tmp_path / "cc"),
                  gradient_accumulation_steps=2, lr_scheduler="linear", lr_warmup_steps=2)
    straight = train(tiny_config(tiny_model_dir, subject_images, tmp_path / "straight", **common))
    assert straight.status == "completed"

    cancel = CancelToken()

    def stop_at_3(event):
        if isinstance(event, StepEvent) and event.step == 3:
            cancel.cancel()

    events: list = []
    interrupted_cfg = tiny_config(tiny_model_dir, subject_images, tmp_path / "resumed", **common)
    first = train(interrupted_cfg, on_event=lambda e: (events.append(e), stop_at_3(e)), cancel=cancel)
    assert first.status == "cancelled" and first.step == 3
    assert first.checkpoint is not None and first.checkpoint.name == "checkpoint-000003"
    assert [e.step for e in events if isinstance(e, CheckpointEvent)] == [3]

    # A half-written checkpoint (killed mid-save) is never taken for the latest one.
    (first.run_dir / "checkpoints" / ".tmp-checkpoint-000004").mkdir()
    resumed = train(interrupted_cfg.replace(resume_from_checkpoint="latest"))
    assert resumed.status == "completed" and resumed.step == 8

    assert max_abs_diff(_trainable(straight.run_dir), _trainable(resumed.run_dir)) == 0.0


def test_v_prediction_model_trains(tiny_vpred_model_dir, subject_images, tmp_path):
    result = train(tiny_config(tiny_vpred_model_dir, subject_images, tmp_path / "run", max_train_steps=2))
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_lora_is_also_saved_for_a1111_comfyui_and_kohya(request, subject_images, tmp_path, family):
    """The kohya-layout file holds the same matrices and the run's alpha, and a reader of that
    layout (diffusers' own kohya loader) draws with it exactly what the diffusers file draws."""
    from safetensors.torch import load_file

    tiny_base = tiny_base_of(request, family)

    config = tiny_config(tiny_base.path, subject_images, tmp_path / "run", learning_rate=1e-2, max_train_steps=4,
                         train_text_encoder=True, lora_rank=8, lora_alpha=4)
    run = train(config).run_dir
    kohya = load_file(run / "pytorch_lora_weights_kohya.safetensors")
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in kohya}
    for module in modules:
        assert {f"{module}.alpha", f"{module}.lora_down.weight", f"{module}.lora_up.weight"} <= kohya.keys()
        assert kohya[f"{module}.alpha"].item() == 4.0
    te_prefixes = {"sd": {"lora_te"}, "sdxl": {"lora_te1", "lora_te2"}}[tiny_base.family]
    assert {m.split("_text_model_")[0] for m in modules if m.startswith("lora_te")} == te_prefixes
    assert all(m.startswith(("lora_unet_", "lora_te")) for m in modules)
    diffusers_file = load_file(run / "pytorch_lora_weights.safetensors")
    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    same = [v for k, v in diffusers_file.items() if "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in k
            and ("lora.down" in k or "lora_A" in k)]
    assert len(same) == 1 and torch.equal(kohya[down], same[0])

    def image(weight_name: str):
        pipe = tiny_base.pipeline_class.from_pretrained(tiny_base.path)
        pipe.load_lora_weights(run, weight_name=weight_name)
        out = pipe("a photo of sks square", num_inference_steps=3, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        return torch.from_numpy(out.images[0])

    assert torch.allclose(image("pytorch_lora_weights.safetensors"), image("pytorch_lora_weights_kohya.safetensors"),
                          atol=1e-5)


@pytest.mark.parametrize("preservation", ["class-images", "base-prediction"])
def test_parked_parts_are_not_used_by_any_step_and_change_nothing(tiny_full_base, subject_images, tmp_path,
                                                                  monkeypatch, preservation):
    """On a GPU the VAE and the frozen text encoders wait in CPU RAM during the steps (trainer/memory/parking.py).
    Forced here on the CPU (where they would not move): no step may call them while parked, samples
    bring them back, and the run trains to the same weights as one that keeps them."""
    import trainer.memory.parking as parking

    tiny_base = tiny_full_base
    common = dict(method="full", learning_rate=1e-3, max_train_steps=4, with_prior_preservation=True,
                  preservation=preservation, class_prompt="a photo of a square", num_class_images=2,
                  class_cache_dir=str(tmp_path / "cache"), validation_prompts=("a photo of sks square",),
                  validation_steps=2)
    kept = train(tiny_config(tiny_base.path, subject_images, tmp_path / "kept", **common))

    made: list[parking.Parking] = []
    original_init = parking.Parking.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(parking.Parking, "__init__", recording_init)
    monkeypatch.setattr(parking, "parking_device", lambda device: torch.device("cpu"))
    calls: list[tuple[str, bool]] = []  # (part, parked at the time)
    import trainer.models as models

    original_load = models.load_components

    def load_and_watch(config):
        parts = original_load(config)
        for name, module in [("vae", parts.vae), *(("text_encoder", te) for te in parts.text_encoders)]:
            for sub in module.modules():
                sub.register_forward_pre_hook(
                    lambda *_, name=name: calls.append((name, bool(made) and made[0].parked)))
        return parts

    monkeypatch.setattr("trainer.loop.load_components", load_and_watch)
    events: list = []
    parked = train(tiny_config(tiny_base.path, subject_images, tmp_path / "parked", **common), on_event=events.append)

    assert len(made) == 1 and set(made[0].modules) == {"vae", *tiny_base.text_encoders}
    lines = [e.message for e in events if isinstance(e, PhaseEvent) and e.message.startswith("Memory: the VAE")]
    assert len(lines) == 1 and "wait in CPU RAM during the steps" in lines[0]
    assert not [c for c in calls if c[1]], "a parked part was used"
    assert {name for name, _ in calls} == {"vae", "text_encoder"}  # before parking, and for the samples
    assert [e.step for e in events if isinstance(e, SampleEvent)] == [2, 4] and not made[0].parked
    for name in (tiny_base.denoiser, "vae", *tiny_base.text_encoders):
        assert max_abs_diff(safetensors_dir(kept.run_dir / name), safetensors_dir(parked.run_dir / name)) == 0.0, name


def test_nothing_parks_when_the_steps_need_the_part(tiny_model_dir, subject_images, tmp_path, monkeypatch):
    """A trained text encoder stays, and so does the VAE when augmented photos are encoded every step."""
    import trainer.memory.parking as parking
    from trainer.families import detect_family

    parts = detect_family(str(tiny_model_dir)).load_components(str(tiny_model_dir), None, None)
    # Samples need the text encoder again: it parks, it is not freed.
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", validation_prompts=("a photo of sks square",))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # nothing moves here: for_run only decides
    assert set(parking.Parking.for_run(config, parts, cuda).modules) == {"vae", "text_encoder"}
    assert set(parking.Parking.for_run(config.replace(train_text_encoder=True), parts, cuda).modules) == {"vae"}
    augmented = config.replace(random_flip=True, center_crop=False)
    assert augmented.augments and set(parking.Parking.for_run(augmented, parts, cuda).modules) == {"text_encoder"}
    assert parking.Parking.for_run(augmented.replace(train_text_encoder=True), parts, cuda) is None
    assert parking.Parking.for_run(config, parts, cpu) is None
    # Nothing needs it again (no samples, no scores, a LoRA): it is freed, on any device.
    unsampled = config.replace(validation_prompts=())
    for device, waiting in ((cuda, {"vae"}), (cpu, set())):
        parked = parking.Parking.for_run(unsampled, parts, device)
        assert set(parked.modules) == waiting and set(parked.freed) == {"text_encoder"}
    assert parking.Parking.for_run(unsampled.replace(method="full"), parts, cpu) is None  # saved with the pipeline


def test_parking_the_vae_alone_keeps_a_trained_text_encoders_embeddings_fresh(tiny_model_dir, subject_images,
                                                                             tmp_path, monkeypatch):
    """With the text encoder trained for half the run only the VAE parks: no prompt may be cached before
    the encoder freezes, or the second half would train on the untrained encoder's embeddings."""
    import trainer.memory.parking as parking

    common = dict(method="full", learning_rate=1e-3, max_train_steps=4, train_text_encoder=True,
                  text_encoder_steps_fraction=0.5)
    kept = train(tiny_config(tiny_model_dir, subject_images, tmp_path / "kept", **common))
    monkeypatch.setattr(parking, "parking_device", lambda device: torch.device("cpu"))
    events: list = []
    parked = train(tiny_config(tiny_model_dir, subject_images, tmp_path / "parked", **common), on_event=events.append)
    assert any(isinstance(e, PhaseEvent) and e.message.startswith("Memory: the VAE waits in CPU RAM") for e in events)
    for name in ("unet", "text_encoder"):
        assert max_abs_diff(safetensors_dir(kept.run_dir / name), safetensors_dir(parked.run_dir / name)) == 0.0, name
