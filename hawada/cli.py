"""The `hawada` command (console-script entry point): the client commands of
`hawada.client.cli` and the service commands of `hawada.worker.cli` under one Typer app.

This module is the composition root of the command line; no layer imports it. Both halves
import only typer/rich at module level, so `hawada --help` and the client commands work with
the base install; service commands say which extra they need when it is missing.
"""

from __future__ import annotations

import typer

from hawada.client import cli as client_cli
from hawada.worker import cli as service_cli

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="HawAda: compress torchvision CNNs for a latency budget.",
)
service_cli.register(app)
client_cli.register(app)


def main() -> None:
    """Run the `hawada` command."""
    app()


if __name__ == "__main__":
    main()
