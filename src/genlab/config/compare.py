"""Two run configs compared option by option: what a resumed run or a rerun sweep job
changed (``model.beta was 4, now 1.0``)."""

from __future__ import annotations

from typing import Any


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (``model.net.activation``)."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def config_changes(
    before: dict[str, Any], after: dict[str, Any], free: tuple[str, ...]
) -> list[str]:
    """``key was old, now new`` for every option that differs, except those whose dotted key
    starts with one of ``free``."""
    old, new = flatten(before), flatten(after)
    return [
        f"{key} was {old.get(key, '<unset>')!r}, now {new.get(key, '<unset>')!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(free)
    ]
