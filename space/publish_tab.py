"""The Publish tab: send a local run to the Hugging Face Hub.

The token comes from the Space's OAuth login (when the Space enables it), else the HF_TOKEN
secret, else a password field, in that order. It only ever travels to trainer.publish.hub.publish.
Launch alone: `python -m space.publish_tab [RUNS_DIR]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr

from space import texts
from space.local_paths import LocalPaths
from space.tokens import NO_TOKEN, oauth_enabled, pick_token, token_field
from space.wiring import CONTROL, bind, name_refusals
from trainer.config import ConfigError
from trainer.publish.hub import HubError, publish, suggest_repo_name
from trainer.run_folder import list_runs, try_read_config

_QUIET = {"api_visibility": "private", "show_progress": "hidden"}  # no API endpoint, no spinner


def run_choices(runs_dir: Path) -> list[tuple[str, str]]:
    """(label, path) of every run folder, newest first; untrained ones say so."""
    return [(texts.publish_run_label(run.name, run.kind), str(run.path)) for run in list_runs(runs_dir)]


def suggest_for_run(run_dir: str | None, username: str | None, unique: bool) -> str:
    """A repo name from the run's identifier and class noun: "alice/sks-dog-dreambooth"."""
    config = try_read_config(Path(run_dir)) if run_dir else None
    if config is None:
        return ""
    return suggest_repo_name(config.identifier, config.class_noun, username, unique=unique)


def publish_run(
    paths: LocalPaths,
    run_dir: str | None,
    repo_id: str,
    private: bool,
    token_text: str,
    oauth_token: gr.OAuthToken | None = None,
) -> str:
    """Publish and return a Markdown link; every failure becomes a gr.Error with the engine's words."""
    if not run_dir:
        raise gr.Error(texts.NO_RUN, print_exception=False)
    if not (repo_id or "").strip():
        raise gr.Error(texts.NO_REPO, print_exception=False)
    token = pick_token(oauth_token, token_text)
    if token is None:
        raise gr.Error(NO_TOKEN, print_exception=False)
    try:
        paths.check(run_dir, "`run`")
        result = publish(Path(run_dir), repo_id, private=private, token=token)
    except (HubError, ConfigError) as err:
        raise gr.Error(str(err), print_exception=False) from None
    return texts.published(result.repo_id, result.url, private, result.commit)


def refresh_runs(runs_dir: Path) -> gr.Dropdown:
    return gr.Dropdown(choices=run_choices(runs_dir))


def prefill(run_dir: str | None, profile: gr.OAuthProfile | None) -> str:
    return suggest_for_run(run_dir, profile.username if profile else None, unique=False)


def make_unique(run_dir: str | None, profile: gr.OAuthProfile | None) -> str:
    return suggest_for_run(run_dir, profile.username if profile else None, unique=True)


def build_publish_tab(runs_dir: Path, paths: LocalPaths) -> None:
    """The tab's content; call it inside `with gr.Tab(...)` of a gr.Blocks."""
    runs = run_choices(runs_dir)
    first = runs[0][1] if runs else None
    gr.Markdown(texts.PUBLISH_INTRO)
    if oauth_enabled():
        gr.LoginButton()
    with gr.Row():
        run = gr.Dropdown(choices=runs, value=first, label="Run", scale=4)
        refresh = gr.Button("Refresh", scale=0)
    with gr.Row():
        repo = gr.Textbox(
            value=suggest_for_run(first, None, unique=False), label="Repo name", info=texts.PUBLISH_REPO_HELP, scale=4
        )
        unique = gr.Button("Make unique", scale=0)
    private = gr.Checkbox(value=True, label="Private repo")
    token = token_field(texts.PUBLISH_TOKEN_HELP)
    button = gr.Button("Publish", variant="primary")
    result = gr.Markdown()

    refresh.click(bind(refresh_runs, runs_dir), None, run, **_QUIET)
    run.change(prefill, run, repo, **_QUIET)
    unique.click(make_unique, run, repo, **_QUIET)
    name_refusals([run, repo, private, token])
    button.click(bind(publish_run, paths), [run, repo, private, token], result, api_name="publish", **CONTROL)


if __name__ == "__main__":
    with gr.Blocks(title="Publish") as app:
        build_publish_tab(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"), LocalPaths([], confined=False))
    app.launch()
