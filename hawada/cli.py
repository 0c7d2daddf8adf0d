"""The `hawada` command (console-script entry point): the client commands of
`hawada.client.cli` and the service commands of `hawada.worker.cli` under one Typer app.

This module is the composition root of the command line; no layer imports it. Both halves
import only typer/rich at module level, so `hawada --help` and the client commands work with
the base install; service commands say which extra they need when it is missing. Exit codes:
0 success, 1 the job failed or was cancelled, 2 usage error, file not found, an error answer
from the API, unreachable service or missing extra (docs/cli.md).
"""

from __future__ import annotations

import httpx
import typer

from hawada.client import cli as client_cli
from hawada.worker import cli as service_cli

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help=(
        "HawAda: compress torchvision CNNs for a latency budget.\n\n"
        "Client commands talk to the service at --url / HAWADA_URL "
        f"(default {client_cli.DEFAULT_URL}). Exit codes: 0 success, 1 the job failed or was "
        "cancelled, 2 usage error, file not found, API error or unreachable service."
    ),
    epilog="Example: hawada submit --recipe recipes/demo-digits.yaml --weights w.safetensors "
    "--wait",
)
service_cli.register(app)
client_cli.register(app)


def main() -> None:
    """Run the `hawada` command; an unreachable service is exit code 2 with one line."""
    try:
        app()
    except httpx.TransportError as exc:  # the client wraps these; a last line of defence
        try:
            where = str(exc.request.url.copy_with(path="/", query=None)).rstrip("/")
        except RuntimeError:  # an error raised before any request was built
            where = "the service"
        client_cli.error(client_cli.unreachable_message(where, str(exc)))
        raise SystemExit(client_cli.EXIT_USAGE) from None


if __name__ == "__main__":
    main()
