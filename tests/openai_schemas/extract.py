"""Extract the OpenAI schemas the bridge's tests use into committed JSON Schema files.

Usage (from the repo root)::

    .venv/bin/python tests/openai_schemas/extract.py [path/to/openai-openapi.yaml]

The default path is ``../shared/openai-openapi.yaml`` next to the repo root. The 3 MB OpenAPI
document is not part of the repo (a clean clone may not have it), so the closures of the schemas
the tests need are written beside this script and committed:

- ``openai_chat_schemas.json``: the responses ``tests/test_bridge_openapi.py`` validates against;
- ``openai_request_schemas.json``: ``CreateChatCompletionRequest``, which
  ``tests/test_bridge_fuzz.py`` generates request bodies from.

Both tests re-run this extraction when the YAML is present and fail if their file is stale.

OpenAPI-only constructs are translated to JSON Schema 2020-12:

- ``nullable: true`` becomes ``{"anyOf": [<the schema>, {"type": "null"}]}`` (wrapping, not
  adding ``"null"`` to ``type``, so it also works next to ``$ref`` and ``enum``);
- OpenAPI 3.0 boolean ``exclusiveMinimum``/``exclusiveMaximum`` become the numeric form;
- ``x-oaiMeta`` (documentation examples, large) is dropped.

Left as they are, because a 2020-12 validator treats them as annotations: ``discriminator``
(:func:`check_discriminators` fails the extraction unless the ``oneOf`` it sits on has branches
told apart by a required one-value enum, so ``oneOf`` alone decides), ``deprecated``,
``default``, ``format`` (``unixtime`` is unknown, hence ignored) and the other ``x-*`` keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "openai-openapi.yaml"
OUTPUT = HERE / "openai_chat_schemas.json"
ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
)
REQUEST_OUTPUT = HERE / "openai_request_schemas.json"
REQUEST_ROOTS = ("CreateChatCompletionRequest",)
REF_PREFIX = "#/components/schemas/"
DROPPED_KEYS = frozenset({"x-oaiMeta"})


def load_spec(path: Path) -> dict[str, Any]:
    """Parse the OpenAPI YAML (libyaml's C loader when available: ~1.5 s instead of ~20 s)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open("rb") as f:
        return yaml.load(f, Loader=loader)


def _refs(node: Any) -> set[str]:
    """Every component schema name ``node`` references, directly."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                if not isinstance(value, str) or not value.startswith(REF_PREFIX):
                    raise ValueError(f"unsupported $ref {value!r}")
                found.add(value[len(REF_PREFIX) :])
            else:
                found |= _refs(value)
    elif isinstance(node, list):
        for item in node:
            found |= _refs(item)
    return found


def closure(schemas: dict[str, Any], roots: tuple[str, ...] = ROOTS) -> list[str]:
    """The names of ``roots`` and every schema they reference, transitively, sorted."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in schemas:
            raise KeyError(f"components.schemas.{name} is referenced but not defined")
        seen.add(name)
        todo.extend(_refs(schemas[name]) - seen)
    return sorted(seen)


def translate(node: Any) -> Any:
    """OpenAPI 3.x schema object → JSON Schema 2020-12 (see the module docstring)."""
    if isinstance(node, list):
        return [translate(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED_KEYS or key == "nullable":
            continue
        if key in ("properties", "$defs", "patternProperties"):
            out[key] = {name: translate(sub) for name, sub in value.items()}
        elif key in ("enum", "const", "default", "examples", "example", "required"):
            out[key] = value  # data, not schemas
        else:
            out[key] = translate(value)
    for bound in ("Minimum", "Maximum"):
        flag = out.get(f"exclusive{bound}")
        if isinstance(flag, bool):  # OpenAPI 3.0 style: a flag on minimum/maximum
            limit = out.pop(bound.lower(), None)
            del out[f"exclusive{bound}"]
            if flag and limit is not None:
                out[f"exclusive{bound}"] = limit
            elif limit is not None:
                out[bound.lower()] = limit
    if node.get("nullable") is True:
        wrapper: dict[str, Any] = {}
        if "description" in out:
            wrapper["description"] = out.pop("description")
        wrapper["anyOf"] = [out, {"type": "null"}]
        return wrapper
    return out


def check_discriminators(schemas: dict[str, Any]) -> None:
    """Fail unless every ``discriminator`` is redundant with its ``oneOf`` in JSON Schema terms.

    JSON Schema ignores ``discriminator``; that is only safe when the ``oneOf`` branches are
    ``$ref``s whose discriminating property is required and a one-value enum, distinct per branch.
    """
    for schema in schemas.values():
        _check_discriminators(schemas, schema)


def _check_discriminators(schemas: dict[str, Any], node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _check_discriminators(schemas, item)
        return
    if not isinstance(node, dict):
        return
    if "discriminator" in node:
        prop = node["discriminator"]["propertyName"]
        tags = []
        for branch in node.get("oneOf", []):
            target = schemas[branch["$ref"][len(REF_PREFIX) :]]
            enum = target.get("properties", {}).get(prop, {}).get("enum", [])
            if prop not in target.get("required", []) or len(enum) != 1:
                raise ValueError(f"discriminator {prop!r}: {branch['$ref']} is not tagged")
            tags.append(enum[0])
        if not tags or len(set(tags)) != len(tags):
            raise ValueError(f"discriminator {prop!r}: tags {tags} are not distinct")
    for value in node.values():
        _check_discriminators(schemas, value)


def extract(source: Path, roots: tuple[str, ...] = ROOTS) -> dict[str, Any]:
    """The document written to ``openai_chat_schemas.json`` (or, for ``REQUEST_ROOTS``, to
    ``openai_request_schemas.json``)."""
    return build(load_spec(source), source, roots)


def build(spec: dict[str, Any], source: Path, roots: tuple[str, ...]) -> dict[str, Any]:
    """The closure of ``roots`` in ``spec``, translated, with where it came from."""
    schemas = spec["components"]["schemas"]
    info = spec.get("info", {})
    names = closure(schemas, roots)
    check_discriminators({name: schemas[name] for name in names})
    return {
        "$comment": (
            "GENERATED by tests/openai_schemas/extract.py from the OpenAI OpenAPI document; "
            "do not edit by hand, re-run the script. OpenAPI-only keywords are translated to "
            "JSON Schema 2020-12 (nullable -> anyOf with null); x-oaiMeta is dropped."
        ),
        "source": {
            "file": source.name,
            "openapi": spec.get("openapi"),
            "title": info.get("title"),
            "version": info.get("version"),
        },
        "roots": list(roots),
        "components": {
            "schemas": {name: translate(schemas[name]) for name in names},
        },
    }


def render(document: dict[str, Any]) -> str:
    """Deterministic text, so the committed file can be compared byte for byte."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(f"no OpenAPI document at {args.source}", file=sys.stderr)
        return 2
    spec = load_spec(args.source)
    for output, roots in ((OUTPUT, ROOTS), (REQUEST_OUTPUT, REQUEST_ROOTS)):
        document = build(spec, args.source, roots)
        out = args.out_dir / output.name
        out.write_text(render(document), encoding="utf-8")
        print(f"wrote {len(document['components']['schemas'])} schemas to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
