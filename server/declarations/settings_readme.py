"""README's Settings table, generated from the fields of Settings: `python -m
server.declarations.settings_readme README.md` rewrites it after a field changed (a test fails until then)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from server.declarations.settings import DEFAULT_CACHE, Settings
from server.declarations.settings_loading import cli_flags, env_name

_TABLE = re.compile(r"(<!-- settings table.*?-->\n)(.*?)(<!-- end of settings table -->)", re.DOTALL)


def _shown(value: Any) -> str:
    if value is None or value == [] or value == {}:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Path):
        return f"`{str(value).replace(str(DEFAULT_CACHE), '~/.cache/fluxd')}`"
    return str(value)


def settings_table() -> str:
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        flag = f"`{cli_flags(name)[-1]}`"
        meaning = (field.description or "").replace("|", "\\|")
        if get_origin(field.annotation) is Literal:
            meaning += f" ({', '.join(f'`{choice}`' for choice in get_args(field.annotation))})"
        default = _shown(field.get_default(call_default_factory=True))
        rows.append(f"| {flag} | `{env_name(name)}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def readme_with_settings_table(readme: str) -> str:
    """README's text with its Settings table replaced by the one the fields give."""
    if not _TABLE.search(readme):
        raise ValueError("README has no <!-- settings table --> ... <!-- end of settings table --> markers")
    return _TABLE.sub(lambda match: f"{match[1]}\n{settings_table()}\n{match[3]}", readme)


if __name__ == "__main__":
    # `python -m server.declarations.settings_readme README.md` rewrites README's Settings table after a field
    # changed.
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(readme_with_settings_table(readme.read_text()))
