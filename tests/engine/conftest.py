"""Fixtures of the engine's tests."""

from __future__ import annotations

import pytest

import lora_monitor.outputs.rendering


@pytest.fixture
def broken_figures(monkeypatch) -> None:
    """Drawing the figures fails: ``comparison_images`` raises ``RuntimeError("no fonts on this
    machine")``."""

    def broken_renderer(*args, **kwargs):
        raise RuntimeError("no fonts on this machine")

    monkeypatch.setattr(lora_monitor.outputs.rendering, "comparison_images", broken_renderer)
