"""Tests taken from other projects (each file notes its origin and licence), run against trio-runner."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _demo_model(demo_dir: Path) -> Path:
    """The demo model, built once, before any class-level server of these tests starts."""
    return demo_dir
