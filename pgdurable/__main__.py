"""``python -m pgdurable`` → the CLI."""

from pgdurable import cli  # noqa: F401  (importing it registers every command on main)
from pgdurable.cli_common import main

main()
