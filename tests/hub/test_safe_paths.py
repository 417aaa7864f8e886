"""Nothing a hub lists, a user types or a registry entry records reaches outside the model cache.

A hostile hub (tests/support/hubserver.py serving a crafted listing) and crafted `vmetal rm` / `uninstall` inputs:
every one is refused with a one-line error, and the files planted outside the cache are byte-identical after.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.hubserver import HubServer, Repo
from vmetal.cli.app import app
from vmetal.hub import huggingface as vhub
from vmetal.hub import modelscope_store, registry

runner = CliRunner()
REPO = "acme/tiny-qwen3"
BAIT = b"precious: must survive\n"


@pytest.fixture
def hub(env, tiny_files, monkeypatch):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def bait(env) -> Path:
    """A folder outside every cache, with a file in it that no vmetal command may touch."""
    outside = env / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_bytes(BAIT)
    return outside


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


# ------------------------------------------------------------------------------------- a hostile hub


def hostile(tiny_files, **kw) -> Repo:
    return Repo(REPO, dict(tiny_files), **kw)


@pytest.mark.parametrize("name", ["../../../outside/evil.json", "../evil.json", "/tmp/vmetal-evil.json",
                                  "sub/../../evil.json", "a\\..\\..\\evil.json", "./config.json"])
def test_listing_with_path_traversal_is_refused_before_any_download(hub, tiny_files, bait, env, name):
    hub.add(hostile(tiny_files, extra_siblings=[{"rfilename": name, "size": 5, "blobId": "0" * 40,
                                                 "content": "evil!"}]))
    # `--include '*'` would select it: the refusal must not depend on the file being selected.
    r = invoke("pull", REPO, "--include", "*")
    assert r.exit_code == 1, r.output
    line = one_line_error(r)
    assert "unsafe name" in line and name in line and "nothing was downloaded" in line
    assert hub.downloads() == []
    assert [p for p in env.rglob("*evil*")] == [] and tree(bait) == {"keep.txt": BAIT}
    assert not Path("/tmp/vmetal-evil.json").exists()
    assert registry.pulled_models() == []


@pytest.mark.parametrize("forged", [{"blobId": "../../../outside/keep.txt"}, {"blobId": "/tmp/x"},
                                    {"sha256": "../../outside/keep"}, {"blobId": "ab" * 30}])
def test_forged_digest_is_not_used_as_a_file_name(hub, tiny_files, bait, forged):
    path = "model.safetensors" if "sha256" in forged else "config.json"
    hub.add(hostile(tiny_files, forged={path: forged}))
    r = invoke("pull", REPO)
    assert r.exit_code == 1, r.output
    assert "unsafe name" in one_line_error(r) and f"`{path}`" in r.stderr
    assert tree(bait) == {"keep.txt": BAIT} and hub.downloads() == []


def test_hub_reporting_a_traversing_commit_is_refused(hub, tiny_files, bait):
    hub.add(hostile(tiny_files, commit="../../../outside"))
    r = invoke("pull", REPO)
    assert r.exit_code == 1 and "the commit of" in one_line_error(r)
    assert tree(bait) == {"keep.txt": BAIT}
    assert not vhub.storage_folder(REPO).exists() or not any(vhub.storage_folder(REPO).rglob("*.json"))


@pytest.mark.parametrize("revision", ["../../../outside/ref", "/etc/vmetal", "refs/../../x"])
def test_revision_that_climbs_out_is_a_usage_error(hub, tiny_files, bait, revision):
    repo = hub.add(hostile(tiny_files))
    repo.revisions[revision] = repo.commit
    r = invoke("pull", REPO, "--revision", revision)
    assert r.exit_code == 2, r.output
    assert "revision" in one_line_error(r) and revision in r.stderr
    assert tree(bait) == {"keep.txt": BAIT}


@pytest.mark.parametrize("model_id", ["acme/..", "../..", "acme/../../x", ".."])
def test_model_ids_with_dotdot_never_reach_the_cache(hub, bait, env, model_id, monkeypatch):
    monkeypatch.chdir(bait)
    r = invoke("pull", model_id)
    assert r.exit_code in (1, 2), r.output
    assert one_line_error(r) and "Traceback" not in r.output
    assert not (env / "hf" / "hub").exists() or not any((env / "hf" / "hub").rglob("*.safetensors"))
    assert tree(bait) == {"keep.txt": BAIT}


def test_symlinked_partial_download_is_not_followed(hub, tiny_files, bait):
    hub.add(hostile(tiny_files))
    remote = vhub.fetch_info(REPO)
    f = remote.file("model.safetensors")
    blobs = vhub.storage_folder(REPO) / "blobs"
    blobs.mkdir(parents=True)
    os.symlink(bait / "keep.txt", blobs / (f.blob + ".incomplete"))
    r = invoke("pull", REPO)
    assert r.exit_code == 0, r.output
    assert tree(bait) == {"keep.txt": BAIT}
    assert (Path(registry.pulled_models()[0].path) / "model.safetensors").read_bytes() == tiny_files[
        "model.safetensors"]


def test_symlinked_snapshot_subfolder_is_refused(hub, tiny_files, bait):
    files = dict(tiny_files)
    files["extra/notes.json"] = b"{}"
    repo = hub.add(Repo(REPO, files))
    snap = vhub.storage_folder(REPO) / "snapshots" / repo.commit
    snap.mkdir(parents=True)
    os.symlink(bait, snap / "extra")
    r = invoke("pull", REPO, "--include", "extra/*")
    assert r.exit_code == 1 and "outside" in one_line_error(r)
    assert tree(bait) == {"keep.txt": BAIT}


# ------------------------------------------------------------------------------------- rm / uninstall


def pulled(hub, tiny_files) -> registry.PulledModel:
    hub.add(hostile(tiny_files))
    assert invoke("pull", REPO, "--quiet").exit_code == 0
    [entry] = registry.pulled_models()
    return entry


def rewrite_entry(**changes) -> None:
    data = json.loads(registry.registry_path().read_text())
    data["models"][0].update(changes)
    registry.registry_path().write_text(json.dumps(data))


@pytest.mark.parametrize("commit", ["../../../../outside", "..", "/tmp", "a/../../.."])
def test_rm_with_a_crafted_commit_deletes_nothing(hub, tiny_files, bait, commit):
    entry = pulled(hub, tiny_files)
    rewrite_entry(commit=commit)
    snap_files = tree(Path(entry.path))
    r = invoke("rm", REPO, "--yes")
    assert r.exit_code == 1 and "not removing" in one_line_error(r)
    assert tree(bait) == {"keep.txt": BAIT}
    assert tree(Path(entry.path)) == snap_files and len(registry.pulled_models()) == 1


@pytest.mark.parametrize("folder", ["blobs", "snapshots", "refs", "."])
def test_rm_never_follows_a_symlinked_cache_folder(hub, tiny_files, bait, env, folder):
    entry = pulled(hub, tiny_files)
    storage = vhub.storage_folder(REPO)
    moved = env / "moved"
    target = storage / folder if folder != "." else storage
    os.rename(target, moved)
    # The link points at the bait: deleting "through" it would delete keep.txt.
    os.symlink(bait, target)
    r = invoke("rm", REPO, "--yes")
    assert r.exit_code == 1 and "symbolic link" in one_line_error(r), r.output
    assert tree(bait) == {"keep.txt": BAIT}
    assert entry.id == registry.pulled_models()[0].id


def test_uninstall_models_with_crafted_entries_deletes_only_the_cache(hub, tiny_files, bait, env, monkeypatch):
    pulled(hub, tiny_files)
    data = json.loads(registry.registry_path().read_text())
    data["models"].append({**data["models"][0], "id": "evil/x", "revision": "main",
                           "commit": "../../../../outside", "path": str(bait)})
    registry.registry_path().write_text(json.dumps(data))
    monkeypatch.setattr("vmetal.demo.default_demo_dir", lambda: env / "demo-none" / "d")
    r = invoke("uninstall", "--models", "--yes", "--venv", str(env / "no-venv"))
    assert tree(bait) == {"keep.txt": BAIT}
    assert r.exit_code == 1 and "not removing `evil/x`" in one_line_error(r), r.output


def test_modelscope_remove_refuses_traversing_revisions_and_links(env, bait):
    cache = env / "ms"
    snaps = cache / "models" / "acme--m" / "snapshots"
    snaps.mkdir(parents=True)
    assert modelscope_store.remove_snapshot(snaps / ".." / ".." / ".." / ".." / "outside",
                                            "../../../../outside") == 0
    os.symlink(bait, snaps / "master")
    assert modelscope_store.remove_snapshot(snaps / "master", "master") == 0
    assert tree(bait) == {"keep.txt": BAIT}


def test_check_relative_accepts_what_hubs_list():
    from vmetal.hub.safe_paths import check_relative

    for ok in ("config.json", "onnx/model.onnx", "refs/pr/1", "a..b.json", "..hidden"):
        assert check_relative(ok, "file") == ok
