"""Every sentence the UI shows, in one place: help strings, banners and status lines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from space.hardware import Hardware, SpaceInfo

if TYPE_CHECKING:
    from space.job_snapshot import JobSnapshot

TITLE = "DreamBooth Studio"
INTRO = (
    "# DreamBooth Studio\n"
    "Teach Stable Diffusion a subject from 3–20 photos, then generate it anywhere. "
    "**Train** makes a run, **Generate** samples from it, **Publish** pushes it to the Hub."
)

TOY_NOTICE = (
    "**Toy model.** The toy model is not Stable Diffusion: it is a small model of the same "
    "shape, trained on a made-up world of coloured shapes (circles, squares, triangles, stars and "
    "crosses in six colours, on plain backgrounds), 32×32 pixels. It runs on a CPU with no network "
    "and draws what that world holds, from prompts like *a photo of a red star on a white "
    "background*, and nothing else. **Try the example** teaches it a star painted half yellow, "
    "half purple, which no prompt makes it draw, in about 2 minutes on 2 CPU cores. To train a real model, pick a "
    "Stable Diffusion id from the list (or type any Hub id or a local diffusers folder) on a "
    "machine with a GPU."
)
# Raised (as a ConfigError) when the toy model is asked for and its folder is not there.
TOY_MISSING = "The toy model is not installed: {folder} has no model_index.json."
TOY_MISSING_NOTICE = (
    "**The toy model is missing.** It ships with the app in `{folder}`, which has no "
    "`model_index.json` here, so training or generating with it will fail (restore that folder, "
    "e.g. with `git checkout`). Pick a Stable Diffusion id from the list, or type any Hub id or a "
    "local diffusers folder."
)


def toy_notice(installed: bool, folder: object) -> str:
    return TOY_NOTICE if installed else TOY_MISSING_NOTICE.format(folder=folder)


def hardware_line(hw: Hardware) -> str:
    if hw.has_gpu:
        return f"**Hardware:** {hw.label}. Defaults below are chosen to fit it."
    return f"**Hardware:** {hw.label}. Real Stable Diffusion training needs a GPU; on this machine use the toy model."


def space_notice(space: SpaceInfo, hw: Hardware) -> str:
    """Empty outside a Space. On a CPU Space, point to the duplicate route."""
    if not space.space_id:
        return ""
    lines = []
    if not hw.has_gpu:
        lines.append(
            f"**This Space runs on a CPU.** Training a real model here would take days. "
            f"[Duplicate this Space]({space.duplicate_url}) to your account and give the copy a "
            "GPU (a T4 is enough for LoRA) in its settings; your runs then stay private to you."
        )
    if space.persistent_storage:
        lines.append("Runs are saved under `/data` (persistent storage): they survive restarts.")
    else:
        lines.append("This Space has no persistent storage: runs are lost when it restarts. Publish them.")
    return "\n\n".join(lines)


# --- Train tab -------------------------------------------------------------------------
IMAGES_HELP = (
    "3–20 photos of your subject: varied backgrounds, angles and lighting; square crops work best. "
    "Optionally a caption per photo (`dog1.txt` for `dog1.jpg`) that uses the identifier; it replaces "
    "the instance prompt for that photo."
)
IDENTIFIER_HELP = (
    "A rare word that will name your subject, e.g. `zwx`. Avoid real words: the model already knows them "
    "(the popular `sks` is also a rifle)."
)
CLASS_NOUN_HELP = "What the subject is, in one or two words: dog, man, backpack, painting."
INSTANCE_PROMPT_HELP = "Caption of your photos; must contain the identifier. Filled from the fields above."
CLASS_PROMPT_HELP = "Caption of generic class images (prior preservation). Must not contain the identifier."
CONCEPT_HELP = (
    "Presets as in the popular training Spaces: steps = 200 × images; the text encoder trains "
    "for 30% (object), 65% (person) or 15% (style) of the steps."
)
METHOD_HELP = (
    "LoRA: small file, less memory, fast. Full: the whole UNet or transformer, best fidelity, needs more memory (the line below "
    "says whether it fits your GPU)."
)
BASE_MODEL_HELP = "Pick one, or type any Hub id (user/model) or a local diffusers folder."
PRIOR_HELP = "Also train on generic class images so every dog does not become *your* dog."
VALIDATION_HELP = "Sampled during training; empty = the instance prompt."
PUBLISH_HELP = (
    "When the training completes (not when cancelled), push the weights, model card and samples to a "
    "model repo. The token is checked before training starts, so a bad one fails in seconds."
)
HUB_REPO_HELP = "name (under the token owner's account) or namespace/name"
HUB_TOKEN_HELP = "Checked now, used once when the training completes; never stored or logged."
IDLE = "No training yet. Upload photos and press **Start training**."
CANCELLING = "Cancelling at the next step…"
TIME_CAP_REACHED = "Stopped at this shared app's time limit for a training; its last checkpoint: {kept}."
GENERATE_TIME_CAP = "Generation stopped at this shared app's time limit of {minutes:g} minutes: ask for fewer steps, images or pixels."
CANNOT_CANCEL_PUBLISHING = "The training has finished and is being published; publishing cannot be cancelled."
NOTHING_TO_CANCEL = "No training of yours is running."
NOTHING_TO_DELETE = "You have no run to delete."
NOTHING_TO_DOWNLOAD = "Your run has no weights to download yet: they are saved when the training finishes."
CANCEL_BEFORE_DELETE = "This run is still queued or training: cancel it first, then delete it."
RUN_DELETED = "Run deleted: its photos, weights, samples and checkpoints are gone from this server."
PHOTOS_DELETED = "Your photos were deleted from the server (the weights and samples stay until you delete the run)."
KEEP_PHOTOS_HELP = ("On an app shared with others, your photos are deleted from the server when the training "
                    "completes (a cancelled or failed run keeps them, to be resumed, until it is deleted). "
                    "Tick to keep them.")
DELETE_CONFIRM = "Delete this run from the server (photos, weights, samples, checkpoints)? This cannot be undone."
NOT_YOUR_JOB = "This training was started by someone else: you can cancel or resume only your own."
WITHDRAWN = "Withdrawn from the queue."
NOTHING_TO_RESUME = "There is no failed or cancelled training to resume."
RESUME_BUTTON = "Resume"
RESUMING = "Resuming from the last checkpoint…"
QUEUE_FULL = "The queue is full ({n} trainings waiting); start again later."
SAME_FOLDER_QUEUED = "`output_dir`: {folder} is already the folder of a queued or running training"
STOPPED_BY_FORCE = (
    "Cancelled: it did not stop within {seconds:.0f} s, so it was stopped by force. Its last checkpoint "
    "is kept: press **Resume** to continue from it."
)
DIED_OUT_OF_MEMORY = (
    "**What to try:** it ran out of memory. Use a smaller batch (train_batch_size 1), gradient "
    "checkpointing, 8-bit Adam or a LoRA, or a lower resolution; then press **Resume** to continue from "
    "the last checkpoint."
)
DIED_KILLED = (
    "**What to try:** press **Resume** to continue from the last checkpoint. A process killed without "
    "warning (SIGKILL) is often the system running out of memory: if it happens again, lower the batch "
    "size or the resolution."
)
DIED_OTHER = "**What to try:** the log above says why; press **Resume** to continue from the last checkpoint."
TRAINED_PUBLISHING = "Trained; publishing to {repo_id}…"
PUBLISH_FAILED_AFTER_TRAINING = "Done, but publishing failed. The run is complete: publish it from the Publish tab."


def published_after_training(repo_id: str, url: str, private: bool) -> str:
    return f"Done. Published to [{repo_id}]({url}) ({'private' if private else 'public'})."


def died_by_signal(name: str) -> str:
    return f"The training process was killed ({name})."


def died_with_status(code: int) -> str:
    return f"The training process failed (exit status {code})."


def queue_line(position: int, starts_in: float | None) -> str:
    """Where a queued training stands: "Queued: 2nd in line · starts in about 4m 10s"."""
    place = "next in line" if position == 1 else f"number {position} in line"
    when = "unknown" if starts_in is None else f"about {eta_text(starts_in)}"
    return f"Queued: {place} · starts in {when}. It starts by itself; you may close this page."


def others_line(running: int, waiting: int) -> str:
    """What a visitor learns of the other visitors' trainings: how many."""
    parts = [f"{n} training{'s' if n != 1 else ''} {what}" for n, what in ((running, "running"),
                                                                         (waiting, "waiting in the queue")) if n]
    return f"Other visitors: {' and '.join(parts)}." if parts else ""
EXAMPLE_HELP = (
    "Five pictures of a star painted half yellow, half purple: a subject the toy model cannot draw "
    "from text. The button loads them and the settings that teach it: about 2 minutes on a 2-core CPU, "
    "scoring included."
)

LORA_RANK_HELP = "Size of the LoRA: higher learns more detail, in a bigger file. Empty: the base model's default."
CACHE_LATENTS_HELP = "Encode the photos with the VAE once, then free it: less memory and time per step."
PRESERVATION_HELP = ("Base-model predictions start at once (no class images to make) and follow the base model exactly, but cost an extra forward pass a step (and, for a full fine-tune, a frozen copy of the UNet in memory).")
SAMPLE_BATCH_HELP = "Class images generated at once: more is faster; decoding large images together takes memory."


def score_checkpoints_help(samples: int, checkpoints: int) -> str:
    """What scoring measures and what it costs: trainer/scores/measure.py samples 2 + 3 prompts, `samples` images each."""
    return (
        "Measures the base model once and each checkpoint (likeness to your photos, new prompts followed, class "
        f"drift, copies of your photos) and picks the best, for (2 + 3) × {samples} = {5 * samples} sampled images "
        f"each; while it is on, a run makes {checkpoints} checkpoints (the interval follows the training steps). "
        "The scoring models (DINOv2-small and CLIP ViT-B/32, about 0.7 GB) download from the Hub once; offline, "
        "the toy model is scored by its judge and other models train without scores."
    )


# The memory line under the base model (space.hardware_fit.memory_note): the engine's memory model
# (trainer/memory/estimate.py) on the form's settings, on a CUDA GPU. GB as the hardware line counts them.
MEMORY_FITS = "**Fits your GPU** (about {need:.1f} of {have:.1f} GB)."
MEMORY_DOES_NOT_FIT = "**Does not fit your GPU** (about {need:.1f} of {have:.1f} GB). {advice}"
# What to do in the form for each change trainer.memory.advice weighs (the rest are not in the form).
MEMORY_CHANGES: dict[str, str] = {
    "gradient_checkpointing": "Turn on gradient checkpointing (under Advanced)",
    "use_8bit_adam": "Turn on 8-bit Adam (under Advanced)",
    "mixed_precision": "Set mixed precision to {value} (under Advanced)",
    "train_text_encoder": "Turn off training the text encoder (under Advanced)",
    "method": "Use LoRA",
    "train_batch_size": "Set the batch size to 1 (under Advanced)",
    "resolution": "Lower the resolution to {value} (under Advanced)",
    "sample_batch_size": "Generate class images one at a time (class images per batch: 1)",
}
MEMORY_CHANGE = "{change} to bring it to about {need:.1f} GB."
MEMORY_TOGETHER = "Use LoRA and every memory saving under Advanced to bring it to about {need:.1f} GB."
MEMORY_TOO_BIG = "Even with every memory saving it will not fit: lower the resolution, or use a GPU with more memory."
MEMORY_ASSUMED = " (Sized as {label}: this model's config files are not on this machine.)"
# The preset the app picked for this GPU (space.hardware_fit.pick), under the memory line.
MEMORY_PICKED = "**Picked for your GPU:** {what} (about {need:.1f} of {have:.1f} GB).{better}"
MEMORY_BETTER = " The next better setting ({difference}) would need {need:.1f} GB."
QUANTIZE_HELP = ("LoRA only: the base model's transformer or UNet in 4-bit (NF4) or 8-bit while the LoRA trains in "
                 "full precision (QLoRA). FLUX.1 then fits 12-16 GB; the LoRA loads onto the full-precision base.")
MEMORY_PUBLISHED = ("**Picked for your GPU** ({have:.0f} GB): LoRA with 8-bit Adam and gradient checkpointing; "
                    "{what}, as its trainers publish it.")
MEMORY_PUBLISHED_SHORT = ("**Likely too small:** {what} needs a GPU of about {least} GB; yours has {have:.0f} GB. "
                          "Try it, or train on a larger card.")
MEMORY_NOTHING_FITS = "**Nothing fits your GPU:** even {what} needs about {need:.1f} of {have:.1f} GB."


def memory_change(field: str, value: object, need: float) -> str:
    return MEMORY_CHANGE.format(change=MEMORY_CHANGES[field].format(value=value), need=need)


def memory_assumed(label: str | None) -> str:
    return MEMORY_ASSUMED.format(label=label) if label else ""


def memory_what(settings: Mapping[str, Any]) -> str:
    """ "full fine-tuning with the text encoder, 8-bit Adam and gradient checkpointing, 512 px, batch 1" """
    how = "full fine-tuning" if settings["method"] == "full" else "LoRA"
    if settings["train_text_encoder"]:
        how += " with the text encoder"
    savings = [
        name
        for name, key in (("8-bit Adam", "use_8bit_adam"), ("gradient checkpointing", "gradient_checkpointing"))
        if settings[key]
    ]
    saved = " and ".join(savings) if savings else "no memory savings"
    one_at_a_time = ", class images one at a time" if settings.get("sample_batch_size") == 1 else ""
    return f"{how}, {saved}, {settings['resolution']} px, batch {settings['train_batch_size']}{one_at_a_time}"


def memory_difference(better: Mapping[str, Any], picked: Mapping[str, Any]) -> str:
    """What a better setting has that the picked one lacks: "full fine-tuning", "without 8-bit Adam",
    "at 1024 px", "at batch 2", "4 class images at a time"."""
    words = []
    if (better["method"], better["train_text_encoder"]) != (picked["method"], picked["train_text_encoder"]):
        words.append(memory_what(better).split(",")[0])
    for key, name in (("use_8bit_adam", "8-bit Adam"), ("gradient_checkpointing", "gradient checkpointing")):
        if picked[key] and not better[key]:
            words.append(f"without {name}")
    if better["resolution"] > picked["resolution"]:
        words.append(f"at {better['resolution']} px")
    if better["train_batch_size"] > picked["train_batch_size"]:
        words.append(f"at batch {better['train_batch_size']}")
    if better.get("sample_batch_size", 1) > picked.get("sample_batch_size", 1):
        words.append(f"{better['sample_batch_size']} class images at a time")
    return ", ".join(words)


def memory_picked(
    settings: Mapping[str, Any], need: float, have: float, better: tuple[Mapping[str, Any], float] | None
) -> str:
    more = MEMORY_BETTER.format(difference=memory_difference(better[0], settings), need=better[1]) if better else ""
    return MEMORY_PICKED.format(what=memory_what(settings), need=need, have=have, better=more)


def memory_nothing_fits(settings: Mapping[str, Any], need: float, have: float) -> str:
    return MEMORY_NOTHING_FITS.format(what=memory_what(settings), need=need, have=have)


def images_count(n: int) -> str:
    if n == 0:
        return "No photos yet."
    advice = "" if 3 <= n <= 20 else " — DreamBooth wants 3 to 20."
    return f"**{n}** photo{'s' if n != 1 else ''}{advice}"


def job_status(snap: JobSnapshot) -> str:
    """The status line(s) under Start/Cancel."""
    if snap.state == "idle":
        return IDLE
    head = {"starting": "Starting", "running": "Training", "completed": "Completed", "cancelled": "Cancelled",
            "queued": "Queued", "withdrawn": "Withdrawn"}
    state = "Publishing" if snap.publishing else head.get(snap.state, "Failed")
    lines = [f"**{state}** · phase: {snap.phase} · step **{snap.step}/{snap.total}**"]
    if snap.active and not snap.publishing:
        lines[0] += f" · ETA {eta_text(snap.eta_seconds)}"
    if snap.queue_position is not None:
        lines.append(queue_line(snap.queue_position, snap.starts_in_seconds))
    if snap.message:
        lines.append(snap.shown(snap.message))
    if snap.error:
        lines.append(f"**Error:** {snap.shown(snap.error)}")
    if snap.publish_error:
        lines.append(f"**Publishing failed:** {snap.shown(snap.publish_error)}")
    if snap.run_dir and not snap.active and not snap.queued:
        lines.append(f"Run: `{snap.run_name}`")
    return "\n\n".join(lines)


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "estimating…"
    seconds = int(round(seconds))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {sec:02d}s"


LOSS_RAW = "each step"
LOSS_SMOOTHED = "smoothed"

# The scores under the loss plot (space/scores_panel.py) and "Use this checkpoint".
USE_CHECKPOINT_BUTTON = "Use this checkpoint"
PICKED_SERIES = "picked"  # the chart's vertical line at the picked step
REPLACE_WEIGHTS_LABEL = "Replace the current weights"
NO_SCORED_RUN = "There is no scored run to take a checkpoint from."
NOT_YOUR_RUN = "This run was trained by someone else: only they can change its weights."
STILL_TRAINING = "The run is still training: use a checkpoint once it has finished or been cancelled."
NO_PICK = "No checkpoint to use: {reason}"
ALREADY_THE_WEIGHTS = "Step {step} is already the run's weights."
EXPORTED = "Step {step} is now the run's weights."


def would_lose_weights(now: int | None, step: int) -> str:
    """The weights the run has now (from step `now`) are in no checkpoint: asks to confirm replacing them."""
    when = f"step {now}" if now is not None else "an unknown step"
    return (
        f"The run's weights now (from {when}) are in no checkpoint: using step {step} would lose them. Tick "
        f"**{REPLACE_WEIGHTS_LABEL}** and press **{USE_CHECKPOINT_BUTTON}** again to replace them anyway."
    )


def scores_title(pick: int | None, running: bool = False) -> str:
    if running:
        return f"Scores so far · best so far: step {pick}" if pick is not None else "Scores so far"
    return f"Scores · picked: step {pick}" if pick is not None else "Scores · no checkpoint picked"


def scores_line(pick: int | None, reason: str, memorised: list[tuple[int, float, float]], weights: int | None,
                running: bool = False) -> str:
    """The pick and why (while the run trains: the best so far, no verdict), any checkpoint that copies a photo
    ((step, similarity, threshold) each), and the step the run's weights are from."""
    if running:
        lines = [f"**Best so far:** step {pick}; the pick comes when the training ends." if pick is not None else
                 "**So far:** the subject is not learned yet; the pick comes when the training ends."]
    else:
        lines = [f"**Picked:** {reason}" if pick is not None else f"**No checkpoint picked:** {reason}"]
    if memorised:
        steps = ", ".join(str(step) for step, _, _ in memorised)
        worst = max(memorised, key=lambda m: m[1])
        lines.append(
            f"**Memorisation:** at step{'s' if len(memorised) > 1 else ''} {steps} a sample is nearly a copy of one of your photos (up to "
            f"{worst[1]:.2f} similar; copies start at {worst[2]:.2f}): an earlier checkpoint, fewer steps or a lower "
            "learning rate help."
        )
    if weights is not None:
        lines.append(f"The run's weights are from step {weights}.")
    return "\n\n".join(lines)


# --- Generate tab ----------------------------------------------------------------------
MODEL_SOURCE_HELP = (
    "A run of this app (newest first), the toy model, or any Hub repo id: a full model or a LoRA "
    "whose model card names its base model."
)
SEED_HELP = "Same seed + same settings = same images."
SIZE_HELP = "Multiples of 8."
GENERATE_WAITING = "Waiting for the training on the GPU to finish (step {step}/{total}); this request draws then."
NO_MODEL = "Choose a model: a run, the toy model, or a Hub repo id."
TOY_SOURCE_LABEL = "Toy base model (shapes world)"


def generate_run_label(name: str, kind: str) -> str:
    """A run in the Generate tab's model list: "20260101-120000-zwx (lora)"."""
    return f"{name} ({kind})"


# --- Publish tab -----------------------------------------------------------------------
PUBLISH_INTRO = (
    "Publish a run to the Hugging Face Hub: its weights, model card, samples and settings "
    "(never its checkpoints or logs). Publishing again to the same repo adds a commit."
)
PUBLISH_REPO_HELP = "name (under your account) or namespace/name"
PUBLISH_TOKEN_HELP = "Used for this publish only; never stored or logged."
NO_RUN = "Choose a run to publish."
NO_REPO = "The repo name is missing."
_KIND_LABELS = {"lora": "LoRA", "full": "full model", None: "no weights yet"}


def publish_run_label(name: str, kind: str | None) -> str:
    """A run in the Publish tab's list: "sks-lora (LoRA)"; one without weights says so."""
    return f"{name} ({_KIND_LABELS[kind]})"


def published(repo_id: str, url: str, private: bool, commit: str) -> str:
    visibility = "private" if private else "public"
    return f"Published to [{repo_id}]({url}) ({visibility}, commit `{commit[:7]}`)."
