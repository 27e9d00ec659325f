"""The app in a real headless Chromium (Debian's), as a person uses it: upload four photos, train
the tiny model a few steps, watch progress and the loss plot move, then generate from the run;
last, one click on "Try the example" fills the form. A second test draws a scored training's chart.

Screenshots of both tabs are saved under test-artifacts/ (gitignored) for a human to look at; with
UPDATE_SCREENSHOTS=1 the finished training's page also becomes the README's picture, docs/app.png.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from ui_fixtures import GPU16, serve_app

from space import texts
from trainer.toyworld import EXAMPLE_CLASS_PROMPT, EXAMPLE_SETTINGS, TOY_MODEL_LABEL

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
README_PICTURE = Path(__file__).resolve().parents[1] / "docs" / "app.png"
IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STEPS = 120  # enough tiny-model steps to span several of the page's 1 s polls on an idle machine
STEP = re.compile(r"step (\d+)/(\d+)")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


def test_train_then_generate_in_a_browser(tmp_path: Path, tiny_model_dir: Path, subject_images: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    photos = sorted(str(p) for p in subject_images.glob("*.png"))
    ARTIFACTS.mkdir(exist_ok=True)
    with serve_app(tmp_path, tiny_model_dir) as (url, services), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1600}).new_page()  # its tabs share cookies
        page.set_default_timeout(60_000)
        page.goto(url)

        # 1. The form: four photos (previews + count), then a short training in Advanced.
        page.locator("#train-images input[type=file]").set_input_files(photos)
        expect(page.locator("#image-count")).to_contain_text("4 photos")
        expect(page.locator("img[src*='subject_']")).to_have_count(4)
        page.get_by_text("Advanced").click()
        expect(page.locator("#steps input")).to_have_value("800")  # the object preset: 200 x 4 photos
        _set_number(page, "#steps input", str(STEPS))
        _set_number(page, "#validation-steps input", str(STEPS // 3))

        # 2. Start; watch the status count steps and the loss plot redraw, until it completes. The page
        #    polls once a second and a tiny step takes 0.03-0.3 s, so STEPS spans several polls.
        page.locator("#start-training").click()
        steps_seen, plots_seen, visitor_checked = set(), set(), False
        status = page.locator("#train-status")
        deadline = time.monotonic() + 480  # a hang guard: about 40 s on an idle 2-core machine
        while "Completed" not in (text := status.inner_text()):
            assert "Failed" not in text and time.monotonic() < deadline, text
            if match := STEP.search(text):
                steps_seen.add(int(match[1]))
            plots_seen.add(_loss_line(page))
            time.sleep(0.25)
            if steps_seen - {0} and not visitor_checked:
                # The same browser's new tab (its cookie: the same visitor) shows the running job; another
                # browser (a context of its own) sees only that someone trains. Drawn by the page's load
                # event; the wait is a guard for a loaded machine (CI failed once at 5 s).
                again, stranger = page.context.new_page(), browser.new_page()
                again.goto(url)
                stranger.goto(url)
                expect(again.locator("#train-status")).to_contain_text(
                    re.compile(r"(Training|Completed) · phase"), timeout=30_000
                )
                expect(stranger.locator("#train-status")).to_contain_text(texts.IDLE.split(".")[0], timeout=30_000)
                expect(stranger.locator("#train-status")).not_to_contain_text("phase")
                again.close()
                stranger.close()
                visitor_checked = True
        plots_seen.add(_loss_line(page))  # the final plot, drawn with the "Completed" status
        assert f"step {STEPS}/{STEPS}" in status.inner_text() and visitor_checked
        assert len(steps_seen - {0}) >= 2, f"progress never moved: {steps_seen}"
        assert len(plots_seen - {None}) >= 2, "the loss plot never redrew"
        expect(page.locator("#train-samples img").first).to_be_visible()
        page.locator("#download-run").click()  # the owner takes the weights home from the page
        expect(page.locator("#run-download")).to_contain_text(".safetensors")
        page.screenshot(path=str(ARTIFACTS / "train-tab.png"), full_page=True)
        page.set_viewport_size({"width": 1400, "height": 1000})
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / "app.png"))
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            shutil.copyfile(ARTIFACTS / "app.png", README_PICTURE)
        page.set_viewport_size({"width": 1400, "height": 1600})

        # 3. Generate: the run just trained is selected and its prompt filled in.
        page.get_by_role("tab", name="Generate").click()
        run_dir = services.jobs.snapshot().run_dir
        expect(page.locator("#generate-model input")).to_have_value(re.compile(Path(run_dir).name))
        expect(page.locator("#generate-prompt textarea")).to_have_value("a photo of zwx dog")
        expect(page.locator("#width input")).to_have_value("32")
        _set_number(page, "#generate-steps input[type=number]", "2")
        page.locator("#generate").click()
        expect(page.locator("#generate-gallery img").first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "generate-tab.png"), full_page=True)

        # 4. Try the example: one click puts its five photos in the upload, with its prompts and settings
        # (which the concept preset and the prompt helpers must leave alone).
        page.get_by_role("tab", name="Train").click()
        page.locator("#try-example").click()
        expect(page.locator("#image-count")).to_contain_text("5 photos")
        expect(page.locator("img[src*='sks-star-']")).to_have_count(5)  # the previews
        expect(page.locator("#base-model input")).to_have_value(TOY_MODEL_LABEL)
        expect(page.locator("#steps input")).to_have_value(str(EXAMPLE_SETTINGS["max_train_steps"]))
        expect(page.locator("#class-prompt textarea")).to_have_value(EXAMPLE_CLASS_PROMPT)
        browser.close()
    assert (ARTIFACTS / "train-tab.png").stat().st_size > 0 and (ARTIFACTS / "generate-tab.png").stat().st_size > 0


def test_the_example_start_to_finish_in_a_browser(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A new visitor's first minutes on the shipped toy model: Try the example, Start, "so far" scores while it
    trains, then the pick, step-labelled samples, Download (the file loads in plain diffusers), and a page opened
    afterwards lists the run for Publish, whose API reaches the token check. With UPDATE_SCREENSHOTS=1 the
    page at start, mid-run and done, at 1400 and 390 px, goes to docs/images/."""
    from gradio_client import Client
    from playwright.sync_api import expect, sync_playwright

    from space.visitors import COOKIE
    from trainer.toyworld import TOY_MODEL_DIR

    with serve_app(tmp_path, tiny_model_dir, toy_dir=TOY_MODEL_DIR) as (url, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        expect(page.locator("#loss-plot")).to_be_hidden()  # nothing ran yet: no empty boxes
        _pictures(page, "start")
        page.locator("#try-example").click()
        expect(page.locator("#image-count")).to_contain_text("5 photos")
        page.locator("#start-training").click()
        expect(page.locator("#scores-line")).to_contain_text(re.compile("so far", re.IGNORECASE), timeout=300_000)
        expect(page.locator("#train-status")).to_contain_text("Training")  # no verdict while it trains
        assert _timers(page) == []
        _pictures(page, "running")
        expect(page.locator("#train-status")).to_contain_text("Completed", timeout=600_000)
        expect(page.locator("#scores-line")).to_contain_text("Picked: step")  # the example learns its subject
        expect(page.locator("#train-samples")).to_contain_text(re.compile(r"step \d+ · "))  # step and prompt
        expect(page.locator("#train-samples")).to_contain_text("(picked), as scored")  # the pick's evidence first
        assert _timers(page) == []
        _pictures(page, "done")

        page.locator("#download-run").click()
        link = page.locator("#run-download a[download$='.safetensors']").first
        expect(link).to_be_visible()
        weights = tmp_path / "download" / "pytorch_lora_weights.safetensors"
        weights.parent.mkdir()
        weights.write_bytes(page.request.get(link.get_attribute("href")).body())
        _loads_in_plain_diffusers(TOY_MODEL_DIR, weights.parent)

        later = context.new_page()  # a page opened after the training, in the same browser
        later.goto(url)
        later.get_by_role("tab", name="Publish").click()
        run = _listed_run(later)
        cookie = {c["name"]: c["value"] for c in context.cookies()}[COOKIE]
        client = Client(url, verbose=False, httpx_kwargs={"cookies": {COOKIE: cookie}})
        with pytest.raises(Exception, match="No Hugging Face token"):  # the run is found; the token is next
            client.predict(run, "zwx-star", True, "", api_name="/publish")
        browser.close()


def _timers(page) -> list[str]:
    """Gradio's progress timers ("0.1s") shown on the page now, each as "<id of its component>: <text>". An event
    with show_progress="hidden" has its timer too, at opacity 0: only what can be seen counts."""
    return page.evaluate(
        """() => [...document.querySelectorAll('.progress-text, .meta-text, .meta-text-center')]
            .filter(e => e.checkVisibility({opacityProperty: true, visibilityProperty: true})
                         && /\\d+(\\.\\d+)?s/.test(e.textContent))
            .map(e => `${(e.closest('[id]') || {id: '?'}).id}: ${e.textContent.trim()}`)"""
    )


def _listed_run(page) -> str:
    """The run the Publish tab's list preselects, by name (its label is "<name> (LoRA)")."""
    from playwright.sync_api import expect

    field = page.locator("#publish-run input")
    expect(field).to_have_value(re.compile(r"^\d{8}-\d{6}-"))
    return field.input_value().split(" ")[0]


def _pictures(page, moment: str) -> None:
    """With UPDATE_SCREENSHOTS=1: the page at `moment`, 1400 and 390 px wide, into docs/images/."""
    if os.environ.get("UPDATE_SCREENSHOTS") != "1":
        return
    IMAGES.mkdir(exist_ok=True)
    for width, height in ((1400, 1000), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(500)  # the layout settles
        page.screenshot(path=str(IMAGES / f"{moment}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})


def _loads_in_plain_diffusers(base: Path, lora_folder: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(lora_folder)
    image = pipe("a photo of sks star", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_picking_sdxl_on_a_16gb_card_sets_its_presets_and_the_memory_note(tmp_path: Path, toy_stand_in: Path) -> None:
    """No training: the Train form on a (pretended) 16 GB GPU as a person picks SDXL, then full fine-tuning."""
    from playwright.sync_api import expect, sync_playwright

    sdxl = "stabilityai/stable-diffusion-xl-base-1.0"
    with serve_app(tmp_path, toy_stand_in, hardware=GPU16) as (url, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(30_000)
        page.goto(url)
        note = page.locator("#memory-note")
        expect(note).to_be_hidden()  # offline, the toy model comes first: nothing to size
        page.locator("#base-model input").click()
        page.get_by_role("option", name=sdxl).click()
        page.get_by_text("Advanced").click()
        expect(page.locator("#resolution input")).to_have_value("1024")
        expect(page.locator("#lora-rank input")).to_have_value("16")
        expect(note).to_contain_text("Fits your GPU")  # the memory model's pick for SDXL on 16 GB
        expect(page.locator("#memory-pick")).to_contain_text("Picked for your GPU")

        page.get_by_label("Full fine-tune").check()
        expect(note).to_contain_text("Does not fit your GPU")
        page.get_by_label("LoRA", exact=True).check()
        expect(note).to_contain_text("Fits your GPU")
        browser.close()


def test_the_scores_show_under_the_loss_plot_in_a_browser(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A training that scores its checkpoints (a stand-in: its events only) draws the chart, the pick and
    "Use this checkpoint", which may be pressed once it has stopped training."""
    from playwright.sync_api import expect, sync_playwright

    from trainer.config import TrainConfig

    release = threading.Event()
    ARTIFACTS.mkdir(exist_ok=True)
    with (
        serve_app(tmp_path, tiny_model_dir, train_fn=_scoring_train(release)) as (url, services),
        sync_playwright() as pw,
    ):
        services.jobs.private = True  # the page's visitor may act on the job the test starts
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(30_000)
        page.goto(url)
        expect(page.locator("#scores-plot")).to_be_hidden()  # no scored run yet
        services.jobs.start(TrainConfig(output_dir=str(tmp_path / "runs" / "run"), max_train_steps=800,
                                        instance_prompt="sks"))
        expect(page.locator("#scores-plot")).to_contain_text("Scores so far · best so far: step 400")
        expect(page.locator("#scores-line")).to_contain_text("Best so far: step 400")  # no verdict yet
        expect(page.locator("#scores-line")).to_contain_text("Memorisation: at step 800")
        expect(page.locator("#use-checkpoint")).to_be_disabled()  # still training
        page.locator("#scores-plot").screenshot(path=str(ARTIFACTS / "scores.png"))
        release.set()
        expect(page.locator("#use-checkpoint")).to_be_enabled()
        expect(page.locator("#scores-line")).to_contain_text("Picked: step 400")  # the run ended: the pick
        browser.close()


def _scoring_train(release: threading.Event):
    """A train() stand-in that scores the base model and four checkpoints, then waits for `release`."""
    from trainer.events import PhaseEvent, RunResult, ScoreEvent, StepEvent

    def row(step: int, subject: float, prompt: float, drift: float) -> dict:
        return {"step": step, "base": step == 0, "subject": subject, "prompt": prompt, "drift": drift,
                "memorised": step == 800, "memorisation": 0.97, "memorisation_threshold": 0.9}

    def train(config, on_event, cancel) -> RunResult:
        on_event(PhaseEvent("training"))
        on_event(ScoreEvent(0, row(0, 0.2, 0.31, 0.0), None, "no checkpoint scored yet"))
        for step, subject, prompt, drift in ((200, 0.55, 0.3, 0.0), (400, 0.71, 0.29, 0.12), (600, 0.78, 0.24, 0.3),
                                             (800, 0.8, 0.22, 0.5)):
            on_event(StepEvent(step, 800, 0.1, 1e-4, 1.0))
            on_event(ScoreEvent(step, row(step, subject, prompt, drift), 400, "step 400: subject fidelity 0.710"))
        release.wait(60)
        return RunResult(Path(config.output_dir), "completed", 800, 800, None, None)

    return train


def _set_number(page, selector: str, value: str) -> None:
    from playwright.sync_api import expect

    field = page.locator(selector)
    # Once in a full CI run on the loaded 2-core machine, a value typed right after the Advanced
    # accordion opened was redrawn back to the server's 800 (not root-caused; the upload handler ran
    # once). Typing again after that redraw is what a person would do; the value must then stick.
    for _ in range(3):
        field.fill(value)
        field.press("Tab")  # gradio commits a number on blur
        page.wait_for_timeout(500)
        if field.input_value() == value:
            break
    expect(field).to_have_value(value)


def _loss_line(page) -> str | None:
    """The SVG path of the loss line: it changes whenever the plot gains points."""
    line = page.locator("#loss-plot path[aria-roledescription='line mark']")
    return line.first.get_attribute("d") if line.count() else None
