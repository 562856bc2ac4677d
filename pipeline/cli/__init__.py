"""The `pipeline` command line: one module per command group, one console, one error path.

main.py builds the app and registers every command; common.py holds what commands share (console,
`fail`, the shared options, the exit codes, renamed flags); train.py, data.py, tokens.py and ops.py hold
the commands; docs.py generates the reference pages from the app; `pipeline bench ...` registers itself
from pipeline/bench/.
"""

from pipeline.cli.main import app, main

__all__ = ["app", "main"]
