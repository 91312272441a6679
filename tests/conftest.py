"""Fixtures shared by every tier."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny GLM-4-MoE default model, built once per test session."""
    from pdserve.engine.default_model import ensure_default_model

    return ensure_default_model(tmp_path_factory.getbasetemp() / "pdserve-cache")
