"""A real nginx for the HTTP shard tests and bench/resume_seek.py: Debian's package (`apt-get install
nginx`, as .ci/run does), started on a free localhost port to serve one directory, stopped afterwards.

Besides the directory at ``/``, it serves the same files rate-limited at ``/slow/`` (a transfer that is
still running when the test stops the server), with Range requests refused at ``/whole/`` (a server
that always sends the whole file), and at ``/cut/`` through a proxy whose upstream sends half of each
file and hangs up (a body cut off mid-transfer: nginx passes the cut on to the client).
"""

from __future__ import annotations

import http.server
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CONFIG = """
daemon off;
worker_processes 1;
user root;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format shards '$uri $status "$http_range" $body_bytes_sent';
    access_log {work}/access.log shards;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /slow/ {{ alias {root}/; limit_rate {slow_rate}; }}
        location /whole/ {{ alias {root}/; max_ranges 0; }}
        location /cut/ {{ proxy_pass http://127.0.0.1:{upstream}/; proxy_buffering off; }}
    }}
}}
"""


PROBE = "/.is-nginx-up"  # requested (404) until nginx answers; left out of requests()


@dataclass
class Request:
    path: str
    status: int
    range: str  # the Range header ("-" when none)
    sent: int  # body bytes sent


class _HalfFile(http.server.BaseHTTPRequestHandler):
    """Says the file's full length, sends half of it, hangs up."""

    root: Path

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, root: Path, work: Path, slow_rate: str = "16k"):
        self.binary = nginx_binary()
        if self.binary is None:
            raise FileNotFoundError("nginx is not installed (apt-get install nginx; .ci/run installs it)")
        self.root, self.work, self.port = root, work, _free_port()
        handler = type("HalfFile", (_HalfFile,), {"root": root})
        self.upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        self.upstream.daemon_threads = True
        threading.Thread(target=self.upstream.serve_forever, daemon=True).start()
        work.mkdir(parents=True, exist_ok=True)
        self.config = work / "nginx.conf"
        self.config.write_text(CONFIG.format(work=work, port=self.port, root=root, slow_rate=slow_rate,
                                             upstream=self.upstream.server_address[1]))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        self.proc = subprocess.Popen([self.binary, "-p", str(self.work), "-c", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self.proc.returncode}: {self.proc.stdout.read()}"
                                     f"{self._error_log()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}{PROBE}", timeout=1)
            except urllib.error.HTTPError:
                return self  # it answers (404)
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx did not answer on port {self.port} within 30 s{self._error_log()}")

    def stop(self) -> None:
        """Fast shutdown: nginx closes the connections it is serving."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.stop()
        self.upstream.shutdown()
        self.upstream.server_close()

    def url(self, name: str, location: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{location + '/' if location else ''}{name}"

    def requests(self) -> list[Request]:
        log = self.work / "access.log"
        lines = log.read_text().splitlines() if log.is_file() else []
        found = []
        for line in lines:
            path, status, rest = line.split(" ", 2)
            if path == PROBE:
                continue
            header, sent = rest.rsplit(" ", 1)
            found.append(Request(path, int(status), header.strip('"'), int(sent)))
        return found

    def _error_log(self) -> str:
        log = self.work / "error.log"
        return f"\n{log.read_text()[-2000:]}" if log.is_file() else ""
