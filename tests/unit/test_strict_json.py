"""Duplicate JSON keys are refused in the bodies the sidecar decides on."""

from __future__ import annotations

import pytest

from vertex_sidecar.strict_json import DuplicateKey, loads_unique


@pytest.mark.parametrize("text, key", [
    ('{"model": "google/gemini-ok", "model": "google/gemini-bad"}', "model"),
    ('{"setup": {"model": "a", "generationConfig": {}, "model": "b"}}', "model"),
    ('{"setup": {}, "setup": {"model": "b"}}', "setup"),
    ('[{"a": 1}, {"b": 1, "b": 2}]', "b"),
    ('{"m\\u006fdel": "x", "model": "y"}', "model"),  # escaped spellings are the same key
])
def test_a_key_twice_in_one_object_is_refused(text: str, key: str) -> None:
    with pytest.raises(DuplicateKey) as info:
        loads_unique(text)
    assert info.value.key == key and isinstance(info.value, ValueError)


def test_the_same_key_in_different_objects_is_fine() -> None:
    assert loads_unique(b'{"a": {"model": 1}, "b": {"model": 2}, "model": 3}') == {
        "a": {"model": 1}, "b": {"model": 2}, "model": 3}
