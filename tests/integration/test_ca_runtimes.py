"""The CA files the sidecar writes for app containers, used by real clients of each runtime:
Node with NODE_EXTRA_CA_CERTS (the pod CA alone, added to Node's own roots) and requests with
REQUESTS_CA_BUNDLE (the bundle: public roots + the organisation's roots + the pod CA)."""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.chart.tools import missing
from vertex_sidecar.config import TlsSettings
from vertex_sidecar.tls import TlsFiles, prepare_tls


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def files(tmp_path: Path) -> TlsFiles:
    corporate = prepare_tls(TlsSettings(state_dir=str(tmp_path / "corp"), ca_bundle_path=str(tmp_path / "c" / "b.pem")))
    roots = tmp_path / "corporate-roots.pem"
    roots.write_bytes(Path(corporate.ca_cert_file or "").read_bytes())
    return prepare_tls(TlsSettings(state_dir=str(tmp_path / "state"), ca_bundle_path=str(tmp_path / "shared" / "ca.crt"),
                                   ca_cert_path=str(tmp_path / "shared" / "pod-ca.crt"), extra_roots_file=str(roots)))


@pytest.fixture()
def server(files: TlsFiles) -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert_file, files.key_file)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_requests_trusts_the_sidecar_through_the_bundle(files: TlsFiles, server: int, tmp_path: Path) -> None:
    assert requests.get(f"https://localhost:{server}/", verify=files.ca_bundle_path, timeout=5).text == "ok"
    bundle = Path(files.ca_bundle_path).read_bytes()
    assert (tmp_path / "corporate-roots.pem").read_bytes() in bundle  # the organisation's roots are kept


def test_node_trusts_the_sidecar_through_the_pod_ca_alone(files: TlsFiles, server: int) -> None:
    node = shutil.which("node")
    if node is None:
        missing("node (Debian package nodejs)")
    script = (f"require('https').get('https://localhost:{server}/', r => {{ let b=''; r.on('data', d => b += d); "
              "r.on('end', () => console.log(r.statusCode, b)); }).on('error', e => { console.log('ERR', e.code); });")
    without = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30)
    assert "ERR" in without.stdout  # Node's own roots do not know the pod CA
    with_ca = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30,
                             env={"NODE_EXTRA_CA_CERTS": str(Path(files.ca_bundle_path).parent / "pod-ca.crt")})
    assert with_ca.stdout.strip() == "200 ok", with_ca.stderr
    # Only the CA: Node keeps its own roots for every other host.
    assert (Path(files.ca_bundle_path).parent / "pod-ca.crt").read_bytes().count(b"BEGIN CERTIFICATE") == 1
