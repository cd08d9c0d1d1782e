"""Run the combined emulator (metadata server + OAuth token endpoint + Vertex) standalone.

    python -m tests.emulators --port 0 [--port-file PATH] [--key-file PATH] [--no-auth]

Prints `emulator listening on http://127.0.0.1:PORT` once it accepts connections and then
writes the port to --port-file (atomically, so a reader never sees a partial file). With
--key-file it writes a service-account JSON key whose token_uri is this server's /token.
SIGINT/SIGTERM stop it cleanly (exit code 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from .oauth import make_service_account_key
from .serve import bind_loopback, create_combined_app, make_server


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.emulators", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = pick a free one)")
    parser.add_argument("--port-file", type=Path, help="write the chosen port here once serving")
    parser.add_argument("--key-file", type=Path, help="write a service-account key file pointing at /token")
    parser.add_argument("--project", default="emu-project", help="project id the metadata server reports")
    parser.add_argument("--no-auth", action="store_true", help="do not require bearer tokens on Vertex paths")
    parser.add_argument("--token-lifetime", type=float, default=3600, help="seconds issued tokens live")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _serve(args: argparse.Namespace) -> None:
    app = create_combined_app(
        require_auth=not args.no_auth,
        project_id=args.project,
        email=f"sidecar@{args.project}.iam.gserviceaccount.com",
        token_lifetime_s=args.token_lifetime,
    )
    sock = bind_loopback(args.port)
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    if args.key_file is not None:
        make_service_account_key(f"{url}/token", args.key_file, keys=app.state.keys, project_id=args.project)
    server = make_server(app, log_level=args.log_level)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"emulator listening on {url}", flush=True)
        if args.port_file is not None:
            _write_atomically(args.port_file, f"{port}\n")
    await task


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
