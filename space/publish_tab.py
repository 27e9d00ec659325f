"""The Publish tab: send a local run to the Hugging Face Hub.

The token comes from the Space's OAuth login (when the Space enables it), else the HF_TOKEN
secret, else a password field, in that order. It only ever travels to trainer.hub.publish.
Launch alone: `python -m space.publish_tab [RUNS_DIR]`.
"""

import sys
from pathlib import Path

import gradio as gr

from space.tokens import NO_TOKEN, oauth_enabled, pick_token, token_field
from trainer.card import CONFIG_NAME, run_kind
from trainer.config import ConfigError, TrainConfig
from trainer.hub import HubError, class_noun, publish, suggest_repo_name


def list_runs(runs_dir: Path) -> list[tuple[str, str]]:
    """(label, path) of every run folder, newest first; untrained ones say so."""
    if not runs_dir.is_dir():
        return []
    runs = sorted(
        (p for p in runs_dir.iterdir() if (p / CONFIG_NAME).is_file()),
        key=lambda p: (p / CONFIG_NAME).stat().st_mtime,
        reverse=True,
    )
    labels = {"lora": "LoRA", "full": "full model", None: "no weights yet"}
    return [(f"{p.name} ({labels[run_kind(p)]})", str(p)) for p in runs]


def suggest_for_run(run_dir: str | None, username: str | None, unique: bool) -> str:
    """A repo name from the run's identifier and class noun: "alice/sks-dog-dreambooth"."""
    if not run_dir:
        return ""
    try:
        config = TrainConfig.load(Path(run_dir) / CONFIG_NAME)
    except (ConfigError, OSError):
        return ""
    return suggest_repo_name(config.identifier, class_noun(config), username, unique=unique)


def publish_run(
    run_dir: str | None,
    repo_id: str,
    private: bool,
    token_text: str,
    oauth_token: gr.OAuthToken | None = None,
) -> str:
    """Publish and return a Markdown link; every failure becomes a gr.Error with the engine's words."""
    if not run_dir:
        raise gr.Error("Choose a run to publish.", print_exception=False)
    if not (repo_id or "").strip():
        raise gr.Error("The repo name is missing.", print_exception=False)
    token = pick_token(oauth_token, token_text)
    if token is None:
        raise gr.Error(NO_TOKEN, print_exception=False)
    try:
        result = publish(Path(run_dir), repo_id, private=private, token=token)
    except (HubError, ConfigError) as err:
        raise gr.Error(str(err), print_exception=False) from None
    visibility = "private" if private else "public"
    return f"Published to [{result.repo_id}]({result.url}) ({visibility}, commit `{result.commit[:7]}`)."


def build_publish_tab(runs_dir: Path) -> None:
    """The tab's content; call it inside `with gr.Tab(...)` of a gr.Blocks."""
    oauth = oauth_enabled()
    runs = list_runs(runs_dir)
    first = runs[0][1] if runs else None

    # 1. layout
    gr.Markdown(
        "Publish a run to the Hugging Face Hub: its weights, model card, samples and settings "
        "(never its checkpoints or logs). Publishing again to the same repo adds a commit."
    )
    if oauth:
        gr.LoginButton()
    with gr.Row():
        run = gr.Dropdown(choices=runs, value=first, label="Run", scale=4)
        refresh = gr.Button("Refresh", scale=0)
    with gr.Row():
        repo = gr.Textbox(
            value=suggest_for_run(first, None, unique=False),
            label="Repo name",
            info="name (under your account) or namespace/name",
            scale=4,
        )
        unique = gr.Button("Make unique", scale=0)
    private = gr.Checkbox(value=True, label="Private repo")
    token = token_field("Used for this publish only; never stored or logged.")
    button = gr.Button("Publish", variant="primary")
    result = gr.Markdown()

    # 2. wiring
    def refreshed() -> gr.Dropdown:
        return gr.Dropdown(choices=list_runs(runs_dir))

    def prefill(run_dir: str | None, profile: gr.OAuthProfile | None) -> str:
        return suggest_for_run(run_dir, profile.username if profile else None, unique=False)

    def make_unique(run_dir: str | None, profile: gr.OAuthProfile | None) -> str:
        return suggest_for_run(run_dir, profile.username if profile else None, unique=True)

    refresh.click(refreshed, None, run, api_visibility="private", show_progress="hidden")
    run.change(prefill, run, repo, api_visibility="private", show_progress="hidden")
    unique.click(make_unique, run, repo, api_visibility="private", show_progress="hidden")
    button.click(publish_run, [run, repo, private, token], result, api_name="publish", concurrency_limit=1)


if __name__ == "__main__":
    with gr.Blocks(title="Publish") as demo:
        build_publish_tab(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))
    demo.launch()
