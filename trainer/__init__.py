"""DreamBooth Studio's engine: fine-tune Stable Diffusion on a subject. No UI imports here."""

from trainer.config import ConfigError, TrainConfig
from trainer.events import CancelToken, RunResult


def train(config: TrainConfig, on_event=None, cancel: CancelToken | None = None) -> RunResult:
    """Train a DreamBooth model; see trainer.loop.train. Imported lazily: torch loads on first use."""
    from trainer.loop import train as _train

    return _train(config, on_event=on_event, cancel=cancel)


__all__ = ["CancelToken", "ConfigError", "RunResult", "TrainConfig", "train"]
