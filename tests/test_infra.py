"""infra/: the Kubernetes manifests, the Ray cluster config and the Dockerfiles, checked without a cluster,
Docker or network. What each file must hold is stated in infra/README.md; the checks here keep the
files and the repository in agreement (modules, configs, images, one RayJob spec) and keep secrets and
public endpoints out."""

import datetime
import fnmatch
import itertools
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
RETRAIN = K8S / "retrain"
CLUSTER_YAML = INFRA / "ray" / "cluster-aws.yaml"
README = INFRA / "README.md"

NAMESPACE = "wuerstchen"
# Image `wuerstchen-<name>` is built from infra/docker/<name>/Dockerfile (infra/README.md).
PROJECT_IMAGE_PREFIX = "wuerstchen-"
# The only images the project does not build; each must carry a pinned tag.
THIRD_PARTY_IMAGES = {"postgres", "alpine/k8s"}

# The RayJob / RayCluster fields of KubeRay's API (ray-operator/apis/ray/v1/rayjob_types.go and
# raycluster_types.go, v1.5-v1.7): a misspelt field would be dropped by the API server, silently.
# fmt: off
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "preRunningDeadlineSeconds"
}
RAYCLUSTER_SPEC_FIELDS = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions"
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts"
}
# KubeRay's released RayCronJob CRD (ray.io_raycronjobs.yaml): schedule and jobTemplate required,
# suspend and timeZone optional. It has no concurrencyPolicy.
RAYCRONJOB_SPEC_FIELDS = {"schedule", "jobTemplate", "suspend", "timeZone"}
# fmt: on

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------
# Loading


def _yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under infra/k8s/ (a kustomization is not one)."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _docs(path):
            if isinstance(doc, dict) and doc.get("kind") not in (None, "Kustomization"):
                out.append((path, doc))
    return out


def _one(kind: str, path: Path | None = None) -> dict:
    found = [doc for p, doc in _manifests() if doc["kind"] == kind and (path is None or p == path)]
    assert len(found) == 1, f"expected one {kind} in {path or K8S}, found {len(found)}"
    return found[0]


def _rayjob() -> dict:
    return _one("RayJob", RETRAIN / "rayjob.yaml")


def _text_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


def _walk(node, key: str):
    """Every value stored under `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _pod_specs(doc: dict) -> list[dict]:
    """The pod specs an object carries: Deployments, StatefulSets, CronJobs, RayJob head and workers."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind in ("RayJob", "RayCronJob"):
        job = spec if kind == "RayJob" else spec["jobTemplate"]
        cluster = job["rayClusterSpec"]
        return [cluster["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])
        ]
    return []


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


# ---------------------------------------------------------------------------------------------------
# A 5-field cron reader (minute hour day-of-month month day-of-week; numbers, *, lists, ranges, steps)


_CRON_FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]


def _cron_field(text: str, name: str, low: int, high: int) -> set[int]:
    values = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if body == "*":
            start, end = low, high
        elif "-" in body:
            start, end = (int(x) for x in body.split("-", 1))
        elif body.isdigit():
            start = end = int(body)
            if step_text:
                end = high
        else:
            raise ValueError(f"cron {name} field {text!r}: only numbers, '*', ',', '-' and '/' are read here")
        if not (low <= start <= end <= high) or step < 1:
            raise ValueError(f"cron {name} field {text!r}: outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return values


def _cron_fire_times(schedule: str, days: int = 14) -> list[datetime.datetime]:
    fields = schedule.split()
    if len(fields) != 5:
        raise ValueError(f"cron schedule {schedule!r}: expected 5 fields, got {len(fields)}")
    minute, hour, dom, month, dow = (_cron_field(f, *spec) for f, spec in zip(fields, _CRON_FIELDS))
    dow = {d % 7 for d in dow}  # 7 is Sunday too
    # cron's rule: when both day fields are restricted, a day matching either one fires.
    either_day = fields[2] != "*" and fields[4] != "*"
    start = datetime.datetime(2026, 1, 5)  # a Monday
    times = []
    for i in range(days * 24 * 60):
        t = start + datetime.timedelta(minutes=i)
        day_of_month, day_of_week = t.day in dom, (t.isoweekday() % 7) in dow
        day_ok = (day_of_month or day_of_week) if either_day else (day_of_month and day_of_week)
        if t.minute in minute and t.hour in hour and t.month in month and day_ok:
            times.append(t)
    return times


def _min_period_seconds(schedule: str) -> float:
    times = _cron_fire_times(schedule)
    assert len(times) >= 2, f"schedule {schedule!r} fires fewer than twice in two weeks"
    return min((b - a).total_seconds() for a, b in itertools.pairwise(times))


def test_cron_reader():
    assert _min_period_seconds("0 2 * * *") == 86400
    assert _min_period_seconds("*/15 * * * *") == 900
    assert _min_period_seconds("30 3 * * 1") == 7 * 86400
    with pytest.raises(ValueError):
        _cron_fire_times("0 2 * *")
    with pytest.raises(ValueError):
        _cron_fire_times("0 25 * * *")


# ---------------------------------------------------------------------------------------------------
# Every file parses; every object follows the label scheme


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path):
    docs = _docs(path)
    assert docs, f"{path}: no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document should be a mapping"


def test_every_manifest_has_the_fixed_labels_and_namespace():
    assert _manifests(), "no manifests under infra/k8s"
    for path, doc in _manifests():
        meta = doc["metadata"]
        what = f"{path.relative_to(ROOT)}: {doc['kind']} {meta.get('name') or meta.get('generateName')}"
        assert doc.get("apiVersion"), f"{what}: no apiVersion"
        assert meta.get("name") or meta.get("generateName"), f"{what}: no name"
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "wuerstchen", f"{what}: label part-of must be wuerstchen"
        assert str(labels.get("app.kubernetes.io/name", "")).startswith("wuerstchen"), f"{what}: label name"
        assert labels.get("app.kubernetes.io/component"), f"{what}: label component missing"
        if doc["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
        else:
            assert meta.get("namespace") == NAMESPACE, f"{what}: namespace must be {NAMESPACE}"


# ---------------------------------------------------------------------------------------------------
# The RayJob


def test_rayjob_has_the_required_fields():
    job = _rayjob()
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["generateName"], "one RayJob per run: the name must be generated"
    assert spec["entrypoint"].startswith("python -m pipelines.")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    # Retries are the scheduler's decision: neither new clusters nor submitter retries.
    assert spec["backoffLimit"] == 0
    assert spec["submitterConfig"]["backoffLimit"] == 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _constraints()["ray"], "rayVersion must be the Ray in the image"
    assert cluster["authOptions"]["mode"] == "token", "Ray token auth must be on"


def test_rayjob_runtime_env_parses_and_carries_no_secret():
    runtime_env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert "working_dir" not in runtime_env, "the image holds the code; nothing to upload"
    env_vars = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "runtime env values must be strings"
    tracking = urlparse(env_vars["MLFLOW_TRACKING_URI"])
    assert tracking.scheme == "http" and tracking.port
    secretish = [name for name in env_vars if SECRET_NAME.search(name)]
    assert not secretish, f"secrets in runtimeEnvYAML (Ray records it with the job): {secretish}"


def test_rayjob_uses_only_kuberay_fields():
    spec = _rayjob()["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown RayJob fields: {set(spec) - RAYJOB_SPEC_FIELDS}"
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, f"unknown fields: {set(cluster) - RAYCLUSTER_SPEC_FIELDS}"
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, f"unknown worker group fields: {set(group) - WORKER_GROUP_FIELDS}"
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    assert all(isinstance(v, str) for v in cluster["headGroupSpec"]["rayStartParams"].values())


def test_rayjob_head_has_no_gpu_and_stays_internal_and_a_worker_group_requests_gpus():
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard must not leave the cluster"
    assert not head.get("enableIngress", False)
    for container in head["template"]["spec"]["containers"]:
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in resources.get(part, {}), "the head pod has no GPU"

    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        limits = [c.get("resources", {}).get("limits", {}) for c in group["template"]["spec"]["containers"]]
        if any(int(lim.get("nvidia.com/gpu", 0)) > 0 for lim in limits):
            gpu_groups.append(group["groupName"])
    assert gpu_groups, "no worker group has nvidia.com/gpu limits"


def test_ray_pods_run_unprivileged_as_the_image_user():
    job = _rayjob()
    for pod in _pod_specs(job):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["serviceAccountName"] == "wuerstchen-ray"
        for container in _containers(pod):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["workingDir"] == "/app", "--config paths are relative to /app in the image"
    service_accounts = {doc["metadata"]["name"] for _, doc in _manifests() if doc["kind"] == "ServiceAccount"}
    assert "wuerstchen-ray" in service_accounts


# ---------------------------------------------------------------------------------------------------
# The schedules


def test_raycronjob_runs_the_same_rayjob_spec():
    raycron = _one("RayCronJob", RETRAIN / "raycronjob.yaml")
    assert raycron["spec"]["jobTemplate"] == _rayjob()["spec"], (
        "raycronjob.yaml's jobTemplate must equal rayjob.yaml's spec (copy the spec over)"
    )


def test_raycronjob_uses_only_the_crd_fields_and_cannot_overlap():
    spec = _one("RayCronJob", RETRAIN / "raycronjob.yaml")["spec"]
    assert set(spec) <= RAYCRONJOB_SPEC_FIELDS, (
        f"fields the RayCronJob CRD does not have: {set(spec) - RAYCRONJOB_SPEC_FIELDS}"
    )
    # No concurrencyPolicy in the CRD: a run must end (deadline) before the next tick.
    period = _min_period_seconds(spec["schedule"])
    deadline = spec["jobTemplate"]["activeDeadlineSeconds"]
    assert deadline < period, f"activeDeadlineSeconds {deadline} >= the schedule's period {period:.0f} s"


def test_cronjob_schedule_and_policy():
    cron = _one("CronJob", RETRAIN / "cronjob.yaml")
    spec = cron["spec"]
    assert _min_period_seconds(spec["schedule"]) > 0
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "no retries: the next scheduled run is the retry"
    assert job["activeDeadlineSeconds"] > _rayjob()["spec"]["activeDeadlineSeconds"], (
        "the waiting pod must outlive the RayJob's own deadline"
    )
    assert job["template"]["spec"]["restartPolicy"] == "Never"


def test_cronjob_pod_creates_the_mounted_rayjob_and_may_do_nothing_else():
    cron = _one("CronJob", RETRAIN / "cronjob.yaml")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = "\n".join(container.get("command", []) + container.get("args", []))
    created = re.search(r"kubectl create -f (\S+)", script)
    assert created, "the pod must `kubectl create -f` the RayJob"
    path = Path(created.group(1))

    mount = next(m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = volume["configMap"]["name"]
    key = str(path.relative_to(mount["mountPath"]))

    kustomization = yaml.safe_load((RETRAIN / "kustomization.yaml").read_text())
    generators = {g["name"]: g for g in kustomization["configMapGenerator"]}
    assert configmap in generators, f"ConfigMap {configmap} is not generated by kustomization.yaml"
    assert key in generators[configmap]["files"], f"{configmap} has no key {key}"
    assert (RETRAIN / key).read_text() == (RETRAIN / "rayjob.yaml").read_text()
    for resource in kustomization["resources"]:
        assert (RETRAIN / resource).is_file(), f"kustomization.yaml: {resource} does not exist"
    assert "rayjob.yaml" not in kustomization["resources"], "a generated name cannot be applied"
    assert "raycronjob.yaml" not in kustomization["resources"], "one schedule at a time"

    # RBAC: the pod's ServiceAccount may create and get RayJobs, nothing more.
    account = pod["serviceAccountName"]
    bindings = [
        d
        for _, d in _manifests()
        if d["kind"] == "RoleBinding"
        and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in d["subjects"])
    ]
    assert len(bindings) == 1, f"ServiceAccount {account} should have one RoleBinding"
    role = next(
        d for _, d in _manifests() if d["kind"] == "Role" and d["metadata"]["name"] == bindings[0]["roleRef"]["name"]
    )
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
@pytest.mark.parametrize(
    ("job_status", "deployment", "message", "expected"),
    [
        ("SUCCEEDED", "Complete", "", 0),  # done, or nothing to do: pipelines.retrain exits 0 for both
        ("FAILED", "Failed", "Job entrypoint command failed with exit code 4, last available logs: ...", 1),
        ("FAILED", "Failed", "Job entrypoint command failed with exit code 1, last available logs: ...", 1),
        ("FAILED", "Failed", "Job entrypoint command failed with exit code 3, last available logs: ...", 1),
        ("FAILED", "Failed", "Job entrypoint command failed with exit code 5, last available logs: ...", 1),
        ("", "ValidationFailed", "invalid RayJob", 1),
    ],
)
def test_cronjob_pod_succeeds_exactly_when_the_ray_job_succeeded(tmp_path, job_status, deployment, message, expected):
    """The waiting script, run against a fake kubectl: only a SUCCEEDED Ray job makes the Job succeed
    (exit code 4, a run refused by the lease, is a failure like any other non-zero code)."""
    container = _one("CronJob", RETRAIN / "cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["command"] == ["/bin/sh", "-c"]
    (script,) = container["args"]
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        "  create*) echo rayjob.ray.io/wuerstchen-retrain-abcde ;;\n"
        f"  *jobDeploymentStatus*) echo '{deployment}' ;;\n"
        f"  *jobStatus*) echo '{job_status}' ;;\n"
        f"  *message*) echo '{message}' ;;\n"
        "  *) exit 1 ;;\n"
        "esac\n"
    )
    kubectl.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == expected, result.stdout + result.stderr
    if "exit code 4" in message:
        assert "refused: another retraining run holds the lease" in result.stdout
    if "exit code 5" in message:
        assert "lost its lease" in result.stdout


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_kustomize_renders_the_cronjob_with_the_generated_configmap():
    result = subprocess.run(
        ["kubectl", "kustomize", str(RETRAIN)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    volumes = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    assert configmap["metadata"]["name"] in [v.get("configMap", {}).get("name") for v in volumes]
    assert yaml.safe_load(configmap["data"]["rayjob.yaml"]) == _rayjob()


# ---------------------------------------------------------------------------------------------------
# MLflow, Services, NetworkPolicies


def _arg(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _mlflow_container() -> dict:
    deployment = _one("Deployment", K8S / "mlflow" / "mlflow.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_mlflow_server_serves_s3_artifacts_with_a_postgresql_backend():
    container = _mlflow_container()
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in args
    backend = urlparse(_arg(args, "--backend-store-uri"))
    assert backend.scheme.startswith("postgresql")
    assert backend.password is None, "the database password comes from a Secret (PGPASSWORD), not the URI"
    assert _arg(args, "--artifacts-destination").startswith("s3://")
    assert _arg(args, "--host") == "0.0.0.0"
    assert _arg(args, "--port") == "5000"
    env = {e["name"]: e for e in container["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"]


def test_the_jobs_tracking_uri_names_the_mlflow_service_and_passes_its_host_check():
    from mlflow.server.security_utils import is_allowed_host_header

    runtime_env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    tracking = urlparse(runtime_env["env_vars"]["MLFLOW_TRACKING_URI"])
    service = _one("Service", K8S / "mlflow" / "mlflow.yaml")
    assert tracking.hostname == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert tracking.port in [p["port"] for p in service["spec"]["ports"]]
    deployment = _one("Deployment", K8S / "mlflow" / "mlflow.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    container = _mlflow_container()
    allowed = _arg(container["args"], "--allowed-hosts").split(",")
    # The Host header a client sends for a non-default port is host:port.
    assert is_allowed_host_header(allowed, tracking.netloc), f"{tracking.netloc} is refused by --allowed-hosts"
    assert not is_allowed_host_header(allowed, "mlflow.attacker.example:5000")


def test_no_service_is_exposed_outside_the_cluster():
    for path, doc in _manifests():
        assert doc["kind"] not in ("Ingress", "Gateway", "HTTPRoute", "Route"), f"{path}: {doc['kind']}"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path}: Service type"
        for service_type in _walk(doc.get("spec", {}), "serviceType"):
            assert service_type == "ClusterIP", f"{path}: serviceType {service_type}"
        for enable_ingress in _walk(doc.get("spec", {}), "enableIngress"):
            assert enable_ingress is False, f"{path}: enableIngress"


def test_network_policies_deny_by_default_and_cover_ray_mlflow_and_postgres():
    policies = [doc for _, doc in _manifests() if doc["kind"] == "NetworkPolicy"]
    default_deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] and "Ingress" in p["spec"]["policyTypes"]
    ]
    assert default_deny, "no default-deny ingress policy"
    selected = [p["spec"]["podSelector"].get("matchLabels", {}) for p in policies]
    assert {"ray.io/is-ray-node": "yes"} in selected, "no policy for the Ray pods"
    for kind, path in (
        ("Deployment", K8S / "mlflow" / "mlflow.yaml"),
        ("StatefulSet", K8S / "mlflow" / "postgres.yaml"),
    ):
        labels = _one(kind, path)["spec"]["template"]["metadata"]["labels"]
        assert any(sel and sel.items() <= labels.items() for sel in selected), f"no policy selects the {kind}"


def test_only_the_job_submitter_and_the_operator_reach_the_ray_jobs_api():
    """The Jobs API (8265) runs any code it is sent: no peer but the RayJob's submitter pod (selected by
    the labels rayjob.yaml's submitterPodTemplate gives it) and the KubeRay operator's namespace."""
    policies = [doc for _, doc in _manifests() if doc["kind"] == "NetworkPolicy"]
    ray = [p for p in policies if p["spec"]["podSelector"].get("matchLabels") == {"ray.io/is-ray-node": "yes"}]
    assert len(ray) == 1
    submitter = _rayjob()["spec"].get("submitterPodTemplate", {})
    submitter_labels = submitter.get("metadata", {}).get("labels", {})
    reaching_8265 = []
    for rule in ray[0]["spec"]["ingress"]:
        ports = [port["port"] for port in rule.get("ports", [])]
        if ports and 8265 not in ports:
            continue
        for peer in rule["from"]:
            if peer.get("podSelector", {}).get("matchLabels") == {"ray.io/is-ray-node": "yes"} and not ports:
                continue  # the Ray pods among themselves
            reaching_8265.append(peer)
    for peer in reaching_8265:
        if "namespaceSelector" in peer:
            assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}, (
                f"only the KubeRay operator's namespace may reach 8265 from outside: {peer}"
            )
            continue
        selector = peer["podSelector"].get("matchLabels")
        assert selector, f"{peer}: every pod of the namespace would reach the Jobs API"
        assert selector.items() <= submitter_labels.items(), f"{peer} does not select the submitter pod"
        for path, doc in _manifests():
            for pod in _pod_templates(doc):
                if pod == submitter:  # the RayCronJob carries the same submitter
                    continue
                assert not selector.items() <= pod.get("metadata", {}).get("labels", {}).items(), (
                    f"{path.relative_to(ROOT)}: a {doc['kind']} pod carries the submitter's labels {selector}"
                )
    assert any("podSelector" in peer for peer in reaching_8265), "the submitter cannot reach the Jobs API"
    assert submitter["spec"]["containers"][0]["image"] == _rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"][
        "template"]["spec"]["containers"][0]["image"], "the submitter runs `ray job submit` of the same Ray"


def _pod_templates(doc: dict) -> list[dict]:
    """The pod templates (metadata and spec) an object carries, the RayJob's submitter included."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    if kind in ("RayJob", "RayCronJob"):
        job = spec if kind == "RayJob" else spec["jobTemplate"]
        cluster = job["rayClusterSpec"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        return templates + ([job["submitterPodTemplate"]] if "submitterPodTemplate" in job else [])
    return []


# ---------------------------------------------------------------------------------------------------
# MLflow authentication: basic-auth app, a writer for the jobs, a read-only user for consumers
# (tests/test_mlflow_auth.py runs the server with this very configuration)


def _secret_ref(container: dict, name: str) -> dict | None:
    env = {e["name"]: e for e in container.get("env", [])}
    return env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")


def test_mlflow_server_runs_basic_auth_configured_from_the_configmap_and_secrets():
    import configparser

    container = _mlflow_container()
    assert _arg(container["args"], "--app-name") == "basic-auth"
    env = {e["name"]: e for e in container["env"]}
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    deployment = _one("Deployment", K8S / "mlflow" / "mlflow.yaml")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    configmap_name = volumes[mount["name"]]["configMap"]["name"]
    configmap = next(d for _, d in _manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == configmap_name)
    ini = configparser.ConfigParser()
    ini.read_string(configmap["data"][config_path.name])
    auth = ini["mlflow"]
    assert auth["default_permission"] == "READ", "consumers read; only granted users write"
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert "admin_password" not in auth, "the admin password comes from a Secret"
    assert urlparse(auth["database_uri"]).password is None
    assert urlparse(auth["database_uri"]).hostname == urlparse(_arg(container["args"], "--backend-store-uri")).hostname
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert _secret_ref(container, name), f"{name} must come from a Secret"


def test_the_users_job_makes_the_writer_of_the_registry_and_experiments_the_jobs_use():
    from pipelines import registry

    job = next(d for _, d in _manifests() if d["kind"] == "Job" and d["metadata"]["name"] == "wuerstchen-mlflow-users")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert _split_image(container["image"])[0].endswith("wuerstchen-mlflow")
    script = container["command"][-1]
    copies = [a.split() for i, a in _dockerfile_instructions(INFRA / "docker" / "mlflow" / "Dockerfile") if i == "COPY"]
    assert ["infra/docker/mlflow/mlflow_users.py", script] in copies, f"the MLflow image does not hold {script}"
    models = _arg(container["args"], "--models").split(",")
    assert set(models) == {registry.STAGE_C_MODEL, registry.DECODERS_MODEL}
    experiments = set(_arg(container["args"], "--experiments").split(","))
    for config, _ in _named(_CONFIG):
        doc = yaml.safe_load((ROOT / config).read_text())
        train = doc.get("train", doc)
        if "tracking" in train:
            assert train["tracking"]["experiment"] in experiments, f"{config}: its experiment is not the writer's"
    for prefix in ("MLFLOW_WRITER", "MLFLOW_READER"):
        for part in ("USERNAME", "PASSWORD"):
            assert _secret_ref(container, f"{prefix}_{part}"), f"{prefix}_{part} must come from a Secret"
    assert _secret_ref(container, "MLFLOW_TRACKING_PASSWORD")["name"] == _secret_ref(
        _mlflow_container(), "MLFLOW_AUTH_ADMIN_PASSWORD")["name"], "the script runs as the admin"


def test_the_jobs_log_to_mlflow_as_the_writer():
    writer = next(
        _secret_ref(c, "MLFLOW_WRITER_PASSWORD")["name"]
        for _, d in _manifests() if d["kind"] == "Job" and d["metadata"]["name"] == "wuerstchen-mlflow-users"
        for c in d["spec"]["template"]["spec"]["containers"]
    )
    for kind, path in (("RayJob", RETRAIN / "rayjob.yaml"), ("RayCronJob", RETRAIN / "raycronjob.yaml")):
        for pod in _pod_specs(_one(kind, path)):
            for container in pod["containers"]:
                for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    ref = _secret_ref(container, name)
                    assert ref and ref["name"] == writer and not ref.get("optional"), f"{path.name}: {name}"
    runtime_env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    assert not any(k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_TRACKING_URI" for k in runtime_env["env_vars"])
    mounts = yaml.safe_load(CLUSTER_YAML.read_text())["file_mounts"]
    assert "~/.mlflow/credentials" in mounts, "the EC2 cluster's jobs need the writer's MLflow credentials file"


# ---------------------------------------------------------------------------------------------------
# Every local path a shipped cluster config names is there on the cluster


def _local_paths(node) -> list[str]:
    if isinstance(node, dict):
        return [p for v in node.values() for p in _local_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in _local_paths(v)]
    if isinstance(node, str) and (node.startswith("/") or node.startswith("file://")):
        return [node.removeprefix("file://")]
    return []


def _under(path: str, folder: str) -> bool:
    return Path(path).is_relative_to(folder)


def test_every_local_path_a_shipped_cluster_config_names_is_provided():
    """Any config named in infra/ may be submitted to either cluster: an absolute path in it must be on a
    volume every Ray container mounts and an init container fills (KubeRay), and on a host folder that
    `initialization_commands` fill and every container mounts (EC2)."""
    paths = sorted({(p, c) for c, _ in _named(_CONFIG) for p in _local_paths(yaml.safe_load((ROOT / c).read_text()))})
    assert paths, "no shipped config names a local path: this test checks nothing (drop it)"
    for kind, path in (("RayJob", RETRAIN / "rayjob.yaml"), ("RayCronJob", RETRAIN / "raycronjob.yaml")):
        for pod in _pod_specs(_one(kind, path)):
            filled = {m["name"] for c in pod.get("initContainers", []) for m in c.get("volumeMounts", [])
                      if not m.get("readOnly")}
            for container in pod["containers"]:
                for local, config in paths:
                    mounts = [m for m in container.get("volumeMounts", []) if _under(local, m["mountPath"])]
                    assert mounts, f"{path.name}: {container['name']} does not mount {local} ({config})"
                    assert mounts[0]["name"] in filled, f"{path.name}: nothing fills the volume holding {local}"
    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    volumes = [o.split(None, 1)[1].split(":") for o in cluster["docker"]["run_options"] if o.startswith("--volume ")]
    for local, config in paths:
        hosts = [host for host, inside, *_ in volumes if _under(local, inside)]
        assert hosts, f"ray/cluster-aws.yaml: the containers do not mount {local} ({config})"
        assert any(hosts[0] in cmd for cmd in cluster["initialization_commands"]), f"nothing fills {hosts[0]}"


# ---------------------------------------------------------------------------------------------------
# Modules, configs and images named in infra/ exist in the repository


_MODULE = re.compile(r"python -m (pipelines(?:\.[a-z_][a-z0-9_]*)+)")
_CONFIG = re.compile(r"--config[= ]+([\w./-]+\.ya?ml)")


def _named(pattern: re.Pattern) -> list[tuple[str, str]]:
    """(reference, file) for every match in infra/'s manifests, cluster config, Dockerfiles and README."""
    found = set()
    for path in _text_files():
        for match in pattern.finditer(path.read_text()):
            found.add((match.group(1), str(path.relative_to(INFRA))))
    return sorted(found)


@pytest.mark.parametrize("module, where", _named(_MODULE), ids=lambda x: x)
def test_every_job_module_named_in_infra_exists(module, where):
    relative = Path(*module.split("."))
    exists = (ROOT / relative.with_suffix(".py")).is_file() or (ROOT / relative / "__main__.py").is_file()
    assert exists, f"infra/{where} runs `python -m {module}`, but {relative}.py is not in the repository"


@pytest.mark.parametrize("config, where", _named(_CONFIG), ids=lambda x: x)
def test_every_config_named_in_infra_exists(config, where):
    assert (ROOT / config).is_file(), f"infra/{where} passes --config {config}, which is not in the repository"


def test_the_retrain_workflow_is_referenced():
    modules = {m for m, _ in _named(_MODULE)}
    assert "pipelines.retrain" in modules


def _image_references() -> list[tuple[str, str]]:
    refs = []
    for path, doc in _manifests():
        refs += [(image, str(path.relative_to(INFRA))) for image in _walk(doc, "image")]
    docker = yaml.safe_load(CLUSTER_YAML.read_text())["docker"]
    refs += [(docker[k], "ray/cluster-aws.yaml") for k in ("image", "head_image", "worker_image") if k in docker]
    for node_type in yaml.safe_load(CLUSTER_YAML.read_text())["available_node_types"].values():
        if "worker_image" in node_type.get("docker", {}):
            refs.append((node_type["docker"]["worker_image"], "ray/cluster-aws.yaml"))
    refs += [(m, "README.md") for m in re.findall(r"docker build .*?-t (\S+)", README.read_text())]
    return refs


def _split_image(image: str) -> tuple[str, str]:
    """(repository path without the registry, tag)."""
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    return "/".join(parts), tag


def test_every_image_is_built_here_or_a_pinned_third_party_image():
    refs = _image_references()
    assert refs
    project_tags = set()
    for image, where in refs:
        repository, tag = _split_image(image)
        assert tag and tag != "latest", f"infra/{where}: image {image} must have a pinned tag"
        basename = repository.rsplit("/", 1)[-1]
        if repository in THIRD_PARTY_IMAGES:
            continue
        assert basename.startswith(PROJECT_IMAGE_PREFIX), (
            f"infra/{where}: image {image} is neither wuerstchen-<name> nor one of {sorted(THIRD_PARTY_IMAGES)}"
        )
        dockerfile = INFRA / "docker" / basename.removeprefix(PROJECT_IMAGE_PREFIX) / "Dockerfile"
        assert dockerfile.is_file(), f"infra/{where}: image {image} has no {dockerfile.relative_to(ROOT)}"
        project_tags.add(tag)
    assert len(project_tags) == 1, f"the project images should share one tag, found {sorted(project_tags)}"
    used = {_split_image(i)[0].rsplit("/", 1)[-1] for i, w in refs if w != "README.md"}
    assert {"wuerstchen-pipelines", "wuerstchen-mlflow"} <= used


def test_readme_builds_each_image_from_its_dockerfile():
    for dockerfile, image in re.findall(r"docker build -f (\S+) -t (\S+)", README.read_text()):
        name = _split_image(image)[0].removeprefix(PROJECT_IMAGE_PREFIX)
        assert dockerfile == f"infra/docker/{name}/Dockerfile"
        assert (ROOT / dockerfile).is_file()
    built = {d for d, _ in re.findall(r"docker build -f (\S+) -t (\S+)", README.read_text())}
    on_disk = {str(p.relative_to(ROOT)) for p in INFRA.glob("docker/*/Dockerfile")}
    assert built == on_disk, "infra/README.md should show how to build every image"


# ---------------------------------------------------------------------------------------------------
# The Dockerfiles


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _dockerignore_allows(path: Path, source: str) -> bool:
    ignore = path.with_name(path.name + ".dockerignore")
    if not ignore.is_file():
        return True
    allowed = True
    for pattern in ignore.read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(source.rstrip("/"), pattern):
            allowed = negate
    return allowed


DOCKERFILES = sorted(INFRA.glob("docker/*/Dockerfile"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_copies_what_exists_and_installs_with_the_constraints(path):
    instructions = _dockerfile_instructions(path)
    copied = []
    for instruction, args in instructions:
        if instruction in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in args.split()), "no multi-stage copies expected"
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source} is not in the repository"
                assert _dockerignore_allows(path, source), f"{path.name}: {source} is excluded by the dockerignore"
                copied.append(source.rstrip("/"))
    assert "constraints.txt" in copied
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert re.search(r"pip install -c \S*constraints\.txt", runs), "pip must install with -c constraints.txt"
    pins = _constraints()
    for name, version in re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][\w.]*)", runs):
        key = name.lower().replace("_", "-")
        if key in pins:
            assert pins[key] == version, f"{path.name} pins {name}=={version}, constraints.txt {pins[key]}"

    users = [args.split()[0] for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name}: must end as a non-root USER"
    for instruction, args in instructions:
        if instruction in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            assert not any(SECRET_NAME.search(n) for n in names), f"{path.name}: {instruction} {args}"


def test_pipelines_image_holds_the_packages_and_configs_on_the_supported_python():
    path = INFRA / "docker" / "pipelines" / "Dockerfile"
    instructions = _dockerfile_instructions(path)
    copied = {w.rstrip("/") for i, a in instructions if i == "COPY" for w in a.split()[:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"configs", "weights", "pyproject.toml", "README.md"} <= copied, "the image misses part of the project"
    base = next(args for instruction, args in instructions if instruction == "FROM")
    version = re.match(r"python:(\d+)\.(\d+)", base)
    assert version, f"FROM {base}: expected a python:<major>.<minor> base"
    from packaging.specifiers import SpecifierSet

    assert f"{version.group(1)}.{version.group(2)}" in SpecifierSet(project["project"]["requires-python"])
    workdir = [args for instruction, args in instructions if instruction == "WORKDIR"]
    assert workdir == ["/app"], "the manifests run the jobs from /app"


# ---------------------------------------------------------------------------------------------------
# The Ray cluster launcher config


def test_cluster_config_passes_rays_own_validation():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    # What `ray up` itself does before launching: fill in the provider's defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_cluster_config_has_a_cpu_head_gpu_workers_and_token_auth():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"]), "the head has no GPU"
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers
    for name, node_type in workers.items():
        assert re.match(r"(g|p)\d", node_type["node_config"]["InstanceType"]), f"{name}: not a GPU instance"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["provider"]["type"] == "aws"
    assert any("RAY_AUTH_MODE=token" in option for option in config["docker"]["run_options"])
    assert any(remote.endswith(".ray/auth_token") for remote in config["file_mounts"])
    assert not any("dashboard-host" in cmd for cmd in config["head_start_ray_commands"]), (
        "the dashboard stays on the head's 127.0.0.1, reached through `ray dashboard`"
    )


# ---------------------------------------------------------------------------------------------------
# No secrets


_SECRET_PATTERNS = [
    (re.compile(r"\b(AKIA|ASIA|A3T[A-Z0-9])[A-Z0-9]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}"), "an AWS secret key"),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@$]+:(?![$*{])[^@/\s]+@"), "a URI with a password"),
    (
        re.compile(r"(?i)\b(password|passwd|secret|token|api_key)[ \t]*[:=][ \t]*['\"]?(?![$<{(])[A-Za-z0-9/+_\-]{8,}"),
        "a literal password, secret or token",
    ),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b|\bhf_[A-Za-z0-9]{30,}\b"), "an access token"),
]


@pytest.mark.parametrize("path", _text_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_no_file_holds_a_literal_secret(path):
    text = path.read_text()
    for pattern, what in _SECRET_PATTERNS:
        match = pattern.search(text)
        assert not match, f"infra/{path.relative_to(INFRA)} holds {what}: {match.group(0)[:40]!r}"


def test_secret_env_vars_come_from_secrets_and_no_secret_object_is_committed():
    for path, doc in _manifests():
        assert doc["kind"] != "Secret", f"{path}: Secrets are created out of band, never committed"
        for pod in _pod_specs(doc):
            for container in _containers(pod):
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env, f"{path}: {env['name']} has a literal value"
                        assert "secretKeyRef" in env.get("valueFrom", {}), f"{path}: {env['name']} not from a Secret"


def test_the_secret_checks_catch_what_they_should():
    samples = {
        "AKIAIOSFODNN7EXAMPLE": "an AWS access key id",
        "postgresql://mlflow:hunter2secret@db:5432/mlflow": "a URI with a password",
        "password: hunter2hunter2": "a literal password, secret or token",
        "-----BEGIN RSA PRIVATE KEY-----": "a private key",
    }
    for sample, what in samples.items():
        assert any(p.search(sample) and w == what for p, w in _SECRET_PATTERNS), sample
    harmless = [
        'password="$(openssl rand -hex 24)"',
        "postgresql://mlflow@wuerstchen-postgres:5432/mlflow",
        "RAY_AUTH_TOKEN=$(kubectl get secret CLUSTER)",
        "key: password",
    ]
    for sample in harmless:
        assert not any(p.search(sample) for p, _ in _SECRET_PATTERNS), sample
