"""The executor: supervisor, worker processes, and their parts."""
