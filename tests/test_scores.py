"""Scores of checkpoints (trainer/scores/measure.py, scoring.py), the export of a checkpoint (trainer/export.py)
and the card's metrics, on the tiny SD with tiny random DINOv2 and CLIP models loaded through
`from_pretrained` as the real ones are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import tiny_config

from trainer import train
from trainer.config import ConfigError
from trainer.events import PhaseEvent, ScoreEvent, WarningEvent

CLASS_PROMPT = "a photo of a square"


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tiny_scorers import build_tiny_scorers

    return build_tiny_scorers(tmp_path_factory.mktemp("scorers"))


def scored_config(model: Path, images: Path, out: Path, scorers: tuple[Path, Path], **changes):
    settings = {"score_checkpoints": True, "checkpointing_steps": 2, "score_samples": 2, "score_inference_steps": 2,
                "score_image_model": str(scorers[0]), "score_clip_model": str(scorers[1]),
                "with_prior_preservation": True, "preservation": "base-prediction", "class_prompt": CLASS_PROMPT}
    return tiny_config(model, images, out, **{**settings, **changes})


@dataclass
class _Images:
    images: list[Image.Image]


class FixedImages:
    """A stand-in pipeline that draws the given pictures whatever it is asked: what a model that reproduces
    its training photos (or draws the subject for every prompt) would return."""

    def __init__(self, images: list[Image.Image]) -> None:
        self.pictures, self.drawn = images, 0

    def __call__(self, prompts: list[str], **kwargs) -> _Images:
        first, self.drawn = self.drawn, self.drawn + len(prompts)
        return _Images([self.pictures[i % len(self.pictures)] for i in range(first, self.drawn)])


@pytest.fixture
def scorer(tiny_model_dir, subject_images, tmp_path, tiny_scorers):
    from trainer.data.photos import collect_image_paths, load_rgb
    from trainer.scores.measure import HubEmbedders, Scorer

    config = scored_config(tiny_model_dir, subject_images, tmp_path / "run", tiny_scorers)
    embedders = HubEmbedders(str(tiny_scorers[0]), str(tiny_scorers[1]))
    photos = [load_rgb(p) for p in collect_image_paths([subject_images])]
    return Scorer(embedders, photos, config, batch=config.score_samples), photos


@pytest.fixture
def base_pipe(tiny_model_dir):
    from trainer.run_folder import load_pipeline

    pipe = load_pipeline(tiny_model_dir, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def without_time(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}


def test_scores_are_the_same_for_the_same_model_and_seeds(scorer, base_pipe):
    scorer, _ = scorer
    first = scorer.score(base_pipe, 0)
    second = scorer.score(base_pipe, 0)
    assert first["base"] and "base" not in second  # the first pipeline scored is the reference
    assert {k: first[k] for k in ("subject", "subject_clip", "prompt", "memorisation")} == \
           {k: second[k] for k in ("subject", "subject_clip", "prompt", "memorisation")}


def test_drawing_one_image_at_a_time_scores_as_drawing_them_together(scorer, base_pipe):
    from trainer.scores.measure import Scorer

    scorer, photos = scorer
    together = scorer.score(base_pipe, 0)
    one_by_one = Scorer(scorer.embedders, photos, scorer.config, batch=1).score(base_pipe, 0)
    for key in ("subject", "subject_in_context", "prompt", "memorisation"):
        assert one_by_one[key] == pytest.approx(together[key], abs=2e-4), key


def test_drift_is_zero_and_diversity_kept_whole_when_the_checkpoint_is_the_base_model(scorer, base_pipe):
    scorer, _ = scorer
    scorer.score(base_pipe, 0)
    again = scorer.score(base_pipe, 10)
    assert again["drift"] == 0.0
    assert again["div_kept"] == pytest.approx(1.0)


def test_a_class_that_now_draws_the_subject_has_drifted(scorer, base_pipe):
    scorer, photos = scorer
    scorer.score(base_pipe, 0)
    drifted = scorer.score(FixedImages(photos), 10)  # every prompt, the class one too, draws the photos
    assert drifted["drift"] > 0.5
    assert drifted["div_kept"] is not None


def test_memorisation_is_highest_when_a_sample_is_a_training_photo(scorer, base_pipe):
    scorer, photos = scorer
    drawn = scorer.score(base_pipe, 0)
    copied = scorer.score(FixedImages(photos), 10)
    assert copied["memorisation"] == pytest.approx(1.0, abs=1e-4)
    assert copied["memorisation"] > drawn["memorisation"]
    assert copied["memorised"] and not drawn["memorised"]
    assert drawn["memorisation_threshold"] == copied["memorisation_threshold"] < 1.0


def test_the_memorisation_threshold_sits_between_other_photos_and_a_copy():
    from trainer.scores.measure import memorisation_threshold

    photos = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    # nearest other photo: cos = 0.8 (both pairs with the middle one); 90% of the way to a copy is 0.98
    assert memorisation_threshold(photos) == pytest.approx(0.98)
    assert memorisation_threshold(photos[:1]) == pytest.approx(0.9)  # one photo: the fixed fallback


def test_training_scores_the_base_and_every_checkpoint_and_the_last_step(
        tiny_model_dir, subject_images, tmp_path, tiny_scorers):
    from trainer.scores.measure import read_scores

    events = []
    config = scored_config(tiny_model_dir, subject_images, tmp_path / "run", tiny_scorers,
                           max_train_steps=5, checkpointing_steps=2, checkpoints_total_limit=1)
    result = train(config, on_event=events.append)
    rows = read_scores(result.run_dir)
    assert [r["step"] for r in rows] == [0, 2, 4, 5]  # the last step is checkpointed and scored too
    assert rows[0]["base"] and rows[0]["drift"] == 0.0
    scored = [e for e in events if isinstance(e, ScoreEvent)]
    assert [e.step for e in scored] == [0, 2, 4, 5]
    assert all(e.scores["seconds"] > 0 for e in scored)
    assert any(isinstance(e, PhaseEvent) and e.phase == "scoring" and "Scored step 2 in" in e.message for e in events)
    # A random tiny model learns no subject its random embedders can see: the rule says so and picks none.
    assert scored[-1].pick is None and "the subject was not learned" in scored[-1].pick_reason
    assert json.loads((result.run_dir / "run.json").read_text())["weights_step"] == 5


def test_the_toy_model_is_scored_by_the_toy_worlds_judge_which_registers_itself() -> None:
    import trainer.scores.during_training  # noqa: F401  what a training run imports
    from trainer.config import TrainConfig
    from trainer.scores.measure import MODEL_EMBEDDERS, load_embedders
    from trainer.toyworld import TOY_MODEL_DIR

    assert TOY_MODEL_DIR.resolve() in MODEL_EMBEDDERS  # registered by trainer/toyworld/score.py, not looked up by path
    assert load_embedders(TrainConfig(pretrained_model=str(TOY_MODEL_DIR))).label == "toy judge"


class _OneShardedProcess:
    """What trainer/sharded.py asks of accelerate's Accelerator, for one process (no DeepSpeed launched)."""

    is_main_process, num_processes = True, 1

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        (Path(folder) / "pytorch_model.bin").write_bytes(b"its part of the weights and optimizer")


@pytest.mark.parametrize("sharded", [False, True], ids=["one process", "DeepSpeed or FSDP"])
def test_pruning_keeps_the_pick_besides_the_newest_checkpoints(tmp_path, sharded):
    from trainer import checkpoints as ckpt
    from trainer import sharded as sharded_ckpt

    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def save(step: int, **protect) -> None:
        state = ckpt.TrainingState(step, True)
        if sharded:
            sharded_ckpt.save_checkpoint(tmp_path, state, _OneShardedProcess(), scheduler, keep=1, **protect)
        else:
            ckpt.save_checkpoint(tmp_path, state, ("unet", layer), [], optimizer, scheduler, keep=1, **protect)

    for step in (1, 2, 3, 4):
        save(step, protect=2)
    assert ckpt.checkpoint_steps(tmp_path) == {2, 4}
    assert all(sharded_ckpt.is_sharded_checkpoint(p) == sharded for p in ckpt.list_checkpoints(tmp_path))
    save(5)
    assert ckpt.checkpoint_steps(tmp_path) == {5}  # no pick to keep: the newest alone


def test_resuming_keeps_the_base_models_scores(tiny_model_dir, subject_images, tmp_path, tiny_scorers):
    from trainer.scores.measure import read_scores

    config = scored_config(tiny_model_dir, subject_images, tmp_path / "run", tiny_scorers, max_train_steps=2)
    train(config)
    events = []
    # Resumed with more images per prompt: the class samples are paired with the base model's by seed.
    train(config.replace(max_train_steps=4, resume_from_checkpoint="latest", score_samples=3), on_event=events.append)
    assert [e.step for e in events if isinstance(e, ScoreEvent)] == [4]  # no base model rescored
    assert [r["step"] for r in read_scores(tmp_path / "run")] == [0, 2, 4]


def test_scores_unavailable_say_why_and_the_training_goes_on(tiny_model_dir, subject_images, tmp_path, tiny_scorers):
    events = []
    config = scored_config(tiny_model_dir, subject_images, tmp_path / "run", tiny_scorers, max_train_steps=2,
                           score_image_model=str(tmp_path / "no-such-model"))
    result = train(config, on_event=events.append)
    warnings = [e.message for e in events if isinstance(e, WarningEvent)]
    assert any(w.startswith("Scores unavailable: could not load") and "no-such-model" in w for w in warnings)
    assert result.status == "completed" and result.weights is not None
    assert not (result.run_dir / "scores.jsonl").exists()


def lora_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "pytorch_lora_weights.safetensors")


def test_export_best_gives_the_weights_of_that_step_and_they_load_in_plain_diffusers(
        tiny_model_dir, subject_images, tmp_path, tiny_scorers):
    from diffusers import StableDiffusionPipeline

    from trainer.export import export_checkpoint
    from trainer.inference import PipelineCache
    from trainer.scores.measure import read_scores
    from trainer.scores.pick import pick_from_rows

    run = tmp_path / "run"
    train(scored_config(tiny_model_dir, subject_images, run, tiny_scorers, max_train_steps=4,
                        checkpoints_total_limit=None))
    rows = read_scores(run)
    # Make step 2 the best by the rule: the scores file is the pick's only input.
    rows = [{**r, "subject": r["subject"] + (0.5 if r["step"] == 2 else 0.0)} for r in rows]
    (run / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pick_from_rows(rows).step == 2
    cache = PipelineCache()
    before = cache.get(str(run), "cpu")
    assert cache.get(str(run), "cpu") is before
    done = export_checkpoint(run, "best")
    assert done.step == 2
    assert cache.get(str(run), "cpu") is not before  # Generate draws with the new weights, not the cached ones
    # The same training stopped at step 2 saved these very weights.
    short = tmp_path / "short"
    train(scored_config(tiny_model_dir, subject_images, short, tiny_scorers, max_train_steps=2, score_checkpoints=False))
    exported, reference = lora_tensors(run), lora_tensors(short)
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    assert json.loads((run / "run.json").read_text())["weights_step"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    pipe.load_lora_weights(run, weight_name="pytorch_lora_weights.safetensors")
    image = pipe("a photo of sks square", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_export_of_a_full_fine_tune_loads_in_plain_diffusers(tiny_model_dir, subject_images, tmp_path, tiny_scorers):
    from diffusers import StableDiffusionPipeline

    from trainer.__main__ import main

    run = tmp_path / "run"
    train(scored_config(tiny_model_dir, subject_images, run, tiny_scorers, method="full", max_train_steps=4,
                        learning_rate=1e-3, checkpoints_total_limit=None))
    last = StableDiffusionPipeline.from_pretrained(run, use_safetensors=True).unet.state_dict()
    assert main(["export", str(run), "--checkpoint", "2", "--quiet"]) == 0
    exported = StableDiffusionPipeline.from_pretrained(run, use_safetensors=True).unet.state_dict()
    checkpoint = load_file(run / "checkpoints" / "checkpoint-000002" / "unet.safetensors")
    assert all(torch.equal(exported[k], checkpoint[k]) for k in checkpoint)
    assert any(not torch.equal(exported[k], last[k]) for k in checkpoint)  # step 2 is not the last step


def test_export_refuses_what_would_lose_weights_or_is_not_there(tiny_model_dir, subject_images, tmp_path, capsys):
    from trainer.__main__ import main
    from trainer.export import export_checkpoint

    run = tmp_path / "run"
    # Not scored: step 3's weights are the result, and only step 2 is a checkpoint.
    train(tiny_config(tiny_model_dir, subject_images, run, max_train_steps=3, checkpointing_steps=2))
    before = lora_tensors(run)
    with pytest.raises(ConfigError, match="in no checkpoint: exporting step 2 would lose them"):
        export_checkpoint(run, 2)
    assert main(["export", str(run), "--checkpoint", "best"]) == 2
    assert "the base model was not scored" in capsys.readouterr().err
    assert main(["export", str(run), "--checkpoint", "7"]) == 2
    assert "has no checkpoint of step 7 (it has: 2)" in capsys.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in lora_tensors(run).items())  # nothing was replaced
    assert export_checkpoint(run, 2, replace_current=True).step == 2


def test_the_cards_metrics_are_the_scores_of_its_weights_and_parse_back(
        tiny_model_dir, subject_images, tmp_path, tiny_scorers):
    from huggingface_hub import ModelCard

    from trainer.export import export_checkpoint
    from trainer.scores.measure import read_scores
    from trainer.scores.report import card_metrics

    run = tmp_path / "run"
    train(scored_config(tiny_model_dir, subject_images, run, tiny_scorers, max_train_steps=4,
                        checkpoints_total_limit=None))
    rows = {r["step"]: r for r in read_scores(run)}

    def expected(row: dict) -> dict[str, float]:
        return {"subject-fidelity": row["subject"], "subject-fidelity-clip-i": row["subject_clip"],
                "prompt-fidelity": row["prompt"], "subject-fidelity-in-context": row["subject_in_context"],
                "class-drift": row["drift"],
                "class-diversity-kept": row["div_kept"], "memorisation": row["memorisation"]}

    card = ModelCard.load(run / "README.md")
    assert card_metrics(card) == expected(rows[4])
    assert "The pick rule: among checkpoints whose class drift is at most 20%" in card.text
    export_checkpoint(run, 2)
    assert card_metrics(ModelCard.load(run / "README.md")) == expected(rows[2])


def test_the_cli_scores_when_asked_and_says_the_best_so_far(tiny_model_dir, subject_images, tmp_path, tiny_scorers,
                                                            capsys):
    from trainer.__main__ import main

    run = tmp_path / "run"
    status = main(["train", "--pretrained-model", str(tiny_model_dir), "--instance-data", str(subject_images),
                   "--output-dir", str(run), "--instance-prompt", "a photo of sks square", "--resolution", "32",
                   "--max-train-steps", "2", "--checkpointing-steps", "1", "--report-to", "none",
                   "--no-gradient-checkpointing", "--score-checkpoints", "--score-samples", "2",
                   "--score-inference-steps", "2", "--score-image-model", str(tiny_scorers[0]),
                   "--score-clip-model", str(tiny_scorers[1])])
    out = capsys.readouterr().out
    assert status == 0
    assert "scores of the base model: subject" in out
    assert "scores of step 2: subject" in out and "no checkpoint passes the pick rule yet" in out
    assert main(["export", str(run), "--checkpoint", "best", "-q"]) == 2
    assert "no best checkpoint" in capsys.readouterr().err
    assert main(["export", str(run), "--checkpoint", "1", "-q"]) == 0
    assert "Step 1 (asked for) is now the weights of" in capsys.readouterr().out


def test_the_memory_model_counts_the_scoring_models_and_the_scoring_phase(tiny_model_dir, subject_images, tmp_path):
    from trainer.memory.estimate import SAMPLES, SCORER_BYTES, SCORERS, SCORING, estimate
    from trainer.memory.shapes import read_shapes

    shapes = read_shapes(str(tiny_model_dir), None, None, local_only=True)
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run")
    plain = estimate(config, "cpu", shapes=shapes)
    scored = estimate(config.replace(score_checkpoints=True, score_samples=4), "cpu", shapes=shapes)
    assert scored.weights_by_part[SCORERS] == SCORER_BYTES and SCORERS not in plain.weights_by_part
    assert scored.weights - plain.weights == SCORER_BYTES
    assert SCORING in scored.phases and SCORING not in plain.phases
    more = estimate(config.replace(score_checkpoints=True, score_samples=16), "cpu", shapes=shapes)
    assert more.phases[SCORING] > scored.phases[SCORING]  # on the CPU a prompt's images are drawn together
    one = estimate(config.replace(score_checkpoints=True, score_samples=1), "cpu", shapes=shapes)
    sampled = estimate(config.replace(validation_prompts=("x",)), "cpu", shapes=shapes)
    assert one.phases[SCORING] - SCORER_BYTES == sampled.phases[SAMPLES]  # one image: a validation sample's


def test_export_refuses_a_sharded_checkpoint_by_name(tiny_model_dir, subject_images, tmp_path):
    from trainer.export import export_checkpoint
    from trainer.sharded import SHARDED

    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, subject_images, run, max_train_steps=2, checkpointing_steps=1))
    state = run / "checkpoints" / "checkpoint-000001" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), SHARDED: True}))  # as DeepSpeed/FSDP runs write it
    with pytest.raises(ConfigError, match="checkpoint-000001 was written under DeepSpeed or FSDP"):
        export_checkpoint(run, 1)
