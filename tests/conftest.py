"""Shared test setup. Fixtures live in tests/fixtures/<area>.py, one module per area."""

pytest_plugins = [
    "tests.fixtures.cli",
    "tests.fixtures.s3",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.netns",
]
