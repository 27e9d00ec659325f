"""A stand-in for the few pieces of torchvision that diffusers' DreamBooth example scripts use.

Not torchvision: PyPI's torchvision wheels break beside this project's torch build, and the example
scripts (`train_dreambooth.py`, `train_dreambooth_lora.py`) import it only for `transforms`. This
package implements those transforms with PIL and torch, with torchvision's semantics (resize of the
short side, crop offsets, the RNG draws of RandomCrop/RandomHorizontalFlip), so the scripts run
unchanged. `bench/run_reference.py` puts it on `sys.path` only after transformers and diffusers have
decided that torchvision is unavailable, so no library switches to a torchvision code path.
"""

from . import transforms

__version__ = "0.0.0+standin"
__all__ = ["transforms"]
