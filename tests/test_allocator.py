"""A training process runs on jemalloc where it is installed (trainer/allocator.py)."""

from __future__ import annotations

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
