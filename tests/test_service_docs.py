"""docs/configuration.md documents every configuration key, each under its own section."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from dermpacs.config import Destination, Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _sections(text: str) -> dict[str, str]:
    """Text under each ``## `[section]` ...`` heading, keyed by the section names it names."""
    parts: dict[str, str] = {}
    chunks = re.split(r"^## ", text, flags=re.MULTILINE)
    for chunk in chunks[1:]:
        heading, _, body = chunk.partition("\n")
        for name in re.findall(r"`\[\[?([a-z_.]+)\]?\]`", heading):
            parts[name] = body
    return parts


def _leaf_keys(model: BaseModel, prefix: str = "") -> list[tuple[str, str]]:
    keys = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            keys += _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append((prefix.rstrip("."), name))
    return keys


def test_every_key_is_documented_in_its_section():
    sections = _sections(DOC.read_text())
    missing = []
    for section, key in _leaf_keys(Settings()):
        if section == "" and key == "destinations":
            section_keys = [("destinations", k) for k in Destination.model_fields]
        else:
            section_keys = [(section, key)]
        for name, leaf in section_keys:
            body = sections.get(name, "")
            if not re.search(rf"^\| `{leaf}` \|", body, flags=re.MULTILINE):
                missing.append(f"{name}.{leaf}")
    assert missing == [], f"undocumented in docs/configuration.md: {missing}"


def test_the_documented_defaults_are_the_defaults():
    text = DOC.read_text()
    defaults = Settings()
    for section, key, shown in [
        ("listener", "port", "11112"),
        ("storage", "min_free_mb", "100"),
        ("broker", "visibility_timeout", "3600"),
        ("dispatch", "give_up_after", "86400.0"),
        ("jobs", "received_grace", "60.0"),
    ]:
        assert str(getattr(getattr(defaults, section), key)) == shown
        assert f"| `{key}` | `{shown}` |" in text
