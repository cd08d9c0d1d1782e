"""nginx as a plain reverse proxy: the reference the sidecar's overhead is measured against.

Started on the same core as the sidecar, in front of the same fake upstream, one worker,
no logging, so "sidecar / nginx" ratios are comparable across noisy machines where absolute
figures are not. Two shapes: the plain `proxy_pass` (a new upstream connection per request,
nginx's default and the reference the design and the issues quote, ~19k req/s at 64
concurrent on this machine kind), and with an upstream `keepalive` pool (as the sidecar
keeps its own) — the best a general-purpose proxy does here.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench.cores import pinned

CONFIG = """
worker_processes 1;
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream fake {{ server 127.0.0.1:{upstream_port};{keepalive} }}
    server {{
        listen 127.0.0.1:{port};
        location /vertex_ai/ {{
            proxy_pass http://fake/;
{keepalive_headers}            proxy_set_header Authorization "Bearer bench-token";
            proxy_buffering off;
        }}
    }}
}}
"""


def available() -> bool:
    return shutil.which("nginx") is not None


KEEPALIVE_HEADERS = """            proxy_http_version 1.1;
            proxy_set_header Connection "";
"""


def start_nginx(tmp: Path, upstream_port: int, port: int, core: int = 0,
                keepalive: bool = False) -> subprocess.Popen[bytes]:
    """nginx on 127.0.0.1:`port` proxying /vertex_ai/ to the fake upstream; waits until it listens."""
    directory = tmp / ("nginx-keepalive" if keepalive else "nginx")
    directory.mkdir(exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(CONFIG.format(tmp=directory, upstream_port=upstream_port, port=port,
                                  keepalive=" keepalive 128;" if keepalive else "",
                                  keepalive_headers=KEEPALIVE_HEADERS if keepalive else ""))
    proc = subprocess.Popen(pinned(core, ["nginx", "-c", str(conf), "-p", str(directory), "-e",
                                          str(directory / "nginx-error.log")]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"nginx did not start: {(directory / 'nginx-error.log').read_text(errors='replace')[-500:]}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
