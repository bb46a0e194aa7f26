"""Gitea's official swagger spec as a test oracle: map a request to its path template and check a
JSON body against the response (or request) schema the spec declares for it.

The spec is swagger 2.0, whose schema dialect is closest to JSON Schema draft 4, so bodies are
checked with ``jsonschema.Draft4Validator`` over the spec's own ``definitions``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema

SPEC_PATH = Path(__file__).with_name("gitea-openapi-v1.json")

# Gitea writes error bodies as {"message", "url"} (404s add "errors"); go-swagger records these as
# response *headers*, so the spec has no body schema for them. This is what the server sends.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["message", "url"],
    "properties": {
        "message": {"type": "string"},
        "url": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "string"}},
    },
}

_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return "T" in value and parsed.tzinfo is not None  # RFC 3339 needs the time and the offset


@_FORMATS.checks("email")
def _is_email(value: object) -> bool:
    return not isinstance(value, str) or value.count("@") == 1


@dataclass(frozen=True)
class Violation:
    """One response the spec does not allow: where it was sent and what was wrong."""

    method: str
    path: str
    status: int
    errors: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}: " + "; ".join(self.errors)


class Spec:
    """The loaded spec: path matching and body validation."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.base_path = doc.get("basePath", "/api/v1")
        self.paths: dict[str, dict[str, Any]] = doc["paths"]
        lenient = _allow_null_pointers(doc["definitions"])
        self._defs = {False: lenient, True: _require_every_property(lenient)}
        self._strict_defs = doc["definitions"]  # requests: what the client sends, no allowances
        self._routes = sorted(
            ((_template_regex(t), t) for t in self.paths),
            # a literal segment beats a parameter: /issues/pinned before /issues/{index}
            key=lambda rt: -sum(not s.startswith("{") for s in rt[1].split("/")),
        )
        self._validators: dict[tuple, jsonschema.Draft4Validator] = {}

    @classmethod
    def load(cls, path: Path = SPEC_PATH) -> Spec:
        return _load(str(path))

    def template(self, path: str) -> str | None:
        """The spec's path template for a concrete API path (with or without the /api/v1 prefix)."""
        path = path.split("?", 1)[0]
        if path.startswith(self.base_path + "/"):
            path = path[len(self.base_path):]
        for regex, template in self._routes:
            if regex.fullmatch(path):
                return template
        return None

    def response_schema(self, method: str, template: str, status: int) -> dict[str, Any] | None:
        """The declared body schema, or None when the spec declares a response without a body."""
        responses = self.paths[template][method.lower()]["responses"]
        response = responses[str(status)]
        if "$ref" in response:
            response = self.doc["responses"][response["$ref"].rsplit("/", 1)[1]]
        return response.get("schema")

    def validate(
        self, method: str, path: str, status: int, body: Any, *, complete: bool = False
    ) -> list[str]:
        """Problems with `body` as the response to METHOD path with `status`; [] if it conforms.

        `complete=True` also requires every property a definition declares. Gitea's Go structs
        encode every field (null when unset), so a missing key means the emulator forgot one.
        """
        template = self.template(path)
        if template is None:
            return [f"no path in the spec matches {path}"]
        op = self.paths[template].get(method.lower())
        if op is None:
            return [f"the spec has no {method.upper()} for {template}"]
        if not 200 <= status < 300:
            return self._check(ERROR_SCHEMA, body, complete)
        if str(status) not in op["responses"]:
            return [f"status {status} is not a documented response of {method.upper()} {template}"]
        schema = self.response_schema(method, template, status)
        if schema is None:
            return [] if body in (None, b"", "") else ["the spec declares no body for this response"]
        return self._check(schema, body, complete)

    def validate_request(self, method: str, path: str, body: Any) -> list[str]:
        """Problems with a request body, against the operation's `in: body` parameter schema."""
        template = self.template(path)
        op = self.paths.get(template or "", {}).get(method.lower()) or {}
        for param in op.get("parameters", []):
            if param.get("in") == "body":
                return self._check(param["schema"], body, False, strict=True)
        return []

    def _check(self, schema: dict, body: Any, complete: bool, strict: bool = False) -> list[str]:
        key = (json.dumps(schema, sort_keys=True), complete, strict)
        validator = self._validators.get(key)
        if validator is None:
            defs = self._strict_defs if strict else self._defs[complete]
            validator = jsonschema.Draft4Validator(
                {**schema, "definitions": defs}, format_checker=_FORMATS
            )
            self._validators[key] = validator
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        return [f"{_where(e)}: {e.message}" for e in _leaves(errors)]


@functools.cache
def _load(path: str) -> Spec:
    return Spec(json.loads(Path(path).read_text(encoding="utf-8")))


def _leaves(errors: list[jsonschema.ValidationError]) -> list[jsonschema.ValidationError]:
    """Look inside "not valid under anyOf" (our null allowance) for the real complaint."""
    out = []
    for e in errors:
        inner = [c for c in e.context or [] if c.validator_value != "null"]
        out += _leaves(inner) if e.validator == "anyOf" and inner else [e]
    return out


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(body)"


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def _allow_null_pointers(definitions: dict[str, Any]) -> dict[str, Any]:
    """A copy of the definitions where null is allowed for pointer-like properties only.

    Swagger 2.0 has no way to say "nullable", yet Gitea's Go structs hold optional objects and
    times as pointers (`Milestone *Milestone`, `Closed *time.Time`) that encode as null: an issue
    without a milestone sends `"milestone": null`. So null is accepted for a property that is a
    `$ref` to an object definition, or a `date-time` string, and nowhere else: a null title, a
    null array or a null inside an array still fails.
    """
    defs = copy.deepcopy(definitions)
    for definition in defs.values():
        props = definition.get("properties") or {}
        for name, prop in props.items():
            ref = prop.get("$ref", "")
            target = definitions.get(ref.rsplit("/", 1)[-1], {}) if ref else {}
            if target.get("type") == "object":
                props[name] = {"anyOf": [prop, {"type": "null"}]}
            elif prop.get("type") == "string" and prop.get("format") == "date-time":
                prop["type"] = ["string", "null"]
    return defs


def _require_every_property(definitions: dict[str, Any]) -> dict[str, Any]:
    defs = copy.deepcopy(definitions)
    for definition in defs.values():
        props = definition.get("properties")
        if props:
            definition["required"] = sorted(set(props) | set(definition.get("required", [])))
    return defs
