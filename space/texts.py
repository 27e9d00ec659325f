"""Every sentence the UI shows, in one place: help strings, banners and status lines."""

from __future__ import annotations

from space.hardware import Hardware, SpaceInfo
from space.jobs import JobSnapshot

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
    "half purple, which no prompt makes it draw, in a few minutes. To train a real model, pick a "
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
    "LoRA: small file, less memory, fast. Full: the whole UNet, best fidelity, needs 16+ GB (SDXL: about 40 GB)."
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
CANNOT_CANCEL_PUBLISHING = "The training has finished and is being published; publishing cannot be cancelled."
NOTHING_TO_CANCEL = "No training is running."
EXAMPLE_HELP = (
    "Five pictures of a star painted half yellow, half purple: a subject the toy model cannot draw "
    "from text. The button loads them and the settings that teach it in a few minutes on a CPU."
)

LORA_RANK_HELP = "Size of the LoRA: higher learns more detail, in a bigger file. Empty: the base model's default."
CACHE_LATENTS_HELP = "Encode the photos with the VAE once, then free it: less memory and time per step."
# The memory note under the base model (space.memory.memory_note), shown only when a setting will not fit.
MEMORY_NOTE = "**May not fit in memory:** {what} needs about {need} GB; this GPU has {have} GB. {advice}"
MEMORY_TURN_ON = "Turn on {savings} (under Advanced) to bring it to about {need} GB."
MEMORY_USE_LORA = "Use LoRA instead: it needs about {need} GB with 8-bit Adam and gradient checkpointing."
MEMORY_TOO_BIG = "Lower the resolution, or use a GPU with more memory."


def memory_what(family_label: str, method: str, resolution: int) -> str:
    """ "Stable Diffusion XL full fine-tuning at 1024 px" """
    how = "LoRA" if method == "lora" else "full fine-tuning"
    return f"{family_label} {how} at {resolution} px"


def images_count(n: int) -> str:
    if n == 0:
        return "No photos yet."
    advice = "" if 3 <= n <= 20 else " — DreamBooth wants 3 to 20."
    return f"**{n}** photo{'s' if n != 1 else ''}{advice}"


def job_status(snap: JobSnapshot) -> str:
    """The status line(s) under Start/Cancel."""
    if snap.state == "idle":
        return IDLE
    head = {"starting": "Starting", "running": "Training", "completed": "Completed", "cancelled": "Cancelled"}
    state = "Publishing" if snap.publishing else head.get(snap.state, "Failed")
    lines = [f"**{state}** · phase: {snap.phase} · step **{snap.step}/{snap.total}**"]
    if snap.active and not snap.publishing:
        lines[0] += f" · ETA {eta_text(snap.eta_seconds)}"
    if snap.message:
        lines.append(snap.message)
    if snap.error:
        lines.append(f"**Error:** {snap.error}")
    if snap.publish_error:
        lines.append(f"**Publishing failed:** {snap.publish_error}")
    if snap.run_dir and not snap.active:
        lines.append(f"Run folder: `{snap.run_dir}`")
    return "\n\n".join(lines)


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "estimating…"
    seconds = int(round(seconds))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {sec:02d}s"


# --- Generate tab ----------------------------------------------------------------------
MODEL_SOURCE_HELP = (
    "A run of this app (newest first), the toy model, or any Hub repo id: a full model or a LoRA "
    "whose model card names its base model."
)
SEED_HELP = "Same seed + same settings = same images."
SIZE_HELP = "Multiples of 8."
GENERATE_BUSY = "A training is using the GPU right now (step {step}/{total}). Generate again when it has finished."
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
