"""Vendor the KubeRay CRD schemas that tests/unit/test_infra.py validates infra/k8s/ against.

    python infra/schemas/vendor_kuberay.py /path/to/kuberay-checkout v1.7.0 <commit sha>

From each CRD under ray-operator/config/crd/bases/ it keeps the `v1` version's
`schema.openAPIV3Schema` (what the API server validates a manifest against), without the
descriptions and the `status` subtree (neither changes what a manifest may say), and writes it as
JSON with its source in `$comment`. Upgrade KubeRay by running it again on the new tag.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

CRDS = {"rayclusters": "RayCluster", "rayjobs": "RayJob"}
HERE = Path(__file__).resolve().parent


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: _strip(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def vendor(checkout: Path, tag: str, commit: str) -> None:
    for plural, kind in CRDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        text = subprocess.run(
            ["git", "-C", str(checkout), "show", f"{commit}:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        crd = yaml.load(text, Loader=yaml.CSafeLoader)
        assert crd["spec"]["names"]["kind"] == kind, crd["spec"]["names"]
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strip(version["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)
        out = {
            "$comment": (
                f"KubeRay {tag} {kind} CRD, spec.versions[name=v1].schema.openAPIV3Schema, from "
                f"https://github.com/ray-project/kuberay/blob/{commit}/{path} "
                "(descriptions and status removed; regenerate with infra/schemas/vendor_kuberay.py)"
            ),
            **schema,
        }
        target = HERE / f"ray.io_{plural}.v1.json"
        target.write_text(json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{target}: {target.stat().st_size} bytes")


if __name__ == "__main__":
    vendor(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
