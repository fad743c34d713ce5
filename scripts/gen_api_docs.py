"""Write the OpenAPI schema the app serves to docs/api/openapi.json, and docs/api/reference.md rendered from it.

Run after changing an endpoint or a model: `.venv/bin/python scripts/gen_api_docs.py`. tests/unit/test_docs.py
fails when the committed files differ from what the app serves (with `info.version` from pyproject.toml: an
editable install keeps the version it was installed with). Offline and deterministic: no plugin, no network,
the same Markdown for the same schema.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "docs" / "api" / "openapi.json"
REFERENCE_FILE = ROOT / "docs" / "api" / "reference.md"
HEADER = """# HTTP API reference

Rendered from the OpenAPI schema the app serves at `/openapi.json` ([openapi.json](openapi.json), version {version}
when generated) by `scripts/gen_api_docs.py`; `tests/unit/test_docs.py` fails when this page is out of date. The
guide to these endpoints, with curl examples: [HTTP API](index.md).
"""


def served_schema() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from kiq.settings import Settings
    from producer.api import create_api

    schema = create_api(Settings(), s3=object()).openapi()
    # The release's version, not the installed one: an editable install keeps the version it was installed with.
    schema["info"]["version"] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return schema


def slug(text: str) -> str:
    """The anchor MkDocs' toc extension gives a heading."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def type_of(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{slug(name)})"
    if "anyOf" in schema:
        return " or ".join(type_of(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {type_of(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {type_of(schema['additionalProperties'])}"
    return f"{kind} ({schema['format']})" if "format" in schema else kind


BOUNDS = {"minimum": "≥ {}", "maximum": "≤ {}", "exclusiveMinimum": "> {}", "exclusiveMaximum": "< {}",
          "minLength": "length ≥ {}", "maxLength": "length ≤ {}", "minItems": "items ≥ {}", "maxItems": "items ≤ {}",
          "pattern": "matches `{}`", "multipleOf": "multiple of {}"}  # fmt: skip


def rules(schema: dict[str, Any]) -> str:
    found = [text.format(schema[key]) for key, text in BOUNDS.items() if key in schema]
    for option in schema.get("anyOf", []):
        found += [text.format(option[key]) for key, text in BOUNDS.items() if key in option]
    if "default" in schema:
        found.append(f"default `{json.dumps(schema['default'])}`")
    return ", ".join(found)


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def operation(method: str, path: str, op: dict[str, Any]) -> list[str]:
    summary = " ".join(
        filter(None, [f"**{op['summary']}.**" if op.get("summary") else "", cell(op.get("description", ""))])
    )
    out = [f"### {method.upper()} `{path}`", "", summary, ""]
    params = op.get("parameters", [])
    if params:
        out += ["| parameter | in | required | type | rules |", "|---|---|---|---|---|"]
        for p in params:
            schema = p.get("schema", {})
            out.append(f"| `{p['name']}` | {p['in']} | {'yes' if p.get('required') else 'no'} | "
                       f"{type_of(schema)} | {cell(rules(schema))} |")  # fmt: skip
        out.append("")
    for content_type, body in (op.get("requestBody") or {}).get("content", {}).items():
        schema = body.get("schema", {})
        shown = type_of(schema) if "$ref" in schema else f"`{cell(json.dumps(schema))}`"
        out += [f"Request body, `{content_type}`: {shown}", ""]
    out += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in op.get("responses", {}).items():
        schemas = [c.get("schema", {}) for c in response.get("content", {}).values()]
        body = ", ".join(type_of(s) for s in schemas if s) or "—"
        out.append(f"| {status} | {cell(response.get('description', ''))} | {body} |")
    return [*out, ""]


def component(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name}", ""]
    if schema.get("description"):
        out += [cell(schema["description"]), ""]
    props = schema.get("properties", {})
    if not props:
        return [*out, f"{type_of(schema)}", ""]
    required = set(schema.get("required", []))
    out += ["| field | type | required | rules |", "|---|---|---|---|"]
    for field, prop in props.items():
        out.append(f"| `{field}` | {type_of(prop)} | {'yes' if field in required else 'no'} | {cell(rules(prop))} |")
    return [*out, ""]


def render(schema: dict[str, Any]) -> str:
    lines = [HEADER.format(version=schema["info"]["version"]), "## Endpoints", ""]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            lines += operation(method, path, op)
    lines += ["## Schemas", ""]
    for name, comp in sorted(schema.get("components", {}).get("schemas", {}).items()):
        lines += component(name, comp)
    return "\n".join(lines).rstrip() + "\n"


def schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    schema = served_schema()
    SCHEMA_FILE.write_text(schema_text(schema), encoding="utf-8")
    REFERENCE_FILE.write_text(render(schema), encoding="utf-8")
    print(f"wrote {SCHEMA_FILE.relative_to(ROOT)} and {REFERENCE_FILE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
