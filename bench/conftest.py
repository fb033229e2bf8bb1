"""Benchmark fixtures: the scheduler ``impl`` fixture shared with the tests."""

pytest_plugins = ["tests.fix_impl"]
