"""deploy/k8s: every overlay renders with kubectl kustomize, passes the Kubernetes schemas offline
(kubernetes-validate, strict), and agrees with the code: flags, env names, ports, drain time."""

from __future__ import annotations

import inspect

import kubernetes_validate
import pytest
import yaml

from pdmesh.config import SchedulerConfig
from pdmesh.exporter.exporter_config import ExporterConfig
from pdmesh.exporter.series import SERIES
from pdmesh.worker.main import run_worker
from support.deploy_files import (DEPLOY, OVERLAYS, flag_default, flags_in, known_env, known_flags, kustomize,
                                  of_kind)

K8S_VERSIONS = ("1.29", "1.32")  # native gRPC probes are GA from 1.27; kubectl here is 1.32
WORKER_DRAIN_S = inspect.signature(run_worker).parameters["grace_s"].default


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request):
    return kustomize(request.param)


def containers(objects):
    """(deployment name, container, pdmesh command) for every pdmesh container."""
    for name, deployment in of_kind(objects, "Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield name, container, container["args"][0]


def env_of(objects, container) -> dict[str, str | None]:
    """Every variable the container gets: its ConfigMaps' keys and its own env (None: from a field)."""
    maps = of_kind(objects, "ConfigMap")
    env = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e.get("value") for e in container.get("env", [])})
    return env


def port_of(container, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_every_overlay_has_each_role(objects):
    assert set(of_kind(objects, "Deployment")) == {f"pdmesh-{r}" for r in ("scheduler", "prefill", "decode",
                                                                         "exporter")}
    assert set(of_kind(objects, "HorizontalPodAutoscaler")) == {"pdmesh-prefill", "pdmesh-decode"}
    assert set(of_kind(objects, "PodDisruptionBudget")) == {"pdmesh-prefill", "pdmesh-decode"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_pass_the_kubernetes_schemas(objects, version):
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_every_env_name_and_flag_exists_in_the_cli(objects):
    for name, container, command in containers(objects):
        unknown = {k for k in env_of(objects, container) if k.startswith("PDMESH_")} - known_env(command)
        assert not unknown, f"{name} sets {unknown}, which `pdmesh {command}` does not read"
        assert flags_in(container["args"]) <= known_flags(command), name


def test_ports_match_the_code(objects):
    for name, container, command in containers(objects):
        env = env_of(objects, container)
        if command == "scheduler":
            assert port_of(container, "grpc") == int(env["PDMESH_PORT"]) == SchedulerConfig().listen.port
            assert port_of(container, "internal") == int(env["PDMESH_INTERNAL_PORT"]) == flag_default(
                "scheduler", "internal-port")
            assert port_of(container, "http") == int(env["PDMESH_HTTP_PORT"]) == SchedulerConfig().http_port
        elif command == "exporter":
            assert port_of(container, "http-metrics") == int(env["PDMESH_PORT"]) == ExporterConfig().port
        else:  # workers' default port is 0 (a free one): the manifests fix one, and use it everywhere
            assert port_of(container, "grpc") == int(env["PDMESH_PORT"])
        if command != "exporter":
            assert port_of(container, "metrics") == int(env["PDMESH_METRICS_PORT"])


def test_services_target_named_container_ports(objects):
    deployments = of_kind(objects, "Deployment")
    for name, service in of_kind(objects, "Service").items():
        component = service["spec"]["selector"]["app.kubernetes.io/component"]
        container = deployments[f"pdmesh-{component}"]["spec"]["template"]["spec"]["containers"][0]
        for port in service["spec"]["ports"]:
            assert port_of(container, port["targetPort"]) == port["port"], f"{name}: {port}"


def test_services_are_found_by_name_never_by_ip(objects):
    services = of_kind(objects, "Service")
    for name, container, command in containers(objects):
        if command == "scheduler":
            continue
        host, port = env_of(objects, container)["PDMESH_SCHEDULER"].rsplit(":", 1)
        wanted = "pdmesh-scheduler" if command == "exporter" else "pdmesh-scheduler-internal"
        assert host == wanted, f"{name} dials {host}"
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}
        if command != "exporter":
            assert env_of(objects, container)["PDMESH_ADVERTISE_ADDRESS"] is None  # from the pod IP


def test_grpc_probes_on_the_grpc_port_and_drain_fits_the_grace_period(objects):
    for name, container, command in containers(objects):
        pod = of_kind(objects, "Deployment")[name]["spec"]["template"]["spec"]
        if command == "exporter":
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            continue
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port_of(container, "grpc"), (name, probe)
        pre_stop = int(container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [0, 0])[1])
        assert pod["terminationGracePeriodSeconds"] > pre_stop + WORKER_DRAIN_S, name
        live = container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > WORKER_DRAIN_S, f"{name}: liveness kills a drain"


def test_pods_run_as_non_root_with_the_cluster_secret_mounted(objects):
    for name, container, command in containers(objects):
        pod = of_kind(objects, "Deployment")[name]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["allowPrivilegeEscalation"] is False
        if command == "exporter":
            continue
        secret_file = env_of(objects, container)["PDMESH_CLUSTER_SECRET_FILE"]
        mount = next(m for m in container["volumeMounts"] if secret_file.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "pdmesh-cluster-secret"


def test_workers_spread_over_nodes_and_have_resources(objects):
    for name, container, command in containers(objects):
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        if command in ("prefill", "decode"):
            pod = of_kind(objects, "Deployment")[name]["spec"]["template"]["spec"]
            term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
            assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == command


def test_gpu_overlay_runs_one_tp_group_over_the_pods_gpus():
    for name, container, command in containers(kustomize("gpu")):
        if command in ("prefill", "decode"):
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["PDMESH_TP"] == container["resources"]["limits"]["nvidia.com/gpu"], name
            pod = of_kind(kustomize("gpu"), "Deployment")[name]["spec"]["template"]["spec"]
            assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def selects(peer: dict, labels: dict) -> bool:
    """Whether a NetworkPolicy `from` peer (pod selector only, this namespace) admits pods with `labels`."""
    if set(peer) != {"podSelector"}:
        return False
    selector = peer["podSelector"]
    return (selector.get("matchLabels", {}).items() <= labels.items()
            and all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", [])))


def test_network_policies_keep_internal_ports_to_mesh_pods(objects):
    """The scheduler's internal port and every worker port (gRPC and KV channels) admit the
    scheduler's and the workers' pods and no other; the client ports (gRPC, HTTP) admit anyone."""
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in of_kind(objects, "Deployment").items()}
    mesh = {"pdmesh-scheduler", "pdmesh-prefill", "pdmesh-decode"}
    policies = of_kind(objects, "NetworkPolicy")
    scheduler = policies["pdmesh-scheduler"]["spec"]["ingress"]
    internal = [rule for rule in scheduler if {"port": 50052} in rule.get("ports", [])]
    workers = [rule for rule in policies["pdmesh-workers"]["spec"]["ingress"] if "ports" not in rule]
    for rules in (internal, workers):
        assert len(rules) == 1
        admitted = {name for name, labels in pod_labels.items() if any(selects(p, labels) for p in rules[0]["from"])}
        assert admitted == mesh and len(rules[0]["from"]) == 1
    assert any("from" not in rule and rule["ports"] == [{"port": 50051}, {"port": 8000}] for rule in scheduler)


def test_hpa_metrics_are_adapter_rules_over_exporter_series(objects):
    values = yaml.safe_load((DEPLOY / "k8s" / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    served = {}
    for rule in values["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0]
        assert series in SERIES, f"adapter rule reads {series}, which the exporter does not serve"
        served[rule["name"]["as"]] = rule
    for name, hpa in of_kind(objects, "HorizontalPodAutoscaler").items():
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        for metric in hpa["spec"]["metrics"]:
            assert metric["object"]["describedObject"]["name"] == "pdmesh-exporter"
            assert metric["object"]["metric"]["name"] in served
