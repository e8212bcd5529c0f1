"""`eigendamage compare` commands (registered on the main typer app)."""

from .cli import app, friendly_errors  # noqa: F401
