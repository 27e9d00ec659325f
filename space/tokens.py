"""Where a Hugging Face token comes from, for every tab that publishes.

The Space's OAuth login first (when the Space enables it), then the HF_TOKEN secret, then a
password field, in that order. A token is only passed on to trainer.publish.hub: never stored, logged,
or put in a config, event or status.
"""

from __future__ import annotations

import os

import gradio as gr

from trainer.publish.hub import TOKEN_ENV

NO_TOKEN = (
    "No Hugging Face token found: paste a token with the **write** role "
    "([create one](https://huggingface.co/settings/tokens)), or set the `HF_TOKEN` secret."
)


def oauth_enabled() -> bool:
    """True on a Space whose README enables `hf_oauth` (the Hub then sets OAUTH_CLIENT_ID)."""
    return bool(os.environ.get("SPACE_ID") and os.environ.get("OAUTH_CLIENT_ID"))


def pick_token(oauth_token: gr.OAuthToken | None, typed: str | None) -> str | None:
    """OAuth login first, then the HF_TOKEN secret, then what was typed."""
    if oauth_token is not None and oauth_token.token:
        return oauth_token.token
    return os.environ.get(TOKEN_ENV) or (typed or "").strip() or None


def token_field(info: str, elem_id: str | None = None) -> gr.Textbox:
    """The password field, shown only when neither a login nor the secret provides the token,
    and a line saying where the token comes from otherwise. Call inside a layout block."""
    oauth, has_secret = oauth_enabled(), bool(os.environ.get(TOKEN_ENV))
    token = gr.Textbox(
        "",  # a default, so that API clients may leave it out
        label="Hugging Face token (write)",
        type="password",
        visible=not oauth and not has_secret,
        info=info,
        elem_id=elem_id,
    )
    if oauth:
        gr.Markdown("Sign in above; the token of your login is used.")
    elif has_secret:
        gr.Markdown("The token comes from this app's `HF_TOKEN` secret.")
    return token
