"""OpenAI's published OpenAPI spec (openai/openai-openapi, openapi.yaml), as the tests' reference
for request and response shapes. It lies at ../shared/reference/openai-openapi.yaml beside the
repository; a test that needs it skips where it is absent, and fails under CI=true, where .ci/run's
machine always has it (a skip there would hide the check)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import yaml

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.yaml"


@functools.lru_cache(maxsize=1)
def openapi() -> dict:
    if not SPEC.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{SPEC} is missing in CI: the conformance checks need OpenAI's published spec", pytrace=False)
        pytest.skip(f"OpenAI's OpenAPI spec is not at {SPEC}; the conformance check needs it")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 87,000 lines: the C loader takes seconds, not a minute
    doc = _numeric_exclusive_bounds(_nullable_as_json_schema(yaml.load(SPEC.read_text(encoding="utf-8"), Loader=loader)))
    # OpenAI's own pause example answers "status": "paused", which the enum has not caught up with.
    doc["components"]["schemas"]["FineTuningJob"]["properties"]["status"]["enum"].append("paused")
    return doc


def _nullable_as_json_schema(node):
    """The spec is OpenAPI 3.1 but still says `nullable: true` (OpenAPI 3.0) in places, which JSON
    Schema ignores: spell it as 3.0 means it, the schema or null."""
    if isinstance(node, list):
        return [_nullable_as_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_as_json_schema(v) for k, v in node.items()}
    if node.get("nullable") is True:  # (a property *named* nullable is a dict, left alone)
        del node["nullable"]
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


def _numeric_exclusive_bounds(node):
    """The spec says `openapi: 3.1.0` but keeps some 3.0-style bounds (`minimum: 0` with
    `exclusiveMinimum: true`, e.g. learning_rate_multiplier). Read as 3.1 (JSON Schema 2020-12),
    `true` would mean "> 1"; OpenAI means "> 0", so such pairs become `exclusiveMinimum: 0`."""
    if isinstance(node, dict):
        for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if node.get(exclusive) is True and bound in node:
                node[exclusive] = node.pop(bound)
            elif node.get(exclusive) is False:
                node.pop(exclusive)
        for value in node.values():
            _numeric_exclusive_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _numeric_exclusive_bounds(value)
    return node


def validator(component: str):
    """A jsonschema validator for components/schemas/<component>, its $refs resolved in the spec."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    spec = openapi()
    registry = Registry().with_resource("urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012))
    schema = {"$ref": f"urn:openai#/components/schemas/{component}"}
    return Draft202012Validator(schema, registry=registry)


def errors(component: str, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator(component).iter_errors(instance)]
