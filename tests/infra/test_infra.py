"""Static checks of infra/: the docker-compose stack, the Kubernetes manifests and their documentation.

Nothing here needs a Docker engine or a cluster. `docker compose config` and `kubectl kustomize` run only where
those CLIs are installed (both work offline); otherwise those two tests are skipped.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
INIT_SQL = INFRA / "postgres" / "init.sql"
K8S = INFRA / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
NAMESPACE = "ddcolor"

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yml", ".yaml"})
DOCKERFILES = sorted(INFRA.rglob("Dockerfile"))
K8S_FILES = sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)
GPU_JOB = K8S / "examples" / "train-gpu-job.yaml"
PREFECT_YAML = ROOT / "prefect.yaml"
WORKER_DOCKERFILE = INFRA / "worker" / "Dockerfile"

REQUIRED_SERVICES = {
    "minio",
    "minio-init",
    "postgres",
    "mlflow",
    "prefect-server",
    "prefect-worker",
    "prefect-worker-gpu",
}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}

# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, and bare $VAR.
INTERPOLATION = re.compile(r"\$\{(?P<braced>[A-Za-z_]\w*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|\$(?P<bare>[A-Za-z_]\w*)")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY$|_KEY_ID$", re.IGNORECASE)
URL_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/@\s\"']+)@")
FULL_VERSION = re.compile(r"\d+\.\d+|RELEASE\.\d{4}-")


# --- helpers ------------------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def image_problem(ref: str) -> str | None:
    """Why an image reference is not pinned, or None if it is (a full-version tag or a digest)."""
    if "@sha256:" in ref:
        return None
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return "has no tag"
    if tag == "latest":
        return "uses :latest"
    if not FULL_VERSION.search(tag):
        return f"tag {tag!r} is not a full version (floating tags move)"
    return None


def strings_in(node: Any) -> Iterator[str]:
    """Every string (mapping keys included) in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def interpolations(text: str) -> Iterator[re.Match[str]]:
    """Compose interpolations in one string; `$$` is an escaped dollar (left for the container's shell)."""
    yield from INTERPOLATION.finditer(text.replace("$$", "__"))


def env_mapping(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command") or []
    return command if isinstance(command, str) else " ".join(map(str, command))


def parse_env_example() -> tuple[dict[str, str], list[str]]:
    """Variables assigned in infra/.env.example, and those without a comment of their own.

    A variable (or a run of consecutive ones) must follow a comment line directly; a section header
    (`# --- ... ---`) does not count.
    """
    values: dict[str, str] = {}
    undocumented: list[str] = []
    documented = False
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            documented = False
        elif stripped.startswith("#"):
            documented = not stripped.startswith("# ---")
        else:
            name, sep, value = stripped.partition("=")
            assert sep, f"infra/.env.example: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
            if not documented:
                undocumented.append(name.strip())
    return values, undocumented


# --- every YAML file ----------------------------------------------------------------------------------------


def test_infra_files_exist():
    for path in (COMPOSE_FILE, ENV_EXAMPLE, INIT_SQL, INFRA / "README.md", KUSTOMIZATION):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    assert YAML_FILES and K8S_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_yaml_parses(path: Path):
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


# --- docker compose -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_docs(COMPOSE_FILE)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def test_compose_required_services(services):
    assert set(services) >= REQUIRED_SERVICES, f"missing services: {REQUIRED_SERVICES - set(services)}"


def test_compose_images_pinned(services):
    for name, service in services.items():
        assert "image" in service, f"service {name}: no image (also name built images, with a version tag)"
        problem = image_problem(service["image"])
        assert problem is None, f"service {name}: image {service['image']!r} {problem}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_dockerfile_base_images_pinned(path: Path):
    bases = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", path.read_text(encoding="utf-8"), re.MULTILINE)
    assert bases, f"{path}: no FROM line"
    for base in bases:
        problem = image_problem(base)
        assert problem is None, f"{path}: base image {base!r} {problem}"


def test_compose_builds_exist(services):
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        context = INFRA / (build if isinstance(build, str) else build["context"])
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert dockerfile.is_file(), f"service {name}: {dockerfile} does not exist"


def test_compose_healthchecks(services):
    for name in ("minio", "postgres", "mlflow", "prefect-server", "prefect-worker"):
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"service {name}: no healthcheck"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ready" in services["minio"]["healthcheck"]["test"]


def test_compose_depends_on_conditions(services):
    allowed = {"service_healthy", "service_completed_successfully", "service_started"}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"service {name}: depends_on must be a mapping with conditions"
        for dep, spec in depends.items():
            assert dep in services, f"service {name}: depends on unknown service {dep}"
            condition = (spec or {}).get("condition")
            assert condition in allowed, f"service {name} -> {dep}: condition {condition!r}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy: no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is one-shot: restart must be 'no'"

    def condition(service: str, dep: str) -> str | None:
        return (services[service].get("depends_on") or {}).get(dep, {}).get("condition")

    assert condition("minio-init", "minio") == "service_healthy"
    assert condition("mlflow", "postgres") == "service_healthy"
    assert condition("mlflow", "minio-init") == "service_completed_successfully"
    assert condition("prefect-server", "postgres") == "service_healthy"
    assert condition("prefect-worker", "prefect-server") == "service_healthy"


def test_compose_named_volumes(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/", "~")):
                path = (INFRA / source).resolve()
                assert path.exists(), f"service {name}: bind-mounted {source} does not exist"
            else:
                assert source in declared, f"service {name}: volume {source!r} is not declared under volumes:"
                used.add(source)
    assert {"minio-data", "postgres-data"} <= used
    assert declared <= used, f"declared but unused volumes: {declared - used}"


def test_compose_variables_documented_in_env_example(compose):
    documented, undocumented = parse_env_example()
    assert not undocumented, f"infra/.env.example: no comment above {undocumented}"
    used: dict[str, set[str]] = {}
    for text in strings_in(compose):
        for match in interpolations(text):
            name = match.group("braced") or match.group("bare")
            default = match.group("arg") if match.group("op") in {"-", ":-"} else None
            used.setdefault(name, set())
            if default is not None:
                used[name].add(default)
    assert used, "no ${VAR} interpolation found"
    missing = sorted(set(used) - set(documented))
    assert not missing, f"used in docker-compose.yml but not documented in infra/.env.example: {missing}"
    unused = sorted(set(documented) - set(used))
    assert not unused, f"documented in infra/.env.example but unused in docker-compose.yml: {unused}"
    for name, defaults in used.items():
        assert len(defaults) <= 1, f"${{{name}}} has different defaults: {sorted(defaults)}"
        if defaults:
            assert documented[name] == next(iter(defaults)), (
                f"{name}: default in docker-compose.yml {next(iter(defaults))!r} differs from infra/.env.example "
                f"{documented[name]!r}"
            )


def _without_interpolations(text: str) -> str:
    return INTERPOLATION.sub("VAR", text.replace("$$", "__"))


def test_compose_no_hardcoded_secrets(services):
    for name, service in services.items():
        for key, value in env_mapping(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[^}]+\}", value), f"service {name}: {key} must come from ${{...}}"
        for text in [*env_mapping(service).values(), command_text(service)]:
            for userinfo in URL_USERINFO.findall(_without_interpolations(text)):
                assert set(userinfo.split(":")) <= {"VAR"}, f"service {name}: credentials in URL {text!r}"


def test_compose_stack_wiring(services):
    mlflow = services["mlflow"]
    command = command_text(mlflow)
    assert "mlflow server" in command
    assert re.search(r"--backend-store-uri postgresql://\S+@postgres:5432/mlflow", command)
    assert "--artifacts-destination s3://mlflow/" in command
    assert "--serve-artifacts" in command
    assert "--host 0.0.0.0" in command and "--port 5000" in command
    assert mlflow["image"].startswith("ddcolor-mlflow:")
    assert "ghcr.io/mlflow/mlflow:v3." in (INFRA / "mlflow" / "Dockerfile").read_text(encoding="utf-8")

    for name in ("mlflow", "prefect-worker"):
        env = env_mapping(services[name])
        assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
        assert env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(env)

    server = services["prefect-server"]
    assert server["image"].startswith("prefecthq/prefect:3.") and server["image"].endswith("-python3.11")
    assert "prefect server start --host 0.0.0.0" in command_text(server)
    assert env_mapping(server)["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert env_mapping(server)["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")

    worker = services["prefect-worker"]
    assert re.search(r"prefect worker start .*--pool ddcolor-process", command_text(worker))
    env = env_mapping(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"

    init = command_text(services["minio-init"])
    assert services["minio-init"]["image"].startswith("minio/mc:")
    assert "mc mb --ignore-existing" in init
    assert "ddcolor-data" in init and "mlflow" in init
    assert "--console-address" in command_text(services["minio"])
    assert any(
        "init.sql" in str(v) and "/docker-entrypoint-initdb.d" in str(v) for v in services["postgres"]["volumes"]
    )


def test_init_sql_creates_both_databases():
    sql = INIT_SQL.read_text(encoding="utf-8")
    for database in ("mlflow", "prefect"):
        assert f"CREATE DATABASE {database}" in sql
    assert "pg_trgm" in sql  # Prefect's trigram indexes


def test_compose_gpu_worker(services):
    """The GPU variant: same environment as the CPU worker, its own pool, NVIDIA devices, only with --profile gpu."""
    gpu, cpu = services["prefect-worker-gpu"], services["prefect-worker"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in cpu  # `up` without --profile starts no GPU container
    assert env_mapping(gpu) == env_mapping(cpu)
    assert env_mapping(cpu)["DDCOLOR_HOME"] == gpu["working_dir"] == cpu["working_dir"] == "/opt/ddcolor"
    assert re.search(r"prefect worker start --pool ddcolor-gpu --type process", command_text(gpu))
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" in device
    assert gpu["shm_size"] and gpu["healthcheck"]["test"] and gpu["depends_on"] == cpu["depends_on"]
    assert gpu["build"]["dockerfile"] == cpu["build"]["dockerfile"] == "infra/worker/Dockerfile"
    assert "pypi.org" in gpu["build"]["args"]["TORCH_INDEX_URL"]  # CUDA wheels
    # nvidia-ml-py (the gpu extra) for GPU system metrics in MLflow; the image installs the extras it is given
    assert "gpu" in gpu["build"]["args"]["DDCOLOR_EXTRAS"].split(",")
    assert '".[${DDCOLOR_EXTRAS}]"' in WORKER_DOCKERFILE.read_text(encoding="utf-8")
    assert gpu["image"] != cpu["image"]  # a CPU and a CUDA build must not overwrite each other's tag


def test_worker_image_sets_ddcolor_home():
    text = WORKER_DOCKERFILE.read_text(encoding="utf-8")
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", text, re.MULTILINE)
    assert re.search(rf"DDCOLOR_HOME={re.escape(workdir)}\b", text), "the image must set DDCOLOR_HOME to its WORKDIR"


def _compose_cli() -> list[str] | None:
    """Compose v2 (the plugin, or a standalone v2 binary); v1 (Debian's python `docker-compose` 1.x) predates the
    Compose Specification this file uses (top-level ``name``, profiles with GPU reservations) and cannot check it."""
    candidates = [["docker", "compose"]] if shutil.which("docker") else []
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cli in candidates:
        probe = subprocess.run([*cli, "version", "--short"], capture_output=True, text=True, timeout=60)
        major = probe.stdout.strip().lstrip("v").split(".")[0]
        if probe.returncode == 0 and major.isdigit() and int(major) >= 2:
            return cli
    return None


@pytest.mark.parametrize("env_file", [None, ENV_EXAMPLE], ids=["defaults", "env-example"])
def test_docker_compose_config(env_file: Path | None):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("Compose v2 is not installed (`docker compose` plugin or a v2 `docker-compose`)")
    cmd = [*cli, "-f", str(COMPOSE_FILE)]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    result = subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# --- kubernetes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in K8S_FILES for doc in load_docs(path)]


def objects(k8s_docs, *kinds: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_docs if doc.get("kind") in kinds]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "Pod":
        return spec
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_k8s_manifest_basics(k8s_docs):
    for filename, doc in k8s_docs:
        for key in ("apiVersion", "kind"):
            assert doc.get(key), f"{filename}: a document has no {key}"
        assert (doc.get("metadata") or {}).get("name"), f"{filename}: {doc['kind']} has no metadata.name"
    names = [(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_docs]
    assert len(names) == len(set(names)), "duplicate kind/name"


def test_k8s_namespace(k8s_docs):
    namespaces = [doc["metadata"]["name"] for doc in objects(k8s_docs, "Namespace")]
    assert namespaces == [NAMESPACE]
    for filename, doc in k8s_docs:
        if doc["kind"] in CLUSTER_SCOPED_KINDS:
            assert "namespace" not in doc["metadata"], f"{filename}: {doc['kind']} is cluster-scoped"
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, (
                f"{filename}: {doc['kind']}/{doc['metadata']['name']} is not in namespace {NAMESPACE}"
            )


def test_k8s_expected_objects(k8s_docs):
    have = {(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_docs}
    expected = {
        ("Deployment", "minio"),
        ("Service", "minio"),
        ("PersistentVolumeClaim", "minio-data"),
        ("StatefulSet", "postgres"),
        ("Service", "postgres"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("Deployment", "prefect-server"),
        ("Service", "prefect-server"),
        ("Deployment", "prefect-worker"),
        ("Secret", "ddcolor-credentials"),
    }
    assert expected <= have, f"missing: {sorted(expected - have)}"


def test_k8s_containers_pinned_with_resources(k8s_docs):
    workloads = objects(k8s_docs, *WORKLOAD_KINDS)
    assert workloads
    for workload in workloads:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        for container in all_containers(workload):
            label = f"{where} container {container['name']}"
            problem = image_problem(container.get("image", ""))
            assert problem is None, f"{label}: image {container.get('image')!r} {problem}"
            resources = container.get("resources") or {}
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(section) or {}), f"{label}: no {section} cpu+memory"


def test_k8s_readiness_probes(k8s_docs):
    for workload in objects(k8s_docs, *LONG_RUNNING_KINDS):
        for container in pod_spec(workload)["containers"]:
            assert container.get("readinessProbe"), (
                f"{workload['kind']}/{workload['metadata']['name']} container {container['name']}: no readinessProbe"
            )


def test_k8s_no_plaintext_secrets(k8s_docs):
    for workload in objects(k8s_docs, *WORKLOAD_KINDS):
        for container in all_containers(workload):
            for env in container.get("env", []):
                label = f"{workload['metadata']['name']}/{container['name']} env {env['name']}"
                if SECRET_NAME.search(env["name"]):
                    assert "valueFrom" in env, f"{label}: take secrets from a Secret (valueFrom)"
                plain = str(env.get("value", ""))
                for userinfo in URL_USERINFO.findall(plain):
                    assert re.fullmatch(r"\$\(\w+\)(:\$\(\w+\))?", userinfo), f"{label}: credentials in URL"


def test_k8s_selectors_and_ports(k8s_docs):
    workloads = objects(k8s_docs, "Deployment", "StatefulSet", "DaemonSet")
    for workload in workloads:
        match = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert match.items() <= labels.items(), f"{workload['metadata']['name']}: selector does not match its pods"
    for service in objects(k8s_docs, "Service"):
        selector = service["spec"]["selector"]
        targets = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service {service['metadata']['name']} selects no workload"
        port_names = {p.get("name") for w in targets for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in port_names, f"Service {service['metadata']['name']}: no container port {target!r}"
    for statefulset in objects(k8s_docs, "StatefulSet"):
        services = {s["metadata"]["name"] for s in objects(k8s_docs, "Service")}
        assert statefulset["spec"]["serviceName"] in services


def test_k8s_references_resolve(k8s_docs):
    secrets = {
        s["metadata"]["name"]: set((s.get("stringData") or {}) | (s.get("data") or {}))
        for s in objects(k8s_docs, "Secret")
    }
    configmaps = {c["metadata"]["name"]: set(c.get("data") or {}) for c in objects(k8s_docs, "ConfigMap")}
    claims = {c["metadata"]["name"] for c in objects(k8s_docs, "PersistentVolumeClaim")}
    accounts = {a["metadata"]["name"] for a in objects(k8s_docs, "ServiceAccount")}
    for workload in objects(k8s_docs, *WORKLOAD_KINDS):
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts, f"{name}: unknown ServiceAccount"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{name}: unknown PVC"
            if "configMap" in volume:
                cm = volume["configMap"]
                assert cm["name"] in configmaps, f"{name}: unknown ConfigMap {cm['name']}"
                for item in cm.get("items", []):
                    assert item["key"] in configmaps[cm["name"]], f"{name}: ConfigMap {cm['name']} has no {item['key']}"
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for container in all_containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, f"{name}: unknown volume {mount['name']}"
            for env in container.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{name}: no secret key {ref}"
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in configmaps.get(ref["name"], set()), f"{name}: no ConfigMap key {ref}"
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
    for binding in objects(k8s_docs, "RoleBinding"):
        roles = {r["metadata"]["name"] for r in objects(k8s_docs, "Role")}
        assert binding["roleRef"]["name"] in roles
        for subject in binding["subjects"]:
            assert subject["kind"] != "ServiceAccount" or subject["name"] in accounts


def test_k8s_secret_example_is_placeholder(k8s_docs):
    text = (K8S / "secrets.example.yaml").read_text(encoding="utf-8")
    assert "EXAMPLE ONLY" in text and "PLACEHOLDER" in text
    (secret,) = objects(k8s_docs, "Secret")
    for key, value in secret["stringData"].items():
        if re.search(r"PASSWORD|SECRET", key):
            assert str(value).startswith("CHANGE-ME"), f"secrets.example.yaml: {key} must be a CHANGE-ME placeholder"


def test_k8s_postgres_init_sql_matches_compose(k8s_docs):
    (configmap,) = [c for c in objects(k8s_docs, "ConfigMap") if c["metadata"]["name"] == "postgres-init"]
    assert configmap["data"]["init.sql"] == INIT_SQL.read_text(encoding="utf-8"), (
        "infra/k8s/postgres.yaml's init.sql differs from infra/postgres/init.sql"
    )


def test_k8s_stack_wiring(k8s_docs):
    by_name = {doc["metadata"]["name"]: doc for doc in objects(k8s_docs, "Deployment")}
    (mlflow,) = pod_spec(by_name["mlflow"])["containers"]
    script = " ".join(mlflow.get("args", []))
    assert "--artifacts-destination s3://mlflow/" in script and "--serve-artifacts" in script
    assert "postgresql://" in script and "@postgres:5432/mlflow" in script
    env = {e["name"]: e.get("value") for e in mlflow["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"
    (server,) = pod_spec(by_name["prefect-server"])["containers"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    (worker,) = pod_spec(by_name["prefect-worker"])["containers"]
    args = " ".join(worker["args"])
    assert "worker start" in args and "--type kubernetes" in args and "--pool ddcolor-k8s" in args
    assert worker["image"].endswith("-kubernetes")  # the image with prefect-kubernetes installed
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def _work_pool_script() -> dict[str, Any]:
    docs = load_docs(K8S / "prefect-worker.yaml")
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prefect-work-pool"]
    namespace: dict[str, Any] = {"__name__": "setup_pool"}
    exec(compile(configmap["data"]["setup_pool.py"], "setup_pool.py", "exec"), namespace)
    return namespace


def _default_kubernetes_template() -> dict[str, Any]:
    """prefect-kubernetes' default base job template; a structural copy where prefect-kubernetes is absent."""
    try:
        from prefect_kubernetes.worker import KubernetesWorker
    except ImportError:
        pass
    else:
        return KubernetesWorker.get_default_base_job_template()
    names = ["name", "env", "labels", "command", "namespace", "image", "service_account_name"]
    names += ["image_pull_policy", "finished_job_ttl", "job_watch_timeout_seconds", "pod_watch_timeout_seconds"]
    names += ["stream_output", "cluster_config"]
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"labels": "{{ labels }}", "namespace": "{{ namespace }}", "generateName": "{{ name }}-"},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": "{{ finished_job_ttl }}",
            "template": {
                "spec": {
                    "parallelism": 1,
                    "completions": 1,
                    "restartPolicy": "Never",
                    "serviceAccountName": "{{ service_account_name }}",
                    "containers": [
                        {
                            "name": "prefect-job",
                            "env": "{{ env }}",
                            "image": "{{ image }}",
                            "imagePullPolicy": "{{ image_pull_policy }}",
                            "args": "{{ command }}",
                        }
                    ],
                }
            },
        },
    }
    configuration = {n: f"{{{{ {n} }}}}" for n in names if n not in {"image", "service_account_name"}}
    return {
        "job_configuration": {**configuration, "job_manifest": manifest},
        "variables": {"type": "object", "properties": {n: {"title": n} for n in names}},
    }


def test_k8s_gpu_work_pool_template():
    script = _work_pool_script()
    default = _default_kubernetes_template()
    original = copy.deepcopy(default)
    template = script["gpu_template"](default, image="registry.example.com/ddcolor:1.0", namespace=NAMESPACE)
    assert default == original, "gpu_template must not modify its input"

    props = template["variables"]["properties"]
    assert props["gpu_count"]["default"] == 1 and props["gpu_count"]["type"] == "integer"
    assert props["image"]["default"] == "registry.example.com/ddcolor:1.0"
    assert props["namespace"]["default"] == NAMESPACE
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {m["name"] for m in container["volumeMounts"]} <= {v["name"] for v in pod["volumes"]}
    # Placeholders take effect only if the variable exists (Prefect drops unknown ones silently).
    used = set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", str(template["job_configuration"])))
    assert used <= set(props), f"placeholders without a variable: {sorted(used - set(props))}"
    # The flow-run Jobs get the S3 key pair and the endpoints from objects that exist in the manifests.
    docs = [doc for path in K8S_FILES for doc in load_docs(path)]
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == script["CREDENTIALS_SECRET"])
    for env in container["env"]:
        assert env["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    assert any(d["kind"] == "ConfigMap" and d["metadata"]["name"] == script["ENDPOINTS_CONFIGMAP"] for d in docs)


def test_kustomization_lists_every_manifest():
    (kustomization,) = load_docs(KUSTOMIZATION)
    assert kustomization["kind"] == "Kustomization"
    assert kustomization.get("namespace") == NAMESPACE
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "duplicate entries in kustomization.yaml"
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists {resource}, which does not exist"
    on_disk = {p.name for p in K8S_FILES} | {p.name for p in K8S.glob("*.yml")}
    assert set(resources) == on_disk, f"not listed: {sorted(on_disk - set(resources))}"


def test_kubectl_kustomize_renders(k8s_docs):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(rendered) == len(k8s_docs)
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ddcolor"


def test_k8s_gpu_training_job_example():
    """infra/k8s/examples/train-gpu-job.yaml: a torchrun Job on as many GPUs as processes, wired like the stack."""
    (job,) = load_docs(GPU_JOB)
    assert job["kind"] == "Job" and job["metadata"]["namespace"] == NAMESPACE
    assert job["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ddcolor"
    assert GPU_JOB.name not in (KUSTOMIZATION.read_text(encoding="utf-8")), "an example, not part of the stack"
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in all_containers(job):
        label = f"{GPU_JOB.name} container {container['name']}"
        assert image_problem(container["image"]) is None, label
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][section]), f"{label}: no {section} cpu+memory"
        assert {m["name"] for m in container.get("volumeMounts", [])} <= set(volumes), label
    (train,) = spec["containers"]
    args = [str(a) for a in train["args"]]
    assert train["command"] == ["torchrun"] and args[args.index("-m") + 1 : args.index("-m") + 3] == [
        "ddcolor.cli",
        "train",
    ]
    nproc = int(args[args.index("--nproc_per_node") + 1])
    assert train["resources"]["limits"]["nvidia.com/gpu"] == nproc, "one process per GPU"
    assert "--resume" in args and any(a.startswith("train.checkpoint_dir=s3://") for a in args)  # evictions resume
    mounts = {m["mountPath"]: m["name"] for m in train["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # credentials and endpoints come from objects of the stack
    docs = [doc for path in K8S_FILES for doc in load_docs(path)]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for env in train["env"]:
        if SECRET_NAME.search(env["name"]):
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert {s["configMapRef"]["name"] for s in train["envFrom"]} <= configmaps


@pytest.fixture(scope="module")
def prefect_deployments() -> dict[str, dict[str, Any]]:
    if not PREFECT_YAML.is_file():
        pytest.skip("prefect.yaml does not exist yet")
    (doc,) = load_docs(PREFECT_YAML)
    return {d["name"]: d for d in doc["deployments"]}


def test_prefect_yaml_local_deployment_matches_compose_worker(prefect_deployments, services):
    local = prefect_deployments["local"]
    pool = local["work_pool"]["name"]
    assert re.search(rf"--pool {pool} --type process", command_text(services["prefect-worker"]))
    path, _, function = local["entrypoint"].partition(":")
    assert (ROOT / path).is_file() and f"def {function}(" in (ROOT / path).read_text(encoding="utf-8")
    assert local.get("schedules") and all(s.get("cron") for s in local["schedules"])


def test_prefect_yaml_k8s_gpu_deployment_matches_work_pool(prefect_deployments, k8s_docs):
    gpu = prefect_deployments["k8s-gpu"]
    by_name = {doc["metadata"]["name"]: doc for doc in objects(k8s_docs, "Deployment")}
    (worker,) = pod_spec(by_name["prefect-worker"])["containers"]
    assert gpu["work_pool"]["name"] == worker["args"][worker["args"].index("--pool") + 1]
    script = _work_pool_script()
    template = script["gpu_template"](
        _default_kubernetes_template(), image="x.example.com/ddcolor:1.0", namespace=NAMESPACE
    )
    job_variables = gpu["work_pool"]["job_variables"]
    unknown = set(job_variables) - set(template["variables"]["properties"])
    assert not unknown, f"k8s-gpu job_variables the ddcolor-k8s pool does not define (Prefect ignores them): {unknown}"
    assert gpu["parameters"].get("nproc_per_node", 1) == job_variables.get("gpu_count", 1), "one process per GPU"
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", WORKER_DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    directories = [step[k]["directory"] for step in gpu.get("pull", []) for k in step if "set_working_directory" in k]
    assert directories == [workdir], "the flow-run image has the repository at its WORKDIR"


# --- documentation ------------------------------------------------------------------------------------------


def test_readme_documents_usage():
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    for needle in (
        "docker compose -f infra/docker-compose.yml --env-file infra/.env up -d",
        "kubectl apply -k infra/k8s",
        "MLFLOW_TRACKING_URI=http://localhost:5000",
        "AWS_ENDPOINT_URL=http://localhost:9000",
        "PREFECT_API_URL=http://localhost:4200/api",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "sqlite:///mlflow.db",
        "--profile gpu",
        "infra/k8s/examples/train-gpu-job.yaml",
    ):
        assert needle in readme, f"infra/README.md does not mention {needle!r}"
