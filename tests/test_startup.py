"""A training's start-up defers the libraries' imports it never uses (trainer/startup.py).

Each check runs in a fresh interpreter: the deferral is a process-wide import hook, and what a
process has imported is the thing measured."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, tmp_path: Path, **env: str) -> dict:
    """Run `code` in a fresh interpreter (cwd: the repository, tmp_path on sys.path); its last stdout
    line is JSON."""
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", **env}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture()
def counted_package(tmp_path: Path) -> Path:
    """`counted/`: a package that appends a line to runs.txt each time its code runs."""
    package = tmp_path / "counted"
    package.mkdir()
    log = tmp_path / "runs.txt"
    (package / "__init__.py").write_text(
        f"open({str(log)!r}, 'a').write('ran\\n')\nVALUE = 42\n__all__ = ['VALUE']\n")
    (package / "part.py").write_text("from counted import VALUE\nDOUBLE = 2 * VALUE\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    return log


FIRST_USES = {
    "attribute": "value = counted.VALUE",
    "from-import": "from counted import VALUE as value",
    "star-import": "namespace = {}; exec('from counted import *', namespace); value = namespace.get('VALUE')",
    "submodule": "from counted.part import DOUBLE; value = DOUBLE // 2",
}


@pytest.mark.parametrize("first_use", FIRST_USES)
def test_a_deferred_module_runs_once_at_its_first_use(counted_package, tmp_path, first_use):
    result = _python(
        f"""
        import inspect, json, pathlib, sys
        from trainer.startup import DeferredModule, defer
        defer(("counted",))
        log = pathlib.Path({str(counted_package)!r})
        runs = lambda: log.read_text().count("ran") if log.exists() else 0
        import counted
        import counted  # a second import checks __spec__: must not run it
        inspect.getmodule(json.dumps)  # touches every module's __file__ (torch does this registering operators)
        before = {{"runs": runs(), "deferred": type(counted) is DeferredModule, "file": counted.__file__.endswith("__init__.py")}}
        {FIRST_USES[first_use]}
        again = counted.VALUE
        print(json.dumps({{**before, "value": value, "again": again, "after": runs(),
                          "still_deferred": type(counted) is DeferredModule}}))
        """, tmp_path)
    assert result == {"runs": 0, "deferred": True, "file": True, "value": 42, "again": 42, "after": 1,
                      "still_deferred": False}


def test_a_deferred_module_that_fails_raises_its_error_where_it_is_used(counted_package, tmp_path):
    result = _python(
        """
        import json
        from trainer.startup import defer
        defer(("broken",))
        import broken  # deferred: nothing runs yet
        errors = []
        for _ in range(2):
            try:
                broken.anything
            except RuntimeError as err:
                errors.append(str(err))
        print(json.dumps(errors))
        """, tmp_path)
    assert result == ["broken on purpose", "broken on purpose"]


def _imports_of_the_training_loop(tmp_path: Path, **env: str) -> dict:
    return _python(
        """
        import json, os, sys
        from trainer.startup import DeferredModule, trim_imports
        trimmed = trim_imports()
        import trainer.loop
        import torch._dynamo
        found = {
            "trimmed": trimmed,
            "inductor": "torch._inductor.compile_fx" in sys.modules,
            "bitsandbytes": "bitsandbytes" in sys.modules,
            "scipy_stats_deferred": isinstance(sys.modules.get("scipy.stats"), DeferredModule),
            "dynamo_disabled": torch._dynamo.config.disable or os.environ.get("TORCHDYNAMO_DISABLE") == "1",
        }
        # diffusers' beta sigmas are what scipy.stats was imported for: they still work (and load it)
        from diffusers import DPMSolverMultistepScheduler
        scheduler = DPMSolverMultistepScheduler(use_beta_sigmas=True)
        scheduler.set_timesteps(10)
        found["beta_sigmas"] = [round(float(s), 4) for s in scheduler.sigmas[:3]]
        found["scipy_stats_loaded"] = type(sys.modules["scipy.stats"]).__name__ == "module"
        print(json.dumps(found))
        """, tmp_path, **env)


@pytest.mark.slow
def test_a_training_process_skips_the_compiler_and_defers_scipy_stats(tmp_path):
    trimmed = _imports_of_the_training_loop(tmp_path)
    plain = _imports_of_the_training_loop(tmp_path, DREAMBOOTH_LAZY_IMPORTS="0")
    assert trimmed["trimmed"] and not plain["trimmed"]
    # bitsandbytes' torch.compile wrappers pull in torch's inductor; without them it is not imported
    assert plain["inductor"] and not trimmed["inductor"]
    assert trimmed["bitsandbytes"] and trimmed["scipy_stats_deferred"] and not plain["scipy_stats_deferred"]
    # torch.compile stays on for everything else
    assert not trimmed["dynamo_disabled"]
    assert trimmed["beta_sigmas"] == plain["beta_sigmas"] and trimmed["scipy_stats_loaded"]


@pytest.mark.slow
def test_the_app_served_as_a_program_generates_with_its_imports_trimmed(tmp_path):
    """`python app.py` (what a Space runs) trims its imports; its Generate endpoint still draws, through
    diffusers' scheduler modules whose scipy.stats is deferred."""
    from gradio_client import Client

    from space.presets import TOY_MODEL

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "DREAMBOOTH_RUNS_DIR": str(tmp_path / "runs")}
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the app did not answer in 180 s"
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        client = Client(url, verbose=False)
        gallery = client.predict(TOY_MODEL, "a photo of a dog", "", 5.0, 2, "DPM++ 2M", 0, 32, 32, 1, 1.0,
                                 api_name="/generate")
        assert len(gallery) == 1 and os.path.isfile(gallery[0]["image"])
    finally:
        proc.terminate()
        proc.wait(30)
