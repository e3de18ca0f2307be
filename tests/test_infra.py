"""infra/: every manifest validates offline, Secrets carry no values, RBAC is TrainJob-only, the Dockerfile installs
what pyproject.toml declares."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
K8S_VERSION = "1.33.0"


def kustomize_build() -> list[dict]:
    """`kubectl kustomize` when kubectl is installed; otherwise the listed files with the namespace applied."""
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc and doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
            if doc:
                docs.append(doc)
    return docs


def secret_templates() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((K8S / "secret-templates").glob("*.yaml"))]


def test_every_manifest_validates_against_the_kubernetes_schema() -> None:
    import kubernetes_validate

    docs = kustomize_build() + secret_templates()
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "StatefulSet",
        "Deployment",
        "Service",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "Secret",
        "TrainingRuntime",
    } <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("trainer.kubeflow.org/"):
            continue  # a custom resource: tests/test_trainjob_runtime.py validates it against the Trainer CRDs
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace", "easyref") == "easyref" or doc["kind"] == "Namespace"


def test_secret_templates_hold_no_values_and_cover_every_reference() -> None:
    templates = {s["metadata"]["name"]: s for s in secret_templates()}
    for secret in templates.values():
        assert not secret.get("data")
        assert all(v == "" for v in secret["stringData"].values()), secret["metadata"]["name"]
    assert not [d for d in kustomize_build() if d["kind"] == "Secret"], "no Secret may be part of the build"
    # every secretKeyRef of the manifests and of the pipeline names a template and one of its keys
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    refs = re.findall(r"secretKeyRef: \{name: ([\w-]+), key: (\w+)\}", text)
    assert refs
    for name, key in refs:
        assert key in templates[name]["stringData"], (name, key)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]
    assert {params["mlflow_secret"], params["s3_secret"]} <= set(templates)


def test_rbac_lets_the_pipeline_create_trainjobs_and_nothing_more() -> None:
    docs = kustomize_build()
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"]
    assert roles[0]["rules"] == [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get"]}
    ]
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
    assert not [d for d in docs if d["kind"] == "ClusterRoleBinding"]


def test_network_policies_deny_by_default_and_fence_postgres() -> None:
    policies = {d["metadata"]["name"]: d for d in kustomize_build() if d["kind"] == "NetworkPolicy"}
    deny = policies["easyref-default-deny"]["spec"]
    assert deny["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "easyref"}}
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    postgres = policies["easyref-postgres-from-mlflow"]["spec"]
    assert postgres["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "easyref", "app.kubernetes.io/name": "mlflow"}}}
    ]
    # the project's own pods carry the label the policies select
    for doc in kustomize_build():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "easyref"


def workloads() -> list[dict]:
    return [d for d in kustomize_build() if d["kind"] in ("Deployment", "StatefulSet")]


def test_every_container_is_restricted_with_limits_and_no_password_in_its_arguments() -> None:
    namespace = next(d for d in kustomize_build() if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in workloads():
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {
            "type": "RuntimeDefault"
        }
        for c in pod.get("initContainers", []) + pod["containers"]:
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert ctx["readOnlyRootFilesystem"] is True, c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(
                c["resources"]["limits"]
            ), c["name"]
            secret_vars = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            text = " ".join(c.get("command", []) + c.get("args", []))
            # Kubernetes expands $(VAR) into the process's command line (visible in /proc/PID/cmdline)
            assert not [v for v in secret_vars if f"$({v})" in text], c["name"]


def test_every_pod_of_the_project_stays_out_of_the_istio_mesh() -> None:
    """Kubeflow profile namespaces inject Istio sidecars (istio-injection: enabled): MLflow, PostgreSQL and the
    TrainJob nodes opt out by the pod label, so every project pod talks plain TCP fenced by the NetworkPolicies
    (sidecar-less TrainJob and KFP pods could not reach a meshed MLflow under STRICT mTLS, and istio-init's
    NET_ADMIN is refused by `restricted`)."""
    from easyref.train.launch import ISTIO_OPT_OUT

    templates = [d["spec"]["template"] for d in workloads()]
    runtimes = [d for d in kustomize_build() if d["kind"] == "TrainingRuntime"]
    for runtime in runtimes:
        templates += [
            job["template"]["spec"]["template"] for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]
        ]
    assert len(templates) >= 3
    for template in templates:
        assert ISTIO_OPT_OUT.items() <= template["metadata"]["labels"].items(), template["metadata"]


def test_mlflow_server_has_postgres_backend_s3_artifacts_and_auth() -> None:
    mlflow = next(d for d in kustomize_build() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--backend-store-uri=postgresql://mlflow-postgres:5432/mlflow" in args and "--app-name=basic-auth" in args
    env = {e["name"]: e["valueFrom"] for e in container["env"] if "valueFrom" in e}
    assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "mlflow-db", "key": "password"}}
    assert "--serve-artifacts" in args and "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    storage = next(d for d in kustomize_build() if d["kind"] == "ConfigMap")
    assert storage["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    pvcs = {d["metadata"]["name"]: d for d in kustomize_build() if d["kind"] == "PersistentVolumeClaim"}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]
    assert pvcs[params["shared_pvc"]]["spec"]["accessModes"] == ["ReadWriteMany"]


def dockerfile() -> str:
    return (ROOT / "infra" / "Dockerfile").read_text()


def test_dockerfile_installs_what_pyproject_declares() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    text = dockerfile()
    # torch first, the same pin as the Makefile, inside pyproject's range
    torch_spec = re.search(r"ARG TORCH_SPEC=(\S+)", text).group(1)
    makefile_spec = re.search(r"TORCH_SPEC \?= (\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert torch_spec == makefile_spec
    torch_dep = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    from packaging.specifiers import SpecifierSet

    assert torch_spec.split("==")[1] in SpecifierSet(torch_dep.removeprefix("torch"))
    assert text.index("${TORCH_SPEC}") < text.index('pip install ".[pipeline]"')
    # the extra the image installs exists and holds the orchestration packages
    extras = re.findall(r'pip install "\.\[([\w,]+)\]"', text)
    assert extras == ["pipeline"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in pyproject["project"]["optional-dependencies"]["pipeline"]}
    assert {"kfp", "kfp-kubernetes", "dvc"} <= names
    # the Python of both bases is pyproject's
    version = re.search(r">=(\d+\.\d+)", pyproject["project"]["requires-python"]).group(1)
    assert f"python{version}" in text and f"python:{version}-" in text
    # never torchvision; the components are importable (PYTHONPATH) and everything pyproject installs is copied
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "torchvision" not in re.sub(r"!\s*pip show torchvision", "", instructions)
    assert "PYTHONPATH=/opt/easyref" in text and "COPY components ./components" in text
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"] and "COPY src ./src" in text


def test_dockerfile_has_cuda_base_and_cpu_build_arg() -> None:
    text = dockerfile()
    assert re.search(r"ARG CUDA_BASE=nvidia/cuda:\S+", text) and "ARG DEVICE=cuda" in text
    assert "FROM base-${DEVICE}" in text and "FROM ${CPU_BASE} AS base-cpu" in text


def test_dockerfile_lints_clean_with_hadolint() -> None:
    """Zero findings; every rule the file ignores says why on the line above (`# hadolint ignore=...`)."""
    import os
    import sys

    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "infra" / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    lines = dockerfile().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rule = line.split("=", 1)[1]
            justification = " ".join(lines[max(0, i - 4) : i])
            assert rule in justification or "pinned" in justification.lower(), (rule, justification)


def test_image_records_the_commit_it_was_built_from_for_mlflow() -> None:
    """The image has no .git: the GIT_COMMIT build argument becomes the variable easyref.runs.git_commit reads."""
    from easyref.runs import GIT_COMMIT_ENV

    text = dockerfile()
    assert "ARG GIT_COMMIT=unknown" in text and f"ENV {GIT_COMMIT_ENV}=${{GIT_COMMIT}}" in text
    guide = (ROOT / "docs" / "orchestration.md").read_text()
    assert guide.count("--build-arg GIT_COMMIT=$(git rev-parse HEAD)") == 2


def test_image_installs_under_constraints_from_the_tested_environment() -> None:
    text = dockerfile()
    assert "ENV PIP_CONSTRAINT=/opt/easyref/infra/constraints.txt" in text
    assert text.index("PIP_CONSTRAINT=") < text.index('pip install ".[pipeline]"')
    pins = {}
    for line in (ROOT / "infra" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and "+" not in version and "/" not in line and "@" not in line, line
            pins[name.lower().replace("_", "-")] = version
    assert "easyref" not in pins and "torchvision" not in pins
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["pipeline"]
    for dep in declared:
        name = re.split(r"[<>=!~\[; ]", dep)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in infra/constraints.txt (make constraints)"
    torch_spec = re.search(r"ARG TORCH_SPEC=torch==(\S+)", text).group(1)
    assert pins["torch"] == torch_spec


def test_image_user_is_the_clusters_and_not_ubuntus_1000() -> None:
    from easyref.train.launch import RUN_AS

    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", dockerfile()).group(1))
    assert uid != 1000  # `ubuntu` in Ubuntu 24.04 images (the CUDA base)
    assert f"USER {uid}" in dockerfile() and RUN_AS == uid
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]["run_as_user"] == uid


def test_cuda_base_does_not_duplicate_the_cuda_libraries_of_the_torch_wheel() -> None:
    base = re.search(r"ARG CUDA_BASE=(\S+)", dockerfile()).group(1)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-base-ubuntu[\d.]+(@sha256:[0-9a-f]{64})?", base), base
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", base).groups()
    assert f"whl/cu{''.join(cuda)}" in dockerfile()  # the torch build matches the base's CUDA


def test_dockerignore_keeps_data_and_secrets_out_of_the_build_context() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "models", "outputs", "mlflow.db"} <= ignored


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "infra").rglob("*") if p.is_file()))
def test_infra_names_no_absolute_path_of_a_dev_machine(path: str) -> None:
    import tempfile

    text = (ROOT / path).read_text()
    assert str(ROOT) not in text and str(Path.home()) + "/" not in text and tempfile.gettempdir() + "/" not in text


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container arguments."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


@pytest.mark.slow  # ~20 s quiet, 2 min on a loaded 2-core machine: the auth app's migrations
def test_mlflow_server_answers_the_in_cluster_host_and_refuses_others(tmp_path: Path) -> None:
    """The real `mlflow server` with the manifest's arguments: the pipeline's Host header gets an answer (mlflow 3
    answers 403 "Invalid Host header" to hosts it does not know, while /health stays 200)."""
    import base64
    import http.client
    import os
    import socket
    import sys
    import time

    mlflow = next(d for d in kustomize_build() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    ui_host = next(d for d in kustomize_build() if d["metadata"]["name"] == "mlflow-server")["data"]["MLFLOW_UI_HOST"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from components.testing import mlflow_store

    # what only the cluster has is replaced: the stores by local ones, the listen address by loopback. The store is
    # a new one already migrated (as on a cluster whose database has run once): the migrations are not under test.
    local = {
        "--backend-store-uri": mlflow_store(tmp_path / "mlflow.db", artifact_root="mlflow-artifacts:/"),
        "--artifacts-destination": str(tmp_path),
        "--host": "127.0.0.1",
        "--port": str(port),
    }
    env = {"POD_NAMESPACE": mlflow["metadata"]["namespace"], "MLFLOW_UI_HOST": ui_host}
    # the container's environment: Secrets get stand-in values, plain values are kept
    for item in container["env"]:
        source = item.get("valueFrom", {})
        if "value" in item or "secretKeyRef" in source:
            env.setdefault(item["name"], item.get("value", f"test-{item['name'].lower()}"))
    args = []
    for arg in container["args"]:
        name = arg.split("=", 1)[0]
        args.append(f"{name}={local[name]}" if name in local else _expand(arg, env))
    # One worker instead of the default four: each worker loads the app and the auth app (migrating auth.db), which
    # costs a minute of CPU on a loaded 2-core machine; the host check runs in every worker alike.
    assert not any(a.startswith(("--workers", "-w")) for a in args), "the manifest sets workers: keep its value"
    args.append("--workers=1")
    (tmp_path / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\nadmin_password = s3cret-Pass-1\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server_env = os.environ | env | {"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini")}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "PGUSER", "PGPASSWORD"):
        server_env.pop(name, None)  # no object store or PostgreSQL here
    cli = [os.path.join(os.path.dirname(sys.executable), "mlflow"), *container["command"][1:], *args]
    proc = subprocess.Popen(cli, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def get(host: str, path: str = "/api/2.0/mlflow/experiments/search?max_results=1") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        token = base64.b64encode(b"admin:s3cret-Pass-1").decode()
        conn.request("GET", path, headers={"Host": host, "Authorization": f"Basic {token}"})
        status = conn.getresponse().status
        conn.close()
        return status

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if get("localhost:5000", "/health") == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.5)
        tracking_host = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]["mlflow_tracking_uri"]
        tracking_host = tracking_host.split("://", 1)[1].rstrip("/")
        for host in (tracking_host, "mlflow:5000", f"mlflow.{env['POD_NAMESPACE']}:5000", "localhost:5000", ui_host):
            assert get(host) == 200, host
        assert get("attacker.example:5000") == 403
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_make_setup_says_what_it_installs(tmp_path: Path) -> None:
    """`make setup` runs pip quietly, so it names each step (`make -n`: the recipe, nothing run)."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    done = subprocess.run(["make", "-n", "setup", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True)
    said = [line for line in done.stdout.splitlines() if line.startswith('echo "setup: ')]
    torch_spec = re.search(r"TORCH_SPEC \?= (\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert any(torch_spec in line for line in said) and any("dev and pipeline extras" in line for line in said), said
    assert said[0].startswith(f'echo "setup: virtual environment {venv}')
