"""The memory allocator of a training process: jemalloc where it is installed.

glibc's malloc keeps much of what a training step frees in its heap (fragmented: it cannot hand it
back or reuse it for the next step's differently sized tensors), so the process's peak resident
memory grows well past what its tensors need. jemalloc reuses it: on the side-by-side benchmark's
mid model (18 M-parameter UNet, 64x64 latents, CPU) the peak RSS of a run fell from 1,269 to
949 MiB (bench/allocator.py, medians of 3 interleaved runs), at 1.05x the seconds per step. On the
tiny model, whose peak is the imported libraries, it changes nothing (604 vs 619 MiB).

Where a training's steps fault much memory back in, jemalloc keeps the pages a step frees for the
next step: the training loop's `FreedMemoryGuard` counts the page faults of its first steps on
jemalloc's defaults and, at 64 MiB or more a step, sets every arena's dirty_decay_ms to -1 (never
decay) for the rest of the run, saying so. On the defaults, and under any finite decay (10 s to
1,000 s alike, set in MALLOC_CONF), a mid step handed ~700 MiB of freed memory back to the system
and took ~180,000 page faults to get it back: 6-9% of the step (3.84 against 3.60 s/step,
bench/allocator.py). The toy model faults ~1,000 pages a step and keeps the defaults (kept pages
raised its peak by 15 MiB and gained nothing). Kept pages cannot grow a process without bound: the
guard hands them back whenever the process's resident memory passes what its first steps after
the switch held by 10% (+16 MiB). Never decaying is what the engine set for a day on 2026-12-02,
for every process and without a guard, and retired: a tiny LoRA run grew by ~6 MiB a step to
2.8 GiB at step 400 (2 of 2 runs). With the engine of 2026-12-03 that growth did not come back
(tiny LoRA and full, 400 steps, and 4 runs of 10: 550-551 MiB either way); the guard stays for run
patterns not measured. A user's MALLOC_CONF is passed on as it is, and then the guard changes
nothing.

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


class FreedMemoryGuard:
    """Counts the page faults of a run's first `warmup` steps; where they bring back `FAULTED` bytes or
    more a step, jemalloc keeps the pages a step frees for the next step's tensors from then on (no
    page faults to get them back), and `after_step()` hands them back to the system whenever the
    process holds more than its next `warmup` steps did by `slack` (+16 MiB), bounding them where a
    run's pattern of sizes stops reusing them. `active` is False, and nothing changes, unless the
    process runs on jemalloc without a MALLOC_CONF of the user's."""

    FLOOR = 16 << 20
    FAULTED = 64 << 20

    def __init__(self, warmup: int = 2, slack: float = 0.10, enabled: bool = True) -> None:
        self.warmup, self.slack = warmup, slack
        self.steps = self.purges = 0
        self.baseline = 0
        self.keeping = False
        self.faults: list[int] = []
        self._mallctl = None if "MALLOC_CONF" in os.environ or not enabled else _jemalloc_mallctl()
        self.active = self._mallctl is not None
        self._last_faults = _page_faults() if self.active else 0

    def keep_freed_pages(self) -> None:
        """From now on every arena keeps its freed (dirty) pages (and new arenas start so)."""
        if not self.active:
            return
        never = ctypes.c_ssize_t(-1)
        size = ctypes.sizeof(never)
        self._mallctl(b"arenas.dirty_decay_ms", None, None, ctypes.byref(never), size)
        for arena in range(_read(self._mallctl, "arenas.narenas", ctypes.c_uint) or 0):
            self._mallctl(f"arena.{arena}.dirty_decay_ms".encode(), None, None, ctypes.byref(never), size)
        self.keeping = True

    def resident(self) -> int:
        """Bytes of memory jemalloc has resident (its own and its kept pages), fresh; 0 when inactive."""
        if not self.active:
            return 0
        self._mallctl(b"epoch", None, None, ctypes.byref(ctypes.c_uint64(1)), ctypes.sizeof(ctypes.c_uint64))
        return _read(self._mallctl, "stats.resident", ctypes.c_size_t) or 0

    def purge(self) -> None:
        """Every arena's kept pages back to the system (MALLCTL_ARENAS_ALL = 4096)."""
        if self.active:
            self._mallctl(b"arena.4096.purge", None, None, None, 0)

    def after_step(self) -> str | None:
        """Call after each optimizer step. Returns a line to show when it starts keeping freed pages."""
        if not self.active:
            return None
        self.steps += 1
        if not self.keeping:
            faults = _page_faults()
            self.faults.append(faults - self._last_faults)
            self._last_faults = faults
            if self.steps < self.warmup:
                return None
            typical = min(self.faults[1:] or self.faults) * os.sysconf("SC_PAGE_SIZE")  # the first step's are fresh
            if typical < self.FAULTED:
                self.active = False  # jemalloc's defaults for the rest of the run
                return None
            self.keep_freed_pages()
            self.warmup += self.steps  # the baseline: the steps after the switch
            return (f"Memory: each step faulted ~{typical >> 20} MiB back in from the system on jemalloc's "
                    "defaults; freed pages are now kept for the next step (handed back if the process "
                    "grows by 10%)")
        resident = self.resident()
        if self.steps <= self.warmup:
            self.baseline = max(self.baseline, resident)
            return None
        if resident > self.baseline * (1 + self.slack) + self.FLOOR:
            self.purge()
            self.purges += 1
        return None


def _page_faults() -> int:
    import resource  # Unix only; the guard is active on Linux only (jemalloc)

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _jemalloc_mallctl():
    """jemalloc's mallctl as this process has it loaded, or None (not on jemalloc, or no such symbol)."""
    if in_use() != "jemalloc":
        return None
    try:
        function = ctypes.CDLL(None).mallctl
    except (AttributeError, OSError):
        return None
    size_p = ctypes.POINTER(ctypes.c_size_t)
    function.argtypes = [ctypes.c_char_p, ctypes.c_void_p, size_p, ctypes.c_void_p, ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def _read(mallctl, name: str, kind):
    value, size = kind(), ctypes.c_size_t(ctypes.sizeof(kind))
    if mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None
    return value.value
