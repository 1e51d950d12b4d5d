"""Shared fixtures. Helpers live in plain modules (importable by name from tests/)."""

from federation_harness import federation  # noqa: F401  (re-exported pytest fixture)
