"""``python -m pgdurable`` → the CLI."""

from pgdurable.cli import main

main()
