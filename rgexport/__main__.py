"""`python -m rgexport` runs the CLI (the same as the `rgexport` command)."""

from rgexport.cli import app

app(prog_name="rgexport")
