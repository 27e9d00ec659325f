"""space/hardware.py: what the app knows of the machine and the Hub."""

from __future__ import annotations

import pytest

from space.hardware import hub_offline


def test_hub_offline_reads_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()
