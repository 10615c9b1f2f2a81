"""Turn a settings `ValidationError` into one log line an on-call engineer can act on.

`python -m worker` and `python -m producer` read their settings from the environment; a bad
value makes them exit non-zero with one JSON line on stdout (event `config_invalid`) that
names the environment variable (or command-line option), the value and what is expected,
instead of a traceback.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic import AliasChoices, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings

# Exit status of a process refused by its configuration (as argparse's usage errors).
CONFIG_ERROR_EXIT = 2
_MAX_VALUE_CHARS = 200
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*:)[^@]*@", re.IGNORECASE)


def redact(value: str) -> str:
    """A URL's password replaced by `***`; other text unchanged."""
    return _URL_PASSWORD.sub(r"\1***@", value)


def env_names(cls: type[BaseSettings], field: str) -> list[str]:
    """The environment variables that set `field`, in order of precedence."""
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return [str(a) for a in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{cls.model_config.get('env_prefix', '')}{field}".upper()]


def setting_error(field: str, value: object, expected: str) -> PydanticCustomError:
    """An error about the one setting `field`, for a rule that also reads others (a model validator):
    the `config_invalid` line names `field`'s variable and value as for an error of the field itself."""
    return PydanticCustomError(
        "setting_invalid", "{expected}", {"expected": expected, "setting": field, "setting_value": str(value)}
    )


def invalid_setting(cls: type[BaseSettings], field: str, value: object, expected: str) -> ValidationError:
    """A `ValidationError` of `cls` about `field`, for a check made after the settings were read (one
    that needs more than the settings validators may do, such as asking torch for the devices)."""
    error = InitErrorDetails(type=setting_error(field, value, expected), loc=(field,), input=value)
    return ValidationError.from_exception_data(cls.__name__, [error])


def _field_of(cls: type[BaseSettings], loc: tuple[Any, ...], ctx: Mapping[str, Any]) -> str | None:
    if ctx.get("setting") in cls.model_fields:
        return str(ctx["setting"])
    if not loc or not isinstance(loc[0], str):
        return None
    name = loc[0]
    if name in cls.model_fields:
        return name
    for field in cls.model_fields:  # a loc may carry the alias that was used
        if name.upper() in env_names(cls, field):
            return field
    return None


def _expected(message: str) -> str:
    for prefix in ("Input should be ", "Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def describe_errors(
    exc: ValidationError, cls: type[BaseSettings], options: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """One dict per error: `env` (variable or option), `value` (as given, passwords masked), `expected`.

    `options` maps the fields given on the command line to their option (`redis_url` -> `--redis-url`).
    Errors of a rule over several settings name no single variable: their `expected` names them, unless
    the rule blames one setting (`setting_error`).
    """
    options = options or {}
    out: list[dict[str, Any]] = []
    for error in exc.errors():
        ctx = error.get("ctx") or {}
        field = _field_of(cls, tuple(error.get("loc", ())), ctx)
        item: dict[str, Any] = {"expected": _expected(str(error.get("msg", "")))}
        if field is not None:
            value: Any = ctx.get("setting_value", error.get("input"))
            if field in options:
                item["env"] = options[field]
            else:
                names = env_names(cls, field)
                given = [n for n in names if n in os.environ]
                item["env"] = given[0] if given else names[0]
                if given:
                    value = os.environ[given[0]]  # as typed, before any normalisation
            item["value"] = redact(str(value))[:_MAX_VALUE_CHARS]
        out.append(item)
    return out


def config_error_fields(
    exc: ValidationError, cls: type[BaseSettings], options: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Fields of the `config_invalid` event: the first error at top level, every error in `errors`."""
    errors = describe_errors(exc, cls, options)
    first = errors[0] if errors else {"expected": str(exc)}
    return {**first, "settings": cls.__name__, "errors": errors}


def print_config_error(
    exc: ValidationError, cls: type[BaseSettings], options: Mapping[str, str] | None = None
) -> None:
    """Write the `config_invalid` event as one JSON line on stdout, in the workers' log format."""
    print_config_event(config_error_fields(exc, cls, options))


def print_config_event(fields: Mapping[str, Any]) -> None:
    """The `config_invalid` line with these fields (`env`, `value`, `expected`, `settings`, `errors`)."""
    event = {
        "event": "config_invalid",
        **fields,
        "level": "error",
        "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
    }
    print(json.dumps(event), file=sys.stdout, flush=True)
