"""Side by side: our trainer against diffusers' reference DreamBooth scripts, same model, data and flags.

    python bench/vs_reference.py --reference-dir /tmp/ref --model tiny --repeats 1 --steps 5   # smoke test
    python bench/vs_reference.py --reference-dir /tmp/ref --model mid                          # 3 + 3 runs
    python bench/vs_reference.py --reference-dir /tmp/ref --model tiny,mid --method full --repeats 5

The reference is diffusers' `examples/dreambooth/train_dreambooth.py` (full fine-tuning) and
`train_dreambooth_lora.py` (LoRA). They stay outside this repository: --reference-dir is a folder
holding them. A bare git mirror of diffusers has no work tree; extract them first, e.g.

    mkdir -p /tmp/ref && for f in train_dreambooth.py train_dreambooth_lora.py; do
      git --git-dir /work/.mirror/huggingface+diffusers/repo show HEAD:examples/dreambooth/$f > /tmp/ref/$f; done

or give the path as it would be in the mirror's tree (`--reference-dir
/work/.mirror/huggingface+diffusers/repo/examples/dreambooth`): when that folder does not exist, the
nearest existing parent that is a git directory is found and the two files are extracted from its
--reference-rev (default HEAD) into the work folder, with the same `git show` as above.

Both sides run through `bench/run_reference.py` (see its docstring), with plain `python` (accelerate
falls back to the CPU), OMP_NUM_THREADS=MKL_NUM_THREADS=--threads (default 1) and that many torch
threads, Hub access off. The reference scripts import torchvision, which cannot be imported beside
this torch; the launcher gives them `bench/torchvision_standin/` (PIL + torch) once transformers and
diffusers have decided torchvision is unavailable.

Models (built once into the work folder, random weights, fixed seeds):
  tiny  the tests' tiny SD 1.5 (tests/tiny_model.py): 32 px images -> 16x16 latents.
  mid   the tiny pipeline with a bigger UNet (~18 M parameters): block channels 64/128/256, two
        layers per block, CrossAttnDown x2 + Down / Up + CrossAttnUp x2, 8 heads, 32 groups,
        sample_size 64; the tiny VAE (2x) at 128 px -> 64x64 latents, the latent grid of SD 1.5 at 512 px.

Same inputs and flags on both sides: the same model folder, --instance-images instance images and
--class-images class images in one shared folder (pre-generated, so no timed run generates), prompt
"a photo of sks dog" / class "a photo of a dog", prior preservation (weight 1), batch 1 (+1 class
image), resolution of the model, centre crop, no flip, 8-bit AdamW (bitsandbytes; lr 5e-6 full, 1e-4
LoRA, betas 0.9/0.999, wd 1e-2, eps 1e-8), constant LR without warm-up, clipping at 1.0, gradient
checkpointing, fp32 (`--mixed_precision no`), seed 0, LoRA rank 4 (alpha 4) on to_q/to_k/to_v/to_out.0,
TensorBoard logging, no validation, no checkpoint within the run (the final weights are saved, as
each side does). Our engine refuses images under 64 px, so the tiny model's instance images are
64 px and its 32 px class images are enlarged 2x (nearest) in the shared folder: both sides resize them
to 32 px (ours Lanczos, the reference's full script bilinear, its LoRA script Lanczos); the mid
model's images are made at 128 px, so no side resizes them. The reference gets `--pre_compute_text_embeddings` (its own option: encode the
prompts once, as our engine always does for a frozen text encoder); --reference-text-encoder-each-step
leaves it off. Not matched, because one side has no such option: our engine caches the VAE latents of
the images once (the reference encodes both images with the VAE every step), and generates class
images with DPMSolverMultistep where the reference uses the model's own scheduler (PNDM here); both
at 50 denoising steps (the reference script's pipeline default, which it cannot change), guidance 7.5,
batch 4, at the model's resolution.

Runs are interleaved, ours then reference, --repeats times per model and method (A B A B ...). Per run:
  s/step        (last step's stamp - first step's stamp) / (steps - 1): the mean step time after the
                first (warm-up) step, everything between two optimizer steps included (data, VAE or
                text encoding, logging, progress bar). The stamps come from the launcher's optimizer
                step post-hook, identical for both sides. Ours' own metrics.jsonl "seconds" (median
                after step 1) is printed beside it as a cross-check.
  first step    process start (the parent's clock just before it spawns the process) -> first optimizer
                step completed: imports, model loading, caching, first step.
  peak RSS      ru_maxrss of the run's process tree, from os.wait4 on that one child (the largest
                resident set of the process or any descendant it waited for).
  wall          process start -> exit (includes saving the final weights).
The table gives each metric's median over the runs and ours / reference (< 1: ours is faster/smaller).

Class-image generation is timed separately, once per side and model (--gen-repeats): the same
command with an empty class folder and --gen-steps 1 training step; generation time = its first-step
time minus the median first-step time of that side's timed runs of the same method (which had the
images). The images ours generates become the shared class folder of the timed runs.
--skip-class-generation skips this (on the mid model each side generates for minutes) and gives both
sides the same synthetic class images instead.

Also measured, each in its own process under the same thread settings: the machine's matmul peak
(2048 x 2048 fp32 matmul on --threads threads, best of 10, GFLOP/s), and for the model (the brief
asks for mid; tiny is counted too) the FLOPs of one UNet forward+backward at batch 2 (instance + class)
with torch.utils.flop_counter.FlopCounterMode, with gradient checkpointing (what a step executes,
recomputation included) and without (the model's FLOPs); divided by ours' median s/step they give
the achieved GFLOP/s and its fraction of the matmul peak. FlopCounterMode counts matmuls and
convolutions (2 FLOPs per multiply-add), not element-wise work. torch has no FLOP formula for SDPA's
CPU kernel (it counted mid's attention, half its matmul work, as zero): the count registers torch's own
SDPA formulas for it (count_cpu_attention), and the report prints the fraction with and without the
attention's matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "bench" / "run_reference.py"
SCRIPTS = {"full": "train_dreambooth.py", "lora": "train_dreambooth_lora.py"}
MODELS = ("tiny", "mid")
METHODS = ("full", "lora")
MID_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [64, 128, 256],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32,
}
RESOLUTION = {"tiny": 32, "mid": 128}  # px; the tiny VAE halves it: 16x16 and 64x64 latents
MIN_SIDE = 64  # our engine refuses smaller instance and class images (trainer.data.photos.MIN_SIDE)
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of a dog"
LR = {"full": 5e-6, "lora": 1e-4}
LORA_RANK = 4
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
CLASS_STEPS = 50  # the reference calls its class pipeline without num_inference_steps: the default, 50
SAMPLE_BATCH = 4
NO_CHECKPOINT = 10**9  # checkpointing_steps beyond any run


# ---------------------------------------------------------------------------------------------------------------
# Work done in child processes (no torch in the parent: its RSS would leak into the children's ru_maxrss).


def child_prepare(model: str, model_dir: Path, data_dir: Path, instance_images: int) -> dict:
    """Build the model folder (once) and the instance images; return the UNet's parameter count."""
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import build_tiny_pipeline

    if not (model_dir / "model_index.json").is_file():
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_pipeline(tmp)
        if model == "mid":
            torch.manual_seed(0)
            shutil.rmtree(tmp / "unet")
            UNet2DConditionModel(**MID_UNET).save_pretrained(tmp / "unet", safe_serialization=True)
        tmp.rename(model_dir)
    config = json.loads((model_dir / "unet" / "config.json").read_text())
    with torch.device("meta"):
        params = sum(p.numel() for p in UNet2DConditionModel.from_config(config).parameters())

    size = max(RESOLUTION[model], MIN_SIDE)
    write_images(data_dir / f"instance-{instance_images}", instance_images, size, "dog", seed=0)
    return {"unet_params": params, "resolution": RESOLUTION[model], "latents": RESOLUTION[model] // 2,
            "instance_px": size}


def write_images(folder: Path, count: int, size: int, stem: str, seed: int) -> None:
    """`count` seeded size x size PNGs (a smooth colour field with a bright disc: not noise, not flat), once."""
    import numpy as np
    from PIL import Image

    if folder.is_dir():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        base = rng.uniform(0.2, 0.8, 3)
        image = base[None, None, :] * (0.6 + 0.4 * np.stack([xx, yy, 1 - xx], -1))
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0.7, 1.0, 3)
        Image.fromarray((image * 255).astype(np.uint8)).save(tmp / f"{stem}-{i:02d}.png")
    tmp.rename(folder)


def child_share(sources: list[Path], target: Path) -> dict:
    """Copy class images into the shared folder, enlarged (nearest, an integer factor) to >= MIN_SIDE px."""
    from PIL import Image

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes = set()
    for path in sources:
        with Image.open(path) as image:
            factor = -(-MIN_SIDE // min(image.size))
            if factor > 1:
                image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
            image.save(tmp / path.name)
            sizes.add(image.size)
    tmp.rename(target)
    return {"images": len(sources), "sizes": sorted(sizes)}


def child_matmul(n: int = 2048, reps: int = 10) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    flops = 2 * n**3
    return {"gflops_best": flops / min(times) / 1e9, "gflops_median": flops / statistics.median(times) / 1e9,
            "threads": torch.get_num_threads()}


def count_cpu_attention() -> None:
    """Give FlopCounterMode torch's own SDPA formula for SDPA's CPU kernel.

    torch registers FLOP formulas for its CUDA attention kernels only; on the CPU, SDPA runs
    `_scaled_dot_product_flash_attention_for_cpu`, which FlopCounterMode then counts as zero, although
    its QK^T and PV products (and their gradients) are as much matmul work as the `bmm` calls of the math
    backend, which it does count. Counted as the math backend's products: torch's forward formula (4 b h
    s_q s_k d) and twice that backward, the four gradient products (torch's flash backward formula adds
    the scores' recomputation, which is the kernel's choice, not the model's work).
    """
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop, sdpa_flop_count

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    # torch's sdpa_flop is registered already (so wrapped to take tensors); `backward` takes shapes.
    for op, formula, raw in ((aten._scaled_dot_product_flash_attention_for_cpu, sdpa_flop, True),
                             (aten._scaled_dot_product_flash_attention_for_cpu_backward, backward, False)):
        if op not in flop_registry:
            register_flop_formula(op, get_raw=raw)(formula)


def attention_flops(counter) -> int:
    """The attention kernels' share of a FlopCounterMode's count."""
    return sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "attention" in str(op))


def child_flops(model_dir: Path, method: str) -> dict:
    """FLOPs of one UNet forward+backward at batch 2, with and without gradient checkpointing."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    if method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    unet.train()
    size = unet.config.sample_size
    latents = torch.randn(2, 4, size, size)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
    out = {}
    for checkpointing in (True, False):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        counter = FlopCounterMode(display=False)
        with counter:
            pred = unet(latents, torch.tensor([10, 500]), hidden).sample
            torch.nn.functional.mse_loss(pred, latents).backward()
        unet.zero_grad(set_to_none=True)
        key = "executed" if checkpointing else "model"
        out[key], out[key + "_attention"] = counter.get_total_flops(), attention_flops(counter)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The parent: commands, runs, timing.


def run_env(threads: int, work: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "DREAMBOOTH_STUDIO_CACHE": str(work / "studio-cache"), "PYTHONWARNINGS": "ignore",
    })
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def child_json(args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours_command(method: str, model_dir: Path, instance: Path, class_dir: Path | None, cache: Path, out: Path,
                 steps: int, class_images: int, resolution: int) -> list[str]:
    cmd = ["-m", "trainer", "train",
           "--pretrained-model", str(model_dir), "--instance-data", str(instance), "--identifier", "sks",
           "--instance-prompt", INSTANCE_PROMPT, "--output-dir", str(out),
           "--with-prior-preservation", "--class-prompt", CLASS_PROMPT, "--prior-loss-weight", "1.0",
           "--num-class-images", str(class_images), "--class-cache-dir", str(cache),
           "--sample-batch-size", str(SAMPLE_BATCH), "--class-inference-steps", str(CLASS_STEPS),
           "--method", method, "--resolution", str(resolution), "--center-crop", "--no-random-flip",
           "--max-train-steps", str(steps), "--train-batch-size", "1", "--gradient-accumulation-steps", "1",
           "--learning-rate", str(LR[method]), "--lr-scheduler", "constant", "--lr-warmup-steps", "0",
           "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--adam-weight-decay", "0.01", "--adam-epsilon", "1e-08",
           "--max-grad-norm", "1.0", "--use-8bit-adam", "--gradient-checkpointing", "--mixed-precision", "no",
           "--seed", "0", "--checkpointing-steps", str(NO_CHECKPOINT), "--report-to", "tensorboard"]
    if class_dir is not None:
        cmd += ["--class-data-dir", str(class_dir)]
    if method == "lora":
        cmd += ["--lora-rank", str(LORA_RANK), "--lora-alpha", str(LORA_RANK)]
    return cmd


def reference_command(script: Path, method: str, model_dir: Path, instance: Path, class_dir: Path, out: Path,
                      steps: int, class_images: int, resolution: int, precompute_text: bool) -> list[str]:
    cmd = [str(script),
           "--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(instance),
           "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(out),
           "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", CLASS_PROMPT,
           "--prior_loss_weight", "1.0", "--num_class_images", str(class_images),
           "--sample_batch_size", str(SAMPLE_BATCH), "--prior_generation_precision", "fp32",
           "--resolution", str(resolution), "--center_crop",
           "--max_train_steps", str(steps), "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
           "--learning_rate", str(LR[method]), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
           "--adam_beta1", "0.9", "--adam_beta2", "0.999", "--adam_weight_decay", "0.01", "--adam_epsilon", "1e-08",
           "--max_grad_norm", "1.0", "--use_8bit_adam", "--gradient_checkpointing", "--mixed_precision", "no",
           "--seed", "0", "--checkpointing_steps", str(NO_CHECKPOINT), "--report_to", "tensorboard",
           "--dataloader_num_workers", "0"]
    if precompute_text:
        cmd.append("--pre_compute_text_embeddings")
    if method == "lora":
        cmd += ["--rank", str(LORA_RANK)]
    return cmd


def timed_run(launcher_args: list[str], env: dict, log: Path, timing: Path) -> dict:
    """Run one training process; return its step stamps, first-step time, wall time and peak RSS."""
    timing.unlink(missing_ok=True)
    with log.open("w", encoding="utf-8") as log_file:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(LAUNCHER), "--timing", str(timing), *launcher_args],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        end = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = timing.read_text().splitlines() if timing.is_file() else []
    stamps = [float(line) for line in lines if line.strip() and not line.startswith("#")]
    optimizers = [line.split()[-1] for line in lines if line.startswith("# optimizer ")]
    row = {"exit": proc.returncode, "wall_s": end - start, "peak_rss_mib": usage.ru_maxrss / 1024,
           "steps_seen": len(stamps), "optimizers": optimizers, "log": str(log)}
    if stamps:
        row["first_step_s"] = stamps[0] - start
    if len(stamps) >= 2:
        row["s_per_step"] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        row["step_s"] = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    if proc.returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        row["failed"] = f"exit {proc.returncode}: {tail[0][:200] if tail else 'no output'} (log: {log})"
    return row


def metrics_seconds(run_dir: Path) -> float | None:
    """Median of ours' own per-step "seconds" (metrics.jsonl), after the first step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    seconds = [json.loads(line)["seconds"] for line in path.read_text().splitlines() if line.strip()]
    return statistics.median(seconds[1:]) if len(seconds) > 1 else None


def find_reference(reference_dir: Path, rev: str, work: Path) -> tuple[dict[str, Path], str]:
    """The two scripts: in the folder, or extracted from the git directory the path points into."""
    reference_dir = reference_dir.expanduser().resolve()
    if reference_dir.is_dir():
        scripts = {m: reference_dir / name for m, name in SCRIPTS.items()}
        missing = [str(p) for p in scripts.values() if not p.is_file()]
        if missing:
            raise SystemExit(f"--reference-dir {reference_dir} lacks {', '.join(missing)}")
        return scripts, f"{reference_dir}"
    git_dir = reference_dir
    while not git_dir.exists() or not ((git_dir / "HEAD").is_file() and (git_dir / "objects").is_dir()):
        if git_dir.parent == git_dir:
            raise SystemExit(f"--reference-dir {reference_dir}: no such folder, and no git directory above it")
        git_dir = git_dir.parent
    inside = reference_dir.relative_to(git_dir).as_posix()
    target = work / "reference"
    target.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    scripts = {}
    for method, name in SCRIPTS.items():
        out = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{commit}:{inside}/{name}"],
                             capture_output=True, check=True)
        (target / name).write_bytes(out.stdout)
        scripts[method] = target / name
    return scripts, f"{git_dir} @ {commit[:10]}:{inside}"


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(ours: float | None, ref: float | None) -> str:
    return "-" if ours is None or not ref else f"{ours / ref:.2f}"


def split_list(value: str, choices: tuple[str, ...], parser: argparse.ArgumentParser, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in choices]
    if bad or not items:
        parser.error(f"{flag}: choose from {', '.join(choices)} (comma-separated)")
    return list(dict.fromkeys(items))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", type=Path, help="folder with train_dreambooth.py and "
                        "train_dreambooth_lora.py, or that folder's path inside a bare git mirror")
    parser.add_argument("--reference-rev", default="HEAD", help="revision to extract from a git mirror")
    parser.add_argument("--model", default="tiny", help="tiny and/or mid, comma-separated (default tiny)")
    parser.add_argument("--method", default="full,lora", help="full and/or lora (default both)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side, interleaved (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed run (default 10)")
    parser.add_argument("--instance-images", type=int, default=4)
    parser.add_argument("--class-images", type=int, default=4)
    parser.add_argument("--gen-repeats", type=int, default=1, help="class-generation runs per side (default 1)")
    parser.add_argument("--gen-steps", type=int, default=1, help="training steps of a class-generation run")
    parser.add_argument("--skip-class-generation", action="store_true",
                        help="do not time class-image generation; use synthetic class images instead")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL/torch threads of every process (default 1)")
    parser.add_argument("--reference-text-encoder-each-step", action="store_true",
                        help="do not pass --pre_compute_text_embeddings to the reference")
    parser.add_argument("--work-dir", type=Path, help="models, data, logs, results.json (default: a temp folder)")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's output folder")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: prepare / matmul / flops
    return parser


def run_child(child: list[str]) -> None:
    """The child side of child_json: do one piece of work, print its result as JSON."""
    kind, rest = child[0], child[1:]
    if kind == "prepare":
        result = child_prepare(rest[0], Path(rest[1]), Path(rest[2]), int(rest[3]))
    elif kind == "synthetic":
        write_images(Path(rest[0]), int(rest[1]), int(rest[2]), "class", seed=1)
        result = {"images": int(rest[1])}
    elif kind == "share":
        result = child_share([Path(p) for p in rest[1:]], Path(rest[0]))
    elif kind == "matmul":
        result = child_matmul()
    else:
        result = child_flops(Path(rest[0]), rest[1])
    print(json.dumps(result))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Bench:
    """What every run of one invocation shares."""

    args: argparse.Namespace
    work: Path
    env: dict
    scripts: dict[str, Path]
    precompute: bool


@dataclass(frozen=True)
class ModelData:
    """One model's folder, data folder, instance images and resolution."""

    model: str
    model_dir: Path
    data_dir: Path
    instance: Path
    resolution: int


def launch(bench: Bench, m: ModelData, side: str, method: str, class_dir: Path | None, steps: int,
           tag: str) -> dict:
    """One timed training run of one side; its row (see timed_run), with a failure if it missed steps."""
    args, work = bench.args, bench.work
    out = work / "runs" / f"{m.model}-{method}-{side}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    if side == "ours":
        cache = m.data_dir / f"ours-class-cache-{tag}"
        cmd = ours_command(method, m.model_dir, m.instance, class_dir, cache, out, steps, args.class_images,
                           m.resolution)
    else:
        cmd = reference_command(bench.scripts[method], method, m.model_dir, m.instance, class_dir, out, steps,
                                args.class_images, m.resolution, bench.precompute)
    name = f"{m.model}-{method}-{side}-{tag}"
    row = timed_run(cmd, bench.env, work / "logs" / f"{name}.log", work / "logs" / f"{name}.stamps")
    if side == "ours":
        row["metrics_s_per_step"] = metrics_seconds(out)
    if row["steps_seen"] != steps and "failed" not in row:
        row["failed"] = f"saw {row['steps_seen']} optimizer steps, expected {steps} (log: {row['log']})"
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    what = (f"{row['s_per_step']:.3f} s/step, first step {row['first_step_s']:.1f} s, "
            f"{row['peak_rss_mib']:.0f} MiB" if "s_per_step" in row else
            f"first step {row.get('first_step_s', float('nan')):.1f} s")
    say(f"  {name}: {row.get('failed') or what}")
    return row


def generate_class_images(bench: Bench, m: ModelData, gen_method: str, shared: Path) -> dict[str, list[dict]]:
    """Each side generates into its own empty folder; ours' images become the shared set. The runs, per side."""
    args = bench.args
    gen = {"ours": [], "reference": []}
    for i in range(0 if args.skip_class_generation else args.gen_repeats):
        for side in ("ours", "reference"):
            empty = m.data_dir / (f"ours-class-cache-gen{i}" if side == "ours" else f"reference-generated-{i}")
            shutil.rmtree(empty, ignore_errors=True)
            row = launch(bench, m, side, gen_method, None if side == "ours" else empty, args.gen_steps, f"gen{i}")
            gen[side].append(row)
    if not shared.is_dir():
        made = sorted((m.data_dir / "ours-class-cache-gen0").rglob("class-*.png"))
        if len(made) < args.class_images:
            raise SystemExit(f"ours generated {len(made)} class images, need {args.class_images}: "
                             f"see {gen['ours'][0]['log']}")
        child_json(["--child", "share", str(shared), *map(str, made[: args.class_images])], bench.env)
    return gen


def generation_times(runs: list[dict], timed: list[dict]) -> dict:
    """Generation time: the generating runs' median first step minus the timed runs' (which had the images)."""
    base = median([r for r in timed if "failed" not in r], "first_step_s")
    with_gen = median([r for r in runs if "failed" not in r], "first_step_s")
    return {"runs": runs, "first_step_with_gen_s": with_gen,
            "generation_s": None if base is None or with_gen is None else with_gen - base}


def bench_model(bench: Bench, model: str, methods: list[str]) -> dict:
    """Prepare one model and its data, time class generation, the interleaved runs, and count the FLOPs."""
    args = bench.args
    model_dir, data_dir = bench.work / "models" / model, bench.work / "data" / model
    info = child_json(["--child", "prepare", model, str(model_dir), str(data_dir), str(args.instance_images)],
                      bench.env)
    say(f"{model}: UNet {info['unet_params'] / 1e6:.2f} M parameters, {info['resolution']} px -> "
        f"{info['latents']}x{info['latents']} latents; instance images {info['instance_px']} px")
    instance = data_dir / f"instance-{args.instance_images}"
    if args.skip_class_generation:
        shared = data_dir / f"class-synthetic-{args.class_images}"
        child_json(["--child", "synthetic", str(shared), str(args.class_images), str(info["instance_px"])],
                   bench.env)
    else:
        shared = data_dir / f"class-shared-{args.class_images}"
    entry = {**info, "methods": {}, "generation": {}}
    m = ModelData(model, model_dir, data_dir, instance, info["resolution"])

    # 1. Class-image generation, each side into its own empty folder; ours' images become the shared set.
    gen_method = methods[0]
    gen = generate_class_images(bench, m, gen_method, shared)

    # 2. Timed runs, interleaved.
    for method in methods:
        rows = {"ours": [], "reference": []}
        for i in range(args.repeats):
            for side in ("ours", "reference"):
                rows[side].append(launch(bench, m, side, method, shared, args.steps, f"run{i}"))
        entry["methods"][method] = rows
    for side in () if args.skip_class_generation else ("ours", "reference"):
        entry["generation"][side] = generation_times(gen[side], entry["methods"][gen_method][side])

    # 3. FLOPs of our step.
    entry["flops"] = {method: child_json(["--child", "flops", str(model_dir), method], bench.env) for method in methods}
    return entry


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return

    if args.reference_dir is None:
        parser.error("--reference-dir is required (see the extraction command above)")
    if args.repeats < 1 or args.steps < 2 or args.gen_steps < 1 or args.class_images < 1 or args.instance_images < 1:
        parser.error("--repeats, --gen-steps, --class-images, --instance-images >= 1 and --steps >= 2")
    models = split_list(args.model, MODELS, parser, "--model")
    methods = split_list(args.method, METHODS, parser, "--method")
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="vs-reference-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    scripts, reference_from = find_reference(args.reference_dir, args.reference_rev, work)
    env = run_env(args.threads, work)
    bench = Bench(args, work, env, scripts, precompute=not args.reference_text_encoder_each_step)

    say(f"work folder: {work}; reference: {reference_from}")
    machine = child_json(["--child", "matmul"], env)
    say(f"matmul 2048^2 fp32, {machine['threads']} thread(s): {machine['gflops_best']:.1f} GFLOP/s")
    results = {"machine": machine, "reference": reference_from, "threads": args.threads, "steps": args.steps,
               "repeats": args.repeats, "models": {}}
    for model in models:
        results["models"][model] = bench_model(bench, model, methods)

    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results, args, bench.precompute)
    say(f"raw numbers: {work / 'results.json'}; logs: {work / 'logs'}")


def report(results: dict, args: argparse.Namespace, precompute: bool) -> None:
    machine = results["machine"]
    peak = machine["gflops_best"]
    print(f"reference: {results['reference']}; {results['threads']} thread(s) per process; "
          f"{results['steps']} steps per run, {results['repeats']} run(s) per side, interleaved; medians"
          + ("" if precompute else "; reference encodes the prompts every step"))
    print(f"matmul peak: 2048x2048 fp32 on {machine['threads']} thread(s): {peak:.1f} GFLOP/s "
          f"(best of 10; median {machine['gflops_median']:.1f})")
    for model, entry in results["models"].items():
        print(f"\n{model}: UNet {entry['unet_params'] / 1e6:.2f} M parameters, {entry['resolution']} px, "
              f"{entry['latents']}x{entry['latents']} latents, batch 1 + 1 class image, fp32, 8-bit AdamW, "
              "gradient checkpointing")
        for method, rows in entry["methods"].items():
            ours = [r for r in rows["ours"] if "failed" not in r]
            ref = [r for r in rows["reference"] if "failed" not in r]
            print(f"\n| {model} · {method} | ours | reference | ours ÷ reference |\n|---|---|---|---|")
            for label, key, digits in (("s/step after warm-up", "s_per_step", 3),
                                       ("time to first step (s)", "first_step_s", 1),
                                       ("peak RSS (MiB)", "peak_rss_mib", 0), ("wall (s)", "wall_s", 1)):
                o, r = median(ours, key), median(ref, key)
                print(f"| {label} | {fmt(o, digits)} | {fmt(r, digits)} | {ratio(o, r)} |")
            print(f"| runs ok | {len(ours)}/{len(rows['ours'])} | {len(ref)}/{len(rows['reference'])} | |")
            used = {side: ", ".join(sorted({o for r in side_rows for o in r.get("optimizers", ())})) or "-"
                    for side, side_rows in (("ours", ours), ("reference", ref))}
            print(f"| optimizer that stepped | {used['ours']} | {used['reference']} | |")
            own = median(ours, "metrics_s_per_step")
            if own is not None:
                print(f"ours' own metrics.jsonl: {own:.3f} s/step (median after step 1)")
            flops = entry.get("flops", {}).get(method)
            step = median(ours, "s_per_step")
            if flops and step:
                for label, cut in (("all matmuls, attention's included", 0),
                                   ("convolutions and linears only, as FlopCounterMode counts without "
                                    "the CPU attention formula", 1)):
                    model_g = (flops["model"] - cut * flops.get("model_attention", 0)) / 1e9
                    exec_g = (flops["executed"] - cut * flops.get("executed_attention", 0)) / 1e9
                    print(f"our step's FLOPs (UNet fwd+bwd, batch 2; {label}): {model_g:.2f} GFLOP model, "
                          f"{exec_g:.2f} GFLOP executed with checkpointing -> {model_g / step:.1f} / "
                          f"{exec_g / step:.1f} GFLOP/s achieved, {100 * model_g / step / peak:.0f}% / "
                          f"{100 * exec_g / step / peak:.0f}% of the matmul peak")
            for side, side_rows in rows.items():
                for r in side_rows:
                    if "failed" in r:
                        print(f"failed ({side}): {r['failed']}")
        gen = entry["generation"]
        if not gen:
            print(f"\n{model}: class-image generation not timed (--skip-class-generation; synthetic class images)")
            continue
        o, r = gen["ours"], gen["reference"]
        print(f"\n| {model} · class images ({args.class_images}, {CLASS_STEPS} steps, batch {SAMPLE_BATCH}) "
              "| ours | reference | ours ÷ reference |\n|---|---|---|---|")
        print(f"| generation (s) | {fmt(o['generation_s'], 1)} | {fmt(r['generation_s'], 1)} "
              f"| {ratio(o['generation_s'], r['generation_s'])} |")
        print(f"| time to first step with generation (s) | {fmt(o['first_step_with_gen_s'], 1)} "
              f"| {fmt(r['first_step_with_gen_s'], 1)} "
              f"| {ratio(o['first_step_with_gen_s'], r['first_step_with_gen_s'])} |")
        for side in ("ours", "reference"):
            for run in gen[side]["runs"]:
                if "failed" in run:
                    print(f"failed ({side}, class generation): {run['failed']}")


if __name__ == "__main__":
    main()
