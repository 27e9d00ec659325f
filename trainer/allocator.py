"""The memory allocator of a training process: jemalloc where it is installed.

glibc's malloc keeps much of what a training step frees in its heap (fragmented: it cannot hand it
back or reuse it for the next step's differently sized tensors), so the process's peak resident
memory grows well past what its tensors need. jemalloc reuses it: on the side-by-side benchmark's
mid model (18 M-parameter UNet, 64x64 latents, CPU) the peak RSS of a run fell from 1,269 to
949 MiB (bench/allocator.py, medians of 3 interleaved runs), at 1.05x the seconds per step. On the
tiny model, whose peak is the imported libraries, it changes nothing (604 vs 619 MiB).

jemalloc runs on its own defaults (freed pages go back to the system after about 10 s). Turning that
off (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1, which the engine set for a day) made mid's
steps 8% faster, but then some runs never reused what they freed: a tiny LoRA run grew by ~6 MiB a
step to 2.8 GiB at step 400 (2 of 2 runs; glibc and jemalloc's defaults stayed at 580 MiB), and
short ones ended at 710 instead of 585 MiB in 5 of 7. Adding lg_extent_max_active_fit:30 (a kept extent
may be split for any smaller request) stopped that growth on tiny and kept mid's speed, but full
fine-tuning of the SD 1.5 UNet on the CPU then peaked 8-12% higher (9.87 against 9.14 GiB with
checkpointing): not adopted (bench/allocator.py's jemalloc-nodecay-fit; README, "How it fits consumer
GPUs"). A user's MALLOC_CONF is passed on as it is.

`python -m trainer train` re-executes itself once with jemalloc preloaded (LD_PRELOAD) when the
library is installed (Debian/Ubuntu: `apt install libjemalloc2`) and not already loaded, before
anything large is imported; the same process id, arguments and environment continue. Set
DREAMBOOTH_ALLOCATOR=system to keep the system's malloc. The run's speed-choices line names the
allocator in use.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import sys
from collections.abc import Mapping

ENV = "DREAMBOOTH_ALLOCATOR"
_REEXECUTED = "_DREAMBOOTH_ALLOCATOR_REEXECUTED"  # set on the re-executed process: never loop
_KNOWN = (("libjemalloc", "jemalloc"), ("libtcmalloc", "tcmalloc"), ("libmimalloc", "mimalloc"))


def in_use() -> str:
    """The malloc this process runs on: jemalloc / tcmalloc / mimalloc when one is loaded, else "system"."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            text = maps.read()
    except OSError:  # not Linux
        return "system"
    for marker, name in _KNOWN:
        if marker in text:
            return name
    return "system"


@functools.cache  # find_library runs ldconfig: once a process, not once an estimate
def jemalloc_library() -> str | None:
    """jemalloc's library name as the dynamic linker finds it, or None when it is not installed."""
    return ctypes.util.find_library("jemalloc") if sys.platform.startswith("linux") else None


def for_training(env: Mapping[str, str] | None = None) -> str:
    """The allocator a `python -m trainer train` started with `env` (default: this process's) will run
    on: "jemalloc" where it is installed and not opted out of, else "system"."""
    env = os.environ if env is None else env
    wanted = env.get(ENV, "jemalloc").lower() != "system"
    return "jemalloc" if wanted and jemalloc_library() is not None else "system"


def with_jemalloc(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with jemalloc preloaded as the engine runs it; `env` unchanged where jemalloc is not installed."""
    library = jemalloc_library()
    if library is None:
        return dict(env)
    preload = " ".join(part for part in (env.get("LD_PRELOAD", ""), library) if part)
    return {**env, "LD_PRELOAD": preload}


def reexecute_with_jemalloc() -> None:
    """Replace this process by itself with jemalloc preloaded, when that applies (see the module
    docstring); otherwise return and run on as it is."""
    if os.environ.get(ENV, "jemalloc").lower() == "system" or os.environ.get(_REEXECUTED):
        return
    argv = getattr(sys, "orig_argv", [])
    if len(argv) < 2 or argv[1] == "-":  # a script read from stdin cannot be read twice
        return
    if jemalloc_library() is None or in_use() != "system":
        return
    env = {**with_jemalloc(os.environ), _REEXECUTED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # could not exec (a sandbox, a vanished interpreter): run on with malloc
        return
