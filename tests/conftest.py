"""Test configuration: fixtures live in tests/fix_*.py (loaded as plugins via pyproject)."""

pytest_plugins = ["tests.fix_impl"]
