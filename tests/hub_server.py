""" A Hugging Face Hub look-alike on 127.0.0.1, for tests that must run the real huggingface_hub client offline

It answers what huggingface_hub 2.x asks of a Hub (see its ``file_download.get_hf_file_metadata`` and
``_commit_api``), nothing more:

* ``HEAD``/``GET /<org>/<repo>/resolve/<rev>/<file>``: ``X-Repo-Commit``, ``ETag``, ``Content-Length``, and for
  LFS-like files (``.safetensors``, ``.bin``, ``.pth``...) ``X-Linked-Etag``/``X-Linked-Size`` as the real Hub
  sends; a missing repo or file is a 404 with ``X-Error-Code`` ``RepoNotFound``/``EntryNotFound``.
* ``GET /api/models/<org>/<repo>`` and ``.../revision/<rev>``: the repo's info (``sha``, ``siblings``), which
  ``HfApi.repo_info``/``resolve_revision`` read; transformers' ``from_pretrained`` and ``pipeline`` resolve the
  revision with it once, then download every file at that commit. A missing repo is a 404 ``RepoNotFound``.
* ``GET /files/<name>``: plain static files, for timm's torch.hub ``url`` downloads (the authors' release files).
* ``POST /api/repos/create``, ``POST /api/models/<repo>/preupload/<rev>`` (every file "regular", i.e. inline),
  ``POST /api/models/<repo>/commit/<rev>`` (NDJSON with base64 file contents), ``POST /api/validate-yaml`` (the
  model card check): enough for ``HfApi.create_repo`` and ``HfApi.upload_folder``. Committed files are served by
  ``resolve`` right away.

Every request is logged in ``server.requests`` as ``(method, path)`` so tests can check cache use and offline mode.
"""
import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

_LFS_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pth.tar', '.pt', '.tar')


class HubLookAlike:
    """Repos held in memory: ``repos[repo_id][filename] = bytes``; ``files[name] = bytes`` for plain urls."""

    def __init__(self) -> None:
        self.repos: Dict[str, Dict[str, bytes]] = {}
        self.files: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str]] = []
        self.validated_cards: List[str] = []
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # --- content -------------------------------------------------------------------------------------------
    def add_file(self, repo_id: str, filename: str, data: bytes) -> None:
        with self._lock:
            self.repos.setdefault(repo_id, {})[filename] = bytes(data)

    def commit_hash(self, repo_id: str) -> str:
        """A 40-hex commit id derived from the repo's content (changes whenever a file does)."""
        h = hashlib.sha1()
        for name, data in sorted(self.repos.get(repo_id, {}).items()):
            h.update(name.encode() + b'\0' + hashlib.sha256(data).digest())
        return h.hexdigest()

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f'http://{host}:{port}'

    def url(self, name: str) -> str:
        return f'{self.endpoint}/files/{name}'

    def count(self, method: Optional[str] = None, contains: str = '') -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and contains in p)

    # --- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> 'HubLookAlike':
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name='hub-look-alike', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> 'HubLookAlike':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubLookAlike
    protocol_version = 'HTTP/1.1'

    def log_message(self, fmt, *args) -> None:  # keep test output quiet
        pass

    # --- helpers -------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
              head_only: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if body and not head_only:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode(), {'Content-Type': 'application/json', **(headers or {})})

    def _body(self) -> bytes:
        n = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(n) if n else b''

    def _log(self) -> str:
        path = unquote(urlsplit(self.path).path)
        with self.server_hub._lock:
            self.server_hub.requests.append((self.command, path))
        return path

    # --- downloads -----------------------------------------------------------------------------------------
    def _resolve(self, head_only: bool) -> None:
        hub = self.server_hub
        path = self._log()
        if path.startswith('/files/'):
            data = hub.files.get(path[len('/files/'):])
            if data is None:
                return self._send(404, b'not found', head_only=head_only)
            return self._send(200, data, {'Content-Type': 'application/octet-stream'}, head_only=head_only)
        parts = path.strip('/').split('/')
        if len(parts) < 5 or parts[2] != 'resolve':
            return self._json(404, {'error': f'no route for {path}'})
        repo_id, filename = '/'.join(parts[:2]), '/'.join(parts[4:])
        repo = hub.repos.get(repo_id)
        if repo is None:
            return self._send(404, b'', {'X-Error-Code': 'RepoNotFound', 'X-Error-Message': 'Repository not found'},
                              head_only=head_only)
        commit = hub.commit_hash(repo_id)
        data = repo.get(filename)
        if data is None:
            return self._send(404, b'', {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': commit,
                                         'X-Error-Message': 'Entry not found'}, head_only=head_only)
        headers = {'X-Repo-Commit': commit, 'Content-Type': 'application/octet-stream', 'Accept-Ranges': 'bytes'}
        if filename.endswith(_LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()  # LFS: the etag is the content's sha256
            headers.update({'ETag': f'"{sha}"', 'X-Linked-Etag': f'"{sha}"', 'X-Linked-Size': str(len(data))})
        else:
            headers['ETag'] = '"' + hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest() + '"'
        rng = self.headers.get('Range')
        if rng and rng.startswith('bytes=') and not head_only:
            start_s, _, end_s = rng[len('bytes='):].partition('-')
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            headers['Content-Range'] = f'bytes {start}-{end}/{len(data)}'
            return self._send(206, data[start:end + 1], headers)
        return self._send(200, data, headers, head_only=head_only)

    def do_HEAD(self) -> None:
        self._resolve(head_only=True)

    def _repo_info(self, path: str) -> None:
        """``/api/models/<org>/<repo>[/revision/<rev>]``: what ``HfApi.model_info`` parses into a ``ModelInfo``."""
        hub = self.server_hub
        parts = path.strip('/').split('/')
        repo_id = '/'.join(parts[2:4])
        with hub._lock:
            repo = hub.repos.get(repo_id)
            names = sorted(repo) if repo is not None else []
        if repo is None:
            return self._json(404, {'error': 'Repository not found'},
                              {'X-Error-Code': 'RepoNotFound', 'X-Error-Message': 'Repository not found'})
        commit = hub.commit_hash(repo_id)
        return self._json(200, {
            'id': repo_id, 'modelId': repo_id, 'sha': commit, 'private': False, 'disabled': False, 'gated': False,
            'tags': [], 'siblings': [{'rfilename': n} for n in names],
        }, {'X-Repo-Commit': commit})

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        parts = path.strip('/').split('/')
        if parts[:2] == ['api', 'models'] and (len(parts) == 4 or (len(parts) == 6 and parts[4] == 'revision')):
            self._log()
            return self._repo_info(path)
        self._resolve(head_only=False)

    # --- uploads -------------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        hub = self.server_hub
        path = self._log()
        body = self._body()
        if path == '/api/repos/create':
            req = json.loads(body or b'{}')
            repo_id = f"{req.get('organization') or 'user'}/{req['name']}" if 'name' in req else req['repo_id']
            with hub._lock:
                hub.repos.setdefault(repo_id, {})
            return self._json(200, {'url': f'{hub.endpoint}/{repo_id}', 'name': repo_id, 'id': repo_id})
        if path == '/api/validate-yaml':  # model card metadata check, made by upload_folder for README.md
            content = json.loads(body or b'{}').get('content', '')
            with hub._lock:
                hub.validated_cards.append(content)
            if not content.startswith('---\n'):
                return self._json(200, {'errors': [], 'warnings': [{'message': 'empty or missing yaml metadata'}]})
            return self._json(200, {'errors': [], 'warnings': []})
        parts = path.strip('/').split('/')
        # /api/models/<org>/<repo>/(preupload|commit)/<rev>
        if len(parts) >= 6 and parts[0] == 'api' and parts[1] == 'models':
            repo_id, action = f'{parts[2]}/{parts[3]}', parts[4]
            if repo_id not in hub.repos:
                return self._send(404, b'', {'X-Error-Code': 'RepoNotFound'})
            if action == 'preupload':
                files = json.loads(body)['files']
                return self._json(200, {'files': [
                    {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False} for f in files]})
            if action == 'commit':
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item.get('key') == 'file':
                        value = item['value']
                        if value.get('encoding', 'base64') != 'base64':
                            return self._json(400, {'error': 'only base64 file content is supported'})
                        hub.add_file(repo_id, value['path'], base64.b64decode(value['content']))
                    elif item.get('key') not in ('header',):
                        return self._json(400, {'error': f"unsupported commit operation {item.get('key')}"})
                commit = hub.commit_hash(repo_id)
                return self._json(200, {'commitUrl': f'{hub.endpoint}/{repo_id}/commit/{commit}',
                                        'commitOid': commit, 'pullRequestUrl': None})
        return self._json(404, {'error': f'no route for POST {path}'})
