"""Measure a DreamBooth run the way the paper does, in the toy world, on a CPU.

    python -m trainer.toyworld.eval --instance-data SUBJECT_DIR --identifier sks --class-noun star
    python -m trainer.toyworld.eval --example --method lora --prior          # train the bundled example
    python -m trainer.toyworld.eval --example --run runs/my-run              # score an existing run folder
    python -m trainer.toyworld.eval --example --method full --score-every 200 --seeds 3   # the pick vs the last step

Trains one DreamBooth run with the engine (unless --run names one), then scores the base model
and the trained one on the same seeds: subject fidelity, prompt fidelity, prior preservation
(see trainer/toyworld/score.py). Only meaningful for models of the toy world, which the judge reads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from trainer.data.photos import collect_image_paths, load_rgb


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.toyworld.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instance-data", type=Path, help="Folder of subject images.")
    parser.add_argument("--example", action="store_true", help="Use the bundled example subject (sks star).")
    parser.add_argument("--captions", action=argparse.BooleanOptionalAction, default=False,
                        help="With --example: write a caption file beside each image naming its background.")
    parser.add_argument("--identifier", default="sks")
    parser.add_argument("--instance-prompt", default=None,
                        help='Prompt of the training images (default "a photo of IDENTIFIER NOUN").')
    parser.add_argument("--class-noun", default="star", help="A toy-world shape: circle, square, triangle, star, cross.")
    parser.add_argument("--base", type=Path, default=None, help="Base model folder (default: the toy model).")
    parser.add_argument("--run", type=Path, default=None, help="Score this run folder instead of training.")
    parser.add_argument("--output-dir", type=Path, default=None, help="Run folder to train into (default: a temp folder).")
    parser.add_argument("--method", choices=("lora", "full"), default="lora", help="Default lora, as the example.")
    parser.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True,
                        help="Prior preservation (default on).")
    parser.add_argument("--preservation", choices=("class-images", "base-prediction"), default="class-images",
                        help="With --prior: class images (default) or the base model's own predictions.")
    parser.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                        help="Also train the text encoder (default: the example's setting).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps (default: the example's).")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="Any other TrainConfig field, e.g. --set lora_rank=16 (repeatable).")
    parser.add_argument("--first-seed", type=int, default=0, help="With --seeds: the first training seed.")
    parser.add_argument("--seeds", type=int, default=1,
                        help="Train this many runs (training seeds 0..N-1) and report their mean: one run's "
                             "numbers move by ~0.1 from seed to seed.")
    parser.add_argument("--score-every", type=int, default=None, metavar="N",
                        help="Checkpoint and score (trainer/scores/measure.py) every N steps while training, then also "
                             "measure the checkpoint the pick rule keeps (trainer/scores/pick.py) beside the last one.")
    parser.add_argument("--score-samples", type=int, default=8, help="With --score-every: images per scoring prompt.")
    parser.add_argument("--samples", type=int, default=16, help="Images per prompt.")
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine).")
    return parser


def train_run(args: argparse.Namespace, base: Path, instance_dir: Path, run_dir: Path,
              seed: int | None = None) -> dict[str, float | None]:
    """Train with the engine; return the wall-clock seconds it took, to its first step, and per step after."""
    from trainer import train
    from trainer.events import StepEvent
    from trainer.toyworld import example_config

    changes: dict = {"method": args.method, "with_prior_preservation": args.prior, "preservation": args.preservation,
                     "identifier": args.identifier,
                     "instance_prompt": args.instance_prompt or f"a photo of {args.identifier} {args.class_noun}",
                     "class_prompt": f"a photo of a {args.class_noun}", "class_noun": args.class_noun,
                     "class_cache_dir": str(run_dir.parent / "class-images")}
    if args.train_text_encoder is not None:
        changes["train_text_encoder"] = args.train_text_encoder
    if args.steps is not None:
        changes["max_train_steps"] = args.steps
    if args.learning_rate is not None:
        changes["learning_rate"] = args.learning_rate
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            changes[name] = json.loads(value)  # numbers, true/false, null
        except json.JSONDecodeError:
            changes[name] = value
    if seed is not None:
        changes["seed"] = seed
    if args.score_every:
        changes.update(score_checkpoints=True, checkpointing_steps=args.score_every, checkpoints_total_limit=None,
                       score_inference_steps=args.inference_steps, score_samples=args.score_samples)
    config = example_config(base, instance_dir, run_dir, **changes)
    steps: list[float] = []  # when each step ended
    started = time.monotonic()
    result = train(config, on_event=lambda e: steps.append(time.monotonic()) if isinstance(e, StepEvent) else None)
    took = {"seconds": round(time.monotonic() - started, 2),
            "first_step": round(steps[0] - started, 2) if steps else None,
            "per_step": round((steps[-1] - steps[0]) / (len(steps) - 1), 4) if len(steps) > 1 else None}
    print(f"trained {result.step} steps in {took['seconds']:.0f} s (first step after {took['first_step']} s, then "
          f"{took['per_step']} s a step) -> {result.run_dir}", flush=True)
    return took


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    from trainer.toyworld.score import SCORE_NAMES

    return {key: round(sum(r[key] for r in rows) / len(rows), 3) for key in SCORE_NAMES}


def _use_pick(run_dir: Path) -> tuple[int | None, str]:
    """Make the run's picked checkpoint its weights (the last step stays a checkpoint); (step, reason)."""
    from trainer.export import export_checkpoint
    from trainer.scores.measure import read_scores
    from trainer.scores.pick import pick_from_rows

    pick = pick_from_rows(read_scores(run_dir))
    if pick.step is None:
        return None, pick.reason
    export_checkpoint(run_dir, pick.step)
    return pick.step, pick.reason


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.example == (args.instance_data is not None):
        raise SystemExit("Give exactly one of --instance-data DIR or --example.")
    if args.seeds < 1 or (args.run is not None and args.seeds != 1):
        raise SystemExit(f"--seeds must be at least 1, and 1 with --run (a run folder is one training); got {args.seeds}.")
    import torch

    from trainer.run_folder import load_pipeline, load_run
    from trainer.toyworld import TOY_MODEL_DIR, example_subject
    from trainer.toyworld.judge import Judge
    from trainer.toyworld.score import Subject, real_similarity, score

    if args.threads:
        torch.set_num_threads(args.threads)
    base = args.base or TOY_MODEL_DIR
    scratch = Path(tempfile.mkdtemp(prefix="dreambooth-eval-"))
    instance_dir = example_subject(scratch / "subject", captions=args.captions) if args.example else args.instance_data
    subject = Subject([load_rgb(p) for p in collect_image_paths([instance_dir])], args.identifier, args.class_noun)
    judge = Judge()

    run_dirs, seconds = [args.run], [None]
    seeds = range(args.first_seed, args.first_seed + args.seeds)  # one run folder each when more than one
    if args.run is None:
        out = args.output_dir or scratch / "run"
        run_dirs = [out] if args.seeds == 1 else [out / f"seed-{k}" for k in seeds]
        seconds = [train_run(args, base, instance_dir, d, seed=None if args.seeds == 1 else k)
                   for k, d in zip(seeds, run_dirs, strict=True)]

    def measure(run_dir: Path | None) -> dict[str, float]:
        """The scores of a run folder's weights (None: the base model's)."""
        pipe = load_pipeline(base, torch.float32) if run_dir is None else load_run(run_dir, base_model=base)
        return score(pipe, judge, subject, count=args.samples, steps=args.inference_steps,
                     guidance=args.guidance).as_dict()

    per_run = [measure(d) for d in run_dirs]
    rows = {"base": measure(None), "trained": _mean(per_run)}
    if len(per_run) > 1:
        rows.update({f"seed {k}": row for k, row in zip(seeds, per_run, strict=True)})
    picks = _measure_picks(run_dirs, per_run, seeds, measure, rows) if args.score_every else None
    results = {"runs": [str(d) for d in run_dirs], "method": args.method, "prior": args.prior,
               "preservation": args.preservation if args.prior else "none",
               "train_seconds": seconds, "picks": picks, "real_similarity": round(real_similarity(judge, subject), 3), **rows}
    _print_results(results, rows, per_run, seconds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _measure_picks(run_dirs: list[Path], per_run: list[dict], seeds: range, measure, rows: dict) -> list[dict]:
    """Make each run's picked checkpoint its weights and measure them (a run with no pick: its last step's
    scores); adds the mean (and, over several seeds, each run's) to `rows`; returns each run's pick."""
    picks, picked = [], []
    for run_dir, last in zip(run_dirs, per_run, strict=True):
        step, reason = _use_pick(run_dir)
        picks.append({"step": step, "reason": reason})
        print(f"{run_dir}: {reason}", flush=True)
        picked.append(last if step is None else measure(run_dir))
    rows["picked"] = _mean(picked)
    if len(picked) > 1:
        rows.update({f"pick {k}": row for k, row in zip(seeds, picked, strict=True)})
    return picks


def _print_results(results: dict, rows: dict, per_run: list[dict], seconds: list) -> None:
    from trainer.toyworld.score import SCORE_NAMES

    print(f"\nreal images vs each other: subject sim {results['real_similarity']}")
    print(f"{'model':8}" + "".join(f"{name:>16}" for name in SCORE_NAMES.values()))
    for label, row in rows.items():
        print(f"{label:8}" + "".join(f"{row[key]:>16.3f}" for key in SCORE_NAMES))
    ratio = rows["trained"]["div"] / rows["base"]["div"] if rows["base"]["div"] else float("nan")
    print(f"DIV kept: {ratio:.2f} of the base model's" + (f" (trained: mean of {len(per_run)} seeds)"
                                                           if len(per_run) > 1 else ""))
    timed = [s for s in seconds if s and s["per_step"] is not None]
    if timed:
        print(f"time to first step {sum(s['first_step'] for s in timed) / len(timed):.1f} s, then "
              f"{sum(s['per_step'] for s in timed) / len(timed):.3f} s a step (mean of {len(timed)} runs)")


if __name__ == "__main__":
    main()
