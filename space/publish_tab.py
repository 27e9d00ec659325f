"""The Publish tab: send one of the visitor's runs to the Hugging Face Hub.

The token comes from the Space's OAuth login (when the Space enables it), else the HF_TOKEN
secret, else a password field, in that order. It only ever travels to trainer.publish.hub.publish.
The run list holds the visitor's own runs by name (space.visitors), filled in when the page opens.
Launch alone: `python -m space.publish_tab [RUNS_DIR]`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from space import texts
from space.errors import error_message
from space.jobs import JobManager
from space.tokens import NO_TOKEN, oauth_enabled, pick_token, token_field
from space.visitors import RunSpace, identify
from space.wiring import CONTROL, bind, name_refusals
from trainer.config import ConfigError
from trainer.publish.hub import HubError, publish, suggest_repo_name
from trainer.run_folder import try_read_config

_QUIET = {"api_visibility": "private", "show_progress": "hidden"}  # no API endpoint, no spinner


@dataclass(frozen=True)
class PublishDeps:
    runs: RunSpace
    jobs: JobManager


@dataclass(frozen=True)
class PublishTab:
    run: gr.Dropdown
    refresh: object  # the visitor's runs as they are on disk now: for the page's load and a finished training


def run_choices(runs: RunSpace, who: object) -> list[tuple[str, str]]:
    """(label, run name) of the visitor's runs, newest first; untrained ones say so."""
    return [(texts.publish_run_label(run.name, run.kind), run.name) for run in runs.runs(who)]


def suggest_for_run(run_dir: Path | None, username: str | None, unique: bool) -> str:
    """A repo name from the run's identifier and class noun: "alice/sks-dog-dreambooth"."""
    config = try_read_config(run_dir) if run_dir else None
    if config is None:
        return ""
    return suggest_repo_name(config.identifier, config.class_noun, username, unique=unique)


def publish_run(
    deps: PublishDeps,
    run: str | None,
    repo_id: str,
    private: bool,
    token_text: str,
    oauth_token: gr.OAuthToken | None = None,
    request: gr.Request | None = None,
) -> str:
    """Publish one of your runs (by name) and return a Markdown link; every failure becomes a gr.Error with the
    engine's words."""
    if not run:
        raise gr.Error(texts.NO_RUN, print_exception=False)
    if not (repo_id or "").strip():
        raise gr.Error(texts.NO_REPO, print_exception=False)
    try:
        run_dir = deps.runs.run_dir(identify(request, deps.jobs.private), run)
    except ConfigError as err:
        raise gr.Error(str(err), print_exception=False) from None
    token = pick_token(oauth_token, token_text)
    if token is None:
        raise gr.Error(NO_TOKEN, print_exception=False)
    try:
        result = publish(run_dir, repo_id, private=private, token=token)
    except (HubError, ConfigError) as err:
        raise gr.Error(error_message(err, not deps.jobs.private), print_exception=False) from None
    return texts.published(result.repo_id, result.url, private, result.commit)


def refresh_runs(deps: PublishDeps, request: gr.Request | None = None) -> gr.Dropdown:
    choices = run_choices(deps.runs, identify(request, deps.jobs.private))
    return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)


def _suggest(deps: PublishDeps, run: str | None, profile: gr.OAuthProfile | None, request: gr.Request | None,
             unique: bool) -> str:
    try:
        run_dir = deps.runs.run_dir(identify(request, deps.jobs.private), run)
    except ConfigError:
        return ""
    return suggest_for_run(run_dir, profile.username if profile else None, unique=unique)


def prefill(deps: PublishDeps, run: str | None, profile: gr.OAuthProfile | None,
            request: gr.Request | None = None) -> str:
    return _suggest(deps, run, profile, request, unique=False)


def make_unique(deps: PublishDeps, run: str | None, profile: gr.OAuthProfile | None,
                request: gr.Request | None = None) -> str:
    return _suggest(deps, run, profile, request, unique=True)


def build_publish_tab(runs: RunSpace, jobs: JobManager) -> PublishTab:
    """The tab's content; call it inside `with gr.Tab(...)` of a gr.Blocks."""
    deps = PublishDeps(runs, jobs)
    gr.Markdown(texts.PUBLISH_INTRO)
    if oauth_enabled():
        gr.LoginButton()
    with gr.Row():
        # Custom values: an API client names its run; publish_run finds it among its own or refuses it.
        run = gr.Dropdown(choices=[], value=None, allow_custom_value=True, label="Run", scale=4,
                          elem_id="publish-run")
        refresh = gr.Button("Refresh", scale=0)
    with gr.Row():
        repo = gr.Textbox(value="", label="Repo name", info=texts.PUBLISH_REPO_HELP, scale=4)
        unique = gr.Button("Make unique", scale=0)
    private = gr.Checkbox(value=True, label="Private repo")
    token = token_field(texts.PUBLISH_TOKEN_HELP)
    button = gr.Button("Publish", variant="primary")
    result = gr.Markdown()

    tab = PublishTab(run=run, refresh=bind(refresh_runs, deps))
    refresh.click(tab.refresh, None, run, **_QUIET)
    run.change(bind(prefill, deps), run, repo, **_QUIET)
    unique.click(bind(make_unique, deps), run, repo, **_QUIET)
    name_refusals([run, repo, private, token])
    button.click(bind(publish_run, deps), [run, repo, private, token], result, api_name="publish", **CONTROL)
    return tab


if __name__ == "__main__":
    with gr.Blocks(title="Publish") as app:
        folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
        tab = build_publish_tab(RunSpace.private(folder), JobManager())
        app.load(tab.refresh, None, tab.run)
    app.launch()
