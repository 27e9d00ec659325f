"""Fair use on a shared app: what one visitor may ask of the machine, so that no one starves the others.

A shared app (a Space, a public link, a login: anything but app.runs_privately) caps each visitor's
trainings (queued or running at once), each training's steps and minutes, and each generation's
work (width × height × images × steps) and minutes. The caps are app.py's flags; a private app has
none unless a flag sets one. Refusals are FairUseError (a UserError: the page shows its words, the
log no traceback) naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import UserError

MEGAPIXEL = 1024 * 1024
# Defaults of a shared app; app.py's flags change them.
SHARED_MAX_STEPS = 3000
SHARED_TRAIN_MINUTES = 120.0
SHARED_TRAININGS_EACH = 1
SHARED_GENERATE_MEGAPIXEL_STEPS = 200  # 1024×1024 px × 4 images × 50 steps
SHARED_GENERATE_MINUTES = 10.0


class FairUseError(UserError):
    """A request over one of the shared app's caps."""


@dataclass
class FairUse:
    """The caps in force; None: no cap (a private app's default)."""

    max_steps: int | None = None
    train_minutes: float | None = None
    trainings_each: int | None = None
    generate_megapixel_steps: float | None = None
    generate_minutes: float | None = None

    @classmethod
    def shared(cls, **given: float | int | None) -> FairUse:
        """A shared app's caps: the defaults above, where `given` (a flag's value) is None."""
        defaults = {
            "max_steps": SHARED_MAX_STEPS,
            "train_minutes": SHARED_TRAIN_MINUTES,
            "trainings_each": SHARED_TRAININGS_EACH,
            "generate_megapixel_steps": SHARED_GENERATE_MEGAPIXEL_STEPS,
            "generate_minutes": SHARED_GENERATE_MINUTES,
        }
        return cls(**{key: value if given.get(key) is None else given[key] for key, value in defaults.items()})

    def set(self, other: FairUse) -> None:
        """Take `other`'s caps (the app's handlers hold this object: it changes in place)."""
        self.__dict__.update(other.__dict__)

    def check_training(self, steps: int, pending: int) -> None:
        """Refuse a training of `steps` steps from a visitor who has `pending` trainings queued or running."""
        if self.trainings_each is not None and pending >= self.trainings_each:
            raise FairUseError(
                f"You already have {pending} training(s) queued or running, the most this shared app allows each "
                "visitor: cancel it or wait for it to end before starting another."
            )
        if self.max_steps is not None and steps > self.max_steps:
            raise FairUseError(
                f"`Training steps` (max_train_steps) must be at most {self.max_steps} on this shared app, got {steps}."
            )

    def check_generation(self, width: int, height: int, num_images: int, steps: int) -> None:
        """Refuse a generation of more than the cap's work: width × height × images × steps."""
        if self.generate_megapixel_steps is None:
            return
        work = width * height * num_images * steps / MEGAPIXEL
        if work > self.generate_megapixel_steps:
            most = self.generate_megapixel_steps
            raise FairUseError(
                f"`Width` × `Height` × `Images` × `Steps` = {width}×{height}×{num_images}×{steps} is {work:g} "
                f"megapixel-steps; this shared app allows at most {most:g} a request (e.g. 1024×1024 px × 4 images × "
                f"{most * MEGAPIXEL / (1024 * 1024 * 4):g} steps): lower one of them."
            )

    @property
    def generate_seconds(self) -> float | None:
        return None if self.generate_minutes is None else self.generate_minutes * 60

    @property
    def train_seconds(self) -> float | None:
        return None if self.train_minutes is None else self.train_minutes * 60
