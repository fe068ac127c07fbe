"""Turn CustomResourceDefinition YAML files into the JSON schemas the chart's manifests are validated against.

    python deploy/schemas/convert_crds.py CRD.yaml [CRD.yaml ...]

writes ``deploy/schemas/<group>/<kind>_<version>.json`` for every served version of each CRD. A CRD's
``openAPIV3Schema`` is OpenAPI, not quite JSON Schema: ``nullable`` becomes a ``null`` type,
``x-kubernetes-int-or-string`` an integer-or-string, and (as ``kubectl --validate=strict`` does) an object
with declared properties refuses unknown ones unless it preserves unknown fields. Descriptions and CEL rules
(``x-kubernetes-validations``, which only the API server evaluates) are dropped to keep the files small.
The sources and versions of the bundled files are listed in ``deploy/schemas/README.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf")


def json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """One OpenAPI v3 schema node of a CRD as a strict JSON Schema node."""
    out: dict[str, Any] = {}
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    for key, value in node.items():
        if key in ("description", "example", "externalDocs") or key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = json_schema(value)
        elif key in _SUBSCHEMA_LISTS:
            out[key] = [json_schema(sub) for sub in value]
        elif key != "nullable":
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def convert(crd_file: Path) -> list[Path]:
    crd = yaml.safe_load(crd_file.read_text(encoding="utf-8"))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    written = []
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        schema = json_schema(version["schema"]["openAPIV3Schema"])
        schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
        schema["properties"]["kind"] = {"const": kind}
        schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        target = HERE / group / f"{kind.lower()}_{version['name']}.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        written.append(target)
    return written


if __name__ == "__main__":
    for name in sys.argv[1:]:
        for path in convert(Path(name)):
            print(path.relative_to(HERE))
