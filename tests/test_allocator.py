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


# A run's steps as the guard sees them: each writes and frees `size` MiB in 32 MiB tensors (jemalloc
# hands such freed pages back at once on its defaults), then one frees 256 MiB more.
GUARD_PROBE = """
import json, resource, sys, torch
from trainer.allocator import FreedMemoryGuard, reexecute_with_jemalloc
reexecute_with_jemalloc()
guard = FreedMemoryGuard()
MiB = 1 << 20
def free(total):
    parts = [torch.ones(8 * MiB) for _ in range(total // 32)]
    del parts
def step(size):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    free(size)
    line = guard.after_step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start, line
size = int(sys.argv[1])
steps = [step(size) for _ in range(7)]
before = guard.resident()
free(256)
kept = guard.resident()
purged = guard.purges
step(size)
print(json.dumps({"active": guard.active, "keeping": guard.keeping, "faults": [f for f, _ in steps],
                  "lines": [line for _, line in steps], "before": before, "kept": kept,
                  "purged": guard.purges - purged, "after": guard.resident(), "later": [step(size) for _ in range(3)]}))
"""


def _guard(size: int, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", GUARD_PROBE, str(size)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**{k: v for k, v in os.environ.items() if k != "MALLOC_CONF"},
                                            "PYTHONPATH": str(REPO), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(jemalloc_library() is None, reason="libjemalloc is not installed (apt install libjemalloc2)")
def test_steps_that_fault_much_keep_their_freed_pages_and_growth_is_handed_back() -> None:
    """Steps that bring 96 MiB back in from the system by page faults each (jemalloc's defaults hand
    freed memory back) make the guard keep freed pages after its 2 counted steps, saying so once: then
    the steps fault almost nothing. When a step leaves the process 256 MiB larger, the kept pages go
    back; steps of the usual size leave them alone."""
    probe = _guard(96)
    pages = 96 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert probe["active"] and probe["keeping"]
    assert all(f > pages // 2 for f in probe["faults"][:3])  # counted on the defaults (the 3rd freed before)
    assert all(f < pages // 100 for f in probe["faults"][3:])  # kept
    assert [i for i, line in enumerate(probe["lines"]) if line] == [1] and "96 MiB" in probe["lines"][1]
    MiB = 1 << 20
    assert probe["kept"] > probe["before"] + 150 * MiB  # freed, yet resident (96 MiB of it reused): kept
    assert probe["purged"] == 1 and probe["after"] < probe["kept"] - 150 * MiB
    assert [purge for purge in probe["later"] if purge[1]] == []


@pytest.mark.skipif(jemalloc_library() is None, reason="libjemalloc is not installed (apt install libjemalloc2)")
def test_steps_that_fault_little_keep_jemallocs_defaults() -> None:
    """32 MiB a step (under the guard's 64): nothing changes, and nothing is kept or handed back."""
    probe = _guard(32)
    pages = 32 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert not probe["active"] and not probe["keeping"] and probe["lines"] == [None] * 7
    assert all(f > pages // 2 for f in probe["faults"])  # the defaults: each step faults its memory back in
    assert probe["purged"] == 0


def test_the_guard_leaves_other_allocators_and_a_users_tuning_alone() -> None:
    assert _guard(96, DREAMBOOTH_ALLOCATOR="system")["active"] is False
    if jemalloc_library() is not None:
        users = _guard(96, MALLOC_CONF="narenas:2")  # decay as the user left it: nothing of ours to change
        assert users["active"] is False and users["keeping"] is False and users["purged"] == 0
