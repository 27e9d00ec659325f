"""The command line: `python -m trainer train --config run.json [--field value ...]`, `memory`, `push`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import types
import typing
from collections.abc import Iterator
from pathlib import Path

from trainer.config import ConfigError, TrainConfig, UserError, read_config_file

_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _scalar_type(tp) -> type:
    """int | None -> int; Literal[...] -> str; tuple[str, ...] -> str."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _scalar_type(args[0])
    if typing.get_origin(tp) is typing.Literal:
        return type(args[0])
    if typing.get_origin(tp) is tuple:
        return args[0]
    return tp


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        tp = _FIELD_TYPES[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        scalar = _scalar_type(tp)
        if typing.get_origin(tp) is tuple:
            kwargs["nargs"] = "+"
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = typing.get_args(tp) + (("none",) if f.name == "preservation" else ())
        elif (inner := [a for a in typing.get_args(tp) if typing.get_origin(a) is typing.Literal]):
            kwargs["choices"] = typing.get_args(inner[0])
        parser.add_argument(flag, type=scalar, **kwargs)


def config_from_args(args: argparse.Namespace, *, validate: bool = False) -> TrainConfig:
    """The config file's fields, overridden by the flags given; `validate` checks every value, and an
    error in a value that came from the file names the file as well as the field."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    if "preservation" in flags:  # --preservation names the kind of prior preservation, or none
        preservation = flags.pop("preservation")
        flags["with_prior_preservation"] = preservation != "none"
        if preservation != "none":
            flags["preservation"] = preservation
    from_file: dict = {}
    if args.config:
        path = Path(args.config)
        try:
            from_file = read_config_file(path)
            TrainConfig.from_dict(from_file)  # unknown fields are named with the file
        except ConfigError as err:
            raise ConfigError(str(err) if str(err).startswith(str(path)) else f"{path}: {err}") from None
    config = TrainConfig.from_dict({**from_file, **flags})
    if not validate:
        return config
    try:
        return config.validate()
    except ConfigError as err:
        if args.config and err.field in from_file and err.field not in flags:
            raise ConfigError(f"{args.config}: {err}", field=err.field) from None
        if args.config and err.field in names and err.field not in from_file and err.field not in flags:
            flag = "--" + err.field.replace("_", "-")
            raise ConfigError(f"{err} (set it in {args.config} or with {flag})", field=err.field) from None
        raise


def _train(args: argparse.Namespace) -> int:
    from trainer import train
    from trainer.cli_progress import CliProgress
    from trainer.events import CancelToken, FileCancelToken

    config = config_from_args(args, validate=True)
    token = None
    if args.push_to_hub is not None:
        from trainer.publish.hub import HubError, check_repo_id, check_token, resolve_token

        # A malformed repo id or a bad token fails now, in seconds, not after the training.
        try:
            args.push_to_hub = check_repo_id(args.push_to_hub)
        except HubError as err:
            raise ConfigError(f"`--push-to-hub`: {err}") from None
        token = resolve_token(_token_from_env(args.token_env))
        check_token(token)
    json_events = getattr(args, "json_events", None)
    if args.quiet or json_events is not None:
        _quiet_libraries(warnings=json_events is None)  # a reader's log keeps the libraries' warnings
    cancel = FileCancelToken(Path(args.cancel_file)) if args.cancel_file else CancelToken()
    # Under `accelerate launch` every process sees the same events; the one with RANK 0 prints them.
    quiet = args.quiet or os.environ.get("RANK", "0") != "0"
    with _stop_on_signals(cancel), CliProgress(quiet=quiet) as progress:
        result = train(config, on_event=json_events or progress, cancel=cancel)
    if json_events is not None:
        json_events(result)
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch the main process reports and publishes
        return 0
    # With --events json, stdout holds the events only: this line (and the URL) go to stderr.
    print(f"{result.status}: {result.step}/{result.total_steps} steps; run folder {result.run_dir}")
    if args.push_to_hub is not None and result.status == "completed":
        from trainer.publish.hub import publish

        print(publish(result.run_dir, args.push_to_hub, private=args.private, token=token).url)
    return 0


@contextlib.contextmanager
def _stop_on_signals(cancel) -> Iterator[None]:
    """SIGINT (Ctrl-C) or SIGTERM: a clean stop, as the app's Cancel (the engine checkpoints and saves
    at the next step); a second Ctrl-C stops at once (KeyboardInterrupt, exit status 130)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    asked: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and signal.SIGINT in asked:
            raise KeyboardInterrupt
        if not asked:
            print("Stopping at the next step (a checkpoint is kept); press Ctrl-C again to stop now.",
                  file=sys.stderr, flush=True)
        asked.append(signum)
        cancel.cancel()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _memory(args: argparse.Namespace) -> int:
    """Print a training's predicted peak memory and, where the capacity is known, whether it fits."""
    import torch

    from trainer.memory.advice import advice, describe_fit
    from trainer.memory.estimate import GiB, device_capacity, estimate, needed
    from trainer.memory.shapes import read_shapes

    config = config_from_args(args)  # not validated: only the model and the memory settings matter
    if not config.pretrained_model.strip():
        raise ConfigError("`pretrained_model` is required (a Hub id or a local folder)")
    here = "cuda" if torch.cuda.is_available() else "cpu"
    device = args.device or here
    shapes = read_shapes(config.pretrained_model, config.revision, config.pretrained_vae, family=args.family)
    memory = estimate(config, device, shapes=shapes)
    print(memory.describe())
    capacity = round(args.memory_gib * GiB) if args.memory_gib else None
    if capacity is None and device == here:
        capacity = device_capacity(torch.device(device))[0]
    if capacity is not None:
        print(f"\n{describe_fit(memory, capacity)}")
        if needed(memory) > capacity:
            print(advice(config, device, capacity, shapes))
    return 0


def _quiet_libraries(warnings: bool = True) -> None:
    """--quiet silences the libraries too: their bars (loading weights, downloads) and their warnings;
    --events json their bars only (a log of progress bars is noise)."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    disable_progress_bars()
    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        if warnings:
            library.set_verbosity_error()
    if warnings:  # bitsandbytes logs through plain `logging` (e.g. about optional CPU kernels on AVX-512 bf16)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        # DeepSpeed, where installed, is imported by accelerate's unwrap_model even in runs without it and
        # warns on stdout about its accelerator; it sets its logger's level at import, a filter stays.
        logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)


def _token_from_env(var: str | None) -> str | None:
    """The token is read from the environment, never from argv (where `ps` and shell history see it)."""
    if not var:
        return None
    token = os.environ.get(var)
    if not token:
        raise ConfigError(f"`--token-env`: the environment variable {var} is not set")
    return token


def _push(args: argparse.Namespace) -> int:
    from trainer.publish.hub import HubError, check_repo_id, publish

    try:
        check_repo_id(args.repo_id)
    except HubError as err:
        raise ConfigError(f"`--repo-id`: {err}") from None
    token = _token_from_env(args.token_env)
    result = publish(Path(args.run_dir), args.repo_id, private=args.private, token=token)
    print(result.url)
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainer.export import export_checkpoint
    from trainer.run_folder import CONFIG_NAME

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_NAME).is_file():
        raise ConfigError(f"`run_dir`: {run_dir} is not a run folder (no {CONFIG_NAME})")
    _quiet_libraries(warnings=args.quiet)  # loading bars are noise here; warnings stay unless --quiet
    done = export_checkpoint(run_dir, args.checkpoint, replace_current=args.replace_current)
    print(f"Step {done.step} ({done.reason}) is now the weights of {run_dir}: {done.weights}")
    return 0


def _prog() -> str:
    """`dreambooth-studio` when run as the installed script, `python -m trainer` otherwise."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("dreambooth-studio") else "python -m trainer"


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the CLI's one form: `error: ...` on stderr, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_prog(), description="DreamBooth Studio engine")
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="Fine-tune a model on your subject.",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train_p.add_argument("--config", help="A config.json (e.g. a run folder's) to start from; flags override it.")
    train_p.add_argument("--quiet", "-q", action="store_true",
                         help="Print only errors and the final line (no progress, phases or warnings).")
    train_p.add_argument("--events", choices=["text", "json"], default="text",
                         help="json: instead of progress bars, print each event as one JSON line on stdout "
                              '({"type": "step", ...}), then one {"type": "result", ...} or {"type": "error", '
                              '"message": ..., "exit": N} line; everything else goes to stderr. Under accelerate '
                              "launch only the process with RANK 0 prints them.")
    train_p.add_argument("--cancel-file", metavar="PATH", default=None,
                         help="Stop cleanly (checkpoint, save) at the next step once this file exists, as on "
                              "Ctrl-C or SIGTERM.")
    add_config_arguments(train_p)
    hub = train_p.add_argument_group("publishing when the training completes")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                     help="Publish the run to this Hub repo; the token is checked before training starts.")
    _add_hub_flags(hub)
    train_p.set_defaults(func=_train)

    memory_p = sub.add_parser("memory", help="Predict a training's peak memory, before anything loads.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    memory_p.add_argument("--config", help="A config.json to start from; flags override it.")
    add_config_arguments(memory_p)
    sizing = memory_p.add_argument_group("the estimate")
    sizing.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="Device to size the training for (default: this machine's).")
    sizing.add_argument("--family", choices=["sd", "sdxl"], default=None,
                        help="Where the base model's config files cannot be read (offline: set HF_HUB_OFFLINE=1 "
                             "not to wait on the network), assume this family's known architecture.")
    sizing.add_argument("--memory-gib", type=float, default=None,
                        help="Memory to check the estimate against (default: this machine's, when sizing for it).")
    memory_p.set_defaults(func=_memory)

    push_p = sub.add_parser("push", help="Publish a run folder to the Hugging Face Hub.")
    push_p.add_argument("run_dir", help="The run folder to publish.")
    push_p.add_argument("--repo-id", required=True, help="Target repo, e.g. you/sks-dog.")
    _add_hub_flags(push_p)
    push_p.set_defaults(func=_push)

    export_p = sub.add_parser("export", help="Make one of a run's checkpoints (or the best) its weights.")
    export_p.add_argument("run_dir", help="The run folder.")
    export_p.add_argument("--checkpoint", required=True, metavar="N|best|last",
                          help="A checkpoint's step, 'best' (the pick over the run's scores: see scores.jsonl) or "
                               "'last'.")
    export_p.add_argument("--replace-current", action="store_true",
                          help="Replace the run's weights even when they are in no checkpoint (they are lost).")
    export_p.add_argument("--quiet", "-q", action="store_true", help="Print only errors and the final line.")
    export_p.set_defaults(func=_export)
    return parser


def _add_hub_flags(parser) -> None:
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, default=True,
                        help="Private repo (default) or --no-private / --public.")
    parser.add_argument("--public", dest="private", action="store_false", help="Same as --no-private.")
    parser.add_argument("--token-env", default=None, metavar="VAR",
                        help="Environment variable holding the token (default: HF_TOKEN, then the token saved by "
                             "`hf auth login`). A token is never passed in argv, where `ps` and shell history see it.")


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done, 1 failed (the model, the Hub, the disk, a diverged training), 2 refused
    input; either way one `error: ...` on stderr, never a traceback for something the user can fix."""
    args = build_parser().parse_args(argv)
    json_events = None
    if getattr(args, "events", "text") == "json":
        from trainer.cli_progress import JsonEvents

        # Events on stdout, from the process with RANK 0 only; anything else printed goes to stderr.
        json_events = args.json_events = JsonEvents(sys.stdout, enabled=os.environ.get("RANK", "0") == "0")
    with contextlib.redirect_stdout(sys.stderr) if json_events else contextlib.nullcontext():
        try:
            return args.func(args)
        except UserError as err:
            return _fail(json_events, str(err), 2 if isinstance(err, ConfigError | ValueError) else 1)
        except OSError as err:  # the disk or the system said no (full, read-only, permissions): no bug of ours
            where = f": {err.filename}" if err.filename else ""
            return _fail(json_events, f"{err.strerror or err}{where}", 1)
        except KeyboardInterrupt:  # a second Ctrl-C: no message, as any command line tool
            if json_events is not None:
                json_events.error("interrupted", 130)
            return 130
        except Exception as err:  # a bug: the traceback goes to stderr as always, the reader learns it failed
            if json_events is not None:
                json_events.error(f"{type(err).__name__}: {err}", 1, unexpected=True)
            raise


def _fail(json_events, message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    if json_events is not None:
        json_events.error(message, status)
    return status


if __name__ == "__main__":
    sys.exit(main())
