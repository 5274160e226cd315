"""`fluxd serve`'s Settings loaded from its flags, the `FLUXD_*` environment and the TOML file, and what a
start-up error says: which setting, by every name it goes by, and never a secret's value."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import SecretStr, ValidationError
from pydantic_settings import CliSettingsSource, SettingsError

from server.declarations.settings import ENV_PREFIX, Settings
from server.declarations.webhook_targets import masked


def cli_flags(name: str) -> list[str]:
    """The flags of field `name`: its own kebab-case one, then the older spelling, if it has one."""
    field = Settings.model_fields[name]
    extra = field.json_schema_extra
    # A switch turns its default around: one that defaults to on is `--no-<name>`.
    spellings = [("no-" if field.default is True else "") + name.replace("_", "-")]
    if isinstance(extra, dict) and isinstance(extra.get("flag"), str):
        spellings.append(str(extra["flag"]))
    return [f"--{spelling}" for spelling in spellings]


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def settings_cli(parser: argparse.ArgumentParser | None = None) -> CliSettingsSource[Any]:
    """Adds one flag per field to `parser` (`fluxd serve`'s), or to a parser of its own when None."""
    shortcuts = {
        flags[0].removeprefix("--"): flags[1].removeprefix("--")
        for flags in map(cli_flags, Settings.model_fields)
        if len(flags) > 1
    }
    # No abbreviations: a new setting must not change what an existing shortened flag means.
    parser = parser or argparse.ArgumentParser(prog="fluxd serve", allow_abbrev=False)
    return CliSettingsSource(Settings, root_parser=parser, cli_shortcuts=shortcuts)


def load_settings(
    args: Sequence[str] | argparse.Namespace = (), cli: CliSettingsSource[Any] | None = None
) -> Settings:
    """`fluxd serve`'s settings from its flags (a list, or what `cli`'s parser parsed), the environment, the
    TOML file and the defaults. Raises ValidationError or SettingsError (see `problems`)."""
    cli = cli or settings_cli()
    loaded = cli(parsed_args=args) if isinstance(args, argparse.Namespace) else cli(args=list(args))
    # mypy sees only the fields in the synthesised __init__, not BaseSettings' source arguments.
    return Settings(_cli_settings_source=loaded)  # type: ignore[call-arg]


def _secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_secret(arg) for arg in get_args(annotation))


SECRETS = frozenset(name for name, field in Settings.model_fields.items() if _secret(field.annotation))


def _shown_input(name: str, value: Any) -> str:
    """What a start-up error shows of the value it refused: never a secret, never a URL's credentials."""
    if name in SECRETS:
        return "(hidden)"
    return masked(json.dumps(value, default=str))


def problems(exc: ValidationError | SettingsError) -> str:
    """A start-up error as a user reads it: each bad setting with the places it can come from. The value of
    a secret setting is never shown, nor are all the settings at once (an error of the whole configuration
    names the settings it is about instead)."""
    if isinstance(exc, SettingsError):
        return masked(str(exc))
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        where = (
            f"{' / '.join(cli_flags(name))}, {env_name(name)} or `{name}` in the TOML file"
            if name in Settings.model_fields
            else "the TOML file"
        )
        path = ".".join(map(str, error["loc"]))
        message = masked(error["msg"])
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown setting `{path}` (in {where})")
        elif not error["loc"]:  # a check across settings: its input is every setting, secrets included
            lines.append(message)
        else:
            lines.append(f"{path}: {message}, got {_shown_input(name, error['input'])} (from {where})")
    return "\n".join(lines)
