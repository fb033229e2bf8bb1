"""Test configuration: fixtures live in tests/fix_*.py (fix_db is loaded via pyproject addopts)."""

pytest_plugins: list[str] = ["tests.fix_impl"]
