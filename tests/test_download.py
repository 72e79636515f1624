"""Tests for minidiff/download.py and tools/download.py against a local HTTP server (127.0.0.1; no network).

The server (threaded, answers Range requests with 206) serves small fake files; the registry is replaced by
fake entries pointing at them. Covered: a full download, resuming a partial .part, a server that ignores
Range, a sha256 mismatch (clear error, no final file), HF_TOKEN sent to Hugging Face only and not carried
over a redirect, HTTP errors, --list, bad arguments (exit 2, one line), missing_weights_message.

    python -m pytest tests/test_download.py -q
"""
import hashlib
import importlib.util
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import minidiff.download as dl

ROOT = Path(__file__).resolve().parents[1]
DATA = bytes(range(256)) * 1200  # 307,200 bytes, several 1 MiB-read-chunks' worth of Range arithmetic
SMALL = b'{"fake": true}\n'


def _load_tool():
    spec = importlib.util.spec_from_file_location("download_tool", ROOT / "tools" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture
def server():
    """A local server: `files` maps URL paths to bytes (or to ('redirect', path)); `seen` logs requests."""
    class Handler(BaseHTTPRequestHandler):
        files, seen, honour_range = {}, [], True

        def do_GET(self):
            Handler.seen.append((self.path, dict(self.headers)))
            body = Handler.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            if isinstance(body, tuple):  # like Hugging Face sending a download on to its storage host
                self.send_response(302)
                self.send_header("Location", body[1])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            if Handler.honour_range and self.headers.get("Range"):
                start = int(self.headers["Range"].split("=")[1].split("-")[0])
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    Handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield Handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def registry(monkeypatch):
    """Fake entries: 'fake' (a hashed file + an unhashed one), 'badhash', 'hf' (a Hugging Face URL)."""
    sha = hashlib.sha256(DATA).hexdigest()
    fake = {
        "fake": dl.Checkpoint("fake", "fake model", (
            dl.RemoteFile("fake/a.bin", "https://example.invalid/a.bin", len(DATA), sha),
            dl.RemoteFile("fake/sub/b.json", "https://example.invalid/b.json"))),
        "badhash": dl.Checkpoint("bad.bin", "file with a wrong hash", (
            dl.RemoteFile("bad.bin", "https://example.invalid/bad.bin", len(DATA), "0" * 64),)),
        "hf": dl.Checkpoint("hf.bin", "file on Hugging Face", (
            dl.RemoteFile("hf.bin", f"{dl.HF}/org/repo/resolve/main/hf.bin", len(DATA), sha),)),
    }
    monkeypatch.setattr(dl, "CHECKPOINTS", fake)
    monkeypatch.setattr(tool, "CHECKPOINTS", fake)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return fake


def _run(tmp_path, *argv):
    return tool.main(["--dir", str(tmp_path / "ckpt"), "--no-progress", *argv])


def test_full_download_then_nothing_to_do(server, registry, tmp_path):
    server.files.update({"/fake/a.bin": DATA, "/fake/sub/b.json": SMALL})
    assert _run(tmp_path, "--base-url", server.url, "--only", "fake") == 0
    assert (tmp_path / "ckpt/fake/a.bin").read_bytes() == DATA
    assert (tmp_path / "ckpt/fake/sub/b.json").read_bytes() == SMALL
    assert not list((tmp_path / "ckpt").rglob("*.part"))
    n = len(server.seen)
    assert _run(tmp_path, "--base-url", server.url, "--only", "fake", "--verify") == 0
    assert len(server.seen) == n  # complete files are not fetched again


@pytest.mark.parametrize("honour_range", [True, False])
def test_resume_from_partial_file(server, registry, tmp_path, honour_range):
    server.files["/fake/a.bin"], server.files["/fake/sub/b.json"] = DATA, SMALL
    server.honour_range = honour_range  # False: a server that ignores Range and sends everything (200)
    part = tmp_path / "ckpt/fake/a.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[:100_000])
    assert _run(tmp_path, "--base-url", server.url, "--only", "fake") == 0
    assert (tmp_path / "ckpt/fake/a.bin").read_bytes() == DATA and not part.exists()
    assert dict(server.seen)["/fake/a.bin"].get("Range") == "bytes=100000-"


def test_hash_mismatch_leaves_no_file(server, registry, tmp_path, capsys):
    server.files["/bad.bin"] = DATA
    assert _run(tmp_path, "--base-url", server.url, "--only", "badhash") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0] and "does not match" in err[0]
    assert not (tmp_path / "ckpt/bad.bin").exists() and not (tmp_path / "ckpt/bad.bin.part").exists()


def test_hf_token_sent_to_hugging_face_only(server, registry, tmp_path, monkeypatch):
    server.files.update({"/org/repo/resolve/main/hf.bin": ("redirect", "/cdn/hf.bin"), "/cdn/hf.bin": DATA,
                         "/fake/a.bin": DATA, "/fake/sub/b.json": SMALL})
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # Hugging Face URLs go to the local server
    assert _run(tmp_path, "--only", "hf") == 0
    assert (tmp_path / "ckpt/hf.bin").read_bytes() == DATA
    auth = {path: headers.get("Authorization") for path, headers in server.seen}
    assert auth["/org/repo/resolve/main/hf.bin"] == "Bearer secret-token"
    assert auth["/cdn/hf.bin"] is None  # not carried over the redirect to the storage host
    monkeypatch.delenv("HF_ENDPOINT")
    assert _run(tmp_path, "--base-url", server.url, "--only", "fake") == 0  # a mirror that is not HF
    assert dict(server.seen)["/fake/a.bin"].get("Authorization") is None


def test_http_error_is_one_line(server, registry, tmp_path, capsys):
    assert _run(tmp_path, "--base-url", server.url, "--only", "badhash") == 1  # nothing served: 404
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 404" in err[0]


def test_unhashed_files_say_size_only_and_web_pages_are_refused(server, registry, tmp_path, capsys):
    server.files.update({"/fake/a.bin": DATA, "/fake/sub/b.json": b"<!DOCTYPE html><html>login</html>"})
    assert _run(tmp_path, "--base-url", server.url, "--only", "fake") == 1  # a mirror's HTML page
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "web page, not the file" in err[0]
    assert not (tmp_path / "ckpt/fake/sub/b.json").exists()
    (tmp_path / "ckpt/fake/sub").mkdir(parents=True, exist_ok=True)  # such a page from an earlier run ...
    (tmp_path / "ckpt/fake/sub/b.json").write_bytes(b"<html>old</html>")
    server.files["/fake/sub/b.json"] = SMALL
    assert _run(tmp_path, "--base-url", server.url, "--only", "fake", "--verify") == 0  # ... is fetched again
    out = capsys.readouterr().out
    assert (tmp_path / "ckpt/fake/sub/b.json").read_bytes() == SMALL
    assert "all 2 files present: 1 checked against their published sha256, 1 by size only" in out
    assert _run(tmp_path, "--base-url", server.url, "--only", "fake") == 0  # nothing to fetch: how checked
    out = capsys.readouterr().out
    assert "a.bin  (sha256)" in out and "b.json  (size only)" in out


def test_no_network_is_one_line_and_makes_no_folder(tmp_path):
    """The README's first command without network: one line that says what to do, no empty folders left
    (sample.py used to take them for downloaded weights)."""
    import socket
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "download.py"), "--no-progress",
                           "--dir", str(tmp_path / "ckpt"), "--base-url", f"http://127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(w in lines[0] for w in ("could not reach 127.0.0.1", "--base-url", "--fake-weights"))
    assert not (tmp_path / "ckpt").exists()


def test_list(registry, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/bad.bin").write_bytes(b"x")
    assert _run(tmp_path, "--list") == 0
    out = capsys.readouterr().out
    assert "[x] badhash" in out and "[ ] fake" in out and "group default" in out


@pytest.mark.parametrize("argv", [["--only", "no-such-model"], ["--no-such-flag"], ["--base-url", "ftp://x"]])
def test_bad_arguments_exit_2_with_one_line(argv):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "download.py"), *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "error" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_weights_message(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "clip-vit-large-patch14").mkdir(parents=True)
    (root / "clip-vit-large-patch14/config.json").write_text("{}")
    paths = dl.default_checkpoint_paths(str(root))
    wanted = [paths["clip"], paths["sd"], root / "diff-plugin/derain", "/nowhere/x.pt"]
    msg = dl.missing_weights_message(wanted)
    print(msg)
    assert "model.safetensors  1.71 GB" in msg and "patch14/config.json" not in msg  # only what is missing
    assert "v1-5-pruned-emaonly.safetensors  4.27 GB  <- https://huggingface.co/" in msg
    assert "derain/tpb.pt  size unknown" in msg
    assert "/nowhere/x.pt: no such file" in msg
    last = msg.splitlines()[-1]
    assert last.startswith("get them with: python tools/download.py --only clip-l14 sd15 plugin-derain")


def test_registry_layout():
    paths = dl.default_checkpoint_paths("checkpoints")
    assert paths["sd"] == "checkpoints/v1-5-pruned-emaonly.safetensors"
    assert paths["clip"] == "checkpoints/clip-vit-large-patch14"
    assert paths["selector"] == "checkpoints/diff-plugin/plugin_selector/PromptTunner.pt"
    assert paths["inception"] == "checkpoints/pt_inception-2015-12-05-6726825d.pth"
    for key, ckpt in dl.CHECKPOINTS.items():
        for f in ckpt.files:
            assert f.path == ckpt.path or f.path.startswith(ckpt.path + "/"), key
            assert f.sha256 is None or (len(f.sha256) == 64 and int(f.sha256, 16) >= 0), key
    assert dl.expand_keys(["plugins"])[:2] == ["plugin-derain", "plugin-desnow"]
