"""The marketer-editable configuration: segments, offers and triggers, as one TOML file.

Defaults ship beside this module (``models/config/<section>.toml``, one file per section, each
documented in its comments). A user's file (``PERSONA_CONFIG``) replaces whole top-level sections
it defines and keeps the defaults for the others, so a file with only ``[offers]`` is valid.

>>> config = load_config(None)
>>> {"segments", "offers", "triggers"} <= set(config)
True
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

DEFAULTS_DIR = Path(__file__).with_name("config")


class ConfigError(ValueError):
    """The configuration file cannot be used; the message says why in one line."""


def default_config() -> dict[str, Any]:
    """Every default section, merged."""
    config: dict[str, Any] = {}
    for path in sorted(DEFAULTS_DIR.glob("*.toml")):
        config.update(tomllib.loads(path.read_text()))
    return config


def load_config(path: str | Path | None) -> dict[str, Any]:
    """Defaults overlaid with the top-level sections of the TOML file at ``path`` (if any)."""
    config = default_config()
    if not path:
        return config
    path = Path(path)
    try:
        user = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(user) - set(config))
    if unknown:
        known = ", ".join(sorted(config))
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (known: {known})")
    config.update(user)
    return config
