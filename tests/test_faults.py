"""Faults, through the real CLI in its own processes: SIGKILL at many points, a full disk, a broken base model.

Each training is `python -m trainer train --config <file> --events json` with resume_from_checkpoint
'latest' from its first start, as a user would restart it after a crash; the test reads the JSON
events on stdout to know where the process is, and kills it with SIGKILL there. Two kill points are
made certain rather than likely: `_PAUSED_CLI` runs the same CLI with one writer wrapped to stop
mid-save (after the first file of a checkpoint, after the LoRA file of the final save) and say so.
The weights of every interrupted run are compared with those of one unbroken training of the same
config, bit for bit.

A full disk is a size-limited tmpfs this test mounts (root only; skipped otherwise), filled by a
ballast file to leave exactly the room each phase needs, less a little.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from PIL import Image
from safetensors.torch import load_file
from train_helpers import max_abs_diff, tiny_config

from trainer import TrainConfig, train
from trainer.checkpoints import STATE, list_checkpoints, resolve_resume
from trainer.run_folder import KOHYA_LORA_WEIGHTS, LORA_WEIGHTS, run_kind

REPO = Path(__file__).resolve().parents[1]
SEED = 13  # chooses the steps of the two kills between steps (1-3 and 3-7 of 8); any seed must pass
TIMEOUT = 300  # seconds one CLI process may live (spawned, waiting, running) before it is killed

pytestmark = pytest.mark.slow

# The CLI's process: the imports a training makes, then a wait for "go" on stdin (so that it can be started
# while the process before it still runs), then `python -m trainer` itself (runpy runs trainer/__main__.py as
# `-m` does). argv[1] may make one writer stop mid-save and print {"type": "paused", ...} on stdout:
# "checkpoint:N": after the UNet file of checkpoint N is written into its temporary folder;
# "weights": after the LoRA file is written into the weights' staging folder, before kohya's copy.
_CLI = r"""
import json, runpy, sys, time
from pathlib import Path
import trainer.checkpoints, trainer.loop, trainer.output
where = sys.argv.pop(1)
def pause(**info):
    print(json.dumps({"type": "paused", **info}), file=sys.__stdout__, flush=True)
    time.sleep(600)
if where.startswith("checkpoint:"):
    folder = ".tmp-checkpoint-%06d" % int(where.split(":")[1])
    save_file = trainer.checkpoints.save_file
    def save_then_pause(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        if Path(filename).parent.name == folder:
            pause(file=str(filename))
    trainer.checkpoints.save_file = save_then_pause
elif where == "weights":
    def pause_instead(family, run_dir, **kwargs):
        pause(folder=str(run_dir))
    trainer.output.save_kohya_lora = pause_instead
if sys.stdin.readline() != "go\n":
    sys.exit("not started")
sys.argv[0] = "trainer"
runpy.run_module("trainer", run_name="__main__", alter_sys=True)
"""


# --- the CLI in a process --------------------------------------------------------------------------------------
# Threads of each training process. Bit-identical weights need the same number in the unbroken reference
# run (in this process): a different count sums a matrix product in another order (3.7e-5 apart).
CHILD_THREADS = int(os.environ.get("OMP_NUM_THREADS", "1"))


class Cli:
    """`python -m trainer train --config <file> --events json` in its own process (see `_CLI`), waiting
    for `go()`; its stderr goes to a log file."""

    def __init__(self, config_file: Path, log: Path, pause_at: str | None = None) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(CHILD_THREADS), "HF_HUB_OFFLINE": "1",
               "GRADIO_ANALYTICS_ENABLED": "False"}
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CLI, pause_at or "-", "train", "--config", str(config_file), "--events", "json"],
                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.watchdog = threading.Timer(TIMEOUT, self.process.kill)
        self.watchdog.start()
        self.events: list[dict] = []

    def go(self) -> Cli:
        with contextlib.suppress(BrokenPipeError):  # it died while importing: reading it says how
            self.process.stdin.write("go\n")
            self.process.stdin.close()
        return self

    def read_until(self, kill_when: Callable[[dict], bool]) -> list[dict]:
        """Read events; SIGKILL the process at the first that `kill_when` accepts."""
        try:
            for line in self.process.stdout:
                self.events.append(json.loads(line))
                if kill_when(self.events[-1]):
                    self.process.send_signal(signal.SIGKILL)
                    break
            else:
                pytest.fail(f"the run ended before its kill point; last event {self.events[-1:]}; {self.stderr()}")
            assert self.process.wait() == -signal.SIGKILL, self.stderr()
        finally:
            self.close()
        return self.events

    def finish(self) -> tuple[int, list[dict], str]:
        """(exit status, events, stderr) of a run left to end."""
        try:
            self.events += [json.loads(line) for line in self.process.stdout]
            status = self.process.wait()
        finally:
            self.close()
        return status, self.events, self.stderr()

    def stderr(self) -> str:
        return f"stderr:\n{self.log.read_text()}"

    def close(self) -> None:
        self.watchdog.cancel()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(BrokenPipeError):
                pipe.close()


class Restarts:
    """The CLI run again and again on one config, as a user restarts a training: each process is spawned
    (and does its seconds of imports) while the one before it runs, and told to go once that one is over."""

    def __init__(self, config_file: Path, logs: Path, pauses: Sequence[str | None]) -> None:
        self.config_file, self.logs, self.pauses = config_file, logs, list(pauses)
        self.spawned: list[Cli] = []
        self.ready = self._spawn()

    def _spawn(self) -> Cli | None:
        n = len(self.spawned)
        if n == len(self.pauses):
            return None
        self.spawned.append(Cli(self.config_file, self.logs / f"process-{n}.stderr", self.pauses[n]))
        return self.spawned[-1]

    def next(self) -> Cli:
        assert self.ready is not None, "every process of the chain has run"
        current = self.ready.go()
        self.ready = self._spawn()
        return current

    def close(self) -> None:
        for cli in self.spawned:
            cli.close()


@pytest.fixture
def restarts(tmp_path: Path) -> Iterator[Callable[[Path, Sequence[str | None]], Restarts]]:
    """Restarts(config file, the pause of each process in turn); every process is ended after the test."""
    made: list[Restarts] = []

    def make(config_file: Path, pauses: Sequence[str | None]) -> Restarts:
        made.append(Restarts(config_file, tmp_path, pauses))
        return made[-1]

    yield make
    for chain in made:
        chain.close()


def _is(kind: str, **fields: object) -> Callable[[dict], bool]:
    return lambda event: event["type"] == kind and all(event.get(k) == v for k, v in fields.items())


def _config_file(config: TrainConfig, folder: Path) -> Path:
    path = folder / "config.json"
    config.save(path)
    return path


# --- what a run folder holds -------------------------------------------------------------------------------------
def _loadable(checkpoint: Path) -> None:
    """Every file of a complete checkpoint reads back."""
    assert json.loads((checkpoint / STATE).read_text())["step"] == int(checkpoint.name.split("-")[1])
    assert {p.name for p in checkpoint.iterdir()} >= {"unet.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"}
    for file in checkpoint.glob("*.safetensors"):
        load_file(file)
    for file in checkpoint.glob("*.pt"):
        torch.load(file, weights_only=True)


def _complete_checkpoints(run: Path) -> list[str]:
    """The complete checkpoints' names, each checked to load."""
    found = list_checkpoints(run)
    for checkpoint in found:
        _loadable(checkpoint)
    return [p.name for p in found]


def _class_images(cache: Path) -> dict[str, bytes]:
    """The cache's class images, each checked to be a whole PNG."""
    images = {}
    for path in sorted(cache.rglob("class-*.png")):
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and image.size == (32, 32), path
        images[path.name] = path.read_bytes()
    return images


def _leftovers(*folders: Path) -> list[Path]:
    """Hidden files and folders under the folders: a write not finished (.tmp), a delete not finished (.old-)."""
    return [p for folder in folders for p in folder.rglob("*") if p.name.startswith(".")]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The final LoRA (diffusers' and kohya's files) and the last checkpoint's trainable weights."""
    last = list_checkpoints(run)[-1]
    return {**{f"lora/{k}": v for k, v in load_file(run / LORA_WEIGHTS).items()},
            **{f"kohya/{k}": v for k, v in load_file(run / KOHYA_LORA_WEIGHTS).items()},
            **{f"checkpoint/{f.name}/{k}": v for f in sorted(last.glob("*.safetensors")) for k, v in load_file(f).items()}}


def _fault_config(model: Path, images: Path, folder: Path, **changes) -> TrainConfig:
    """A LoRA with its text encoder and prior preservation (3 class images, made one at a time), a
    checkpoint every 2 steps; resumed from the latest checkpoint from its first start."""
    return tiny_config(model, images, folder / "run", learning_rate=1e-3, train_text_encoder=True,
                       checkpointing_steps=2, with_prior_preservation=True, class_prompt="a photo of a square",
                       num_class_images=3, sample_batch_size=1, class_cache_dir=str(folder / "cache"),
                       resume_from_checkpoint="latest", **changes)


def _unbroken(config: TrainConfig, folder: Path) -> Path:
    """The same training, in one go, in this process (own run folder and class cache), with the children's
    thread count: the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(CHILD_THREADS)
    try:
        result = train(config.replace(output_dir=str(folder / "run"), class_cache_dir=str(folder / "cache"),
                                      resume_from_checkpoint=None))
    finally:
        torch.set_num_threads(threads)
    assert result.status == "completed"
    return result.run_dir


# --- 1. SIGKILL anywhere ---------------------------------------------------------------------------------------
def test_a_training_killed_anywhere_resumes_to_the_weights_of_an_unbroken_one(
    tiny_model_dir, subject_images, tmp_path, restarts
):
    rng = random.Random(SEED)
    first, second = rng.randint(1, 3), rng.randint(3, 7)  # the steps after which two kills land
    config = _fault_config(tiny_model_dir, subject_images, tmp_path, max_train_steps=8)
    run, cache = Path(config.output_dir), Path(config.class_cache_dir)
    cli = restarts(_config_file(config, tmp_path), [None, None, None, "checkpoint:4", None, "weights", None])
    straight = _unbroken(config, tmp_path / "straight")

    # 1. While the base model loads: nothing is written yet, and a resume of nothing starts afresh.
    cli.next().read_until(_is("phase", phase="loading"))
    assert not list_checkpoints(run)

    # 2. While class images are made: the one finished is whole; a half-written one is only a hidden .tmp
    # (as a kill mid-write leaves it), which is not taken for an image and is replaced.
    cli.next().read_until(_is("progress", phase="class-images", done=1))
    made = _class_images(cache)
    assert 1 <= len(made) < 3 and not list_checkpoints(run)
    folder = next(cache.iterdir())
    (folder / ".class-00002.png.tmp").write_bytes(made["class-00000.png"][:100])

    # 3. After a step chosen at random, before a checkpoint or while one is written: the latest complete one loads.
    cli.next().read_until(_is("step", step=first))
    assert len(_class_images(cache)) == 3
    assert all(int(name.split("-")[1]) <= first for name in _complete_checkpoints(run))

    # 4. Midway through writing checkpoint 4: checkpoint 2 is intact and 'latest' still means it.
    events = cli.next().read_until(_is("paused"))
    assert Path(events[-1]["file"]).parent == run / "checkpoints" / ".tmp-checkpoint-000004"
    assert not (run / "checkpoints" / ".tmp-checkpoint-000004" / STATE).exists()
    assert _complete_checkpoints(run) == ["checkpoint-000002"]
    assert resolve_resume(run, "latest") == run / "checkpoints" / "checkpoint-000002"

    # 5. After another step chosen at random.
    cli.next().read_until(_is("step", step=second))
    assert _complete_checkpoints(run)[-1] in {f"checkpoint-{s:06d}" for s in range(2, second + 1, 2)}

    # 6. In the final save, after the LoRA file is written: no weights in the run folder look complete.
    cli.next().read_until(_is("paused"))
    assert run_kind(run) is None and not (run / KOHYA_LORA_WEIGHTS).exists()
    assert _complete_checkpoints(run)[-1] == "checkpoint-000008"

    # 7. The last resume saves; all is as if nothing had happened.
    status, events, stderr = cli.next().finish()
    assert status == 0 and events[-1]["status"] == "completed", stderr
    assert max_abs_diff(_weights(straight), _weights(run)) == 0.0
    assert _class_images(cache) == _class_images(straight.parent / "cache")
    assert not _leftovers(run, cache)


# --- 2. a full disk ----------------------------------------------------------------------------------------------
class Disk:
    """A size-limited tmpfs; a ballast file in it leaves exactly the free space asked for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ballast = path / "ballast"
        self.page = os.statvfs(path).f_frsize

    def free_pages(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize // self.page

    def pages(self, *files: Path) -> int:
        """The pages the files take on this disk (tmpfs allocates whole pages)."""
        return sum(math.ceil(f.stat().st_size / self.page) for f in files)

    def leave_free(self, pages: int) -> None:
        size = self.ballast.stat().st_size if self.ballast.exists() else 0
        target = size + (self.free_pages() - pages) * self.page
        assert target >= 0, f"the disk cannot leave {pages} pages free"
        with self.ballast.open("ab") as ballast:
            if target < size:
                ballast.truncate(target)
            elif target > size:
                os.posix_fallocate(ballast.fileno(), size, target - size)
        assert self.free_pages() == pages


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Disk]]:
    """Mounts a 4 MiB tmpfs at tmp_path/<name>; unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str) -> Disk:
        path = tmp_path / name
        path.mkdir()
        if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("a full disk is simulated with a size-limited tmpfs, which only root can mount (Linux)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"could not mount a size-limited tmpfs to fill: {done.stderr.strip()}")
        mounted.append(path)
        return Disk(path)

    yield mount
    for path in reversed(mounted):  # lazily: a failed test's last child may still hold a file there
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def _says_the_disk_is_full(status: int, events: list[dict], stderr: str, path: Path) -> None:
    """Exit 1 and one `error:` line naming the full disk and the file not written; no traceback."""
    line = f"error: No space left on device: {path}"
    assert status == 1, stderr
    assert [x for x in stderr.splitlines() if x.startswith("error:")] == [line], stderr
    assert "Traceback" not in stderr
    assert events[-1] == {"type": "error", "message": line.removeprefix("error: "), "exit": 1}


def test_a_full_disk_is_named_keeps_what_was_complete_and_a_resume_finishes(
    tiny_model_dir, subject_images, tmp_path, small_disk, restarts
):
    cache_disk, run_disk = small_disk("cache-disk"), small_disk("run-disk")
    config = _fault_config(tiny_model_dir, subject_images, tmp_path, max_train_steps=4).replace(
        output_dir=str(run_disk.path / "run"), class_cache_dir=str(cache_disk.path / "cache"))
    run, cache = Path(config.output_dir), Path(config.class_cache_dir)
    cli = restarts(_config_file(config, tmp_path), [None] * 4)
    straight = _unbroken(config, tmp_path / "straight")
    reference_images = sorted((straight.parent / "cache").rglob("class-*.png"))
    checkpoint = run_disk.pages(*(straight / "checkpoints" / "checkpoint-000002").iterdir())
    lora = run_disk.pages(straight / LORA_WEIGHTS)
    assert checkpoint > 4 and lora > 4, "the files are too small to fill a disk midway"

    # (a) Class images: room for one.
    cache_disk.leave_free(cache_disk.pages(reference_images[0]))
    status, events, stderr = cli.next().finish()
    folder = next(cache.iterdir())
    _says_the_disk_is_full(status, events, stderr, folder / "class-00001.png")
    assert list(_class_images(cache)) == ["class-00000.png"] and not (folder / "manifest.json").exists()
    assert not _leftovers(cache, run)

    # (b) A checkpoint: room for the cache, the run's small files, checkpoint 2 and half of checkpoint 4.
    cache_disk.ballast.unlink()
    run_disk.leave_free(2 + checkpoint + checkpoint // 2)
    status, events, stderr = cli.next().finish()
    _says_the_disk_is_full(status, events, stderr, run / "checkpoints" / "checkpoint-000004")
    assert _complete_checkpoints(run) == ["checkpoint-000002"]
    assert resolve_resume(run, "latest") == run / "checkpoints" / "checkpoint-000002"
    assert len(_class_images(cache)) == 3 and (folder / "manifest.json").is_file()
    assert not _leftovers(cache, run)

    # (c) The final save: room for checkpoint 4 and half of the LoRA file.
    run_disk.leave_free(1 + checkpoint + lora // 2)
    status, events, stderr = cli.next().finish()
    _says_the_disk_is_full(status, events, stderr, run / LORA_WEIGHTS)
    assert _complete_checkpoints(run) == ["checkpoint-000002", "checkpoint-000004"]
    assert run_kind(run) is None and not (run / KOHYA_LORA_WEIGHTS).exists()
    assert not _leftovers(cache, run)

    # Space freed: the resume saves, with the weights of a run that never ran out of disk.
    run_disk.ballast.unlink()
    status, events, stderr = cli.next().finish()
    assert status == 0 and events[-1]["status"] == "completed", stderr
    assert max_abs_diff(_weights(straight), _weights(run)) == 0.0
    assert not _leftovers(cache, run)


# --- 3. a base model that cannot load ------------------------------------------------------------------------------
def test_a_base_model_missing_a_weights_file_is_named(tiny_model_dir, subject_images, tmp_path):
    """(Pickle-only weights, a wrong folder, a truncated file: tests/test_hardening.py.)"""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    config_file = _config_file(tiny_config(model, subject_images, tmp_path / "run"), tmp_path)
    status, stderr = run_cli(["train", "--config", str(config_file), "--quiet"])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 1 and len(errors) == 1, stderr  # 1: the model failed, not the input (trainer/__main__.py)
    assert f"could not load the unet of '{model}'" in errors[0] and "diffusion_pytorch_model.safetensors" in errors[0]
    assert not (tmp_path / "run").exists()
