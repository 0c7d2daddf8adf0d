"""Request bodies are capped while they arrive, on a real API process over loopback.

Each case sends a body far larger than the cap (with Content-Length, without it as chunked
transfer, multipart and JSON) from a raw socket, and measures on the server process what it
cost: bytes the API wrote (`wchar` in /proc/PID/io: spooled parts and stored uploads), its peak
RSS (`VmHWM`) and whether anything was left under the upload folder or the temp folder.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from services import ROOT, base_env, free_port

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/io").exists(), reason="needs Linux /proc accounting"
)

MiB = 1024 * 1024
CAP = 1 * MiB  # HAWADA_MAX_UPLOAD_BYTES for the server under test
# What "the cap plus a small margin" means here: the form margin (1 MiB), one read chunk.
MARGIN = 2 * MiB
BODY = 200 * MiB  # what the client offers; the old API spooled all of it


class Api:
    """`hawada api` as a subprocess with its own TMPDIR, and its /proc counters."""

    def __init__(self, tmp: Path) -> None:
        self.tmpdir = tmp / "tmp"
        self.tmpdir.mkdir()
        self.var = tmp / "var"
        env = base_env(self.var)
        env.update(HAWADA_MAX_UPLOAD_BYTES=str(CAP), TMPDIR=str(self.tmpdir))
        self.port = free_port()
        self.log = tmp / "api.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hawada.cli", "api", "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise TimeoutError(self.log.read_text())

    def wchar(self) -> int:
        """Bytes this process passed to write(2) so far (files it spooled or stored)."""
        for line in Path(f"/proc/{self.proc.pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
        raise AssertionError("no wchar")

    def peak_rss(self) -> int:
        """Peak resident set size of the process, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def leftovers(self) -> list[Path]:
        """Files left in the upload area and the temp folder."""
        uploads = self.var / "artifacts" / "uploads"
        found = [p for p in self.tmpdir.rglob("*") if p.is_file()]
        return found + ([p for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else [])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    server = Api(tmp_path_factory.mktemp("limits"))
    yield server
    server.stop()


def send_streaming(
    port: int, path: str, headers: dict[str, str], head: bytes, total: int, chunked: bool
) -> tuple[int, dict, int]:
    """POST `head` then zeros up to `total` bytes, reading the answer while sending.

    Returns (status, JSON body, bytes the client managed to send). Sending stops as soon as
    the server answers or closes.
    """
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sock.setblocking(False)
    pending = head
    sent = 0
    reply = b""
    block = b"\x00" * (64 * 1024)
    while True:
        readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], 10)
        if readable:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                break
            reply += data
            if b"\r\n\r\n" in reply:
                headers_end = reply.index(b"\r\n\r\n")
                hdr = reply[:headers_end].decode().lower()
                length = next(
                    int(line.split(":")[1])
                    for line in hdr.split("\r\n")
                    if "content-length" in line
                )
                if len(reply) >= headers_end + 4 + length:
                    break
            continue
        if not writable:
            if not readable:
                raise TimeoutError(f"no answer after sending {sent} bytes")
            continue
        piece = pending or block[: min(len(block), total - sent)]
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
        try:
            n = sock.send(frame)
        except (BrokenPipeError, ConnectionResetError):
            break
        except BlockingIOError:
            continue
        if n < len(frame):  # keep framing simple: finish this frame blocking
            sock.setblocking(True)
            try:
                sock.sendall(frame[n:])
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.setblocking(False)
        sent += len(piece)
        pending = b""
        if sent >= total and chunked:
            sock.sendall(b"0\r\n\r\n")
    sock.close()
    status = int(reply.split(b" ", 2)[1])
    body = json.loads(reply[reply.index(b"\r\n\r\n") + 4 :])
    return status, body, sent


def multipart_head(boundary: str, recipe: dict | None = None) -> bytes:
    """Form fields, then the start of a `weights` file part whose data follows."""
    parts = b""
    if recipe is not None:
        parts += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="recipe"\r\n\r\n'
            f"{json.dumps(recipe)}\r\n"
        ).encode()
    parts += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="weights"; '
        'filename="w.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    return parts


RECIPE = {
    "model": {"arch": "resnet18", "num_classes": 10},
    "data": {"source": "synthetic"},
}

CASES = {
    # name: (path, content type, head)
    "jobs-multipart": (
        "/v1/jobs",
        "multipart/form-data; boundary=xyz",
        multipart_head("xyz", RECIPE),
    ),
    "models-multipart": ("/v1/models", "multipart/form-data; boundary=xyz", multipart_head("xyz")),
    "jobs-json": ("/v1/jobs", "application/json", b'{"recipe": {"x": "'),
    "cancel-body": ("/v1/jobs/" + "0" * 32 + "/cancel", "application/json", b"{"),
}


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_oversized_body_refused_while_streaming(api: Api, case: str, chunked: bool) -> None:
    path, ctype, head = CASES[case]
    wchar0 = api.wchar()
    status, body, sent = send_streaming(
        api.port, path, {"Content-Type": ctype}, head, BODY, chunked
    )
    written = api.wchar() - wchar0
    if case == "cancel-body" and chunked:
        # A route that reads no body answers without reading it (here: no such job).
        assert status == 404, body
    else:
        assert status == 413, body
        assert body["error"]["code"] == "upload_too_large"
    # The server stopped reading near the cap: the client could not push the whole body
    # (what it did send includes both sides' socket buffers), and the API wrote at most the cap.
    assert sent < BODY // 4, sent
    assert written < CAP + MARGIN, written
    assert api.leftovers() == []
    assert api.peak_rss() < 400 * MiB
    if not chunked:
        assert sent < 16 * MiB  # declared too large: answered before reading the body


def test_file_part_over_cap_with_room_in_body(api: Api) -> None:
    """A single file part past the per-file cap is refused while it streams."""
    status, body, _ = send_streaming(
        api.port,
        "/v1/jobs",
        {"Content-Type": "multipart/form-data; boundary=xyz"},
        multipart_head("xyz", RECIPE),
        CAP + 512 * 1024,  # under the whole-body cap, over the per-file cap
        chunked=True,
    )
    assert status == 413, body
    assert "weights" in body["error"]["message"]
    assert api.leftovers() == []


def test_concurrent_large_safetensors_headers_stay_bounded(api: Api) -> None:
    """Headers that claim tens of MB are refused from their 8-byte length, without parsing."""
    rss0 = api.peak_rss()
    header = b"{" + b'"a":1,' * (CAP // 8) + b'"z":1}'
    blob = len(header).to_bytes(8, "little") + header
    with httpx.Client(base_url=f"http://127.0.0.1:{api.port}") as client:
        resp = client.post("/v1/models", files={"weights": ("w.safetensors", blob)})
    assert resp.status_code == 400, resp.text
    assert api.peak_rss() - rss0 < 64 * MiB
    assert api.leftovers() == []


def test_peak_rss_stays_near_baseline(api: Api) -> None:
    """After every oversized request above, the API never held a body in memory."""
    assert api.peak_rss() < 400 * MiB, api.peak_rss()
    assert os.path.exists(f"/proc/{api.proc.pid}")
