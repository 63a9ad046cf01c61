"""An in-memory Hugging Face Hub behind huggingface_hub's own HTTP client, and the Hub cache's folder layout.

`FakeHub` replaces only the network transport (`huggingface_hub.set_client_factory` with an `httpx2.MockTransport`):
every request huggingface_hub makes (create the repo, validate the card's YAML, pre-upload, the LFS batch and PUT, the
NDJSON commit, file resolution) goes through its own code and reaches the handlers below, which answer the way the
Hub's API does. Uploads take the LFS path (xet is switched off: its client does its own networking), so regular files
arrive base64 in the commit and `.safetensors` through LFS, as on the Hub.

`install_snapshot` lays files out the way `hf_hub_download` caches them (`models--owner--name/snapshots/<commit>/...`,
`refs/main`), so that `from_pretrained("owner/name")` finds them with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote

import httpx2
import huggingface_hub
import yaml
from huggingface_hub import constants
from huggingface_hub.utils import validate_repo_id

LFS_HOST = "https://lfs.fake-hub.invalid"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
PIPELINE_TAGS = {"text-generation", "text2text-generation", "feature-extraction", "text-classification"}


@dataclass
class Commit:
    oid: str
    message: str
    regular: dict[str, bytes]  # sent base64 inside the commit
    lfs: dict[str, bytes]  # sent through the LFS batch API and PUT


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[Commit] = field(default_factory=list)


class FakeHub:
    """The Hub's HTTP API for model repositories, in memory. `requests` logs `(method, path)` of every call."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 hex -> content
        self.requests: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ wiring

    @contextlib.contextmanager
    def serving(self) -> Iterator[FakeHub]:
        """huggingface_hub talks to this fake within the block (online mode, xet off), and to nothing else."""
        previous = (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET)
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
        huggingface_hub.set_client_factory(
            lambda: httpx2.Client(transport=httpx2.MockTransport(self.handle), follow_redirects=True)
        )
        try:
            yield self
        finally:
            huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
            constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = previous

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = unquote(request.url.path)
        self.requests.append((request.method, path))
        if str(request.url).startswith(LFS_HOST):
            return self._lfs_put(request, path)
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method == request.method and match:
                return handler(request, **match.groupdict())
        return httpx2.Response(404, json={"error": f"the fake Hub has no route for {request.method} {path}"})

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self, request):
        body = json.loads(request.content)
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"user/{body['name']}"
        self.repos.setdefault(repo_id, Repo())
        return httpx2.Response(200, json={"url": f"{constants.ENDPOINT}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, request):
        content = json.loads(request.content)["content"]
        errors = metadata_errors(content)
        if errors:
            return httpx2.Response(400, json={"error": "Invalid metadata in README.md.\n" + "\n".join(errors)})
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _preupload(self, request, repo, rev):
        if repo not in self.repos:
            return _error(404, "RepoNotFound")
        files = json.loads(request.content)["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000_000 else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in files
        ]
        return httpx2.Response(200, json={"files": modes})

    def _lfs_batch(self, request, repo):
        body = json.loads(request.content)
        assert body["operation"] == "upload" and "basic" in body["transfers"], body
        objects = [
            {
                "oid": o["oid"],
                "size": o["size"],
                "authenticated": True,
                "actions": {"upload": {"href": f"{LFS_HOST}/{o['oid']}"}},
            }
            for o in body["objects"]
        ]
        return httpx2.Response(200, json={"transfer": "basic", "objects": objects})

    def _lfs_put(self, request, path):
        oid = path.strip("/")
        content = request.read()
        if hashlib.sha256(content).hexdigest() != oid:
            return httpx2.Response(400, json={"error": "sha256 mismatch"})
        self.lfs[oid] = content
        return httpx2.Response(200)

    def _commit(self, request, repo, rev):
        if repo not in self.repos:
            return _error(404, "RepoNotFound")
        lines = [json.loads(line) for line in request.content.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        regular, lfs = {}, {}
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                assert value["encoding"] == "base64"
                regular[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return httpx2.Response(422, json={"error": f"LFS object {value['oid']} was never uploaded"})
                lfs[value["path"]] = self.lfs[value["oid"]]
            elif item["key"] != "header":
                return httpx2.Response(400, json={"error": f"the fake Hub does not take {item['key']!r}"})
        oid = hashlib.sha1(json.dumps([header, sorted(regular), sorted(lfs)]).encode() + os.urandom(8)).hexdigest()
        state = self.repos[repo]
        state.files.update({**regular, **lfs})
        state.commits.append(Commit(oid, header["summary"], regular, lfs))
        return httpx2.Response(
            200, json={"commitUrl": f"{constants.ENDPOINT}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
        )

    def _resolve(self, request, repo, rev, file):
        state = self.repos.get(repo)
        if state is None:
            return _error(404, "RepoNotFound")
        if file not in state.files:
            return _error(404, "EntryNotFound")
        content = state.files[file]
        commit = state.commits[-1].oid
        headers = {
            "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
            "X-Repo-Commit": commit,
            "Content-Length": str(len(content)),
        }
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else content)


def _error(status: int, code: str) -> httpx2.Response:
    return httpx2.Response(status, headers={"X-Error-Code": code}, json={"error": code})


def metadata_errors(readme: str) -> list[str]:
    """What the Hub's YAML check would refuse in a README's metadata: `base_model` must be model ids
    ('owner/name'), `library_name` a name, `tags` strings, `pipeline_tag` a known task."""
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    if not match:
        return []
    meta = yaml.safe_load(match.group(1)) or {}
    errors = []
    bases = meta.get("base_model")
    for base in [bases] if isinstance(bases, str) else bases or []:
        try:
            validate_repo_id(base)
            ok = base.count("/") == 1 and not base.startswith((".", "~"))
        except Exception:
            ok = False
        if not ok:
            errors.append(f'"base_model" must be a model id on the Hub, got {base!r}')
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    if not all(isinstance(t, str) for t in meta.get("tags") or []):
        errors.append('"tags" must be strings')
    if meta.get("pipeline_tag") is not None and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" {meta["pipeline_tag"]!r} is not a task')
    return errors


def install_snapshot(cache: str | os.PathLike, repo_id: str, files: dict[str, bytes], commit: str) -> str:
    """Lay `files` out as the Hub cache does (`HF_HUB_CACHE/models--owner--name/snapshots/<commit>/...`, with
    `refs/main` naming the commit) and return the snapshot folder."""
    root = os.path.join(os.fspath(cache), "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(root, "snapshots", commit)
    for name, content in files.items():
        path = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def folder_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """Every file under `folder`, by its path relative to it (with '/')."""
    out = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder).replace(os.sep, "/")] = f.read()
    return out
