"""DreamBooth Studio: `python app.py` serves the UI on http://127.0.0.1:7860.

Importing this module builds the UI (`demo`, for `gradio app.py` and Spaces) and nothing else:
no model is loaded and no training thread starts until someone asks for one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import gradio as gr

from space import fair_use, retention
from space.example import EXAMPLE_FOLDER
from space.hardware import SpaceInfo
from space.layout import CSS, GPU_MODE_ENV, MAX_SESSIONS, MAX_UPLOAD, Services, app_kwargs, build_app

AUTH_ENV = "DREAMBOOTH_AUTH"  # "user:password", an alternative to --auth that stays out of argv


def create_app(runs_dir: Path | None = None, gpu_mode: str | None = None) -> tuple[gr.Blocks, Services]:
    services = Services.create(runs_dir=runs_dir, gpu_mode=gpu_mode)
    return build_app(services), services


def runs_privately(args: argparse.Namespace, space: SpaceInfo) -> bool:
    """Served on this machine's loopback only, without a public link, a login or a Space around it:
    whoever uses it is the machine's user, who may cancel any training."""
    local = args.host in ("127.0.0.1", "localhost", "::1")
    return local and not args.share and args.auth is None and space.space_id is None


def parse_auth(text: str, where: str = "--auth") -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{where} must look like USER:PASSWORD, both non-empty")
    return user, password


def read_logins(pairs: list[str], file: Path | None) -> list[tuple[str, str]] | None:
    """The logins of --auth (each USER:PASS), $DREAMBOOTH_AUTH and --auth-file (one USER:PASS a line; blank
    lines and # comments skipped); None when there are none. A user named twice is refused."""
    logins = [parse_auth(text) for text in pairs]
    if not pairs and os.environ.get(AUTH_ENV):
        logins.append(parse_auth(os.environ[AUTH_ENV], AUTH_ENV))
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--auth-file: cannot read {file}: {err.strerror or err}") from None
        logins += [parse_auth(line, f"--auth-file line {n}") for n, line in enumerate(lines, 1)
                   if line.strip() and not line.lstrip().startswith("#")]
    users = [user for user, _ in logins]
    twice = sorted({user for user in users if users.count(user) > 1})
    if twice:
        raise ValueError(f"--auth: the user {twice[0]!r} is given twice")
    return logins or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="Serve the DreamBooth Studio UI.")
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="Interface to listen on (0.0.0.0 for the local network). Default 127.0.0.1.",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), help="Port. Default 7860."
    )
    parser.add_argument("--share", action="store_true", help="Also create a public gradio.live link.")
    parser.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASS",
        help=f"Require a login; repeat for several people, each with runs of their own (one login shared by "
        f"several people is one owner). Or set {AUTH_ENV}=USER:PASS, which keeps it out of ps.",
    )
    parser.add_argument("--auth-file", type=Path, default=None, metavar="FILE",
                        help="Logins from a file, one USER:PASS a line (with or instead of --auth).")
    parser.add_argument(
        "--gpu-mode",
        choices=["per_gpu", "all_gpus"],
        default=None,
        help=f"With several GPUs: one queued training per GPU (per_gpu, the default), or one training across "
        f"all of them with accelerate launch (all_gpus). Or set {GPU_MODE_ENV}.",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=MAX_SESSIONS,
        help=f"Browser sessions whose page state is kept in memory (about 220 KB each; the least recently "
        f"used go first). Default {MAX_SESSIONS}.",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="Where runs are saved. Default ./runs, or /data/runs on a Space with storage.",
    )
    _fair_use_flags(parser)
    args = parser.parse_args(argv)
    if args.max_sessions < 1:
        parser.error(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if any(value is not None and value <= 0 for value in fair_use_caps(args).values()):
        parser.error("the fair-use caps (--max-steps … --max-generate-minutes) must be above 0")
    if args.keep_runs_days is not None and args.keep_runs_days <= 0:
        parser.error(f"--keep-runs-days must be above 0, got {args.keep_runs_days:g}")
    try:
        args.auth = read_logins(args.auth, args.auth_file)
    except ValueError as err:
        parser.error(str(err))
    return args


def _fair_use_flags(parser: argparse.ArgumentParser) -> None:
    """The caps of a shared app (space.fair_use); a private app has only those given."""
    caps = parser.add_argument_group("fair use on a shared app (a Space, --share, --auth, another --host)")
    caps.add_argument("--max-steps", type=int, default=None, metavar="N",
                      help=f"Most steps a training may ask for. Default {fair_use.SHARED_MAX_STEPS}.")
    caps.add_argument("--max-train-minutes", type=float, default=None, metavar="MIN",
                      help=f"A training still running after this is cancelled, its checkpoint kept. "
                      f"Default {fair_use.SHARED_TRAIN_MINUTES:g}.")
    caps.add_argument("--trainings-each", type=int, default=None, metavar="N",
                      help=f"Trainings a visitor may have queued or running at once. Default "
                      f"{fair_use.SHARED_TRAININGS_EACH}.")
    caps.add_argument("--max-generate-megapixel-steps", type=float, default=None, metavar="N",
                      help=f"Most width × height × images × steps a generation may ask for, in megapixels "
                      f"(1024×1024 px) × steps. Default {fair_use.SHARED_GENERATE_MEGAPIXEL_STEPS} (1024×1024 px × "
                      f"4 images × 50 steps).")
    caps.add_argument("--max-generate-minutes", type=float, default=None, metavar="MIN",
                      help=f"A generation still running after this stops. Default {fair_use.SHARED_GENERATE_MINUTES:g}.")
    caps.add_argument("--keep-runs-days", type=float, default=None, metavar="DAYS",
                      help=f"A visitor's runs (photos, weights, samples) untouched this long are deleted, and so are "
                      f"the copies gradio served. Default {retention.SHARED_KEEP_DAYS:g}.")


def fair_use_caps(args: argparse.Namespace) -> dict[str, float | int | None]:
    """The FairUse fields app.py's flags set (None: not given)."""
    return {
        "max_steps": args.max_steps,
        "train_minutes": args.max_train_minutes,
        "trainings_each": args.trainings_each,
        "generate_megapixel_steps": args.max_generate_megapixel_steps,
        "generate_minutes": args.max_generate_minutes,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    default = args.runs_dir is None and args.gpu_mode is None
    app, services = (demo, _services) if default else create_app(args.runs_dir, args.gpu_mode)
    private = runs_privately(args, services.space)
    services.set_private(private, **fair_use_caps(args))
    if args.share and args.auth is None:
        print("Warning: the public link will be open to anyone who has it; protect it with --auth USER:PASS.")
    if not private:
        days = args.keep_runs_days or retention.SHARED_KEEP_DAYS
        retention.start(services.runs_dir, days, services.jobs.busy_runs)
        app.delete_cache = (int(min(retention.SWEEP_SECONDS, days * 86400)), int(days * 86400))
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=args.auth,
        # Only the example's pictures: runs reach a page through the app's handlers, for their owner only.
        allowed_paths=[str((services.runs_dir / EXAMPLE_FOLDER).resolve())],
        max_file_size=None if private else MAX_UPLOAD,
        state_session_capacity=args.max_sessions,
        app_kwargs=app_kwargs(),
        prevent_thread_lock=True,
        theme=gr.themes.Soft(),
        css=CSS,
    )
    if args.share and not app.share_url:
        print(
            f"Could not create the public link (is this machine offline?). Still serving locally on {app.local_url}",
            file=sys.stderr,
        )
    app.block_thread()


demo, _services = create_app()

if __name__ == "__main__":
    main()
