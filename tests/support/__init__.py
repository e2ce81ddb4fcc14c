"""What several test modules use that is not a fixture (those are in tests/conftest.py). pyproject.toml puts
tests/ on the import path, so a test module imports these as ``support.models``, ``support.runs``, ..."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
