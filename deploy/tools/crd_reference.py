"""Write the field-by-field part of docs/crd-reference.md from the CRD itself.

Why: a reference written by hand drifts from the schema the apiserver enforces. The CRD YAML
(deploy/crd/) is the truth: this script walks its openAPIV3Schema and renders every field with its type,
whether it is required, its default and each validation rule, between the GENERATED markers of the doc.
tests/unit/test_deploy.py fails when the doc is stale. Run: `python deploy/tools/crd_reference.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "crd" / "inferencemodels.inference.eh-ops.io.yaml"
DOC = ROOT / "docs" / "crd-reference.md"
BEGIN = "<!-- BEGIN GENERATED from deploy/crd by deploy/tools/crd_reference.py: do not edit by hand -->"
END = "<!-- END GENERATED -->"


def _type(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "integer or string (a Kubernetes quantity)"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items') or {})}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map of string to {_type(schema['additionalProperties'])}"
    if schema.get("format"):
        return f"{kind} ({schema['format']})"
    return str(kind)


def _rules(schema: dict[str, Any]) -> list[str]:
    rules = []
    for key, text in (("minimum", "minimum {}"), ("maximum", "maximum {}"), ("minLength", "length at least {}"),
                      ("maxLength", "length at most {}"), ("minItems", "at least {} items")):
        if key in schema:
            rules.append(text.format(schema[key]))
    if "enum" in schema:
        rules.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    if "pattern" in schema:
        rules.append(f"matches `{schema['pattern']}`")
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        rules.append("any fields (not pruned; checked by the consumer)")
    if schema.get("x-kubernetes-list-type") == "map":
        keys = ", ".join(schema.get("x-kubernetes-list-map-keys") or [])
        rules.append(f"a list keyed by {keys} (server-side apply merges entries by key)")
    for rule in schema.get("x-kubernetes-validations") or []:
        rules.append(f"rule `{rule['rule']}`: {rule.get('message', '')}".rstrip(": "))
    return rules


def _walk(schema: dict[str, Any], path: str, required: bool, out: list[str]) -> None:
    out.append(f"#### `{path}`\n")
    parent = path.rpartition(".")[0]
    if parent.endswith("[]"):
        needed = f"Required in each entry of `{parent.removesuffix('[]')}`"
    elif "." in parent:
        needed = f"Required when `{parent}` is set"
    else:
        needed = "Required"
    facts = [f"Type: {_type(schema)}", needed if required else "Optional"]
    if "default" in schema:
        facts.append(f"Default: `{schema['default']}`")
    out.append("- " + ". ".join(facts) + ".")
    for rule in _rules(schema):
        out.append(f"- Validation: {rule}.")
    description = " ".join(str(schema.get("description", "")).split())
    if description:
        out.append(f"\n{description}")
    out.append("")
    children = schema.get("properties") or {}
    if schema.get("type") == "array":
        children = (schema.get("items") or {}).get("properties") or {}
        required_children = set((schema.get("items") or {}).get("required") or [])
        prefix = f"{path}[]"
    else:
        required_children = set(schema.get("required") or [])
        prefix = path
    for name, child in children.items():
        _walk(child, f"{prefix}.{name}", name in required_children, out)


def render_fields(crd: dict[str, Any]) -> str:
    """The generated section: one heading per field of spec and status, per served version."""
    out = [BEGIN, ""]
    for version in crd["spec"]["versions"]:
        root = version["schema"]["openAPIV3Schema"]
        out.append(f"### Fields of `{crd['spec']['group']}/{version['name']}` {crd['spec']['names']['kind']}\n")
        for top in ("spec", "status"):
            _walk(root["properties"][top], top, top in set(root.get("required") or []), out)
    out.append(END)
    return "\n".join(out) + "\n"


def updated_doc(doc: str, crd: dict[str, Any]) -> str:
    """The doc with its generated section replaced (appended when the markers are missing)."""
    section = render_fields(crd)
    if BEGIN in doc and END in doc:
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + section.rstrip("\n") + tail
    return doc.rstrip("\n") + "\n\n" + section


def main(argv: list[str]) -> int:
    """Rewrite the doc (or, with --check, exit 1 when it is stale)."""
    crd = yaml.safe_load(CRD.read_text())
    doc = DOC.read_text() if DOC.exists() else "# InferenceModel reference\n"
    new = updated_doc(doc, crd)
    if argv[1:] == ["--check"]:
        if new != doc:
            print(f"{DOC} is stale: run python deploy/tools/crd_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
