"""OpenAPI 3 generated from the route table and the msgspec request types."""
from __future__ import annotations

import re

import msgspec

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "details"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object", "properties": {
            "path": {"type": "string"}, "message": {"type": "string"}}}}}}},
}
ERROR_STATUSES = {"400": "Malformed JSON", "401": "No key or an unknown key", "403": "Key not allowed here",
                  "404": "Not found", "409": "Conflict", "413": "Body over the configured limit",
                  "422": "Schema or business rule violated", "429": "Rate limited",
                  "503": "Starting, draining or overloaded"}

_cache: dict[int, dict] = {}


def document(routes) -> dict:
    cached = _cache.get(id(routes))
    if cached is None:
        cached = _cache[id(routes)] = _build(routes)
    return cached


def _build(routes) -> dict:
    bodies = sorted({r.body for r in routes if r.body is not None}, key=lambda t: t.__name__)
    (schemas_list, components) = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    components["Error"] = ERROR_SCHEMA
    paths: dict[str, dict] = {}
    for r in routes:
        op = {"summary": r.summary, "operationId": r.handler.__name__,
              "responses": {str(r.ok_status): {"description": "OK", "content": {
                  "application/json": {"schema": {"type": "object"}}}}}}
        if r.path == "/metrics":
            op["responses"][str(r.ok_status)] = {"description": "Prometheus text",
                                                 "content": {"text/plain": {"schema": {"type": "string"}}}}
        if r.ok_status == 201:
            op["responses"]["200"] = {"description": "Replayed: the stored result of the same request",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}
        for status, text in ERROR_STATUSES.items():
            op["responses"][status] = {"description": text, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"{(\w+)}", r.path)]
        params += _query_params(r.path, r.method)
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{r.body.__name__}"}}}}
        if r.roles is not None:
            op["security"] = [{"bearer": []}]
            op["description"] = "Roles: " + ", ".join(sorted(r.roles))
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {"openapi": "3.0.3",
            "info": {"title": "Loyalty processing server", "version": "1"},
            "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


def _query_params(path: str, method: str) -> list[dict]:
    def q(name, fmt="string"):
        return {"name": name, "in": "query", "required": False, "schema": {"type": fmt}}
    if method == "GET" and path == "/v1/members/{card}":
        return [q("at")]
    if path.endswith("/statement"):
        return [q("from"), q("to"), q("limit", "integer")]
    return []
