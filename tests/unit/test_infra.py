"""The infrastructure files are checked, not just written: the KubeRay manifests against the CRD
schemas of the KubeRay release they target (vendored in infra/schemas/) and the core objects with
kubernetes-validate, the compose stack with `docker compose config` where the plugin exists and
structurally always, the launcher config against Ray's own schema, the image's Dockerfile, the
Prefect deployment and automation files, and that what must be filled in says so."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
CRD_SCHEMAS = {"RayCluster": "ray.io_rayclusters.v1.json", "RayJob": "ray.io_rayjobs.v1.json"}
STORAGE_SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f.name, d) for f in sorted(K8S.glob("*.yaml")) for d in _docs(f)]


def _locked_version(package: str) -> str:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    (version,) = [p["version"] for p in lock["package"] if p["name"] == package]
    return str(version)


def _closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others, as the API server's
    strict field validation (kubectl's default) treats a manifest: a misspelt field is an error,
    not silently dropped."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


_validators: dict[str, jsonschema.protocols.Validator] = {}


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    kind = doc["kind"]
    if kind not in _validators:
        schema = json.loads((INFRA / "schemas" / CRD_SCHEMAS[kind]).read_text())
        _validators[kind] = jsonschema.Draft7Validator(_closed(schema))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validators[kind].iter_errors(doc)
    ]


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, RayCluster spec) of the RayCluster and of the RayJob's cluster."""
    out = []
    for name, doc in _k8s_docs():
        if doc["kind"] == "RayCluster":
            out.append((f"{name}: RayCluster", doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append((f"{name}: RayJob", doc["spec"]["rayClusterSpec"]))
    return out


def _groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]


# -- Kubernetes ------------------------------------------------------------------------------------
def test_the_manifests_hold_a_raycluster_a_rayjob_and_their_storage_secret():
    kinds = sorted(d["kind"] for _, d in _k8s_docs())
    assert {"RayCluster", "RayJob", "Secret", "ServiceAccount"} <= set(kinds), kinds


@pytest.mark.parametrize(
    "name,doc",
    [(n, d) for n, d in _k8s_docs() if d["kind"] in CRD_SCHEMAS],
    ids=lambda v: v if isinstance(v, str) else v["kind"],
)
def test_kuberay_manifests_match_the_crd_schema(name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert not _crd_errors(doc), f"{name} {doc['kind']}:\n" + "\n".join(_crd_errors(doc))


def test_the_crd_check_catches_a_misspelt_field_and_a_bad_quantity():
    (doc,) = [d for _, d in _k8s_docs() if d["kind"] == "RayCluster"]
    bad = copy.deepcopy(doc)
    group = bad["spec"]["workerGroupSpecs"][0]
    group["replica"] = 2
    group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "48 GB"
    errors = "\n".join(_crd_errors(bad))
    assert "'replica' was unexpected" in errors and "'48 GB' does not match" in errors, errors


def test_core_objects_and_pod_templates_validate_against_kubernetes():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for _, doc in _k8s_docs():
        if doc["kind"] not in CRD_SCHEMAS:
            kubernetes_validate.validate(doc, version, strict=True)
    # The pods KubeRay makes from the groups' templates, with Kubernetes' own schema as well.
    for where, spec in _cluster_specs():
        for group, g in _groups(spec):
            pod = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"diffpipe-{group}"},
                "template": g["template"],
            }
            try:
                kubernetes_validate.validate(pod, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{where} group {group}: {err}")


def test_clusters_run_the_locked_ray_on_gpus_with_token_auth_and_their_own_storage_keys():
    docs = _k8s_docs()
    secrets = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "Secret"}
    claims = {d["metadata"]["name"] for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    accounts = {d["metadata"]["name"] for _, d in docs if d["kind"] == "ServiceAccount"}
    ray_version = _locked_version("ray")
    images = set()
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == ray_version, f"{where}: rayVersion is not uv.lock's Ray"
        # Ray 2.60 token authentication; KubeRay (>= 1.5) hands the token to every Ray container.
        assert spec["authOptions"]["mode"] == "token", where
        gpu_groups = []
        for group, g in _groups(spec):
            pod = g["template"]["spec"]
            assert pod.get("serviceAccountName") in accounts, f"{where} {group}: service account"
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, where
            ray_container = pod["containers"][0]
            images.add(ray_container["image"])
            # Ray forwards no credentials: each node reads the store's keys from the Secret.
            refs = {e["secretRef"]["name"] for e in ray_container.get("envFrom", [])}
            assert refs, f"{where} {group}: no storage credentials"
            for ref in refs:
                keys = set(secrets[ref].get("stringData", {})) | set(secrets[ref].get("data", {}))
                assert keys >= STORAGE_SECRET_KEYS, f"Secret {ref} lacks {STORAGE_SECRET_KEYS}"
            for port in ray_container.get("ports", []):
                assert port["containerPort"] != 10001, f"{where}: no Ray Client port (ray://)"
            limits = ray_container["resources"].get("limits", {})
            if group != "head":
                assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where} {group}"
                if int(limits.get("nvidia.com/gpu", 0)) > 0:
                    gpu_groups.append(group)
        assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
    assert len(images) == 1, f"every Ray container runs the pipeline image, found {images}"


def test_the_rayjob_runs_the_nightly_with_a_config_that_loads(monkeypatch):
    from tasks.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    (job,) = [d for _, d in _k8s_docs() if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[:2] == ["diffpipe", "nightly"] and "diffpipe" in scripts, argv
    config = argv[argv.index("-c") + 1]
    assert config.startswith("/app/"), "the image's checkout is /app (infra/Dockerfile WORKDIR)"
    cfg = load_config(str(REPO / config.removeprefix("/app/")), argv[argv.index("-c") + 2 :])
    assert cfg.train.use_gpu and cfg.ray.address is None  # Ray sets RAY_ADDRESS for the job
    assert job["spec"]["shutdownAfterJobFinishes"] is True


# -- docker compose --------------------------------------------------------------------------------
COMPOSE = INFRA / "docker-compose.yml"
COMPOSE_ENV = {"RAY_AUTH_TOKEN": "0" * 64}


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} interpolation."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        assert op != ":?", f"${{{name}}} must be set: {arg}"
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)


def _compose() -> dict[str, Any]:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), COMPOSE_ENV)


def _words(command: Any) -> list[str]:
    return command if isinstance(command, list) else shlex.split(command)


def _flag(words: list[str], flag: str) -> str:
    for i, w in enumerate(words):
        if w == flag:
            return words[i + 1]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {words}")


def test_docker_compose_config_accepts_the_stack():
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True).returncode
    ):
        pytest.skip(
            "no docker compose plugin on this machine (the docker CLI here has none): "
            "`docker compose config` not run; test_compose_stack_is_wired checks the file"
        )
    run = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **COMPOSE_ENV},
    )
    assert run.returncode == 0, run.stderr


def test_compose_stack_is_wired():
    services = _compose()["services"]
    assert set(services) >= {"minio", "prefect-server", "ray-head", "ray-worker", "pipeline"}
    pipeline_image = services["pipeline"]["image"]
    for name in ("prefect-server", "ray-head", "ray-worker", "pipeline"):
        svc = services[name]
        assert svc["image"] == pipeline_image, f"{name} runs another image"
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == REPO, name
        assert build["dockerfile"] == "infra/Dockerfile", name

    # The pipeline service points at MinIO, the Prefect server and the Ray head.
    env = services["pipeline"]["environment"]
    endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
    # MinIO serves S3 on --address, :9000 when not given
    minio_port = _flag(_words(services["minio"]["command"]) + ["--address", ":9000"], "--address")
    assert endpoint.hostname == "minio" and f":{endpoint.port}" == minio_port, env
    api = urlsplit(env["PREFECT_API_URL"])
    server = _words(services["prefect-server"]["command"])
    assert api.hostname == "prefect-server" and str(api.port) == _flag(server, "--port"), env
    assert api.path == "/api"
    head_port = _flag(_words(services["ray-head"]["command"]), "--port")
    assert env["RAY_ADDRESS"] == f"ray-head:{head_port}", "the head's GCS, not Ray Client (ray://)"
    assert set(services["pipeline"]["depends_on"]) >= {"prefect-server", "ray-head"}

    # Every Ray node (the pipeline's driver node included) has the store's keys, MinIO's own
    # credentials, and the cluster's token.
    minio_env = services["minio"]["environment"]
    for name in ("ray-head", "ray-worker", "pipeline"):
        node_env = services[name]["environment"]
        assert node_env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"], name
        assert node_env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"], name
        assert node_env["RAY_AUTH_MODE"] == "token", name
        assert node_env["RAY_AUTH_TOKEN"] == COMPOSE_ENV["RAY_AUTH_TOKEN"], name
    for name in ("ray-worker", "pipeline"):  # `ray start --address=...` joins the cluster
        words = shlex.split(" ".join(_words(services[name]["command"])))
        assert _flag(words, "--address") == f"ray-head:{head_port}", name
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)

    # The pipeline deploys infra/prefect.yaml and serves its work pool.
    prefect_yaml = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    pool = prefect_yaml["deployments"][0]["work_pool"]["name"]
    joins = " ".join(_words(services["pipeline"]["command"]))
    assert "prefect deploy --prefect-file infra/prefect.yaml --all" in joins
    assert f"prefect worker start --pool {pool}" in joins
    assert env["DIFFPIPE_HOME"] == "/app"

    # The bucket made at start is the one configs/nightly-cluster.yaml writes to.
    storage_root = yaml.safe_load((REPO / "configs" / "nightly-cluster.yaml").read_text())
    bucket = urlsplit(storage_root["storage"]["root"]).hostname
    assert _words(services["minio-bucket"]["entrypoint"])[-1].endswith(f"/{bucket}")


# -- the image ----------------------------------------------------------------------------------
def test_the_dockerfile_installs_exactly_uv_lock():
    text = (INFRA / "Dockerfile").read_text()
    instructions = [
        line.strip()
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    runs = [i for i in instructions if i.startswith("RUN ")]
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs and all("--locked" in r for r in syncs), syncs
    for r in runs:
        assert not re.search(r"\bpip3? install|uv pip install|uv add|uv lock", r), r
    copies = [i for i in instructions if i.startswith("COPY ")]
    first_sync = instructions.index(syncs[0])
    assert any("uv.lock" in c and "pyproject.toml" in c for c in copies[: first_sync + 1])
    # The last sync installs the project itself, after its packages were copied in.
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["packages"]
    last_sync = instructions.index(syncs[-1])
    copied = " ".join(instructions[:last_sync])
    for package in [*packages, "configs"]:
        assert f"COPY {package} {package}" in copied, package
    assert "--no-install-project" not in syncs[-1]
    python = re.search(r"UV_PYTHON=(3\.\d+)", text)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python and SpecifierSet(requires).contains(python.group(1) + ".0"), requires
    assert "WORKDIR /app" in text and "DIFFPIPE_HOME=/app" in text


# -- Prefect -------------------------------------------------------------------------------------
def test_prefect_yaml_deploys_an_existing_flow_from_a_parametrised_checkout():
    import ast

    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    (pull_step,) = spec["pull"]
    assert pull_step["prefect.deployments.steps.set_working_directory"] == {
        "directory": "{{ $DIFFPIPE_HOME }}"
    }
    for deployment in spec["deployments"]:
        path, func = deployment["entrypoint"].split(":")
        tree = ast.parse((REPO / path).read_text())
        (flow_def,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
        decorators = [ast.unparse(d) for d in flow_def.decorator_list]
        assert f"flow(name='{deployment['name']}')" in decorators, decorators
        args = {a.arg for a in flow_def.args.args}
        assert set(deployment["parameters"]) <= args, deployment["parameters"]
        params = deployment["parameters"]  # a pipeline config, or a sweep's YAML
        assert (REPO / params.get("config_path", params.get("sweep_path", ""))).is_file()
        assert deployment["work_pool"]["name"]
        for schedule in deployment.get("schedules", []):  # a sweep runs on demand
            assert len(schedule["cron"].split()) == 5 and schedule["timezone"] == "UTC"
        assert "RAY_ADDRESS" not in deployment["work_pool"]["job_variables"].get("env", {}), (
            "the worker's machine says where the cluster is"
        )


def test_the_failed_nightly_automation_is_a_valid_prefect_automation():
    from prefect.events.schemas.automations import AutomationCore

    from flows.deploy import AUTOMATION_FILE, NOTIFY_PLACEHOLDER

    spec = yaml.safe_load(AUTOMATION_FILE.read_text())
    # AutomationCore ignores unknown keys; a misspelt one would silently do nothing.
    assert set(spec) <= set(AutomationCore.model_fields), set(spec) - set(
        AutomationCore.model_fields
    )
    (action,) = spec["actions"]
    assert action["block_document_id"] == NOTIFY_PLACEHOLDER
    action["block_document_id"] = str(uuid.uuid4())
    AutomationCore.model_validate(spec)
    trigger = spec["trigger"]
    assert set(trigger["expect"]) == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    # runs of the flow named "nightly" (flows/nightly.py), whichever deployment started them
    assert trigger["match_related"] == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": "nightly",
    }


# -- the Ray cluster launcher --------------------------------------------------------------------
def test_the_launcher_config_matches_rays_schema_and_sizes_its_disks():
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    ray_dir = Path(next(iter(spec.submodule_search_locations)))
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(config)
    ]
    assert not errors, errors
    for name, node_type in config["available_node_types"].items():
        (disk,) = node_type["node_config"]["BlockDeviceMappings"]
        assert disk["Ebs"]["VolumeSize"] >= 100, f"{name}: the image alone needs tens of GB"
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command


PLACEHOLDER = re.compile(
    # example values: a registry org, a key, an account id, a cluster-internal service name
    r"REPLACE|your-org|FILL-IN|CHANGE-?ME|123456789012|XXXX|<[a-z][\w-]*>|example\.com|\.svc\b",
    re.I,
)
PLACEHOLDER_FILES = [
    INFRA / "ray-cluster.yaml",
    INFRA / "prefect.yaml",
    INFRA / "docker-compose.yml",
    INFRA / "Dockerfile",
    *sorted(K8S.glob("*.yaml")),
]


@pytest.mark.parametrize("path", PLACEHOLDER_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_placeholder_says_what_to_fill_in(path):
    """A value that would fail at `ray up` / `kubectl apply` carries a FILL IN comment on its line
    or the line above."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        code = line.split("#", 1)[0]
        if PLACEHOLDER.search(code):
            here = line + " " + (lines[i - 1] if i else "")
            assert "FILL IN" in here, (
                f"{path.name}:{i + 1}: {line.strip()!r} says nothing to fill in"
            )


def test_the_placeholder_scan_finds_an_unexplained_placeholder():
    text = (INFRA / "ray-cluster.yaml").read_text().replace("latest_dlami #", "ami-REPLACE-ME #", 1)
    lines = text.splitlines()
    flagged = [
        line
        for i, line in enumerate(lines)
        if PLACEHOLDER.search(line.split("#", 1)[0])
        and "FILL IN" not in line + " " + (lines[i - 1] if i else "")
    ]
    assert flagged and "ami-REPLACE-ME" in flagged[0]


def test_no_ray_client_address_anywhere():
    """Ray Client (ray://) may not work with Ray Train: clusters are reached through RAY_ADDRESS to
    the GCS or Ray's Jobs API."""
    files = [REPO / "README.md", *INFRA.rglob("*"), *(REPO / "configs").rglob("*")]
    for path in files:
        if path.is_file() and path.suffix != ".json":
            for n, line in enumerate(path.read_text().splitlines(), 1):
                assert not re.search(r"ray://[\w<$\[{]", line), f"{path.name}:{n}: {line.strip()}"
