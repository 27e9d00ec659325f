"""The command line as people meet it: its output in a log, on a terminal and when quiet, and the
package that `pip install .` makes of it (the console script and the bundled toy model)."""

from __future__ import annotations

import io
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from trainer.cli_progress import CliProgress
from trainer.events import CheckpointEvent, PhaseEvent, ProgressEvent, SampleEvent, StepEvent, WarningEvent

ROOT = Path(__file__).resolve().parents[1]
WARNING = "The identifier 'dog' is a common word"


def _steps(first: int, last: int, total: int = 100) -> list[StepEvent]:
    return [StepEvent(i, total, loss=1.0 / i, lr=1e-4, eta_seconds=float(total - i)) for i in range(first, last + 1)]


RUN = [
    PhaseEvent("loading", "Loading tiny"),
    PhaseEvent("class-images", "Preparing 4 class images"),
    *[ProgressEvent("class-images", i, 4) for i in range(1, 5)],
    PhaseEvent("caching", "Encoding images with the VAE once"),
    *[ProgressEvent("caching", i, 30) for i in range(1, 31)],
    PhaseEvent("training", "Training 100 steps"),
    WarningEvent(WARNING),
    *_steps(1, 50),
    SampleEvent(50, (Path("samples/step-000050-p0-0.png"),)),
    CheckpointEvent(50, Path("checkpoints/checkpoint-000050")),
    *_steps(51, 100),
    PhaseEvent("saving", "Saving the model"),
    PhaseEvent("done", "Finished"),
]


def _screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: a carriage return goes back to the start of the line."""
    lines = []
    for line in raw.split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return [line for line in lines if line]


# --- a log: stdout is a pipe or a file ------------------------------------------------------
def test_a_log_gets_a_line_per_phase_and_about_one_per_tenth_of_it(capsys: pytest.CaptureFixture[str]) -> None:
    with CliProgress() as progress:  # capsys' stdout is no terminal
        for event in RUN:
            progress(event)

    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "[loading] Loading tiny",
        "[class-images] Preparing 4 class images",
        *[f"[class-images] {i}/4" for i in range(1, 5)],  # few: each one
        "[caching] Encoding images with the VAE once",
        *[f"[caching] {i}/30" for i in range(3, 31, 3)],
        "[training] Training 100 steps",
        *[f"step {i}/100 loss {1 / i:.4f} lr 1.00e-04 eta 01:{100 - i - 60:02d}" for i in (10, 20, 30, 40)],
        f"step 50/100 loss {1 / 50:.4f} lr 1.00e-04 eta 00:50",
        "samples at step 50: samples/step-000050-p0-0.png",
        "checkpoint at step 50: checkpoints/checkpoint-000050",
        *[f"step {i}/100 loss {1 / i:.4f} lr 1.00e-04 eta 00:{100 - i:02d}" for i in (60, 70, 80, 90, 100)],
        "[saving] Saving the model",
        "[done] Finished",
    ]
    assert err == f"warning: {WARNING}\n"


def test_a_resumed_or_uneven_run_still_logs_its_last_step(capsys: pytest.CaptureFixture[str]) -> None:
    with CliProgress(tty=False) as progress:
        for event in _steps(51, 57, total=57):
            progress(event)
    steps = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert steps == ["54/57", "57/57"]  # every 6th step of 57, and the last


# --- a terminal ------------------------------------------------------------------------------
def test_a_terminal_gets_bars_with_loss_lr_and_eta_and_lines_above_them() -> None:
    out, err = io.StringIO(), io.StringIO()
    with CliProgress(out, err, tty=True) as progress:
        for event in RUN:
            progress(event)

    raw = out.getvalue()
    assert "step 10/100" not in raw and "\r" in raw  # a bar drawn over itself, not log lines
    screen = _screen(raw)
    bar = r"\|[#█]+\| {done}/{total} \[\d\d:\d\d{postfix}\]"
    expected = [
        "[loading] Loading tiny",
        "[class-images] Preparing 4 class images",
        "class images: 100%" + bar.format(done=4, total=4, postfix=""),
        "[caching] Encoding images with the VAE once",
        "caching latents: 100%" + bar.format(done=30, total=30, postfix=""),
        "[training] Training 100 steps",
        "samples at step 50: samples/step-000050-p0-0.png",  # written above the open bar ...
        "checkpoint at step 50: checkpoints/checkpoint-000050",
        "training: 100%" + bar.format(done=100, total=100, postfix=r", loss=0\.0100, lr=1\.00e-04, eta=00:00"),
        "[saving] Saving the model",
        "[done] Finished",
    ]
    assert len(screen) == len(expected), screen
    for line, pattern in zip(screen, expected, strict=True):
        assert re.fullmatch(pattern if "|" in pattern else re.escape(pattern), line), (line, pattern)
    # ... which is drawn again below them, where it was: half way, with its loss and ETA.
    after_samples = raw[raw.index("samples at step 50") :]
    assert re.search(r"training:  50%\|.*\| 50/100 \[\d\d:\d\d, loss=0\.0200, lr=1\.00e-04, eta=00:50\]", after_samples)
    assert err.getvalue() == f"warning: {WARNING}\n"


def test_quiet_prints_nothing_on_a_terminal_or_in_a_log() -> None:
    for tty in (True, False):
        out, err = io.StringIO(), io.StringIO()
        with CliProgress(out, err, quiet=True, tty=tty) as progress:
            for event in RUN:
                progress(event)
        assert (out.getvalue(), err.getvalue()) == ("", "")


@pytest.mark.slow
def test_cli_quiet_prints_only_the_final_line(tiny_model_dir: Path, subject_images: Path, tmp_path: Path) -> None:
    # 'dog' as the identifier makes the engine warn; the log mode's lines are checked above.
    cmd = [sys.executable, "-m", "trainer", "train", "--quiet", "--pretrained-model", str(tiny_model_dir),
           "--instance-data", str(subject_images), "--identifier", "dog", "--instance-prompt", "a photo of dog",
           "--output-dir", str(tmp_path / "run"), "--resolution", "32", "--max-train-steps", "2",
           "--report-to", "none", "--no-use-8bit-adam"]
    quiet = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout == f"completed: 2/2 steps; run folder {tmp_path / 'run'}\n"
    assert quiet.stderr == ""  # not the warning, nor the libraries' loading bars


# --- installed as a package -------------------------------------------------------------------
ASSETS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "trainer" / "assets").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` would install, built offline from a copy of the sources."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools installed")
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pyproject.toml", "requirements.txt", "app.py"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("trainer", "space"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=300)
    return next(dist.glob("dreambooth_studio-*.whl"))


def test_the_wheel_carries_the_code_the_toy_model_and_the_pinned_requirements(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.rsplit("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        assert ASSETS and all(archive.read(a) == (ROOT / a).read_bytes() for a in ASSETS)
    sources = {p.relative_to(ROOT).as_posix() for d in ("trainer", "space") for p in (ROOT / d).rglob("*.py")}
    assert sources | {"app.py"} <= names  # every subpackage, the ones added later too
    assert not any(n.startswith(("tests/", "tools/", "bench/")) for n in names)
    requirements = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert re.findall(r"^Requires-Dist: (.+)$", metadata, re.MULTILINE) == requirements
    assert "dreambooth-studio = trainer.__main__:main" in entry_points
    assert "dreambooth-studio-app = app:main" in entry_points


def test_the_installed_script_runs_from_any_folder_with_the_toy_model(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # The requirements come from the environment running the tests, a venv or a system Python (a venv's
    # --system-site-packages would see the base Python's packages, not those of a venv running the tests):
    # a .pth file adds its site-packages after the new venv's own. Only the package itself is installed.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    paths = sysconfig.get_paths()
    ours = [*site.getsitepackages(), paths["purelib"], paths["platlib"]]
    if site.ENABLE_USER_SITE:
        ours.append(site.getusersitepackages())
    lines = [f"import site; site.addsitedir({d!r})\n" for d in dict.fromkeys(ours) if Path(d).is_dir()]
    (Path(venv_site) / "requirements-from-the-tests.pth").write_text("".join(lines))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    away = tmp_path / "elsewhere"
    away.mkdir()

    help_ = subprocess.run([venv / "bin" / "dreambooth-studio", "train", "--help"], cwd=away, env=env,
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0, help_.stderr[-2000:]
    assert help_.stdout.startswith("usage: dreambooth-studio train") and "--quiet" in help_.stdout
    code = ("import trainer; from trainer.toyworld import TOY_MODEL_DIR; "
            "print(trainer.__file__); print(TOY_MODEL_DIR); print(sorted(p.name for p in TOY_MODEL_DIR.iterdir()))")
    found = subprocess.run([python, "-c", code], cwd=away, env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    module, toy_dir, listing = found.stdout.splitlines()
    assert Path(module).is_relative_to(venv) and Path(toy_dir).is_relative_to(venv)  # not this checkout
    assert listing == str(sorted(p.name for p in (ROOT / "trainer/assets/toy-sd").iterdir()))
