"""A local HTTP server that speaks the part of the Hugging Face hub's protocol that
huggingface_hub's `model_info` / `snapshot_download` use (repo info, tree listing, HEAD and
GET of /resolve/), serving directories of files as repositories. The hub itself cannot be
reached from the test machines; this lets the real huggingface_hub client download, write its
cache and show its progress bars, and lets a test see which files were fetched.

    with HubServer({"org/name": checkpoint_dir}) as hub:      # hub.endpoint -> HF_ENDPOINT
        ...
        hub.fetched                                           # ["org/name/config.json", ...]
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

from aiohttp import web
from server_harness import free_port

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".gguf")


class HubServer:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {rid: self._index(Path(d)) for rid, d in repos.items()}
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.fetched: list[str] = []  # "org/name/path" of every GET of a file
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-hub")

    @staticmethod
    def _index(root: Path) -> dict:
        files = {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                data = p.read_bytes()
                lfs = p.name.endswith(_LFS_SUFFIXES)
                files[p.relative_to(root).as_posix()] = dict(
                    path=p,
                    size=len(data),
                    oid=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                    sha256=hashlib.sha256(data).hexdigest() if lfs else None,
                )
        commit = hashlib.sha1("".join(f"{k}{v['oid']}" for k, v in files.items()).encode()).hexdigest()
        return {"commit": commit, "files": files}

    def _repo(self, request: web.Request) -> dict:
        rid = f"{request.match_info['org']}/{request.match_info['name']}"
        if rid not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")
        return self.repos[rid]

    async def _info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        rid = f"{request.match_info['org']}/{request.match_info['name']}"
        return web.json_response(
            {
                "id": rid,
                "modelId": rid,
                "sha": repo["commit"],
                "private": False,
                "siblings": [{"rfilename": f} for f in repo["files"]],
            }
        )

    async def _tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        entries = []
        for path, f in repo["files"].items():
            entry = {"type": "file", "oid": f["oid"], "size": f["size"], "path": path}
            if f["sha256"]:
                entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
            entries.append(entry)
        return web.json_response(entries)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        path = request.match_info["path"]
        f = repo["files"].get(path)
        if f is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"}, text="Entry not found")
        etag = f["sha256"] or f["oid"]
        headers = {"X-Repo-Commit": repo["commit"], "ETag": f'"{etag}"', "Content-Length": str(f["size"])}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        self.fetched.append(f"{request.match_info['org']}/{request.match_info['name']}/{path}")
        return web.Response(
            body=f["path"].read_bytes(), headers={k: v for k, v in headers.items() if k != "Content-Length"}
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self._info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> HubServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
