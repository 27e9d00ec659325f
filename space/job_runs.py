"""A job's run folder, as the app sees it: the checks before a job is queued, the copies of the
uploads (made only once the checks pass, removed again when the job never trains), and run.json
for a training that died before it could write how it ended.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from trainer.config import ConfigError, TrainConfig, check_locations
from trainer.data.photos import check_images, collect_image_paths, is_caption_file, read_captions, split_caption_files
from trainer.run_folder import instance_images_dir, is_run, read_status, write_status


def check_inputs(config: TrainConfig) -> None:
    """The engine's checks that need no model (the same functions trainer/loop.py's check_inputs
    calls), run here before anything is queued or copied: a refused Start is answered at once and
    leaves nothing behind. What needs the model (an unknown model id) the child reports."""
    from trainer.runtime import check_runtime

    config.validate()
    check_locations(config)
    check_runtime(config)
    out = Path(config.output_dir)
    if config.resume_from_checkpoint is None and is_run(out):  # the copies would land in another run
        raise ConfigError(f"`output_dir`: {out} already holds a run; resume it or choose a new folder",
                          field="output_dir")
    sources, named_captions = split_caption_files(config.instance_data, config.caption_extension)
    images = collect_image_paths(sources, field="instance_data")
    check_images(images, config.resolution)  # raises for what cannot train; its warnings come from the engine
    read_captions(images, config.caption_extension, config.identifier.strip(), named_captions)
    if config.class_data_dir:
        check_images(collect_image_paths([config.class_data_dir], field="class_data_dir"), config.resolution)


def has_checkpoint(run_dir: Path) -> bool:
    from trainer.checkpoints import list_checkpoints

    return bool(list_checkpoints(run_dir))


def keep_uploads(config: TrainConfig) -> TrainConfig:
    """Copy the uploaded photos (and caption files) into the run folder: gradio deletes its
    temporary uploads, and a run must stay repeatable and resumable from its own config.json.

    Gradio keeps each upload in a folder of its own, so a caption is paired with its photo by
    name here: dog1.txt goes beside dog1.jpg as 03-dog1.txt next to 03-dog1.jpg.
    """
    dest = instance_images_dir(Path(config.output_dir))
    sources = [Path(p) for p in config.instance_data]
    if not all(p.is_file() for p in sources) or all(p.parent == dest for p in sources):
        return config
    ext = config.caption_extension
    photos = [p for p in sources if not is_caption_file(p, ext)]
    captions = {p.stem: p for p in sources if is_caption_file(p, ext)}
    dest.mkdir(parents=True, exist_ok=True)
    copies = []
    for i, src in enumerate(photos):
        target = dest / f"{i:02d}-{src.name}"
        shutil.copy2(src, target)
        copies.append(str(target))
        caption = captions.pop(src.stem, None)
        if caption is not None:
            shutil.copy2(caption, target.with_suffix(ext))
    # A caption matching no photo stays named, so the engine reports it by its own name.
    return config.replace(instance_data=tuple(copies) + tuple(str(p) for p in captions.values()))


def mark_run(config: TrainConfig, status: str, step: int) -> None:
    """run.json says how the run ended, where the child could not say it (killed while "running")."""
    run_dir = Path(config.output_dir)
    recorded = read_status(run_dir)
    if recorded.get("status") == "running":
        family = recorded.get("family")
        write_status(run_dir, status, step, config.max_train_steps, family=family if isinstance(family, str) else None)


def remove_photos(run_dir: Path) -> None:
    """Delete the run's copies of the photos (and their captions): a shared app's default once a training
    completes. The weights, samples and config stay; the run cannot be trained on from them."""
    shutil.rmtree(instance_images_dir(run_dir), ignore_errors=True)


def delete_run_folder(run_dir: Path) -> None:
    """Delete a whole run folder: photos, weights, samples, checkpoints."""
    shutil.rmtree(run_dir, ignore_errors=True)


def discard_uploads(config: TrainConfig, created_dir: bool) -> None:
    """Remove the copies of the uploads (and the run folder, when the app made it and it is left empty)
    of a job that never trained: refused, or withdrawn from the queue."""
    if not created_dir:
        return
    run_dir = Path(config.output_dir)
    if is_run(run_dir):
        return
    shutil.rmtree(instance_images_dir(run_dir), ignore_errors=True)
    with contextlib.suppress(OSError):  # something else is in it: it is not ours to remove
        run_dir.rmdir()
