"""`vmetal pull` / `list` / `rm` against a local hub that huggingface_hub itself talks to (tests/support/hubserver.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from tests.support.hub_fixtures import REPO
from tests.support.hubserver import Repo
from tests.support.pull_helpers import SERVE_FILES, big_files, damage, interrupt_pull, with_chunked_attention
from vmetal.cli.app import app
from vmetal.hub import huggingface as vhub
from vmetal.hub import registry
from vmetal.hub.common import select_files

runner = CliRunner()
BIG = "acme/big-qwen3"
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: what reaches the disk at a time


def pull(*args: str, input: str | None = None):
    return runner.invoke(app, ["pull", *args], input=input)


def storage(repo_id: str = REPO) -> Path:
    return vhub.storage_folder(repo_id)


def big_repo(tiny_files: dict[str, bytes], size: int = 2 * CHUNK + 4 * 1024 * 1024) -> Repo:
    return Repo(BIG, big_files(tiny_files, size))


# ------------------------------------------------------------------------------------------- pulls


def test_full_pull_fetches_only_what_serving_needs(hub, tiny_files):
    r = pull(REPO)
    assert r.exit_code == 0, r.output
    snap = storage() / "snapshots" / hub.repos[REPO].commit
    assert {p.name for p in snap.iterdir()} == SERVE_FILES
    for name in SERVE_FILES:
        assert (snap / name).read_bytes() == tiny_files[name]
    # The allow-list is respected on the wire, not just on disk.
    assert hub.resolved_files() == SERVE_FILES
    assert (storage() / "refs" / "main").read_text() == hub.repos[REPO].commit
    [entry] = registry.pulled_models()
    assert (entry.id, entry.source, entry.revision, entry.status) == (REPO, "huggingface", "main", "complete")
    assert entry.path == str(snap) and entry.size == sum(len(tiny_files[n]) for n in SERVE_FILES)
    assert "fit:" in r.stderr and "fits" in r.stderr

    # huggingface_hub (what vLLM and mlx-lm use) finds the pull in its cache, offline.
    from huggingface_hub import snapshot_download

    assert snapshot_download(REPO, local_files_only=True, cache_dir=vhub.hf_cache_dir()) == str(snap)
    from vmetal.preflight.cache_types import check_model
    from vmetal.preflight.checkpoint import read_config

    assert check_model(read_config(snap)).module == "qwen3"


def test_second_pull_downloads_nothing(hub):
    assert pull(REPO).exit_code == 0
    sent = hub.bytes_sent()
    r = pull(REPO, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["downloaded"] == 0 and sorted(summary["reused"]) == sorted(SERVE_FILES)
    assert hub.bytes_sent() == sent


def test_include_adds_other_weights(hub, tiny_files):
    r = pull(REPO, "--include", "*.bin", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
    assert hub.resolved_files() == SERVE_FILES | {"pytorch_model.bin"}


def test_revision_is_honoured(hub):
    repo = hub.repos[REPO]
    repo.revisions["v1"] = repo.commit
    r = pull(REPO, "--revision", "v1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["revision"] == "v1"
    assert (storage() / "refs" / "v1").read_text() == repo.commit
    r = pull(REPO, "--revision", "nope")
    assert r.exit_code == 1
    assert "revision `nope`" in r.stderr


def test_dropped_connection_resumes_within_the_pull(hub, tiny_files):
    repo = hub.add(big_repo(tiny_files))
    size = len(repo.files["model.safetensors"])
    hub.drops["model.safetensors"] = CHUNK + 1024 * 1024
    r = pull(BIG)
    assert r.exit_code == 0, r.output
    gets = hub.downloads("model.safetensors")
    assert [g.range for g in gets] == [None, f"bytes={CHUNK}-"]
    assert gets[1].sent == size - CHUNK
    snap = storage(BIG) / "snapshots" / repo.commit
    assert (snap / "model.safetensors").read_bytes() == repo.files["model.safetensors"]


def test_redirected_lfs_download_resumes_at_the_cdn(hub, tiny_files):
    repo = big_repo(tiny_files)
    repo.redirect_lfs = True
    hub.add(repo)
    hub.drops["model.safetensors"] = CHUNK + 1024 * 1024
    r = pull(BIG)
    assert r.exit_code == 0, r.output
    gets = hub.downloads("model.safetensors")
    assert all(g.path.startswith("/cdn/") for g in gets)
    assert [g.range for g in gets] == [None, f"bytes={CHUNK}-"]
    snap = storage(BIG) / "snapshots" / repo.commit
    assert (snap / "model.safetensors").read_bytes() == repo.files["model.safetensors"]


def test_interrupted_pull_resumes_without_refetching(hub, tiny_files, env):
    repo = hub.add(big_repo(tiny_files))
    size = len(repo.files["model.safetensors"])
    hub.stalls["model.safetensors"] = CHUNK + 1024 * 1024
    partial = storage(BIG) / "blobs" / (repo.etag("model.safetensors") + ".incomplete")
    code, err = interrupt_pull([BIG], partial, CHUNK, HF_HUB_OFFLINE="0")
    hub.release.set()
    assert code == 130, err
    assert "interrupted" in err and "again" in err
    # No folder that serve (or an offline lookup) could mistake for a model.
    assert not (storage(BIG) / "snapshots").exists()
    assert not (storage(BIG) / "refs").exists()
    assert partial.stat().st_size == CHUNK
    [entry] = registry.pulled_models()
    assert entry.status == "incomplete"
    listed = runner.invoke(app, ["list", "--json"])
    assert json.loads(listed.stdout)[0]["state"] == "incomplete"

    before = hub.bytes_sent("model.safetensors")
    r = pull(BIG, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["resumed"] == {"model.safetensors": CHUNK}
    last = hub.downloads("model.safetensors")[-1]
    assert last.range == f"bytes={CHUNK}-"
    assert hub.bytes_sent("model.safetensors") - before == size - CHUNK  # nothing fetched twice
    snap = storage(BIG) / "snapshots" / repo.commit
    assert (snap / "model.safetensors").read_bytes() == repo.files["model.safetensors"]
    assert registry.pulled_models()[0].status == "complete"


def test_corrupted_cached_file_is_fetched_again(hub, tiny_files):
    assert pull(REPO).exit_code == 0
    damage(storage() / "blobs" / hub.repos[REPO].etag("model.safetensors"))
    r = pull(REPO)
    assert r.exit_code == 0, r.output
    assert "damaged" in r.stderr
    snap = storage() / "snapshots" / hub.repos[REPO].commit
    assert (snap / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    assert len(hub.downloads("model.safetensors")) == 2


def test_damaged_download_is_refused_and_not_recorded(hub):
    hub.damaged.add("model.safetensors")
    r = pull(REPO)
    assert r.exit_code == 1
    assert "does not match the sha256" in r.stderr
    assert not (storage() / "snapshots").exists()
    # The damaged bytes are not kept for a resume (other files' partials may be, for the next pull).
    etag = hub.repos[REPO].etag("model.safetensors")
    assert not (storage() / "blobs" / etag).exists()
    assert not (storage() / "blobs" / (etag + ".incomplete")).exists()
    assert [m.status for m in registry.pulled_models()] == ["incomplete"]


# ------------------------------------------------------------------------------------------- errors


def test_404_suggests_close_matches(hub):
    r = pull("acme/tiny-qwen")
    assert r.exit_code == 1
    assert "does not exist" in r.stderr and "HTTP 404" in r.stderr
    assert f"`{REPO}`" in r.stderr  # did you mean
    assert registry.pulled_models() == []


def test_private_repo_explains_login_and_works_with_hf_token(hub, monkeypatch):
    hub.repos[REPO].private = True
    r = pull(REPO)
    assert r.exit_code == 1
    assert "HTTP 401" in r.stderr and "hf auth login" in r.stderr and "HF_TOKEN" in r.stderr
    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    r = pull(REPO)
    assert r.exit_code == 1 and "not valid" in r.stderr
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    r = pull(REPO)
    assert r.exit_code == 0, r.output
    assert all(g.auth == "Bearer hf_good" for g in hub.downloads())


def test_gated_repo_says_accept_terms(hub):
    hub.repos[REPO].gated = True
    r = pull(REPO)
    assert r.exit_code == 1
    assert "gated" in r.stderr and f"{hub.url}/{REPO}" in r.stderr


def test_server_errors_are_explained(hub):
    hub.fail_status["model.safetensors"] = (500, -1)
    r = pull(REPO)
    assert r.exit_code == 1
    assert "HTTP 500" in r.stderr and "again" in r.stderr
    assert not (storage() / "snapshots").exists()
    hub.fail_status.clear()
    hub.api_status = 503
    r = pull(REPO)
    assert r.exit_code == 1 and "HTTP 503" in r.stderr


def test_unreachable_hub(env, monkeypatch):
    from vmetal.server.process import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    r = pull(REPO)
    assert r.exit_code == 1 and "cannot reach" in r.stderr


def test_offline_mode_refuses(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = pull(REPO)
    assert r.exit_code == 1 and "HF_HUB_OFFLINE" in r.stderr
    assert hub.log == []


# ------------------------------------------------------------------------------------------- checks


def test_fit_check_refuses_oversized_model_before_downloading_weights(hub):
    hub.repos[REPO].listed_sizes["model.safetensors"] = 10**15  # a petabyte of weights
    r = pull(REPO)
    assert r.exit_code == 1
    assert "does not fit" in r.stderr and "--force" in r.stderr
    assert hub.downloads("model.safetensors") == []
    assert registry.pulled_models() == []


def test_unsupported_architecture_refused_before_weights(hub, tiny_files):
    """Decided by the caches mlx-lm makes for the config (layers with several caches each here), not by its name."""
    hub.add(Repo("acme/nestedish", with_chunked_attention(tiny_files)))
    r = pull("acme/nestedish")
    assert r.exit_code == 1
    assert "llama4 (Llama4ForConditionalGeneration)" in r.stderr and "ChunkedKVCache" in r.stderr
    assert hub.resolved_files() == {"config.json"}


def test_repo_without_safetensors_refused(hub, tiny_files):
    files = {k: v for k, v in tiny_files.items() if k != "model.safetensors"}
    hub.add(Repo("acme/bin-only", files))
    r = pull("acme/bin-only")
    assert r.exit_code == 1
    assert "no `model*.safetensors`" in r.stderr and "pytorch_model.bin" in r.stderr
    assert hub.downloads() == []


def test_local_folder_is_checked_not_copied(hub, qwen3_model):
    r = pull(str(qwen3_model))
    assert r.exit_code == 0, r.output
    assert "nothing to download" in r.stderr
    assert hub.log == [] and registry.pulled_models() == []
    r = pull(str(qwen3_model.parent / "missing"))
    assert r.exit_code == 2


def test_invalid_modelscope_variable_is_a_usage_error(hub, monkeypatch):
    monkeypatch.setenv("VLLM_USE_MODELSCOPE", "maybe")
    r = pull(REPO)
    assert r.exit_code == 2 and "VLLM_USE_MODELSCOPE" in r.stderr
    assert hub.log == []


# ------------------------------------------------------------------------------------------- list / rm


def test_list_and_rm(hub):
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0 and "no models pulled" in r.stderr
    assert pull(REPO).exit_code == 0
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0, r.output
    assert REPO in r.stdout and "huggingface" in r.stdout and "main" in r.stdout and "ok" in r.stdout
    assert "never" in r.stdout  # last used
    registry.touch(REPO, when=time.time() - 7200)
    assert "2 hours ago" in runner.invoke(app, ["list"]).stdout

    r = runner.invoke(app, ["rm", REPO], input="n\n")
    assert r.exit_code == 1 and storage().exists() and len(registry.pulled_models()) == 1
    r = runner.invoke(app, ["rm", REPO], input="y\n")
    assert r.exit_code == 0, r.output
    assert not storage().exists() and registry.pulled_models() == []
    r = runner.invoke(app, ["rm", REPO, "--yes"])
    assert r.exit_code == 2 and "not among the pulled models" in r.stderr


def test_rm_one_revision_keeps_the_other(hub, tiny_files):
    assert pull(REPO).exit_code == 0
    first = hub.repos[REPO].commit
    hub.add(Repo(REPO, dict(tiny_files), commit="f" * 40, revisions={"old": first}))
    assert pull(REPO).exit_code == 0                       # main moved to f…f
    assert pull(REPO, "--revision", "old").exit_code == 0  # and the old commit by name
    r = runner.invoke(app, ["rm", REPO, "--revision", "old", "--yes"])
    assert r.exit_code == 0, r.output
    snaps = storage() / "snapshots"
    assert not (snaps / first).exists()
    assert (snaps / ("f" * 40) / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    assert [m.revision for m in registry.pulled_models()] == ["main"]
    assert runner.invoke(app, ["rm", REPO, "--yes"]).exit_code == 0
    assert not storage().exists()


def test_registry_roundtrip(env):
    e = registry.upsert(registry.PulledModel(id="a/b", source="huggingface", revision="main", path="/x"))
    assert registry.find("A/B")[0].status == "incomplete"
    assert registry.touch("a/b", when=5.0)
    e.status = registry.COMPLETE
    registry.upsert(e)
    [m] = registry.pulled_models()
    assert m.complete and m.last_used == 5.0
    registry.registry_path().write_text("{broken")
    assert registry.pulled_models() == []


def test_select_files():
    names = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "consolidated.safetensors", "pytorch_model.bin", "onnx/config.json", "tokenizer.model",
             "chat_template.jinja", "merges.txt", "model.gguf", "original/params.json"]
    assert select_files(names) == sorted(["config.json", "model-00001-of-00002.safetensors",
                                               "model.safetensors.index.json", "tokenizer.model",
                                               "chat_template.jinja", "merges.txt"])
    assert "model.gguf" in select_files(names, ["*.gguf"])


def test_serve_pulls_a_hub_model_then_serves_its_folder(hub, monkeypatch):
    from vmetal.cli import serve as serve_cmd
    from vmetal.server.process import free_port

    started = []

    class FakeServer:
        def __init__(self, model, **kw):
            started.append(model)

    monkeypatch.setattr(serve_cmd, "ServerProcess", FakeServer)
    monkeypatch.setattr(serve_cmd, "supervise", lambda *a, **k: 0)
    result = CliRunner().invoke(app, ["serve", REPO, "--port", str(free_port())])
    assert result.exit_code == 0, result.output
    assert len(started) == 1 and Path(started[0]).is_dir()
    assert (Path(started[0]) / "config.json").is_file() and Path(started[0]) == storage() / "snapshots" / \
        Path(started[0]).name
