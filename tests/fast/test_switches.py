"""iwae.fast.switches: one switch per fast feature, read from ``IWAE_FAST``."""

from __future__ import annotations

import pytest

from iwae.fast import switches


def test_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (
        ("", set(switches.FEATURES)),
        ("0", set()),
        ("none", set()),
        ("backprop,adam", {"backprop", "adam"}),
        ("-step", set(switches.FEATURES) - {"step"}),
    ):
        monkeypatch.setenv("IWAE_FAST", value)
        assert switches.enabled_features() == expected, value
    monkeypatch.setenv("IWAE_FAST", "warp")
    with pytest.raises(switches.SwitchError, match="unknown feature"):
        switches.enabled("step")
    monkeypatch.setenv("IWAE_FAST", "0")
    assert "IWAE_FAST='0'" in switches.why_off("step")
    monkeypatch.delenv("IWAE_FAST")


def test_spellings_and_unknown_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """Case and spaces do not matter, ``all``/``on``/``1`` and ``off`` are the whole set and none, several ``-name``
    entries drop each; a feature the layer does not have is a KeyError naming the ones it has, and a bad value of the
    variable one line naming what it accepts."""
    for value, expected in (
        (" All ", set(switches.FEATURES)),
        ("on", set(switches.FEATURES)),
        ("1", set(switches.FEATURES)),
        ("OFF", set()),
        (" Step , KERNELS ", {"step", "kernels"}),
        ("-step,-adam", set(switches.FEATURES) - {"step", "adam"}),
    ):
        monkeypatch.setenv("IWAE_FAST", value)
        assert switches.enabled_features() == expected, value
    monkeypatch.delenv("IWAE_FAST")
    assert switches.enabled("step")
    with pytest.raises(KeyError, match="no fast feature 'warp'; features: kernels, onednn, backprop"):
        switches.enabled("warp")
    monkeypatch.setenv("IWAE_FAST", "backprop,-warp,turbo")
    with pytest.raises(switches.SwitchError) as error:
        switches.enabled_features()
    message = str(error.value)
    assert "\n" not in message and "unknown feature(s) warp, turbo; use all, none or a list of" in message
