"""The memory allocator of a training process: jemalloc where it is installed.

glibc's malloc keeps much of what a training step frees in its heap (fragmented: it cannot hand it
back or reuse it for the next step's differently sized tensors), so the process's peak resident
memory grows well past what its tensors need. jemalloc reuses it: on the side-by-side benchmark's
mid model (18 M-parameter UNet, 64x64 latents, CPU) the peak RSS of a run fell from 1,269 to
949 MiB (bench/allocator.py, medians of 3 interleaved runs), at 1.05x the seconds per step with
jemalloc's default of returning freed pages after 10 s, and at 979 MiB and 0.94x that default's
seconds with it off (KEEP_FREED_PAGES, what the engine sets). On the tiny model, whose peak is the
imported libraries, it changes nothing (604 vs 619 MiB).

`python -m trainer train` re-executes itself once with jemalloc preloaded (LD_PRELOAD) when the
library is installed (Debian/Ubuntu: `apt install libjemalloc2`) and not already loaded, before
anything large is imported; the same process id, arguments and environment continue (plus
MALLOC_CONF=KEEP_FREED_PAGES when MALLOC_CONF is unset). Set
DREAMBOOTH_ALLOCATOR=system to keep the system's malloc. The run's speed-choices line names the
allocator in use.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping

ENV = "DREAMBOOTH_ALLOCATOR"
# jemalloc's tuning unless the user set MALLOC_CONF: keep freed pages instead of returning them to the
# system after 10 s. A CPU step of a large model takes longer than that, so by default every step
# faulted its big tensors' pages in afresh (mid: 16.2 s/step with, 15.2 without; peak 949 / 979 MiB).
KEEP_FREED_PAGES = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
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
    """`env` with jemalloc preloaded as the engine runs it (freed pages kept unless MALLOC_CONF is set);
    `env` unchanged where jemalloc is not installed."""
    library = jemalloc_library()
    if library is None:
        return dict(env)
    preload = " ".join(part for part in (env.get("LD_PRELOAD", ""), library) if part)
    return {"MALLOC_CONF": KEEP_FREED_PAGES, **env, "LD_PRELOAD": preload}


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
