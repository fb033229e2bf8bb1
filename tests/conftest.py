"""Test configuration: fixtures live in tests/fix_*.py (fix_db is loaded via pyproject addopts;
fix_impl and fix_sql here)."""

pytest_plugins: list[str] = ["tests.fix_impl", "tests.fix_sql"]
