"""The `hawada` command (console-script entry point): the client commands of
`hawada.client.cli` and the service commands of `hawada.worker.cli` under one Typer app.

This module is the composition root of the command line; no layer imports it. Both halves
import only typer/rich at module level, so `hawada --help` and the client commands work with
the base install; service commands say which extra they need when it is missing. Exit codes:
0 success, 1 the job failed or was cancelled (or the API answered an error), 2 usage error,
unreachable service or missing extra.
"""

from __future__ import annotations

import httpx
import typer
from rich.markup import escape

from hawada.client import cli as client_cli
from hawada.console import console
from hawada.worker import cli as service_cli

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="HawAda: compress torchvision CNNs for a latency budget.",
)
service_cli.register(app)
client_cli.register(app)


def main() -> None:
    """Run the `hawada` command; an unreachable service is exit code 2 with one line."""
    try:
        app()
    except httpx.TransportError as exc:
        try:
            where = str(exc.request.url)
        except RuntimeError:  # an error raised before any request was built
            where = "the service"
        message = f"[red]error[/red] cannot reach {escape(where)}: {escape(str(exc))}"
        console.print(message, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
