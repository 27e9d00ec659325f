"""Publishing and loading back, through the real huggingface_hub client over real HTTP.

The Hub is tests/hub_server.py on 127.0.0.1, started by the `hub` fixture (tests/hub_fixtures.py), which
also makes the `lora_run` and `full_run` folders. huggingface_hub reads its settings at import, so the
ones it reads later from `constants` are patched; the engine reads HF_ENDPOINT when called.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hub_fixtures import CANARY, make_run
from hub_server import READ_TOKEN, USER, WRITE_TOKEN, Account, Blob, FakeHub, Repo
from huggingface_hub import HfApi, ModelCard, constants

from trainer.config import ConfigError, TrainConfig
from trainer.publish import hub as hub_module
from trainer.publish.card import build_model_card, write_model_card
from trainer.publish.hub import (
    HubError,
    check_token,
    download_model,
    publish,
    resolve_token,
    suggest_repo_name,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES_LORA = {
    ".gitattributes",
    "README.md",
    "config.json",
    "pytorch_lora_weights.safetensors",
    "samples/step-000005-p0-0.png",
    "samples/step-000010-p0-0.png",
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- publish -------------------------------------------------------------------------------
def test_publish_lora_run_uploads_the_model_files_only_to_a_private_repo(
    hub: FakeHub, lora_run: Path
) -> None:
    result = publish(lora_run, "sks-dog", token=WRITE_TOKEN)

    assert result.repo_id == f"{USER}/sks-dog"
    assert result.url == f"{hub.url}/{USER}/sks-dog"
    repo = hub.repos[result.repo_id]
    assert repo.private is True
    assert result.commit == repo.head.oid
    files = hub.files(result.repo_id)
    assert set(files) == MODEL_FILES_LORA  # no checkpoints, logs or metrics
    for path in MODEL_FILES_LORA - {".gitattributes", "config.json"}:
        assert files[path] == (lora_run / path).read_bytes()
    # The published config keeps every setting but none of this machine's paths.
    local = json.loads((lora_run / "config.json").read_text())
    public = json.loads(files["config.json"])
    assert str(lora_run.parent) in json.dumps(local) and str(lora_run.parent) not in json.dumps(public)
    assert public["instance_data"] == [Path(p).name for p in local["instance_data"]]
    assert {k: v for k, v in public.items() if not k.endswith(("_dir", "_data", "pretrained_model"))} == {
        k: v for k, v in local.items() if not k.endswith(("_dir", "_data", "pretrained_model"))}
    # Both upload paths of the client ran: LFS for weights and images, inline for text files.
    assert {b.lfs for p, b in repo.head.files.items() if p.endswith((".safetensors", ".png"))} == {True}
    assert {b.lfs for p, b in repo.head.files.items() if p.endswith((".md", ".json"))} == {False}
    assert (
        "PUT",
        f"/_lfs/upload/{repo.head.files['pytorch_lora_weights.safetensors'].sha256}",
    ) in hub.requests


def test_publish_full_run_uploads_the_pipeline(hub: FakeHub, full_run: Path) -> None:
    result = publish(full_run, f"{USER}/sks-full", private=False, token=WRITE_TOKEN)

    assert hub.repos[result.repo_id].private is False
    files = set(hub.files(result.repo_id))
    assert {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
        "README.md",
        "config.json",
    } <= files
    assert not any(f.startswith(("checkpoints/", "logs/")) or f.endswith((".bin", ".jsonl")) for f in files)


def test_second_publish_is_a_new_commit_not_an_error(hub: FakeHub, lora_run: Path) -> None:
    first = publish(lora_run, "sks-dog", token=WRITE_TOKEN)
    # Nothing changed: no error, and no empty commit either.
    same = publish(lora_run, "sks-dog", token=WRITE_TOKEN)
    assert same.commit == first.commit
    # Trained further: new weights and samples make a second commit in the same repo.
    make_run(
        lora_run, Path(json.loads((lora_run / "config.json").read_text())["pretrained_model"]), "lora", seed=1
    )
    second = publish(lora_run, "sks-dog", token=WRITE_TOKEN)

    commits = hub.repos[f"{USER}/sks-dog"].commits
    assert [c.oid for c in commits] == [commits[0].oid, first.commit, second.commit]
    assert second.commit != first.commit
    assert (
        hub.files(second.repo_id)["pytorch_lora_weights.safetensors"]
        == (lora_run / "pytorch_lora_weights.safetensors").read_bytes()
    )
    assert hub.requests.count(("POST", "/api/repos/create")) == 3  # answered 409 after the first


def test_published_card_metadata_parses_back(hub: FakeHub, lora_run: Path, tmp_path: Path) -> None:
    result = publish(lora_run, "sks-dog", token=WRITE_TOKEN)
    (tmp_path / "README.md").write_bytes(hub.files(result.repo_id)["README.md"])
    card = ModelCard.load(tmp_path / "README.md")

    data = card.data
    assert data.library_name == "diffusers"
    assert data.instance_prompt == "a photo of sks dog"
    assert {"text-to-image", "diffusers", "dreambooth", "lora"} <= set(data.tags)
    assert data.base_model is None  # a local base folder is not a Hub id
    widget = data.widget
    assert widget == [
        {"text": "a photo of sks dog on the beach", "output": {"url": "samples/step-000010-p0-0.png"}}
    ]
    assert widget[0]["output"]["url"] in hub.files(result.repo_id)
    assert (
        f'pipe.load_lora_weights("{result.repo_id}", weight_name="pytorch_lora_weights.safetensors")'
        in card.text
    )
    assert "![a photo of sks dog on the beach](samples/step-000010-p0-0.png)" in card.text
    assert "| Method | LoRA, rank 4, alpha 4 |" in card.text


def test_card_of_a_hub_base_names_it_and_inherits_its_license(lora_run: Path, full_run: Path) -> None:
    for run_dir in (lora_run, full_run):
        config = TrainConfig.load(run_dir / "config.json")
        config.replace(pretrained_model="runwayml/stable-diffusion-v1-5").save(run_dir / "config.json")
    lora = build_model_card(lora_run, "tester/sks-lora")
    assert lora.data.base_model == "runwayml/stable-diffusion-v1-5"
    assert lora.data.license == "creativeml-openrail-m"
    assert 'StableDiffusionPipeline.from_pretrained(\n    "runwayml/stable-diffusion-v1-5"' in lora.text

    full = build_model_card(full_run, "tester/sks-full")
    assert "lora" not in full.data.tags
    assert 'from_pretrained(\n    "tester/sks-full", dtype=torch.float16, use_safetensors=True' in full.text
    assert "load_lora_weights" not in full.text
    # Without a repo (end of training), the snippet loads the run folder itself.
    assert str(full_run.resolve()) in write_model_card(full_run).read_text()

    config = TrainConfig.load(full_run / "config.json")
    for base, license_ in [
        ("stabilityai/stable-diffusion-2-1-base", "openrail++"),
        ("CompVis/stable-diffusion-v1-4", "creativeml-openrail-m"),
        ("someone/model", None),
    ]:
        config.replace(pretrained_model=base).save(full_run / "config.json")
        assert build_model_card(full_run).data.license == license_


def test_a_flux_lora_card_carries_the_non_commercial_license_and_the_flux_snippet(lora_run: Path) -> None:
    """FLUX.1-dev's license is none of the Hub's own: `other`, with its name and link, as the base's card has it."""
    from trainer.run_folder import write_status

    config = TrainConfig.load(lora_run / "config.json")
    for base, license_, name in [
        ("black-forest-labs/FLUX.1-dev", "other", "flux-1-dev-non-commercial-license"),
        ("black-forest-labs/FLUX.1-schnell", "apache-2.0", None),
    ]:
        config.replace(pretrained_model=base).save(lora_run / "config.json")
        write_status(lora_run, "completed", 2, 2, family="flux")
        card = build_model_card(lora_run, "tester/sks-flux")
        assert (card.data.license, card.data.get("license_name")) == (license_, name)
        assert "flux" in card.data.tags and card.data.base_model == base
        assert f'FluxPipeline.from_pretrained(\n    "{base}", dtype=torch.bfloat16' in card.text
        assert "guidance_scale=3.5" in card.text
    assert card.data.get("license_link") is None
    config.replace(pretrained_model="black-forest-labs/FLUX.1-dev").save(lora_run / "config.json")
    link = build_model_card(lora_run).data.get("license_link")
    assert link == "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"


def test_card_inherits_the_license_of_a_local_base_folder(tmp_path: Path, full_run: Path) -> None:
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# A base\n")
    config = TrainConfig.load(full_run / "config.json")
    config.replace(pretrained_model=str(base)).save(full_run / "config.json")
    assert build_model_card(full_run).data.license == "mit"


# --- the token -----------------------------------------------------------------------------
def test_check_token_names_the_user_and_refuses_read_only_tokens(hub: FakeHub) -> None:
    assert check_token(WRITE_TOKEN) == USER
    assert check_token(READ_TOKEN, write=False) == USER
    with pytest.raises(HubError, match="read-only"):
        check_token(READ_TOKEN)


def test_token_comes_from_the_argument_then_the_environment(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_token(None) is None
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert resolve_token(None) == WRITE_TOKEN
    assert resolve_token("  hf_explicit ") == "hf_explicit"
    assert check_token(None) == USER
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="No Hugging Face token"):
        check_token(None)


def test_the_token_appears_in_no_file_log_or_output(
    hub: FakeHub,
    lora_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    hub.accounts[CANARY] = Account(USER, "write")
    monkeypatch.setenv("HF_TOKEN", CANARY)
    caplog.set_level(logging.DEBUG)
    messages = []

    result = publish(lora_run, "sks-dog")  # the token comes from HF_TOKEN
    download_model(result.repo_id)
    for repo_id in ("someone-else/sks-dog", "not a repo"):  # 403, invalid id
        with pytest.raises(HubError) as failure:
            publish(lora_run, repo_id)
        messages.append(str(failure.value))
    del hub.accounts[CANARY]  # now the token is refused: 401
    with pytest.raises(HubError) as failure:
        publish(lora_run, "sks-dog")
    messages.append(str(failure.value))

    out, err = capfd.readouterr()
    places = {"stdout": out, "stderr": err, "logs": caplog.text, "errors": "\n".join(messages)}
    places.update({f"run:{p}": data.decode("latin-1") for p, data in snapshot(lora_run).items()})
    places.update({f"hub:{p}": data.decode("latin-1") for p, data in hub.files(result.repo_id).items()})
    assert [name for name, text in places.items() if CANARY in text] == []
    assert "401" in messages[-1] and "403" in messages[0]


def test_a_fresh_process_publishing_prints_no_token(hub: FakeHub, lora_run: Path, tmp_path: Path) -> None:
    """huggingface_hub configured by the environment at import, as the CLI runs, at debug verbosity."""
    hub.accounts[CANARY] = Account(USER, "write")
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": CANARY,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_VERBOSITY": "debug",
        "HF_DEBUG": "1",
        "PYTHONPATH": str(ROOT),
    }
    code = (
        "import sys; from pathlib import Path; from trainer.publish.hub import publish; "
        "print(publish(Path(sys.argv[1]), 'sks-dog', private=True))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(lora_run)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{hub.url}/{USER}/sks-dog" in proc.stdout
    assert "Authorization" in proc.stderr or "authenticated: True" in proc.stderr  # debug logging was on
    assert CANARY not in proc.stdout + proc.stderr
    assert set(hub.files(f"{USER}/sks-dog")) == MODEL_FILES_LORA


# --- failures ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad token", r"rejected the token \(401 Unauthorized\).*untouched"),
        ("read-only token", r"read-only: publishing needs a token with the 'write' role"),
        ("no permission", r"no write permission there \(403 Forbidden\).*someone-else.*untouched"),
        ("unreachable", r"cannot be reached \(ConnectError\)"),
        ("invalid repo id", r"Invalid repo id 'bad--name'"),
        ("not trained", r"has no trained weights yet"),
    ],
)
def test_failures_have_clear_messages_and_leave_the_run_untouched(
    hub: FakeHub, lora_run: Path, monkeypatch: pytest.MonkeyPatch, case: str, expected: str
) -> None:
    repo_id, token = "sks-dog", WRITE_TOKEN
    if case == "bad token":
        token = "hf_notAValidToken"
    elif case == "read-only token":
        token = READ_TOKEN
    elif case == "no permission":
        repo_id = "someone-else/sks-dog"
    elif case == "unreachable":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    elif case == "invalid repo id":
        repo_id = "bad--name"
    elif case == "not trained":
        (lora_run / "pytorch_lora_weights.safetensors").unlink()
    before = snapshot(lora_run)

    with pytest.raises(HubError, match=expected):
        publish(lora_run, repo_id, token=token)
    assert snapshot(lora_run) == before
    assert hub.repos == {}


def test_an_upload_refused_after_the_card_was_written_restores_the_card(hub: FakeHub, lora_run: Path) -> None:
    # A public repo of someone else: create_repo(exist_ok) finds it, the upload is then refused.
    other = Repo("someone-else/shared", private=False)
    hub.commit(other, "initial commit", {"README.md": Blob(b"# theirs\n", lfs=False)})
    hub.repos[other.repo_id] = other
    write_model_card(lora_run)
    before = snapshot(lora_run)

    with pytest.raises(HubError, match=r"Cannot upload to someone-else/shared.*403"):
        publish(lora_run, "someone-else/shared", token=WRITE_TOKEN)
    assert snapshot(lora_run) == before
    assert len(hub.repos[other.repo_id].commits) == 1


def test_download_failures_have_clear_messages(hub: FakeHub, lora_run: Path, monkeypatch) -> None:
    publish(lora_run, "sks-dog", token=WRITE_TOKEN)
    with pytest.raises(HubError, match="does not exist, or it is private"):
        download_model(f"{USER}/sks-dog")  # private, and no token
    with pytest.raises(HubError, match="does not exist"):
        download_model(f"{USER}/missing", WRITE_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(HubError, match="cannot be reached"):
        download_model(f"{USER}/other", WRITE_TOKEN)


# --- load back -----------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "method"), [(family, method) for family in ("sd", "sdxl", "sd3", "flux")
                                                 for method in ("lora", "full") if (family, method) != ("flux", "full")])
def test_a_published_model_loads_back_and_generates_the_local_image(
    hub: FakeHub, tmp_path: Path, request: pytest.FixtureRequest, family: str, method: str
) -> None:
    from hub_fixtures import train_tiny_run
    from tiny_model import tiny_base_of

    from trainer.families import family_by_name
    from trainer.inference import GenerateRequest, PipelineCache, generate

    tiny_base = tiny_base_of(request, family)
    # The LoRA's base model is on the Hub too, named in its card as base_model.
    base_id = f"{USER}/tiny-{tiny_base.family}"
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo(base_id)
    api.upload_folder(repo_id=base_id, folder_path=tiny_base.path)
    run_dir = train_tiny_run(tiny_base.path, tmp_path / "run", method)
    if method == "lora":  # as if trained from the Hub id
        TrainConfig.load(run_dir / "config.json").replace(pretrained_model=base_id).save(run_dir / "config.json")
    result = publish(run_dir, f"sks-{method}", token=WRITE_TOKEN)
    card = ModelCard.load(run_dir / "README.md")
    if method == "lora":
        assert card.data.base_model == base_id
    assert set(family_by_name(family).card_tags) <= set(card.data.tags) and "dreambooth" in card.data.tags
    assert ("lora" in card.data.tags) == (method == "lora")
    assert f"from diffusers import {tiny_base.pipeline_class.__name__}\n" in card.text
    if method == "lora" and family in ("sd", "sdxl"):  # the kohya-layout copy for A1111 / ComfyUI goes up too
        assert "pytorch_lora_weights_kohya.safetensors" in card.text
        assert "pytorch_lora_weights_kohya.safetensors" in api.list_repo_files(result.repo_id)

    request = GenerateRequest("a photo of sks dog", steps=3, width=32, height=32, seed=7, num_images=2)
    cache = PipelineCache()
    local = generate(cache.get(str(run_dir), "cpu", token=WRITE_TOKEN), request)
    remote_pipe = cache.get(result.repo_id, "cpu", token=WRITE_TOKEN)
    assert type(remote_pipe) is tiny_base.pipeline_class
    remote = generate(remote_pipe, request)

    assert len(remote) == 2
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    downloaded = Path(constants.HF_HUB_CACHE) / f"models--{USER}--sks-{method}"
    names = [p.name for p in downloaded.rglob("*") if p.is_file() or p.is_symlink()]
    assert not any(n.endswith((".png", ".bin")) for n in names)


# --- names ---------------------------------------------------------------------------------
def test_the_class_noun_is_set_once_when_the_config_is_made_and_kept_in_config_json(tmp_path: Path) -> None:
    def config(**fields) -> TrainConfig:
        prompts = {"instance_prompt": "a photo of sks dog.", "class_prompt": "a photo of a corgi"}
        return TrainConfig(identifier="sks", **{**prompts, **fields})

    # Given: kept as given (the form's and the CLI's --class-noun), whatever the prompts say.
    assert config(class_noun="golden retriever").class_noun == "golden retriever"
    # Not given: the word after the identifier in the instance prompt, else the class prompt's last word.
    assert config().class_noun == "dog"
    assert config(instance_prompt="a painting in the style of sks").class_noun == "corgi"
    assert config(instance_prompt="sks", class_prompt="").class_noun == ""
    # A config.json from before the field: the same noun; saved, the noun is in the file.
    old = config().to_dict()
    del old["class_noun"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = TrainConfig.load(tmp_path / "old.json")
    assert loaded.class_noun == "dog" and loaded == config()
    loaded.save(tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text())["class_noun"] == "dog"
    # A value that is no text is left to validate, which names the field.
    with pytest.raises(ConfigError, match="`class_noun` must be text"):
        config(class_noun=3).validate()


def test_the_token_is_scrubbed_from_what_a_failure_says() -> None:
    from trainer.publish.hub import scrub_token

    assert scrub_token("401 for hf_secret at /api?token=hf_secret", "hf_secret") == "401 for hf_*** at /api?token=hf_***"
    assert scrub_token("no token given", None) == "no token given"


def test_suggested_repo_names_are_valid_and_unique_on_request(lora_run: Path) -> None:
    config = TrainConfig.load(lora_run / "config.json")
    assert config.class_noun == "dog"
    assert suggest_repo_name("sks", "dog", "tester", unique=False) == "tester/sks-dog-dreambooth"
    assert suggest_repo_name("sks", "", None) == "sks-dreambooth"
    unique = {suggest_repo_name("sks", "dog", "tester", unique=True) for _ in range(5)}
    assert len(unique) == 5 and all(name.startswith("tester/sks-dog-dreambooth-") for name in unique)
    assert suggest_repo_name("<ohw> ", "toy car!!", "Jo Doe") == "Jo-Doe/ohw-toy-car-dreambooth"
    assert len(suggest_repo_name("x" * 200, "dog", "tester", unique=True)) <= 96


def test_hub_module_reads_the_endpoint_when_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1/")
    assert hub_module.hub_endpoint() == "http://127.0.0.1:1"
    assert hub_module.hub_endpoint("http://example.test") == "http://example.test"


# --- the Publish tab -----------------------------------------------------------------------
def test_publish_tab_publishes_with_the_preferred_token(
    hub: FakeHub, lora_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gradio as gr

    from space.jobs import JobManager
    from space.local_paths import LocalPaths
    from space.publish_tab import PublishDeps, build_publish_tab, publish_run, run_choices, suggest_for_run
    from space.visitors import RunSpace

    runs = RunSpace(lora_run.parent, LocalPaths([]))  # shared: the app itself (no visitor) sees this folder
    deps = PublishDeps(runs, JobManager())
    name = lora_run.name

    with gr.Blocks() as demo:
        build_publish_tab(runs, deps.jobs)
    assert [fn.api_name for fn in demo.fns.values() if fn.api_name == "publish"] == ["publish"]
    assert run_choices(runs, None) == [("sks-lora (LoRA)", name)]
    assert suggest_for_run(lora_run, None, unique=False) == "sks-dog-dreambooth"

    link = publish_run(deps, name, "sks-dog-dreambooth", True, WRITE_TOKEN)
    assert f"[{USER}/sks-dog-dreambooth]({hub.url}/{USER}/sks-dog-dreambooth) (private" in link
    with pytest.raises(gr.Error, match=r"401 Unauthorized"):
        publish_run(deps, name, "sks-dog-dreambooth", True, "hf_typedButWrong")
    with pytest.raises(gr.Error, match="No Hugging Face token"):
        publish_run(deps, name, "sks-dog-dreambooth", True, "")
    # OAuth login first, then the HF_TOKEN secret, then the typed token.
    oauth = gr.OAuthToken(token=WRITE_TOKEN, scope="openid profile write-repos", expires_at=0)
    publish_run(deps, name, "sks-oauth", True, "hf_typedButWrong", oauth)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    publish_run(deps, name, "sks-secret", True, "hf_typedButWrong")
    assert {f"{USER}/sks-oauth", f"{USER}/sks-secret"} <= set(hub.repos)


# --- the command line ----------------------------------------------------------------------
def _cli_env(hub: FakeHub, tmp_path: Path, token: str) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(ROOT)}


def test_cli_push_publishes_and_a_bad_token_gets_a_message(hub: FakeHub, lora_run: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "trainer", "push", str(lora_run), "--repo-id", "sks-dog"]
    ok = subprocess.run(cmd, env=_cli_env(hub, tmp_path, WRITE_TOKEN), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip().endswith(f"{USER}/sks-dog")
    assert set(hub.files(f"{USER}/sks-dog")) == MODEL_FILES_LORA

    bad = subprocess.run(cmd, env=_cli_env(hub, tmp_path, CANARY), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "\nerror: " in "\n" + bad.stderr and "401" in bad.stderr
    assert "Traceback" not in bad.stderr and CANARY not in bad.stdout + bad.stderr


def test_cli_train_with_push_checks_the_token_before_training(hub: FakeHub, tiny_model_dir: Path,
                                                               subject_images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "train", "--pretrained-model", str(tiny_model_dir),
           "--instance-data", str(subject_images), "--instance-prompt", "a photo of sks square",
           "--output-dir", str(run), "--resolution", "32", "--max-train-steps", "1", "--report-to", "none",
           "--push-to-hub", "sks-square"]
    bad = subprocess.run(cmd, env=_cli_env(hub, tmp_path, CANARY), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "401" in bad.stderr and "Traceback" not in bad.stderr
    assert not run.exists(), "training started although the token was refused"

    ok = subprocess.run(cmd, env=_cli_env(hub, tmp_path, WRITE_TOKEN), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip().endswith(f"{USER}/sks-square")
    assert hub.repos[f"{USER}/sks-square"].private is True
