"""What a training process imports before its first step: the libraries' optional extras, deferred.

On the tiny model nearly all of a run's time to its first step, and most of its peak memory, is
importing libraries (README, "Benchmark: against diffusers' reference scripts"). Three of them do
work there that a DreamBooth training on the CPU or CUDA never uses:

- **bitsandbytes** wraps five of its fallback operations (blockwise and 4-bit dequantization, its
  32-bit optimizer) in `torch.compile` when it is imported. Only creating those wrappers makes
  torch load its inductor compiler: ~1 s and ~45 MiB (`python -X importtime -m trainer train ...`:
  `torch._inductor.compile_fx` 0.82 s, `torch._dynamo.repro.after_dynamo` 0.22 s). CUDA runs its
  own kernels, and on the CPU the engine steps 8-bit AdamW itself (trainer/adamw8bit.py), so those
  operations never run in a training. bitsandbytes is imported here first with
  `TORCHDYNAMO_DISABLE=1` for the length of the import: `torch.compile` then leaves each function
  as it is (the eager path bitsandbytes itself falls back to when compiling fails). The variable
  is read by torch only when a function is compiled; torch._dynamo is imported before it is set,
  so its config (which also reads it) stays as it was, and torch.compile works for anything else.
  Not on Apple (MPS) or Intel (XPU) GPUs, where bitsandbytes does run compiled fallbacks.
- **diffusers' schedulers** `import scipy.stats` (for beta-distributed sigmas, an option we never
  set) and **accelerate** imports `boto3` (for its `accelerate config` SageMaker questions): ~0.5 s
  and ~28 MiB. They are deferred: `import scipy.stats` gives a module object whose code runs at
  the first use of one of its names (`scipy.stats.beta`), so a program that does use it works
  unchanged. Python's own `importlib.util.LazyLoader` cannot do this on 3.11: the import system's
  check of `__spec__` on a second `import scipy.stats`, and `inspect.getmodule` (which torch calls
  when an operator is registered) touching every module's `__file__`, both load the module.
  Here the module's import attributes (`__spec__`, `__file__`, `__path__`, ...) are set without
  running it, and only a missing non-dunder name loads it.

Measured with `python -X importtime -c "import trainer.loop"` on 2026-12-03 (Intel Xeon, 2 cores):
importing the training loop took 5.5-7.4 s and 485 MiB before, 4.0-6.0 s and 413 MiB after.

`python -m trainer train` does this once it has read its arguments, before the training's imports
(trainer/__main__.py; after --quiet has quieted bitsandbytes' logger, which speaks at import);
DREAMBOOTH_LAZY_IMPORTS=0 turns it off. Not done when another program calls `trainer.__main__.main()`
or `trainer.train()`: a process-wide import hook is that program's choice. A library that imports one of these modules with `from scipy.stats import beta` loads it there,
as it would anyway.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
import types

ENV = "DREAMBOOTH_LAZY_IMPORTS"
DEFERRED = ("scipy.stats", "boto3")  # imported by diffusers' schedulers / accelerate's config, unused here

_LOCK = threading.RLock()  # one module runs at a time; the thread running it may re-enter


class DeferredModule(types.ModuleType):
    """A module whose code has not run yet: it runs at the first access to a name it does not have.
    Dunder names (what the import system, `inspect` and `pickle` probe on every module) do not run
    it, except `__all__` (for `from x import *`) and `__version__`."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__") and name not in ("__all__", "__version__"):
            raise AttributeError(name)
        with _LOCK:
            if type(self) is DeferredModule:
                _run(self)
        return getattr(self, name)


def _run(module: DeferredModule) -> None:
    """Run the module's code in its own namespace, as the import would have. While it runs its spec
    holds the real loader, and a name it has not defined yet reads as on any partly imported module."""
    spec = module.__spec__
    deferring = spec.loader
    if not isinstance(deferring, _DeferringLoader):  # its own code (or a submodule it imports) is asking
        raise AttributeError(f"partially initialized module {module.__name__!r} has no such attribute yet")
    spec.loader = module.__loader__ = deferring.real
    try:
        deferring.real.exec_module(module)
    except BaseException:
        spec.loader = module.__loader__ = deferring  # still deferred: the next use tries again and fails the same way
        raise
    module.__class__ = types.ModuleType


class _DeferringLoader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return DeferredModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # runs at first use (DeferredModule.__getattr__)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds a module in `names` as the other finders do, and hands back its spec with a deferring loader."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _DeferringLoader(spec.loader)
                return spec
        return None


def defer(names: tuple[str, ...] = DEFERRED) -> None:
    """Import `names` deferred from now on (those not imported yet). Idempotent."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder(names))


def import_bitsandbytes_uncompiled() -> None:
    """Import bitsandbytes (when installed) without its torch.compile wrappers (see the docstring)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None or "bitsandbytes" in sys.modules:
        return
    import torch
    import torch._dynamo  # noqa: F401  (its config reads TORCHDYNAMO_DISABLE at import: before it is set)

    if torch.backends.mps.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - reported where it is used (trainer/optim.py names the failure)
        pass
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def trim_imports() -> bool:
    """Before a training imports its libraries: defer what it never uses. False when turned off."""
    if os.environ.get(ENV, "1") == "0":
        return False
    defer()
    import_bitsandbytes_uncompiled()
    return True
