"""Engine parts on their own: dtypes, optimizer fallback, loss weighting, checkpoint retention."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from train_helpers import tiny_config

from trainer import TrainConfig, train
from trainer.checkpoints import list_checkpoints
from trainer.loss import Denoising, FlowMatching, Noised, dreambooth_loss, target_for
from trainer.models import load_components, prepare_for_training
from trainer.optim import make_optimizer


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_keeps_trainable_weights_fp32_and_frozen_ones_bf16(tiny_base, subject_images, tmp_path, method):
    if method == "full" and tiny_base.family == "flux":
        method = "lora"  # FLUX.1 is not fine-tuned in full (test_flow_families: the refusal)
    config = tiny_config(tiny_base.path, subject_images, tmp_path / "run", method=method, mixed_precision="bf16",
                         train_text_encoder=True)
    parts = load_components(config)
    prepare_for_training(parts, config, torch.device("cpu"))
    assert len(parts.text_encoders) == len(tiny_base.text_encoders)
    trained = len(tiny_base.trainable)  # the CLIP encoders; T5 (SD 3, FLUX) never trains
    for i, module in enumerate((parts.denoiser, *parts.text_encoders)):
        trainable = [p for p in module.parameters() if p.requires_grad]
        frozen = [p for p in module.parameters() if not p.requires_grad]
        assert (bool(trainable) == (i <= trained)) and all(p.dtype == torch.float32 for p in trainable)
        assert all(p.dtype == torch.bfloat16 for p in frozen)
        if method == "lora":
            assert frozen, "LoRA must leave the base weights frozen"
    assert not any(p.requires_grad for p in parts.vae.parameters())


def test_bf16_training_runs_on_cpu(tiny_model_dir, subject_images, tmp_path):
    result = train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", mixed_precision="bf16",
                               max_train_steps=2))
    assert result.status == "completed"


def test_without_bitsandbytes_falls_back_to_torch_adamw_with_a_reason(tiny_model_dir, subject_images, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    notes: list[str] = []
    param = torch.nn.Parameter(torch.zeros(8))
    opt = make_optimizer([param], [], tiny_config(tiny_model_dir, subject_images, tmp_path), notes.append)
    assert type(opt) is torch.optim.AdamW
    assert len(notes) == 1 and "bitsandbytes failed to import" in notes[0] and "pip install bitsandbytes" in notes[0]


def test_8bit_adam_is_used_when_available(tiny_model_dir, subject_images, tmp_path):
    import bitsandbytes as bnb

    param = torch.nn.Parameter(torch.zeros(8192))
    opt = make_optimizer([param], [], tiny_config(tiny_model_dir, subject_images, tmp_path), lambda m: None)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    param.grad = torch.ones_like(param)
    opt.step()
    assert any(t.dtype == torch.uint8 for state in opt.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def test_loss_target_follows_prediction_type():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    eps = DDPMScheduler(prediction_type="epsilon")
    vpred = DDPMScheduler(prediction_type="v_prediction")
    assert torch.equal(target_for(eps, latents, noise, t), noise)
    assert torch.allclose(target_for(vpred, latents, noise, t), vpred.get_velocity(latents, noise, t))


def test_prior_loss_is_weighted_and_min_snr_downweights_easy_timesteps(tiny_model_dir, subject_images, tmp_path):
    pred, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    target[1] *= 2  # class row error 4, instance row error 1
    config = tiny_config(tiny_model_dir, subject_images, tmp_path, prior_loss_weight=0.5)
    parts = dreambooth_loss(pred, Noised(pred, torch.tensor([5, 5]), target, None), n_instance=1, config=config)
    assert parts.instance == pytest.approx(1.0) and parts.prior == pytest.approx(4.0)
    assert parts.total.item() == pytest.approx(1.0 + 0.5 * 4.0)

    # Min-SNR-5 weighs each row by min(SNR, 5) / SNR: about 5/SNR at t=5 (SNR huge), 1 at t=999 (SNR < 5).
    latents = torch.zeros(2, 4, 8, 8)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    noised = Denoising().noised(DDPMScheduler(), latents, gens, config.replace(snr_gamma=5.0))
    assert noised.weights is not None and noised.weights.shape == (2,)
    easy = Noised(pred[:1], torch.tensor([5]), target[:1], None)
    weights = torch.clamp(compute_snr(DDPMScheduler(), easy.timesteps), max=5.0) / compute_snr(DDPMScheduler(), easy.timesteps)
    weighted = dreambooth_loss(pred[:1], Noised(pred[:1], easy.timesteps, target[:1], weights), 1, config)
    assert weighted.instance < 0.01


def test_flow_matching_interpolates_noise_and_latents_on_the_schedulers_sigmas(tiny_model_dir, subject_images, tmp_path):
    """noisy = (1 - σ)·x + σ·ε with σ one of the scheduler's (shifted) sigmas, target ε − x; logit-normal σ
    cluster in the middle, the same generators give the same draw (a resume's bit-exact batches)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = tiny_config(tiny_model_dir, subject_images, tmp_path)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents = torch.randn(64, 4, 4, 4)

    def draw(scheme: str) -> Noised:
        gens = [torch.Generator().manual_seed(i) for i in range(64)]
        return FlowMatching().noised(scheduler, latents, gens, config.replace(weighting_scheme=scheme))

    noised = draw("logit_normal")
    noise = noised.target + latents
    sigma = ((noised.noisy - latents) / (noise - latents)).flatten(1).median(dim=1).values
    assert torch.allclose(noised.noisy, (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise,
                          atol=1e-5)
    known = scheduler.sigmas[:-1]
    assert all(torch.isclose(known, s, atol=1e-4).any() for s in sigma)  # on the schedule
    assert torch.allclose(noised.timesteps, sigma * 1000, atol=0.1)
    assert torch.equal(draw("logit_normal").noisy, noised.noisy)
    assert torch.equal(noised.weights, torch.ones(64))
    uniform = draw("uniform")
    # σ shifted by 3 sits high; logit-normal draws fewer of the extremes than uniform does.
    extreme = lambda n: ((n.timesteps < 300) | (n.timesteps > 980)).float().mean()  # noqa: E731
    assert extreme(noised) < extreme(uniform)
    assert draw("sigma_sqrt").weights.min() >= 1  # 1/σ², σ ≤ 1


def test_only_the_last_k_checkpoints_are_kept(tiny_model_dir, subject_images, tmp_path):
    result = train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", checkpointing_steps=2,
                               checkpoints_total_limit=2, max_train_steps=6, gradient_checkpointing=True,
                               train_text_encoder=True, offset_noise=0.1, snr_gamma=5.0))
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["checkpoint-000004", "checkpoint-000006"]


def test_own_class_images_are_used_before_generating(tiny_model_dir, subject_images, tmp_path):
    from PIL import Image

    own = tmp_path / "own-class"
    own.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i * 100, 50, 50)).save(own / f"c{i}.png")
    events: list = []
    train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", with_prior_preservation=True,
                      class_prompt="a photo of a square", num_class_images=3, class_data_dir=str(own),
                      class_cache_dir=str(tmp_path / "cache"), max_train_steps=1), on_event=events.append)
    assert len(list((tmp_path / "cache").rglob("class-*.png"))) == 1  # 3 wanted, 2 given: 1 generated


def test_cancel_during_class_images_keeps_what_was_generated(tiny_model_dir, subject_images, tmp_path):
    from trainer import CancelToken
    from trainer.events import ProgressEvent

    cancel = CancelToken()

    def on_event(event):
        if isinstance(event, ProgressEvent) and event.phase == "class-images":
            cancel.cancel()

    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", with_prior_preservation=True,
                         class_prompt="a photo of a square", num_class_images=6, sample_batch_size=2,
                         class_cache_dir=str(tmp_path / "cache"))
    result = train(config, on_event=on_event, cancel=cancel)
    assert result.status == "cancelled" and result.step == 0 and result.weights is None
    assert len(list((tmp_path / "cache").rglob("class-*.png"))) == 2  # one batch, then it stopped

    # The next run resumes the cache: only the 4 missing images are generated.
    events: list = []
    train(config.replace(output_dir=str(tmp_path / "run2"), max_train_steps=1), on_event=events.append)
    assert [e.total for e in events if isinstance(e, ProgressEvent) and e.phase == "class-images"][-1] == 4


def test_each_image_trains_with_its_own_caption(tiny_model_dir, subject_images, tmp_path):
    from trainer.data.batches import BatchSource
    from trainer.data.photos import ImageSet, collect_image_paths, read_captions, split_caption_files

    uploaded = tmp_path / "upload" / "subject_3.txt"  # named explicitly, as an upload is
    uploaded.parent.mkdir()
    uploaded.write_text("a photo of sks square, upside down\n")
    (subject_images / "subject_1.txt").write_text("a photo of sks square on a beach")
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", train_batch_size=4,
                         instance_data=(str(subject_images), str(uploaded)))
    sources, named = split_caption_files(config.instance_data, config.caption_extension)
    paths = collect_image_paths(sources)
    captions = read_captions(paths, config.caption_extension, "sks", named)
    assert captions == [None, "a photo of sks square on a beach", None, "a photo of sks square, upside down"]

    parts = load_components(config)
    prompts = [c or config.instance_prompt for c in captions]
    source = BatchSource(config, parts, ImageSet(paths), None, torch.device("cpu"), instance_prompts=prompts)
    source.cache_latents(lambda done, total: None)
    batch = source.batch(0)  # one epoch: the 4 images in a seeded order
    tok = parts.tokenizer
    seen = {tok.decode(ids, skip_special_tokens=True).strip() for ids in batch.input_ids}
    assert seen == {"a photo of sks square", "a photo of sks square on a beach", "a photo of sks square , upside down"}
    # each row's prompt belongs to its own image: match latents to the images' cached means
    means = source._moments["instance"][0] * parts.vae.config.scaling_factor
    for latent, ids in zip(batch.latents, batch.input_ids, strict=True):
        image = int(((means - latent[None]) ** 2).flatten(1).sum(1).argmin())
        assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",").strip() == prompts[image]

    with_captions_off = read_captions(paths, "", "sks", named)
    assert with_captions_off == [None] * 4


def test_sdxl_time_ids_are_the_original_size_and_the_crop_actually_taken(tiny_sdxl_model_dir, tmp_path):
    """Random crops and flips of non-square photos: each row's time ids must name the photo's real size
    and the square the batch's pixels came from (the VAE is replaced by the identity to see them)."""
    import numpy as np
    from PIL import Image

    from trainer.data.batches import BatchSource
    from trainer.data.photos import ImageSet, _resize_short_side, load_rgb

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(80, 48), (40, 72), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    config = tiny_config(tiny_sdxl_model_dir, folder, tmp_path / "run", center_crop=False, random_flip=True,
                         train_batch_size=3)
    parts = load_components(config)
    paths = sorted(folder.iterdir())
    source = BatchSource(config, parts, ImageSet(paths), None, torch.device("cpu"))
    source._encode = lambda pixels: (pixels, torch.zeros_like(pixels))  # latents = the pixels themselves

    seen = set()
    for micro_step in range(4):
        batch = source.batch(micro_step)
        for latent, info in zip(batch.latents, batch.image_info, strict=True):
            pixels = latent / parts.vae.config.scaling_factor
            oh, ow, top, left, th, tw = (int(v) for v in info)
            assert (th, tw) == (32, 32)
            path = next(p for p in paths if load_rgb(p).size == (ow, oh))  # the photo's real size
            resized = _resize_short_side(load_rgb(path), 32)
            expected = [np.asarray(resized)[top:top + 32, left:left + 32]]  # as cropped ...
            mirrored = np.asarray(resized)[:, ::-1]
            expected.append(mirrored[top:top + 32, left:left + 32])  # ... or mirrored, left read in the mirror
            got = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round()
            assert any(np.abs(got - e).max() < 1.0 for e in expected), (path.name, top, left)
            seen.add((path.name, top, left))
    assert len({(name, top, left) for name, top, left in seen if name == "p0.png"}) > 1, "the crops never moved"


def test_8bit_adamw_gives_way_where_the_strategy_shards_the_optimizer_and_says_why():
    from trainer.optim import sharding_optimizer_note

    config = TrainConfig(use_8bit_adam=True)
    assert sharding_optimizer_note(config, "ddp", offload=False) is None  # DDP and one process keep it
    assert "DeepSpeed's CPU Adam" in sharding_optimizer_note(config, "deepspeed", offload=True)
    for how, name in (("deepspeed", "DeepSpeed ZeRO"), ("fsdp", "FSDP")):
        note = sharding_optimizer_note(config, how, offload=False)
        assert note.startswith("Optimizer: torch AdamW instead of 8-bit AdamW") and name in note
    # Nothing to say when 8-bit was not asked for.
    assert sharding_optimizer_note(config.replace(use_8bit_adam=False), "fsdp", offload=False) is None


@pytest.mark.parametrize(("name", "kind", "machines"), [
    ("multi_gpu", "MULTI_GPU", 1), ("two_machines", "MULTI_GPU", 2), ("zero2_offload", "DEEPSPEED", 1),
    ("fsdp", "FSDP", 1)])
def test_the_shipped_accelerate_configs_load_as_accelerate_reads_them(name, kind, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == kind and config.num_machines == machines
    if kind == "DEEPSPEED":  # ZeRO-2 with the optimizer state offloaded: what the engine's choice reads
        assert config.deepspeed_config["zero_stage"] == 2 and config.deepspeed_config["offload_optimizer_device"] == "cpu"
    if kind == "FSDP":  # the engine gathers weights with FSDP1's summon_full_params; LoRA needs orig params
        assert config.fsdp_config["fsdp_version"] == 1 and config.fsdp_config["fsdp_use_orig_params"] is True


def test_the_eta_counts_the_checkpoints_scorings_and_samplings_to_come_and_does_not_rise() -> None:
    """A run of 100 steps at 0.1 s, a scored checkpoint every 50 (2 s, as the base model's scoring took) and 4
    validation images every 25 steps: the ETA is the steps left plus what is still to come, from the first
    timed step on, and it never rises while the machine's pace holds."""
    from types import SimpleNamespace

    from trainer.loop import StepLog, upcoming

    config = TrainConfig(max_train_steps=100, checkpointing_steps=50, score_checkpoints=True, score_samples=2,
                         score_inference_steps=10, validation_prompts=("a", "b"), num_validation_images=2,
                         validation_steps=25, validation_inference_steps=5)
    assert upcoming(config, 0) == {"checkpoint": 2, "sample": 4}
    assert upcoming(config.replace(max_train_steps=120), 100) == {"checkpoint": 1, "sample": 0}  # the last, scored
    scorer = SimpleNamespace(images_per_checkpoint=8)  # 2 images x (the two fidelity prompts + 2 recontexts)
    log = StepLog(SimpleNamespace(config=config, scoring=SimpleNamespace(last_seconds=2.0, scorer=scorer),
                                  is_main=False), first_step=0)
    per_image_step = 2.0 / (8 * 10)
    etas = []
    for step in range(1, 101):
        etas.append(log.eta(step, 0.5 if step == 1 else 0.1))  # the first step warms up
        if step % 50 == 0:
            log.took("checkpoint", 2.0)
        if step % 25 == 0:
            log.took("sample", per_image_step * 4 * 5)
    assert etas[0] is None
    assert etas[1] == pytest.approx(98 * 0.1 + 2 * 2.0 + 4 * 0.5)  # 98 steps, 2 scored checkpoints, 4 samplings
    assert all(later <= earlier + 1e-9 for earlier, later in zip(etas[1:], etas[2:], strict=False))
    assert etas[-1] == pytest.approx(0.0)
