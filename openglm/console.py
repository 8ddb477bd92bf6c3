"""What every `openglm` command prints for bad input: one red line on stderr and exit code 2."""

from __future__ import annotations

import typer


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)
