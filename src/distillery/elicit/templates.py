"""Prompt templates: Jinja2 text the user can edit, inline in the config or in a file.

A config value is the template text itself, or ``@path/to/file.j2`` to read it from a file
(relative to the working directory). Variables missing at render time are an error that names
the template and the variable, never a silently empty prompt.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2


class TemplateError(ValueError):
    """A template that cannot be read or rendered, naming which one and why."""


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                          autoescape=False)


def builtin(name: str) -> str:
    """The text of a template shipped with distillery (``elicit/templates/<name>.j2``)."""
    return resources.files("distillery.elicit").joinpath("templates", f"{name}.j2").read_text()


@lru_cache(maxsize=128)
def _compile(source: str, label: str) -> jinja2.Template:
    if source.startswith("@"):
        path = Path(source[1:])
        if not path.is_file():
            raise TemplateError(f"template {label}: file not found: {path}")
        source = path.read_text(encoding="utf-8")
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template {label}: line {exc.lineno}: {exc.message}") from None


def render(source: str, label: str = "template", **variables: object) -> str:
    """Render ``source`` (text or ``@file``) with ``variables``; strips surrounding whitespace."""
    try:
        return _compile(source, label).render(**variables).strip()
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"template {label}: {exc.message}; available: "
                            f"{', '.join(sorted(variables))}") from None
