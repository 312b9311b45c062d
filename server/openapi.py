"""OpenAPI 3.1 generated from the route table: the msgspec request types each route decodes and
the answer types (server/answer_types.py) each declares per status, so the document says
what the server accepts and answers.

3.1, because its schemas are JSON Schema 2020-12 as msgspec writes them: a field that may
be null is `anyOf: [..., {"type": "null"}]` (or `type: [..., "null"]`), which 3.0's
schema objects (`nullable: true`) do not have."""
from __future__ import annotations

import re

import msgspec

from server.answer_types import Error

OPENAPI_VERSION = "3.1.0"
SCHEMA_DIALECT = "https://spec.openapis.org/oas/3.1/dialect/base"     # JSON Schema 2020-12 with OpenAPI's vocabulary
REF = "#/components/schemas/{name}"
ERROR_STATUSES = {"400": "Malformed JSON, or not valid HTTP", "401": "No key or an unknown key",
                  "403": "Key not allowed here", "404": "Not found", "408": "The body did not arrive in time",
                  "409": "Conflict", "413": "Body over the configured limit",
                  "422": "Schema or business rule violated", "429": "Rate limited",
                  "500": "A bug on the server; resending the same body is safe",
                  "503": "Starting, draining, overloaded or a storage fault"}
# How long a client waits before sending the same body again (docs/integrators.md, Errors).
RETRY_AFTER_STATUSES = ("429", "503")
# Not required: /readyz's 503 is for load balancers, which route by it rather than wait.
RETRY_AFTER = {"description": "whole seconds to wait before sending the same body again",
               "schema": {"type": "integer", "minimum": 0}}
# A quantity may be sent as a JSON number (2, 0.5) or as a decimal string ("0.125"): msgspec
# decodes either into the same Decimal; its own schema names the string form only. Which
# values are taken (positive, at most 6 decimals) is checked after decoding, so no pattern.
DECIMAL = {"anyOf": [{"type": "number"},
                     {"type": "string", "format": "decimal", "description": "a decimal number, e.g. \"0.125\""}]}

_cache: dict[int, dict] = {}


def document(routes) -> dict:
    cached = _cache.get(id(routes))
    if cached is None:
        cached = _cache[id(routes)] = _build(routes)
    return cached


def _build(routes) -> dict:
    types = {r.body for r in routes if r.body is not None} | {Error}
    types |= {t for r in routes for _, t, _ in r.answers if t is not None}
    _, components = msgspec.json.schema_components(sorted(types, key=lambda t: t.__name__), ref_template=REF)
    paths: dict[str, dict] = {}
    for r in routes:
        op = {"summary": r.summary, "operationId": r.handler.__name__, "responses": _responses(r)}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"{(\w+)}", r.path)]
        params += _query_params(r.path, r.method)
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": REF.format(name=r.body.__name__)}}}}
        if r.roles is not None:
            op["security"] = [{"bearer": []}]
            op["description"] = "Roles: " + ", ".join(sorted(r.roles))
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {"openapi": OPENAPI_VERSION, "jsonSchemaDialect": SCHEMA_DIALECT,
            "info": {"title": "Loyalty processing server", "version": "1"},
            "paths": paths,
            "components": {"schemas": _decimals_as_numbers_too(components),
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


def _responses(route) -> dict:
    out = {}
    for status, answer, description in route.answers:
        if answer is None:      # not JSON: /metrics
            out[str(status)] = {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}
        else:
            out[str(status)] = {"description": description, "content": {"application/json": {
                "schema": {"$ref": REF.format(name=answer.__name__)}}}}
    for status, text in ERROR_STATUSES.items():
        out[status] = {"description": text, "content": {"application/json": {
            "schema": {"$ref": REF.format(name=Error.__name__)}}}}
        if status in RETRY_AFTER_STATUSES:
            out[status]["headers"] = {"Retry-After": RETRY_AFTER}
    return out


def _decimals_as_numbers_too(node):
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("format") == "decimal":
            return DECIMAL
        return {k: _decimals_as_numbers_too(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_decimals_as_numbers_too(v) for v in node]
    return node


def _query_params(path: str, method: str) -> list[dict]:
    def q(name, fmt="string"):
        return {"name": name, "in": "query", "required": False, "schema": {"type": fmt}}
    if method == "GET" and path == "/v1/members/{card}":
        return [q("at")]
    if path.endswith("/statement"):
        return [q("from"), q("to"), q("limit", "integer")]
    if path == "/v1/admin/rules/versions":
        return [q("limit", "integer"), q("before", "integer")]
    if path == "/v1/admin/events":
        return [q("after", "integer"), q("limit", "integer")]
    if path == "/v1/admin/reports/campaigns/{rule}":
        return [q("from"), q("to")]
    return []
