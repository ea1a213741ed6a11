"""OpenAI's published OpenAPI document (tests/openai_spec, vendored) as a validator of our answers.

`assert_matches(body, "OpenAIFile")` checks a JSON value against `#/components/schemas/OpenAIFile`
as OpenAI's document states it: required fields, types and enums are enforced; properties the
document does not name are allowed (ours, such as `sha256`) unless a schema says
`additionalProperties: false`. `response_schema_name("get", "/files")` names the component an
operation answers, so a test need not guess it.

The document is OpenAPI 3.1, whose schemas are JSON Schema 2020-12 plus OpenAPI's vocabulary.
Three of its older idioms change what validates and are rewritten once, on load:
- `nullable: true` (OpenAPI 3.0, still in places): the value may also be null; a member of an
  `allOf` that says only that (`allOf: [{$ref: X}, {nullable: true}]`) makes the whole null-able.
- `exclusiveMinimum: true` beside `minimum: m` (OpenAPI 3.0): `exclusiveMinimum: m` (a boolean
  here would be compared as the number 1); the same for `exclusiveMaximum`.
- `$recursiveRef: "#"` (draft 2019-09, gone in 2020-12): the schema refers to its own component.
The rest are annotations a validator ignores, as OpenAI's own clients do: `discriminator` (the
`oneOf`/`anyOf` it decorates is still enforced), `x-oaiTypeLabel`, `x-oaiMeta`, `x-stainless-*`,
`example`, `deprecated`, and `format` (`unixtime`, `float`: the `type` beside it is what counts).
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[1] / "openai_spec" / "openapi.json"
DOCUMENT_URI = "urn:openai:openapi"  # the vendored document's name in the validator's registry
_COMPONENT = "#/components/schemas/"
_BOUNDS = {"exclusiveMinimum": "minimum", "exclusiveMaximum": "maximum"}
_ANNOTATIONS = frozenset({"description", "title", "default", "example", "deprecated"})


def _only_nullable(member: Any) -> bool:
    """Whether an `allOf` member says nothing but `nullable: true` (and annotations)."""
    return (isinstance(member, dict) and member.get("nullable") is True
            and set(member) - _ANNOTATIONS == {"nullable"})


def _openapi_to_json_schema(node: Any, component: str | None = None) -> Any:
    """A copy of `node` with OpenAPI 3.0's `nullable` and boolean exclusive bounds and draft
    2019-09's `$recursiveRef` rewritten as JSON Schema 2020-12 states them; `component` is the
    component schema `node` lies in (what `#` recurses to). Only boolean values are keywords: a
    property that happens to be named `nullable` stays."""
    if isinstance(node, list):
        return [_openapi_to_json_schema(item, component) for item in node]
    if not isinstance(node, dict):
        return node
    members = node.get("allOf")
    if isinstance(members, list) and any(_only_nullable(member) for member in members):
        node = {**node, "nullable": True,
                "allOf": [member for member in members if not _only_nullable(member)]}
    keywords = {key for key in ("nullable", *_BOUNDS) if isinstance(node.get(key), bool)}
    rewritten = {key: _openapi_to_json_schema(value, component) for key, value in node.items()
                 if key not in keywords}
    for exclusive, inclusive in _BOUNDS.items():
        if node.get(exclusive) is True and inclusive in node:
            rewritten[exclusive] = rewritten.pop(inclusive)
    if rewritten.get("$recursiveRef") == "#" and component is not None:
        del rewritten["$recursiveRef"]
        rewritten["$ref"] = f"{_COMPONENT}{component}"
    if node.get("nullable") is True:
        return {"anyOf": [{"type": "null"}, rewritten]}
    return rewritten


@cache
def openapi_document() -> dict[str, Any]:
    """The vendored document with its schemas rewritten as JSON Schema 2020-12 (loaded once)."""
    document = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    schemas = document["components"]["schemas"]
    document["components"]["schemas"] = {name: _openapi_to_json_schema(schema, name)
                                         for name, schema in schemas.items()}
    return document


@cache
def _registry() -> Registry:
    """A `referencing` registry holding the document, so `$ref`s resolve into it."""
    resource = Resource(contents=openapi_document(), specification=DRAFT202012)
    return Registry().with_resource(DOCUMENT_URI, resource)


@cache
def schema_validator(name: str) -> Draft202012Validator:
    """A validator of `#/components/schemas/<name>`; KeyError when the document has no such
    component."""
    if name not in openapi_document()["components"]["schemas"]:
        raise KeyError(f"OpenAI's document has no component schema {name!r}")
    return Draft202012Validator({"$ref": f"{DOCUMENT_URI}{_COMPONENT}{name}"},
                                registry=_registry())


def schema_errors(instance: Any, name: str) -> list[ValidationError]:
    """Everything about `instance` that OpenAI's schema `name` refuses (empty: it matches)."""
    return list(schema_validator(name).iter_errors(instance))


def _described(error: ValidationError) -> str:
    """An error as `at <json path>: <message>`, descending into the most relevant `anyOf` and
    `oneOf` branch so the message names the field that failed."""
    while error.context:
        deeper = best_match(error.context)
        if deeper is None:
            break
        error = deeper
    return f"at {error.json_path}: {error.message}"


def assert_matches(instance: Any, name: str) -> None:
    """Fail, naming every offending field, unless `instance` matches OpenAI's schema `name`."""
    errors = schema_errors(instance, name)
    if errors:
        details = "\n  ".join(_described(error) for error in errors)
        raise AssertionError(f"not an OpenAI {name}:\n  {details}\ninstance: "
                             f"{json.dumps(instance)[:2000]}")


def response_schema_name(method: str, path: str, status: str = "200") -> str:
    """The component an operation of OpenAI's API answers with, e.g. ("get", "/files") ->
    "ListFilesResponse" (`path` as OpenAI writes it, without /v1)."""
    operation = openapi_document()["paths"][path][method.lower()]
    content = operation["responses"][status]["content"]
    schema = next(iter(content.values()))["schema"]
    reference = schema["$ref"]
    if not reference.startswith(_COMPONENT):
        raise ValueError(f"{method.upper()} {path} answers an inline schema, not a component")
    return reference.removeprefix(_COMPONENT)
