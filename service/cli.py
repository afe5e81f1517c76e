"""The `dare-serve` command line. Heavy modules are imported inside each command."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Serve long-sequence recommendation models: data, training, bundles, serving.")


@app.callback()
def main() -> None:
    """dare-serve: offline training and export, feature store, online ranking."""


@app.command()
def version() -> None:
    """Print the installed dare-serve version."""
    from importlib.metadata import version as dist_version

    typer.echo(dist_version("dare-serve"))


if __name__ == "__main__":
    app()
