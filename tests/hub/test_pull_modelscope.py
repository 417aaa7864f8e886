"""`vmetal pull --source modelscope` / VLLM_USE_MODELSCOPE=true against a local ModelScope hub that ModelScope's own
client talks to (tests/support/msserver.py), with the fake Hugging Face hub (tests/support/hubserver.py) running alongside: it must
never be asked anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.hubserver import HubServer
from tests.support.hubserver import Repo as HfRepo
from tests.support.msserver import ModelScopeServer, Repo
from tests.support.pull_helpers import (
    SERVE_FILES,
    big_files,
    child_env,
    damage,
    interrupt_pull,
    isolate_homes,
    tiny_repo_files,
    with_chunked_attention,
)
from vmetal.cli.app import app
from vmetal.hub import registry

pytest.importorskip("modelscope_hub", reason="ModelScope support needs the `modelscope` package")

runner = CliRunner()
REPO = "acme/tiny-qwen3"
BIG = "acme/big-qwen3"
PULLED = SERVE_FILES | {"configuration.json"}    # ModelScope's own small config is a `*.json` too, as on HF


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    files = tiny_repo_files(tmp_path_factory.mktemp("msmodel"))
    files["configuration.json"] = b'{"framework": "pytorch", "task": "text-generation"}'
    return files


@pytest.fixture
def env(tmp_path, monkeypatch):
    isolate_homes(tmp_path, monkeypatch, unset=("MODELSCOPE_API_TOKEN", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN",
                                                "VLLM_METAL_MODELSCOPE_CACHE"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "modelscope-home"))  # no stored login
    return tmp_path


@pytest.fixture
def hf(env, tiny_files, monkeypatch):
    """The Hugging Face hub, holding the same model: a fallback to it would succeed, so it must be caught."""
    with HubServer() as server:
        server.add(HfRepo(REPO, dict(tiny_files)))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def ms(env, hf, tiny_files, monkeypatch):
    with ModelScopeServer() as server:
        server.add(Repo(REPO, dict(tiny_files)))
        monkeypatch.setenv("MODELSCOPE_DOMAIN", server.url)   # ModelScope's domain setting
        yield server
    assert hf.log == [], "the Hugging Face hub was asked something during a ModelScope pull"


@pytest.fixture
def fast_retries(monkeypatch):
    """ModelScope's client waits 1 s, 2 s, … between integrity retries and retries 5 times; keep tests short."""
    import modelscope_hub._download as msdl

    monkeypatch.setattr(msdl, "DOWNLOAD_INTEGRITY_RETRY_BACKOFF", 0.0)
    monkeypatch.setattr(msdl, "DOWNLOAD_RETRY_TIMES", 1)


def pull(*args: str):
    return runner.invoke(app, ["pull", "--source", "modelscope", *args])


def cache() -> Path:
    return Path(os.environ["MODELSCOPE_CACHE"])


def snapshot(repo_id: str = REPO, revision: str = "master") -> Path:
    return cache() / "models" / repo_id.replace("/", "--") / "snapshots" / revision


def staging(repo_id: str = REPO, revision: str = "master") -> Path:
    return cache() / "models" / repo_id.replace("/", "--") / ".vmetal-partial" / revision


def big_repo(tiny_files: dict[str, bytes], size: int = 4 * 1024 * 1024) -> Repo:
    return Repo(BIG, big_files(tiny_files, size))


def modelscope_offline_lookup(repo_id: str) -> Path:
    """What ModelScope's own client (and so vLLM with VLLM_USE_MODELSCOPE) finds in the cache without network."""
    from modelscope_hub import HubApi, HubConfig

    api = HubApi(config=HubConfig(endpoint="http://127.0.0.1:9", cache_dir=cache()))
    return Path(api.download_repo(repo_id, "model", local_files_only=True))


# ------------------------------------------------------------------------------------------- pulls


@pytest.mark.parametrize("how", ["flag", "env"])
def test_full_pull_from_modelscope_only(ms, hf, tiny_files, monkeypatch, how):
    if how == "flag":
        r = pull(REPO)
    else:
        monkeypatch.setenv("VLLM_USE_MODELSCOPE", "true")
        r = runner.invoke(app, ["pull", REPO])
    assert r.exit_code == 0, r.output
    snap = snapshot()
    assert {p.name for p in snap.iterdir()} == PULLED
    for name in PULLED:
        assert (snap / name).read_bytes() == tiny_files[name]
    # Only what serving needs crossed the wire, each file once, and nothing went to Hugging Face.
    assert ms.fetched_files() == PULLED
    assert len(ms.downloads()) == len(PULLED)
    assert hf.log == []
    assert not staging().parent.exists()      # no staging folder left behind
    [entry] = registry.pulled_models()
    assert (entry.id, entry.source, entry.revision, entry.status) == (REPO, "modelscope", "master", "complete")
    assert entry.path == str(snap) and entry.size == sum(len(tiny_files[n]) for n in PULLED)
    assert "fit:" in r.stderr and "fits" in r.stderr and "ModelScope" in r.stderr
    assert "skipping 2 weight file(s)" in r.stderr
    # No tqdm bars or log lines of ModelScope's own in vmetal's output.
    assert "Downloading" not in r.stderr and "modelscope_hub" not in r.stderr

    assert modelscope_offline_lookup(REPO) == snap
    from vmetal.preflight.cache_types import check_model
    from vmetal.preflight.checkpoint import read_config

    assert check_model(read_config(snap)).module == "qwen3"


def test_second_pull_downloads_nothing(ms):
    assert pull(REPO).exit_code == 0
    sent = ms.bytes_sent()
    r = pull(REPO, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["source"] == "modelscope" and summary["revision"] == "master"
    assert summary["downloaded"] == 0 and sorted(summary["reused"]) == sorted(PULLED)
    assert ms.bytes_sent() == sent


def test_include_adds_other_weights(ms):
    r = pull(REPO, "--include", "*.bin", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
    assert ms.fetched_files() == PULLED | {"pytorch_model.bin"}


def test_corrupted_cached_file_is_fetched_again(ms, tiny_files):
    assert pull(REPO).exit_code == 0
    weights = snapshot() / "model.safetensors"
    damage(weights)
    r = pull(REPO)
    assert r.exit_code == 0, r.output
    assert "damaged" in r.stderr and "sha256 mismatch" in r.stderr
    assert weights.read_bytes() == tiny_files["model.safetensors"]
    assert len(ms.downloads("model.safetensors")) == 2
    assert len(ms.downloads("tokenizer.json")) == 1           # the intact files were verified, not fetched


def test_damaged_download_is_refused_and_not_recorded(ms, fast_retries):
    ms.damaged.add("model.safetensors")
    r = pull(REPO)
    assert r.exit_code == 1
    assert "does not match the sha256" in r.stderr
    assert len(ms.downloads("model.safetensors")) >= 2        # ModelScope's client tried again before giving up
    assert not snapshot().exists()
    assert not (staging() / "model.safetensors").exists()
    assert [m.status for m in registry.pulled_models()] == ["incomplete"]
    listed = runner.invoke(app, ["list", "--json"])
    assert json.loads(listed.stdout)[0]["state"] == "incomplete"

    ms.damaged.clear()
    r = pull(REPO)
    assert r.exit_code == 0, r.output
    assert registry.pulled_models()[0].status == "complete"


def test_dropped_connection_resumes_within_the_pull(ms, tiny_files):
    repo = ms.add(big_repo(tiny_files))
    size = len(repo.files["model.safetensors"])
    cut = 1024 * 1024 + 4096
    ms.drops["model.safetensors"] = cut
    r = pull(BIG)
    assert r.exit_code == 0, r.output
    gets = ms.downloads("model.safetensors")
    assert [g.range for g in gets] == [None, f"bytes={cut}-"]
    assert gets[1].sent == size - cut
    assert (snapshot(BIG) / "model.safetensors").read_bytes() == repo.files["model.safetensors"]


def test_redirected_lfs_download(ms, tiny_files):
    repo = big_repo(tiny_files)
    repo.redirect_lfs = True
    ms.add(repo)
    ms.drops["model.safetensors"] = 1024 * 1024
    r = pull(BIG)
    assert r.exit_code == 0, r.output
    gets = ms.downloads("model.safetensors")
    assert all(g.path.startswith("/oss/") for g in gets)
    assert [g.range for g in gets] == [None, "bytes=1048576-"]
    assert (snapshot(BIG) / "model.safetensors").read_bytes() == repo.files["model.safetensors"]


def test_interrupted_pull_resumes_without_refetching(ms, tiny_files):
    repo = ms.add(big_repo(tiny_files))
    size = len(repo.files["model.safetensors"])
    cut = 2 * 1024 * 1024 + 12345
    ms.stalls["model.safetensors"] = cut
    partial = staging(BIG) / "model.safetensors.incomplete"
    code, err = interrupt_pull(["--source", "modelscope", BIG], partial, cut)
    ms.release.set()
    assert code == 130, err
    assert "interrupted" in err and "again" in err
    # No folder that serve or an offline ModelScope lookup could mistake for a model.
    assert not snapshot(BIG).exists()
    with pytest.raises(Exception, match="(?i)cannot find cached snapshot"):
        modelscope_offline_lookup(BIG)
    assert partial.stat().st_size == cut
    [entry] = registry.pulled_models()
    assert entry.status == "incomplete" and entry.source == "modelscope"

    before = ms.bytes_sent("model.safetensors")
    earlier = len(ms.downloads())
    r = pull(BIG, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["resumed"] == {"model.safetensors": cut}
    assert summary["downloaded"] == sum(g.sent for g in ms.downloads()[earlier:])
    last = ms.downloads("model.safetensors")[-1]
    assert last.range == f"bytes={cut}-"
    assert ms.bytes_sent("model.safetensors") - before == size - cut  # nothing fetched twice
    assert (snapshot(BIG) / "model.safetensors").read_bytes() == repo.files["model.safetensors"]
    assert registry.pulled_models()[0].status == "complete"
    assert modelscope_offline_lookup(BIG) == snapshot(BIG)


def test_revision_is_honoured(ms):
    repo = ms.repos[REPO]
    repo.tags["v1.0"] = repo.commit
    r = pull(REPO, "--revision", "v1.0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["revision"] == "v1.0"
    assert (snapshot(revision="v1.0") / "model.safetensors").is_file()
    assert {tuple(g.query["Revision"]) for g in ms.downloads()} == {("v1.0",)}
    r = pull(REPO, "--revision", "nope")
    assert r.exit_code == 1
    assert "revision `nope`" in r.stderr and "`v1.0`" in r.stderr


def test_model_cache_variable_is_the_cache(ms, env, monkeypatch, qwen3_model):
    other = env / "vmetal-ms-cache"
    monkeypatch.setenv("VLLM_METAL_MODELSCOPE_CACHE", str(other))
    r = pull(REPO)
    assert r.exit_code == 0, r.output
    snap = other / "models" / REPO.replace("/", "--") / "snapshots" / "master"
    assert registry.pulled_models()[0].path == str(snap)
    assert (snap / "model.safetensors").is_file()
    assert not snapshot().exists()                             # MODELSCOPE_CACHE is not used then

    monkeypatch.setenv("VLLM_METAL_MODELSCOPE_CACHE", str(qwen3_model))   # a model folder, not a cache
    r = pull(REPO)
    assert r.exit_code == 2 and "model folder" in r.stderr
    monkeypatch.setenv("VLLM_METAL_MODELSCOPE_CACHE", "relative/path")
    assert pull(REPO).exit_code == 2


# ------------------------------------------------------------------------------------------- errors


def test_404_says_the_model_does_not_exist(ms, hf):
    r = pull("acme/no-such-model")
    assert r.exit_code == 1
    assert "`acme/no-such-model` does not exist" in r.stderr and "HTTP 404" in r.stderr
    assert ms.url in r.stderr and "MODELSCOPE_API_TOKEN" in r.stderr
    assert registry.pulled_models() == []
    assert hf.log == []


def test_private_model_works_with_a_token(ms, monkeypatch):
    ms.repos[REPO].private = True
    r = pull(REPO)
    assert r.exit_code == 1 and "does not exist" in r.stderr and "MODELSCOPE_API_TOKEN" in r.stderr
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-bad")
    r = pull(REPO)
    assert r.exit_code == 1 and "HTTP 401" in r.stderr
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-good")
    r = pull(REPO)
    assert r.exit_code == 0, r.output
    assert all(g.auth == "Bearer ms-good" for g in ms.downloads())


def test_server_errors_are_explained(ms, fast_retries):
    ms.fail_status["model.safetensors"] = (500, -1)
    r = pull(REPO)
    assert r.exit_code == 1
    assert "HTTP 500" in r.stderr and "again" in r.stderr and "model.safetensors" in r.stderr
    assert not snapshot().exists()


def test_unreachable_modelscope(env, hf, monkeypatch):
    from vmetal.server.process import free_port

    # In a child process: ModelScope's client retries a refused connection 5 times over 15 s by default, and
    # reads MODELSCOPE_API_MAX_RETRIES once, at import.
    proc = subprocess.run([sys.executable, "-m", "vmetal.cli.app", "pull", "--source", "modelscope", REPO],
                          env=child_env(MODELSCOPE_DOMAIN=f"http://127.0.0.1:{free_port()}",
                                        MODELSCOPE_API_MAX_RETRIES="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "cannot reach http://127.0.0.1:" in proc.stderr and "MODELSCOPE_DOMAIN" in proc.stderr
    assert hf.log == [] and registry.pulled_models() == []


def test_without_the_package_nothing_is_fetched(ms, hf, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope_hub", None)   # `import modelscope_hub` raises ImportError
    r = pull(REPO)
    assert r.exit_code == 1
    assert "needs the `modelscope` package" in r.stderr and "pip install" in r.stderr
    assert ms.log == [] and hf.log == [] and registry.pulled_models() == []


# ------------------------------------------------------------------------------------------- checks


def test_unsupported_architecture_refused_before_weights(ms, tiny_files):
    """Decided by the caches mlx-lm makes for the config (layers with several caches each here), not by its name."""
    ms.add(Repo("acme/nestedish", with_chunked_attention(tiny_files)))
    r = pull("acme/nestedish")
    assert r.exit_code == 1
    assert "llama4 (Llama4ForConditionalGeneration)" in r.stderr and "ChunkedKVCache" in r.stderr
    assert ms.fetched_files() == {"config.json"}
    assert registry.pulled_models() == []


def test_fit_check_refuses_oversized_model_before_downloading_weights(ms):
    ms.repos[REPO].listed_sizes["model.safetensors"] = 10**15   # a petabyte of weights
    r = pull(REPO)
    assert r.exit_code == 1
    assert "does not fit" in r.stderr and "--force" in r.stderr
    assert ms.downloads("model.safetensors") == []
    assert registry.pulled_models() == []


def test_repo_without_safetensors_refused(ms, tiny_files):
    ms.add(Repo("acme/bin-only", {k: v for k, v in tiny_files.items() if k != "model.safetensors"}))
    r = pull("acme/bin-only")
    assert r.exit_code == 1
    assert "no `model*.safetensors`" in r.stderr and "pytorch_model.bin" in r.stderr
    assert ms.downloads() == []


# ------------------------------------------------------------------------------------------- list / rm


def test_list_and_rm(ms):
    assert pull(REPO).exit_code == 0
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0, r.output
    [row] = [line for line in r.stdout.splitlines() if line.startswith(REPO)]
    assert row.split()[3:5] == ["modelscope", "master"] and row.split()[-1] == "ok"
    assert json.loads(runner.invoke(app, ["list", "--json"]).stdout)[0]["source"] == "modelscope"

    r = runner.invoke(app, ["rm", REPO, "--source", "modelscope", "--yes"])
    assert r.exit_code == 0, r.output
    assert not (cache() / "models" / REPO.replace("/", "--")).exists()
    assert registry.pulled_models() == []


def test_rm_one_revision_keeps_the_other(ms):
    ms.repos[REPO].tags["v1.0"] = ms.repos[REPO].commit
    assert pull(REPO).exit_code == 0
    assert pull(REPO, "--revision", "v1.0").exit_code == 0
    r = runner.invoke(app, ["rm", REPO, "--revision", "v1.0", "--yes"])
    assert r.exit_code == 0, r.output
    assert not snapshot(revision="v1.0").exists()
    assert (snapshot() / "model.safetensors").is_file()
    assert [m.revision for m in registry.pulled_models()] == ["master"]


def test_stale_shards_are_removed_when_a_revision_moves(ms, tiny_files):
    assert pull(REPO).exit_code == 0
    (snapshot() / "model-00002-of-00002.safetensors").write_bytes(b"old shard")   # what master used to have
    new = dict(tiny_files)
    new["tokenizer.json"] = tiny_files["tokenizer.json"] + b" "
    ms.add(Repo(REPO, new, commit="f" * 40))
    r = pull(REPO)
    assert r.exit_code == 0, r.output
    assert (snapshot() / "tokenizer.json").read_bytes() == new["tokenizer.json"]
    assert not (snapshot() / "model-00002-of-00002.safetensors").exists()
    assert "no longer has it" in r.stderr


# ------------------------------------------------------------------------------------------- settings


def test_endpoint_and_cache_settings(env):
    from vmetal.hub import modelscope as vms

    assert vms.configured_endpoint({}) is None                 # ModelScope's default (modelscope.cn / .ai)
    assert vms.configured_endpoint({"MODELSCOPE_DOMAIN": "www.modelscope.cn"}) == "https://www.modelscope.cn"
    assert vms.configured_endpoint({"MODELSCOPE_DOMAIN": "http://127.0.0.1:1/",
                                    "MODELSCOPE_ENDPOINT": "https://modelscope.ai"}) == "https://modelscope.ai"
    assert vms.cache_dir({"MODELSCOPE_CACHE": "/x/ms"}) == Path("/x/ms")
    assert vms.cache_dir({"MODELSCOPE_CACHE": "/x/ms", "VLLM_METAL_MODELSCOPE_CACHE": "/y/ms"}) == Path("/y/ms")
    assert vms.cache_dir({"HOME": "/h"}).name == "modelscope"


def test_long_downloads_say_how_to_continue():
    from modelscope_hub._download_control import _DownloadDeadlineError
    from modelscope_hub.errors import FileDownloadError

    from vmetal.hub import modelscope as vms

    exc = FileDownloadError("1 of 6 failed", failed_files={"model.safetensors": _DownloadDeadlineError("late")})
    err = vms.explain_error(exc, REPO, endpoint="https://modelscope.cn")
    assert "`model.safetensors`" in err.message and "MODELSCOPE_DOWNLOAD_TOTAL_TIMEOUT" in err.hint
    assert "again" in err.hint
