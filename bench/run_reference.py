"""Run a training script or module the way bench/vs_reference.py times it: same process setup for both sides.

    python bench/run_reference.py [--timing FILE] PATH/train_dreambooth.py --pretrained_model_name_or_path ...
    python bench/run_reference.py [--timing FILE] -m trainer train --pretrained-model ...

What it does, in this order, before handing over to the script (`runpy.run_path(..., run_name="__main__")`,
as `python SCRIPT` would) or the module (`runpy.run_module`, as `python -m MODULE` would):

1. torch.set_num_threads(OMP_NUM_THREADS) when that variable is set (torch reads it too; this makes it
   explicit), so both sides run on the same number of intra-op threads.
2. Imports transformers and diffusers and asks both whether torchvision is available. PyPI's
   torchvision cannot be imported beside this torch, so both answer no, and transformers caches that
   answer (`is_torchvision_available` is an lru_cache) while diffusers computes it at import.
3. Only then puts `bench/torchvision_standin/` first on sys.path: diffusers' DreamBooth example scripts
   do `from torchvision import transforms`, and the stand-in offers those transforms (PIL + torch).
   If a real torchvision imports, the stand-in is not used.
4. With --timing FILE, registers a global optimizer step post-hook
   (`torch.optim.optimizer.register_optimizer_step_post_hook`, a public torch API; it fires after every
   `Optimizer.step()` of any optimizer, bitsandbytes' 8-bit AdamW included) that appends
   `time.monotonic()` to FILE, one line per optimizer step (and a `# optimizer MODULE.CLASS` line the
   first time each optimizer class steps, to show which optimizer ran). CLOCK_MONOTONIC is system-wide on Linux, so
   the parent compares those stamps with its own clock. Nothing of the script is patched or wrapped.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "torchvision_standin"


def _usage() -> None:
    print(__doc__, file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    argv = sys.argv[1:]
    timing = None
    if argv[:1] == ["--timing"]:
        if len(argv) < 2:
            _usage()
        timing, argv = argv[1], argv[2:]
    module = script = None
    if argv[:1] == ["-m"]:
        if len(argv) < 2:
            _usage()
        module, argv = argv[1], argv[2:]
    elif argv:
        script, argv = argv[0], argv[1:]
    else:
        _usage()

    # sys.path[0] is this file's folder; make it what `python SCRIPT` / `python -m MODULE` would have.
    if module:
        sys.path[0] = os.getcwd()
    else:
        script = str(Path(script).resolve())
        sys.path[0] = str(Path(script).parent)

    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))

    import diffusers.utils.import_utils as diffusers_imports
    import transformers  # noqa: F401  (imported for its decision on torchvision, below)
    from transformers.utils.import_utils import is_torchvision_available

    if not is_torchvision_available() and not diffusers_imports.is_torchvision_available():
        sys.path.insert(0, str(STANDIN))

    if timing:
        import time

        from torch.optim.optimizer import register_optimizer_step_post_hook

        stamps = open(timing, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (open for the process's life)

        seen: set[str] = set()

        def after_step(optimizer, args, kwargs) -> None:
            now = time.monotonic()
            name = type(optimizer).__module__.split(".")[0] + "." + type(optimizer).__name__
            if name not in seen:  # once per optimizer class, after the stamp's time was taken
                seen.add(name)
                stamps.write(f"# optimizer {name}\n")
            stamps.write(f"{now:.6f}\n")

        register_optimizer_step_post_hook(after_step)

    if module:
        sys.argv = [module, *argv]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *argv]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
