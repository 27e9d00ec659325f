"""Build and load the engine's C kernels (trainer/kernels/*.c) with the machine's compiler.

A kernel is built at first use into the user's cache folder; the library's name carries a hash of
the source, the flags, the compiler and this CPU's flags, so a shared home folder never runs code
built for another CPU. No compiler, or a build that fails: `BuildError` says why, and the caller
keeps its PyTorch path (trainer/small_heads.py, trainer/geglu.py, trainer/adamw8bit.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

KERNELS = Path(__file__).parent / "kernels"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-Wno-psabi")


class BuildError(RuntimeError):
    """A kernel could not be built or loaded (the message says why)."""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dreambooth-studio" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, source: Path, flags: tuple[str, ...]) -> Path:
    text = source.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [text, " ".join(flags).encode(), version.encode(), _cpu_flags().encode(), platform.machine().encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    said = ""
    for openmp in (["-fopenmp"], []):  # without OpenMP (clang on macOS): one thread, same results
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            done = subprocess.run(
                [cc, *FLAGS, *flags, *openmp, str(source), "-o", str(built)], capture_output=True, text=True, timeout=300
            )
            if done.returncode == 0:
                os.replace(built, target)  # atomic: processes building at once each install a whole file
                return target
            lines = (done.stderr or done.stdout).strip().splitlines()
            said = lines[-1] if lines else f"exit status {done.returncode}"
    raise BuildError(f"{cc} could not build {source.name}: {said}")


def load(name: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """trainer/kernels/<name>.c built (once per machine and source) with FLAGS + `flags`, loaded."""
    cc = compiler()
    if not cc:
        raise BuildError("no C compiler found (set CC, or install gcc)")
    try:
        return ctypes.CDLL(str(_build(cc, KERNELS / f"{name}.c", flags)))
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(str(error)) from error


def kernel(name: str, switch: str, flags: tuple[str, ...] = (), declare=None) -> tuple[ctypes.CDLL | None, str]:
    """Kernel `name` built and loaded once a process, `declare(library)` having set its functions'
    argument types, and "" ; or None and why not: a build that failed, or the environment variable
    `switch` set to 0 (read at every call, so that it can be turned off in a running process)."""
    if os.environ.get(switch, "1") == "0":
        return None, f"{switch}=0"
    return _built(name, flags, declare)


@functools.cache
def _built(name: str, flags: tuple[str, ...], declare) -> tuple[ctypes.CDLL | None, str]:
    try:
        library = load(name, flags)
    except BuildError as error:
        return None, str(error)
    if declare is not None:
        declare(library)
    return library, ""


def _declare_adamw8bit(library: ctypes.CDLL) -> None:
    pointer = ctypes.c_void_p
    library.adamw8bit_step.argtypes = [pointer] * 10 + [ctypes.c_long] + [ctypes.c_float] * 7 + [ctypes.c_int]
    library.adamw8bit_step.restype = None


def adamw8bit() -> tuple[ctypes.CDLL | None, str]:
    """The 8-bit AdamW step kernel (trainer/kernels/adamw8bit.c) and "", or None and why not.
    Built without contracting products and sums into fused multiply-adds: its rounding is that of
    the separate torch operations it replaces. DREAMBOOTH_ADAMW8BIT_KERNEL=0 turns it off."""
    return kernel("adamw8bit", "DREAMBOOTH_ADAMW8BIT_KERNEL", ("-ffp-contract=off",), _declare_adamw8bit)
