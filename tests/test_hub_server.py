"""Tests for the fake Hub server in tests/hub_server.py, driven by the real huggingface_hub client.

huggingface_hub is imported at module level on purpose: the fixture must cope with constants
that were computed before it ran.
"""

from __future__ import annotations

import json
import os
import sys
import types

import huggingface_hub
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

try:  # pytest's default "prepend" import mode puts tests/ on sys.path (same spelling as tests/conftest.py should use)
    from hub_server import DEFAULT_TOKEN, HubServer, configure_hf_env, hub_server  # noqa: F401
except ImportError:  # e.g. tests/ became a package, or --import-mode=importlib
    from tests.hub_server import (  # type: ignore[no-redef]  # noqa: F401
        DEFAULT_TOKEN,
        HubServer,
        configure_hf_env,
        hub_server,
    )

# huggingface_hub's legacy LFS upload calls httpx2 with `data=<file object>` (client side, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning")

REPO = "test-user/tiny"


def _make_model_folder(path, size=5 * 1024 * 1024, seed=0):
    """config.json + a ~5 MB model.safetensors (real safetensors header; deterministic payload, random if seed=None)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "toy", "hidden_size": 8}
    (path / "config.json").write_text(json.dumps(config))
    payload = os.urandom(size) if seed is None else bytes((i * 31 + seed) % 251 for i in range(256)) * (size // 256)
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    header += b" " * (-len(header) % 8)
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + payload)
    return path


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_fixture_patches_constants_imported_before(hub_server):
    # huggingface_hub was imported (with the default endpoint) before the fixture ran
    assert hf_constants.ENDPOINT == hub_server.url
    assert hf_constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub_server.url + "/")
    assert huggingface_hub.hf_api.api.endpoint == hub_server.url
    assert hf_constants.HF_HUB_DISABLE_XET is True and hf_constants.HF_HUB_OFFLINE is False
    assert hf_constants.HF_HUB_CACHE == os.environ["HF_HUB_CACHE"]
    from huggingface_hub.utils import _cache_manager

    assert _cache_manager.HF_HUB_CACHE == hf_constants.HF_HUB_CACHE
    # module-level helpers bound to the import-time HfApi instance also hit the fake server
    assert huggingface_hub.whoami()["name"] == hub_server.user
    url = huggingface_hub.create_repo("bare-name")
    assert url == f"{hub_server.url}/{hub_server.user}/bare-name"
    assert url.repo_id == f"{hub_server.user}/bare-name"
    assert hub_server.repo_exists(f"{hub_server.user}/bare-name")


def test_reconfigure_repoints_copies_made_during_a_test(hub_server, monkeypatch, tmp_path):
    # e.g. project code imported mid-test doing `from huggingface_hub.constants import ENDPOINT`
    # or `api = HfApi()` at import: it holds this server's URL, the next configuration must re-point it.
    module = types.ModuleType("_fake_project_module")
    module.ENDPOINT = hf_constants.ENDPOINT
    module.api = HfApi()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with HubServer() as other:
        inner = pytest.MonkeyPatch()
        try:
            configure_hf_env(inner, other.url, tmp_path / "home2")
            assert module.ENDPOINT == other.url and module.api.endpoint == other.url
            module.api.create_repo("elsewhere")
            assert other.repo_exists("test-user/elsewhere")
            assert not hub_server.repo_exists("test-user/elsewhere")
        finally:
            inner.undo()
    assert module.ENDPOINT == hub_server.url and module.api.endpoint == hub_server.url


def test_upload_folder_and_download(hub_server, tmp_path):
    folder = _make_model_folder(tmp_path / "model")
    api = HfApi()
    repo_url = api.create_repo(REPO)
    assert repo_url == f"{hub_server.url}/{REPO}"
    # exist_ok=True on an existing repo goes through the 409 path
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError):
        api.create_repo(REPO)

    info = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="add model")
    assert info.oid == hub_server.head(REPO)
    assert hub_server.list_files(REPO) == [".gitattributes", "config.json", "model.safetensors"]
    # the safetensors file went through the LFS batch + PUT path, config.json inline
    paths = [r.path for r in hub_server.requests]
    assert any("info/lfs/objects/batch" in p for p in paths)
    assert any(p.startswith("/_lfs/upload/") for p in paths)

    for name in ("config.json", "model.safetensors"):
        local = hf_hub_download(REPO, name)
        assert _read(local) == _read(folder / name)
        assert info.oid in local  # stored under snapshots/<commit sha>/

    model_info = api.model_info(REPO, files_metadata=True)
    assert model_info.sha == info.oid
    siblings = {s.rfilename: s for s in model_info.siblings}
    assert set(siblings) == {".gitattributes", "config.json", "model.safetensors"}
    assert siblings["model.safetensors"].lfs is not None
    assert siblings["model.safetensors"].size == (folder / "model.safetensors").stat().st_size
    assert api.repo_info(REPO, revision=info.oid).sha == info.oid
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "config.json", "model.safetensors"]

    # uploading the same folder again is a no-op commit on the client side
    before = hub_server.commits(REPO)
    api.upload_folder(folder_path=folder, repo_id=REPO)
    assert hub_server.commits(REPO) == before


def test_upload_file_and_snapshot_download(hub_server, tmp_path):
    folder = _make_model_folder(tmp_path / "model", size=1024 * 1024)
    api = HfApi()
    api.create_repo(REPO)
    api.upload_folder(folder_path=folder, repo_id=REPO)
    api.upload_file(path_or_fileobj=b"# Tiny\n", path_in_repo="README.md", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"nested", path_in_repo="sub/dir/notes.txt", repo_id=REPO)
    assert len(hub_server.commits(REPO)) == 4  # initial + 3

    snapshot = snapshot_download(REPO)
    found = sorted(
        os.path.relpath(os.path.join(root, f), snapshot).replace(os.sep, "/")
        for root, _, files in os.walk(snapshot)
        for f in files
    )
    expected = [".gitattributes", "README.md", "config.json", "model.safetensors", "sub/dir/notes.txt"]
    assert found == expected
    for name in expected:
        assert _read(os.path.join(snapshot, name)) == hub_server.read_file(REPO, name)

    tree = {f.path: f for f in api.list_repo_tree(REPO)}
    assert set(tree) == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub"}
    assert [f.path for f in api.list_repo_tree(REPO, path_in_repo="sub", recursive=True)] == [
        "sub/dir",
        "sub/dir/notes.txt",
    ]
    assert api.file_exists(REPO, "sub/dir/notes.txt") and not api.file_exists(REPO, "nope.txt")
    # older revisions stay addressable
    first_commit = hub_server.commits(REPO)[-2][0]
    assert sorted(api.list_repo_files(REPO, revision=first_commit)) == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
    ]


def test_commit_operations_and_dataset_repo(hub_server):
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete

    api = HfApi()
    api.create_repo(REPO)
    big = os.urandom(300 * 1024)
    api.create_commit(
        REPO,
        [
            CommitOperationAdd("a/one.txt", b"one"),
            CommitOperationAdd("a/two.txt", b"two"),
            CommitOperationAdd("w/weights.bin", big),  # *.bin => LFS
        ],
        commit_message="add",
    )
    paths = {p.path: p for p in api.get_paths_info(REPO, ["a", "a/one.txt", "w/weights.bin", "missing"])}
    assert set(paths) == {"a", "a/one.txt", "w/weights.bin"}
    assert paths["w/weights.bin"].lfs is not None and paths["a/one.txt"].lfs is None
    api.create_commit(
        REPO,
        [
            CommitOperationCopy("a/one.txt", "b/one-copy.txt"),
            CommitOperationCopy("w/weights.bin", "w/weights-copy.bin"),
            CommitOperationDelete("a/two.txt"),
        ],
        commit_message="copy + delete",
    )
    assert hub_server.list_files(REPO) == [
        ".gitattributes",
        "a/one.txt",
        "b/one-copy.txt",
        "w/weights-copy.bin",
        "w/weights.bin",
    ]
    assert hub_server.read_file(REPO, "w/weights-copy.bin") == big
    api.delete_folder("w", REPO)
    api.delete_file("b/one-copy.txt", REPO)
    assert hub_server.list_files(REPO) == [".gitattributes", "a/one.txt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("nope.txt", REPO)
    assert hub_server.commits(REPO)[0][1] == "Delete b/one-copy.txt with huggingface_hub"

    api.create_repo("test-user/data", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id="test-user/data", repo_type="dataset"
    )
    local = hf_hub_download("test-user/data", "data.csv", repo_type="dataset")
    assert _read(local) == b"a,b\n1,2\n"
    assert api.dataset_info("test-user/data").sha == hub_server.head("test-user/data", repo_type="dataset")
    api.delete_repo("test-user/data", repo_type="dataset")
    assert not hub_server.repo_exists("test-user/data", repo_type="dataset")


def test_transformers_push_to_hub_and_from_pretrained(hub_server):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    model = ViTForImageClassification(config)
    commit = model.push_to_hub(REPO)
    assert commit.oid == hub_server.head(REPO)
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub_server.list_files(REPO))

    loaded = ViTForImageClassification.from_pretrained(REPO)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    assert transformers.utils.hub.hf_api().endpoint == hub_server.url


def test_commit_failure_leaves_repo_unchanged(hub_server, tmp_path):
    api = HfApi()
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b'{"v": 1}', path_in_repo="config.json", repo_id=REPO)
    head, files = hub_server.head(REPO), hub_server.list_files(REPO)
    content = hub_server.read_file(REPO, "config.json")

    folder = _make_model_folder(tmp_path / "model", seed=3)
    hub_server.fail_next("/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_folder(folder_path=folder, repo_id=REPO)
    assert excinfo.value.response.status_code == 500
    assert hub_server.pending_failures == 0
    # preupload and the LFS upload happened, the commit was refused
    methods_paths = [(r.method, r.path, r.status) for r in hub_server.requests]
    assert any("/preupload/" in p and s == 200 for _, p, s in methods_paths)
    assert any(p.startswith("/_lfs/upload/") and s == 200 for _, p, s in methods_paths)
    assert [s for m, p, s in methods_paths if "/commit/" in p] == [200, 500]

    assert hub_server.head(REPO) == head
    assert hub_server.list_files(REPO) == files
    assert hub_server.read_file(REPO, "config.json") == content

    # the next attempt goes through (the LFS object is already on the server: no re-upload)
    n_uploads = sum(p.startswith("/_lfs/upload/") for _, p, _ in methods_paths)
    api.upload_folder(folder_path=folder, repo_id=REPO)
    assert hub_server.read_file(REPO, "model.safetensors") == _read(folder / "model.safetensors")
    assert sum(r.path.startswith("/_lfs/upload/") for r in hub_server.requests) == n_uploads


def test_fail_next_options(hub_server):
    api = HfApi()
    hub_server.fail_next("/api/repos/create", status=403, method="POST", message="nope")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO)
    assert excinfo.value.response.status_code == 403
    assert not hub_server.repo_exists(REPO)
    api.create_repo(REPO)  # only one failure was armed

    hub_server.fail_next(f"/api/models/{REPO}", status=404, times=2, error_code="RepoNotFound")
    for _ in range(2):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(REPO)
    assert api.model_info(REPO).id == REPO


def test_missing_file_and_repo(hub_server):
    api = HfApi()
    api.create_repo(REPO)
    with pytest.raises(EntryNotFoundError) as excinfo:
        hf_hub_download(REPO, "does-not-exist.json")
    assert isinstance(excinfo.value, HfHubHTTPError) and excinfo.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-user/no-such-repo", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-user/no-such-repo")
    with pytest.raises(HfHubHTTPError):  # RevisionNotFoundError
        api.model_info(REPO, revision="no-such-branch")


def test_write_requires_token(hub_server):
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(token="hf_wrong").create_repo(REPO)
    assert excinfo.value.response.status_code == 401
    assert HfApi(token=DEFAULT_TOKEN).create_repo(REPO).repo_id == REPO


def test_branches_prs_and_lfs_redirect(hub_server, tmp_path):
    hub_server.lfs_redirect = True  # LFS downloads redirect to another host name, like the Hub's CDN
    api = HfApi()
    api.create_repo(REPO)
    folder = _make_model_folder(tmp_path / "model", size=256 * 1024)
    api.create_branch(REPO, branch="dev")
    api.upload_folder(folder_path=folder, repo_id=REPO, revision="dev")
    assert "model.safetensors" in hub_server.list_files(REPO, revision="dev")
    assert "model.safetensors" not in hub_server.list_files(REPO)
    local = hf_hub_download(REPO, "model.safetensors", revision="dev")
    assert _read(local) == _read(folder / "model.safetensors")
    assert any(r.path.startswith("/_lfs/objects/") for r in hub_server.requests)

    pr = api.upload_file(path_or_fileobj=b"hello", path_in_repo="hello.txt", repo_id=REPO, create_pr=True)
    assert pr.pr_num == 1
    assert hub_server.list_files(REPO, revision="refs/pr/1") == [".gitattributes", "hello.txt"]
    assert "hello.txt" not in hub_server.list_files(REPO)
    assert _read(hf_hub_download(REPO, "hello.txt", revision="refs/pr/1")) == b"hello"


def test_server_standalone_context_manager():
    with HubServer() as server:
        url = server.create_repo("standalone")
        assert url == f"{server.url}/test-user/standalone"
        assert server.list_files("test-user/standalone") == [".gitattributes"]
