"""What every `speft` command shares: the terminal (messages on stderr, results on stdout) and
the settings read from the environment."""
from __future__ import annotations

import json
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console

from api.core.config import Settings

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def load_settings() -> Settings:
    """Settings from the environment; a clear message and exit 2 when they are invalid."""
    try:
        return Settings()
    except ValidationError as err:
        for problem in err.errors():
            console.print(f"[red]configuration error:[/red] {problem['msg']}")
        raise typer.Exit(code=2) from err


def print_json(value: Any) -> None:
    """Print an API object as indented JSON on stdout."""
    out.print_json(json.dumps(value))
