"""space/job_runs.py: a Start's uploads are copied into the run folder, each caption beside its photo."""

from __future__ import annotations

from pathlib import Path

import pytest
from ui_fixtures import form_values

from space.form import form_to_config
from space.job_runs import keep_uploads
from trainer.config import ConfigError, TrainConfig


def test_uploads_are_copied_into_the_run_folder(tmp_path: Path, four_images: list[str]) -> None:
    for i, name in enumerate(four_images):
        Path(name).write_bytes(bytes([i]) * 10)

    config = TrainConfig(output_dir=str(tmp_path / "run"), instance_data=tuple(four_images))
    kept = keep_uploads(config)
    copies = [Path(p) for p in kept.instance_data]
    assert [p.parent for p in copies] == [tmp_path / "run" / "instance_images"] * 4
    assert [p.read_bytes() for p in copies] == [Path(p).read_bytes() for p in four_images]
    assert keep_uploads(kept) == kept  # already in place: nothing copied twice
    folder = config.replace(instance_data=(str(tmp_path),))
    assert keep_uploads(folder) == folder  # a folder (CLI-style) is used where it is


def test_uploaded_captions_follow_their_photos(tmp_path: Path, four_images: list[str]) -> None:
    """Gradio keeps each upload in its own folder; the copies put each caption beside its photo."""

    for i, name in enumerate(four_images):
        Path(name).write_bytes(bytes([i]) * 10)
    caption = tmp_path / "gradio-tmp-123" / f"{Path(four_images[2]).stem}.txt"
    stray = tmp_path / "gradio-tmp-456" / "nobody.txt"
    for path, text in ((caption, "a photo of sks dog on a sofa"), (stray, "a photo of sks dog")):
        path.parent.mkdir()
        path.write_text(text)
    uploads = (four_images[0], str(caption), *four_images[1:], str(stray))
    values = form_values(list(uploads))
    config = form_to_config(values, tmp_path / "runs")  # 4 photos counted, the captions not
    kept = keep_uploads(config)
    copies = [Path(p) for p in kept.instance_data]
    photos = [p for p in copies if p.suffix == ".png"]
    assert len(photos) == 4 and all(p.parent.name == "instance_images" for p in photos)
    assert photos[2].with_suffix(".txt").read_text() == "a photo of sks dog on a sofa"
    assert [p.with_suffix(".txt").exists() for p in photos] == [False, False, True, False]
    assert copies[-1] == stray  # matches no photo: left named, for the engine to report by its name

    with pytest.raises(ConfigError, match="needs 3 to 20 images, got 2"):
        form_to_config(form_values([*four_images[:2], str(caption)]), tmp_path / "runs")
