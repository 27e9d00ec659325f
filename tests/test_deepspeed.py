"""DeepSpeed ZeRO-2 through `accelerate launch`, on this CPU-only machine (over gloo: see
trainer/runtime.py `deepspeed_without_gpu`; on GPUs the same code runs over NCCL).

The claims, against a plain one-process run of the same global batch with torch AdamW (what the
engine steps under ZeRO instead of 8-bit AdamW, and says so): ZeRO-2 on 2 processes ends with the
same weights ("the same" as in test_multiprocess: launch_helpers.assert_same_weights); its sharded
checkpoint (one optimizer part per process) resumes on 2 processes and ends exactly as the
uninterrupted run, and is refused on another number of processes with what to do; the shipped
ZeRO-2 CPU-offload configuration (configs/accelerate/zero2_offload.yaml) trains with DeepSpeed's
CPU Adam and ends as the one-process run too; and ZeRO-2 trains in bf16 mixed precision, where
DeepSpeed holds the UNet in bf16.

What DeepSpeed compiles on a machine without a GPU, once per environment (g++ into ~/.cache/torch_extensions,
as DeepSpeed does for any user): its shared-memory communication op on every ZeRO run (about a minute here:
deepspeed.comm builds it whenever it starts, whatever the optimizer), and its CPU Adam for the offload test
only (about 4 minutes here, marked `compiles`). The other runs step torch AdamW, which needs no compiling.

The offload claim holds at weight decay 0 only. With weight decay, ZeRO-Offload's CPU Adam moved the
weights here as if the decay were added to the gradient (L2) instead of to the weights (AdamW): after
one step at lr 1e-4 and decay 1e-2, 26% of the tiny UNet's weights moved the other way from the
one-process run; at decay 0 none did. `python bench/deepspeed_offload_probe.py` shows it without the
trainer (a plain accelerate + DeepSpeed script); whether CUDA does the same is for a GPU session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch_helpers import assert_same_weights, json_events, launch, metrics, square_photos, weight_differences
from train_helpers import tiny_config

from trainer.run_folder import read_status

pytestmark = pytest.mark.slow

LR = 1e-4
ZERO2 = ("--use_deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "none",
         "--offload_param_device", "none", "--gradient_accumulation_steps", "1")
OFFLOAD = ("--config_file", str(Path(__file__).resolve().parents[1] / "configs/accelerate/zero2_offload.yaml"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir: Path) -> dict[str, object]:
    """Full fine-tuning of the UNet (DeepSpeed trains one model), prior preservation, gradient
    checkpointing, 8-bit AdamW asked for, a checkpoint at step 4 of 6: once on 2 ZeRO-2 processes ×
    batch 1, once on 1 plain process × batch 2 with torch AdamW."""
    root = tmp_path_factory.mktemp("deepspeed")
    config = tiny_config(tiny_model_dir, square_photos(root / "photos"), root / "unused", method="full",
                         gradient_checkpointing=True, with_prior_preservation=True, num_class_images=4,
                         class_prompt="a photo of a square", class_cache_dir=str(root / "cache"),
                         checkpointing_steps=4, learning_rate=LR)
    path = root / "config.json"
    config.save(path)
    zero2 = launch(2, path, root / "zero2", "--train-batch-size", "1", accelerate=ZERO2)
    launch(1, path, root / "one", "--train-batch-size", "2", "--no-use-8bit-adam")
    return {"root": root, "config": path, "base": tiny_model_dir, "one": root / "one", "zero2": root / "zero2",
            "zero2_events": json_events(zero2)}


def messages(events: list[dict]) -> list[str]:
    return [e.get("message", "") for e in events]


def test_zero2_on_two_processes_ends_where_one_process_with_the_same_global_batch_ends(runs):
    one, zero2 = runs["one"], runs["zero2"]
    assert_same_weights(one, zero2, LR, parts=("unet",))
    moved = weight_differences(zero2, runs["base"], "unet")
    assert moved.max() > 3 * LR  # six Adam steps moved the weights: the comparison above is not of two bases
    for a, b in zip(metrics(one), metrics(zero2), strict=True):
        assert a["images"] == b["images"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    said = messages(runs["zero2_events"])
    assert any("= 1 per process × 2 processes (DeepSpeed) × 1 accumulation step" in m for m in said)
    assert any(m.startswith("Optimizer: torch AdamW instead of 8-bit AdamW: DeepSpeed ZeRO shards") for m in said)
    assert read_status(zero2)["processes"] == 2 and read_status(zero2)["effective_batch"] == 2
    # Only the main process logged and reported; each process wrote its own part of the optimizer state.
    assert [m["step"] for m in metrics(zero2)] == list(range(1, 7))
    assert sum(e["type"] == "result" for e in runs["zero2_events"]) == 1
    checkpoint = zero2 / "checkpoints" / "checkpoint-000004"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["sharded"] is True and state["processes"] == 2 and state["step"] == 4
    parts = sorted(p.name for p in checkpoint.rglob("*optim_states.pt"))
    assert parts == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_zero2_checkpoint_resumes_and_ends_as_the_uninterrupted_run(runs):
    root = runs["root"]
    out = root / "zero2-resumed"
    events = json_events(launch(2, runs["config"], out, "--train-batch-size", "1", "--resume-from-checkpoint",
                                str(runs["zero2"] / "checkpoints" / "checkpoint-000004"), accelerate=ZERO2))
    assert "Resumed from checkpoint-000004 at step 4" in messages(events)
    assert [m["step"] for m in metrics(out)] == [5, 6]
    assert [(m["images"], m["loss"]) for m in metrics(out)] == [(m["images"], m["loss"]) for m in metrics(runs["zero2"])][4:]
    assert weight_differences(runs["zero2"], out).max() == 0  # one machine, the same order of sums: exact


def test_a_zero2_checkpoint_is_refused_on_another_number_of_processes(runs):
    root = runs["root"]
    done = launch(1, runs["config"], root / "zero2-on-one", "--train-batch-size", "2", "--resume-from-checkpoint",
                  str(runs["zero2"] / "checkpoints" / "checkpoint-000004"), accelerate=ZERO2, expect=1)
    (error,) = [e for e in json_events(done) if e["type"] == "error"]
    assert error["exit"] == 2
    assert error["message"] == ("`resume_from_checkpoint`: checkpoint-000004 holds DeepSpeed ZeRO state split over 2 "
                                "processes; resume it with `--num_processes 2` (this run has 1)")
    assert not (root / "zero2-on-one" / "unet").exists()


@pytest.mark.compiles
def test_the_shipped_zero2_offload_config_trains_with_deepspeeds_cpu_adam(runs):
    """At weight decay 0 (see the module's docstring), in text mode: the reader sees one run's lines.
    The only test here that needs DeepSpeed's CPU Adam, which DeepSpeed compiles (with g++, into
    ~/.cache/torch_extensions) the first time an environment uses it: about 4 minutes on a 2-core machine."""
    root = runs["root"]
    no_decay = ("--adam-weight-decay", "0")
    done = launch(2, runs["config"], root / "offload", "--train-batch-size", "1", *no_decay,
                  accelerate=OFFLOAD, events="text")
    launch(1, runs["config"], root / "one-no-decay", "--train-batch-size", "2", "--no-use-8bit-adam", *no_decay)
    assert_same_weights(root / "one-no-decay", root / "offload", LR, parts=("unet",))
    assert done.stdout.count("step 6/6 loss") == 1 and done.stdout.count("[done] Finished") == 1
    assert done.stderr.count("warning: Optimizer: DeepSpeed's CPU Adam instead of 8-bit AdamW") == 1
    assert read_status(root / "offload")["status"] == "completed"


def test_zero2_trains_in_bf16_mixed_precision(runs):
    """DeepSpeed holds the UNet in bf16 (its fp32 master weights are the optimizer's) and accelerate's
    autocast stands aside under it: without the engine's own autocast the first fp32 latent meets bf16
    weights and the run stops ("mat1 and mat2 must have the same dtype"). fp16, the shipped config's, is
    the same path on a GPU."""
    root = runs["root"]
    out = root / "zero2-bf16"
    launch(2, runs["config"], out, "--train-batch-size", "1", "--mixed-precision", "bf16", accelerate=ZERO2)
    assert read_status(out)["status"] == "completed"
    for fp32, bf16 in zip(metrics(runs["zero2"]), metrics(out), strict=True):
        assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.01)
    moved = weight_differences(out, runs["base"], "unet")
    assert moved.max() > 3 * LR
