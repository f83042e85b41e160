"""nginx as a real HTTP intermediary: its own config on loopback, started and stopped
by PID (``daemon off``: the process we start is the master).

It routes by path prefix to upstreams and caches what upstreams mark cacheable (public
content and the discovery document; TCTP answers are ``no-store``). Its access log
records the request line, status, Content-Encoding, Location and cache status: what an
intermediary legitimately sees.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from attestation.errors import TestbedError

START_TIMEOUT: Final = 10.0
_TEMP_DIRS: Final = ("cache", "body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxError(TestbedError):
    """nginx is missing, would not start, or would not stop."""


@dataclass(frozen=True)
class Route:
    prefix: str  # e.g. "/service-a/"
    upstream: int  # a port on 127.0.0.1


def _worker_user() -> str:
    entry = pwd.getpwuid(os.geteuid())
    return f"{entry.pw_name} {grp.getgrgid(os.getegid()).gr_name}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if found is None:
        raise NginxError("nginx is not installed (the Debian package nginx; .ci/bootstrap)")
    return found


class Nginx:
    """One nginx master on 127.0.0.1:``port``, routing ``routes``; ``default`` serves /."""

    def __init__(self, root: Path, routes: Sequence[Route], default: int) -> None:
        self.root = root
        self.routes = tuple(routes)
        self.default = default
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> Nginx:
        self._prepare_dirs()
        conf = self.root / "nginx.conf"
        conf.write_text(self.config())
        self._process = subprocess.Popen(
            [nginx_binary(), "-p", str(self.root), "-c", str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(self.root / "stderr.log").open("wb"))
        self._wait_listening()
        return self

    def _prepare_dirs(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in _TEMP_DIRS:
            (self.root / name).mkdir(mode=0o700, exist_ok=True)

    def config(self) -> str:
        root = self.root
        # Workers run as we do: our work directories are 0700 (a worker switched to
        # nobody could not reach its cache); nginx listens on loopback only.
        user = f"user {_worker_user()};" if os.geteuid() == 0 else ""
        locations = "".join(_location(r.prefix, r.upstream) for r in self.routes)
        temp = "".join(f"  {kind}_temp_path {root / kind};\n"
                       for kind in ("proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""# written by testbed.tctp.nginx
worker_processes 1;
daemon off;
{user}
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
  log_format tctp '$remote_addr "$request" $status $body_bytes_sent '
                  'ce="$http_content_encoding" rce="$sent_http_content_encoding" '
                  'loc="$sent_http_location" cache=$upstream_cache_status';
  access_log {root / "access.log"} tctp;
  client_max_body_size 2m;
  client_body_temp_path {root / "body"};
{temp}  proxy_cache_path {root / "cache"} levels=1 keys_zone=tctp:1m max_size=16m inactive=10m;
  server {{
    listen 127.0.0.1:{self.port};
{locations}{_location("/", self.default, exact=True)}  }}
}}
"""

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                errors = (self.root / "stderr.log").read_text(errors="replace")[-500:]
                raise NginxError(f"nginx exited with {self._process.returncode}: {errors}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NginxError(f"nginx did not listen on 127.0.0.1:{self.port} within "
                         f"{START_TIMEOUT:.0f} s")

    def stop(self) -> None:
        """TERM to our master (it stops its workers), KILL after 5 s; by PID only."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _location(prefix: str, upstream: int, *, exact: bool = False) -> str:
    match = "= " if exact else ""
    return f"""    location {match}{prefix} {{
      proxy_pass http://127.0.0.1:{upstream};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache tctp;
      add_header X-Cache $upstream_cache_status always;
    }}
"""
