"""A training process runs on jemalloc where it is installed (trainer/allocator.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.allocator import for_training, jemalloc_library

REPO = Path(__file__).resolve().parent.parent
# Stands in for `python -m trainer train`'s first step: re-execute, then say who runs and where.
PROBE = ("import os; from trainer.allocator import in_use, reexecute_with_jemalloc as r; r(); "
         "print(in_use(), os.getpid(), os.environ.get('MALLOC_CONF', '-'))")
WITHOUT_JEMALLOC = "import ctypes.util; ctypes.util.find_library = lambda name: None; "


def _probe(prefix: str = "", **env: str) -> tuple[str, bool, str]:
    """(the allocator the probe ended on, whether it is still the process that was started, MALLOC_CONF)."""
    child = subprocess.Popen([sys.executable, "-c", prefix + PROBE], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**{k: v for k, v in os.environ.items() if k != "MALLOC_CONF"},
                                  "PYTHONPATH": str(REPO), **env})
    out, _ = child.communicate(timeout=60)
    name, pid, conf = out.split()
    return name, int(pid) == child.pid, conf


@pytest.mark.skipif(jemalloc_library() is None, reason="libjemalloc is not installed (apt install libjemalloc2)")
def test_the_process_reexecutes_itself_once_on_jemalloc_and_keeps_its_id() -> None:
    assert _probe() == ("jemalloc", True, "-")  # the same process, on jemalloc, printing once, untuned
    assert _probe(MALLOC_CONF="narenas:2") == ("jemalloc", True, "narenas:2")  # the user's tuning is kept
    assert for_training({}) == "jemalloc"  # what the memory model sizes a training's RAM for


def test_the_system_allocator_when_asked_or_when_jemalloc_is_absent() -> None:
    assert _probe(DREAMBOOTH_ALLOCATOR="system") == ("system", True, "-")
    assert for_training({"DREAMBOOTH_ALLOCATOR": "system"}) == "system"
    assert _probe(WITHOUT_JEMALLOC) == ("system", True, "-")


# A run's steps as the guard sees them: each allocates and frees 64 MiB in 0.5 MiB tensors (jemalloc's
# ordinary arenas, not its dedicated one for huge requests); then one frees 256 MiB more.
GUARD_PROBE = """
import json, torch
from trainer.allocator import FreedMemoryGuard, reexecute_with_jemalloc
reexecute_with_jemalloc()
guard = FreedMemoryGuard(warmup=2)
MiB = 1 << 20
imported = guard.resident()
parts = [torch.ones(MiB // 8) for _ in range(512)]
del parts
loading = guard.resident()  # 256 MiB freed before the loop: handed back at its start
guard.start()
started = guard.resident()
def free(total):
    parts = [torch.ones(MiB // 8) for _ in range(total * 2)]
    del parts
def step():
    free(64)
    return guard.after_step()
steady = [step() for _ in range(5)]
before = guard.resident()
free(256)
kept = guard.resident()
purged = guard.after_step()
after = guard.resident()
print(json.dumps({"active": guard.active, "imported": imported, "loading": loading, "started": started, "steady": steady, "before": before, "kept": kept, "purged": purged,
                  "after": after, "later": [step() for _ in range(3)]}))
"""


def _guard(**env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", GUARD_PROBE], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k != "MALLOC_CONF"},
                               "PYTHONPATH": str(REPO), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(jemalloc_library() is None, reason="libjemalloc is not installed (apt install libjemalloc2)")
def test_freed_pages_are_kept_for_the_next_step_and_handed_back_when_the_process_grows() -> None:
    """Once the loop starts (having handed back what loading freed) jemalloc keeps what a step frees
    (no page faults to get it back); steps that reuse it leave it alone, and when a step leaves the
    process 256 MiB larger the guard hands the kept pages back."""
    probe = _guard()
    MiB = 1 << 20
    assert probe["active"] and probe["started"] <= probe["loading"]
    assert probe["loading"] < probe["imported"] + 150 * MiB  # before the loop, most of 256 MiB freed went back
    assert probe["steady"] == [False] * 5
    assert probe["kept"] > probe["before"] + 150 * MiB  # freed, yet resident (64 MiB of it reused): kept
    assert probe["purged"] and probe["after"] < probe["kept"] - 150 * MiB
    assert probe["later"] == [False] * 3  # back to the steps' own size: nothing more to hand back


def test_the_guard_leaves_other_allocators_and_a_users_tuning_alone() -> None:
    assert _guard(DREAMBOOTH_ALLOCATOR="system")["active"] is False
    if jemalloc_library() is not None:
        users = _guard(MALLOC_CONF="narenas:2")  # decay as the user left it: nothing of ours to bound
        assert users["active"] is False and users["purged"] is False
