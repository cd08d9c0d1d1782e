"""`make demo` — see the README.

Starts the local Google emulators (GCE metadata server, Vertex AI REST) and the real
`vertex-sidecar` on 127.0.0.1:4000 (override with DEMO_PORT), sends real google-genai
requests through it, prints the answers, and keeps the sidecar running until Ctrl-C so
you can try it with curl or your own code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise SystemExit(f"the emulator exited with {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit("the emulator did not start in time")


def wait_ready(admin: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the sidecar exited with {proc.returncode} (is port {admin} or the app port taken?)")
        try:
            if urllib.request.urlopen(f"http://{admin}/readyz", timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the sidecar did not become ready (no Google token from the metadata emulator?)")


def main() -> int:
    port = int(os.environ.get("DEMO_PORT", "4000"))
    admin_port = int(os.environ.get("DEMO_ADMIN_PORT", "9464"))
    work = Path(tempfile.mkdtemp(prefix="vertex-demo-"))
    port_file = work / "emulator.port"
    emulator = subprocess.Popen([sys.executable, "-m", "tests.emulators", "--port", "0", "--port-file",
                                 str(port_file), "--project", "demo-project"], cwd=ROOT,
                                stdout=subprocess.DEVNULL)
    procs = [emulator]
    try:
        emulator_url = f"http://127.0.0.1:{wait_for_file(port_file, emulator)}"
        config = work / "sidecar.yaml"
        config.write_text(
            f"listen: 127.0.0.1:{port}\n"
            f"admin_listen: 127.0.0.1:{admin_port}\n"
            "upstreams:  # the demo points every Google host at the local emulator\n"
            f"  aiplatform: {emulator_url}\n"
            f"  aiplatform_global: {emulator_url}\n"
            f"  aiplatform_multiregion: {emulator_url}\n"
            f"  discovery: {emulator_url}\n"
            f"  discovery_multiregion: {emulator_url}\n"
            "defaults: {project: demo-project, location: us-central1}\n"
        )
        metadata_host = emulator_url.removeprefix("http://")
        env = {**os.environ, "GCE_METADATA_HOST": metadata_host, "GCE_METADATA_IP": metadata_host,
               "HOME": str(work), "CLOUDSDK_CONFIG": str(work / "gcloud")}
        env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        sidecar = subprocess.Popen([sys.executable, "-m", "vertex_sidecar", "--config", str(config)], env=env,
                                   cwd=ROOT, stdout=subprocess.PIPE)
        procs.append(sidecar)
        assert sidecar.stdout is not None
        listening = json.loads(sidecar.stdout.readline() or b"{}")
        if not listening:
            raise SystemExit("the sidecar did not start")
        wait_ready(listening["admin_listen"], sidecar)
        base_url = f"http://{listening['listen']}/vertex_ai"
        print(f"\nvertex-sidecar is ready on {base_url} (admin: http://{listening['admin_listen']})\n")
        ask(base_url)
        print(
            "\nTry it yourself while it runs (Ctrl-C stops everything):\n"
            f"  curl -s {base_url}/v1/projects/demo-project/locations/us-central1/publishers/google/models/"
            "gemini-2.5-flash:generateContent \\\n"
            "    -H 'content-type: application/json' "
            "-d '{\"contents\":[{\"role\":\"user\",\"parts\":[{\"text\":\"Hi there\"}]}]}'\n"
            f"  curl -s http://{listening['admin_listen']}/readyz\n"
            "The sidecar's access log (one JSON line per request) follows below.\n",
            flush=True,
        )
        for line in sidecar.stdout:
            sys.stdout.write(line.decode("utf-8", "replace"))
            sys.stdout.flush()
        return sidecar.wait()
    except KeyboardInterrupt:
        print("\nstopping...")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def ask(base_url: str) -> None:
    """The same calls an app makes, with the real google-genai SDK."""
    from google import genai
    from google.genai import types
    from google.oauth2.credentials import Credentials

    client = genai.Client(
        vertexai=True, project="demo-project", location="us-central1",
        # The SDK insists on Google credentials of its own; the sidecar drops whatever it
        # sends and injects the pod's real token, so a placeholder is enough.
        credentials=Credentials(token="placeholder-the-sidecar-replaces-it"),
        http_options=types.HttpOptions(base_url=base_url),
    )
    prompt = "Why run a Vertex AI sidecar?"
    response = client.models.generate_content(model="gemini-2.5-flash", contents=prompt)
    print(f"generate_content({prompt!r}) →\n  {response.text}")
    usage = response.usage_metadata
    if usage is not None:
        print(f"  tokens: prompt={usage.prompt_token_count} output={usage.candidates_token_count} "
              f"total={usage.total_token_count}")
    print("generate_content_stream(...) →", end=" ", flush=True)
    for chunk in client.models.generate_content_stream(model="gemini-2.5-flash", contents="Stream a short answer"):
        print(chunk.text or "", end="", flush=True)
    print()


if __name__ == "__main__":
    sys.exit(main())
