"""deploy/k8s and deploy/Dockerfile: render, validate, and check they agree with the code.

- ``kubectl kustomize`` renders the aggregator base, the clinic agent and the example
  overlay; every rendered object is validated against the Kubernetes OpenAPI schemas
  bundled with kubernetes-validate (offline), strictly (unknown fields are errors);
- the manifests are hardened (non-root, read-only root, no capabilities, RuntimeDefault
  seccomp, resources) and consistent with each other and with the TOML configs they
  ship, which the daemons' own config loaders accept;
- the kubelet's probe target, the plaintext health port, really answers grpc.health.v1
  on a running aggregator while the mutual-TLS port does not;
- the Dockerfile is structurally sound (a small lint: no Docker engine here).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from federation_harness import Federation
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki_fixtures import FederationPKI, make_federation

from aggregator.config import ServerSection, ValidationSection, load_aggregator_config
from clinic_agent.config import load_clinic_config
from dermafed.cli import build_parser
from dermafed.v1 import federation_pb2, federation_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
# The newest schemas kubernetes-validate bundles, and an older release still in service.
K8S_VERSIONS = (kubernetes_validate.latest_version(), "1.30.0")
IMAGE_UID = 10001


def require_binary(name: str) -> str:
    """The binary's path; skip without it, except in CI where it must be installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (needed to render the kustomizations)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run this test")
        pytest.skip(message)
    return path


def render(kustomization: Path) -> list[dict[str, Any]]:
    kubectl = require_binary("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S / "base")


@pytest.fixture(scope="module")
def clinic() -> list[dict[str, Any]]:
    return render(K8S / "clinic")


@pytest.fixture(scope="module")
def example() -> list[dict[str, Any]]:
    return render(K8S / "overlays" / "example")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FederationPKI:
    return make_federation(tmp_path_factory.mktemp("pki"))


# --- schema validation ----------------------------------------------------------------


@pytest.mark.parametrize("folder", ["base", "clinic", "overlays/example"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_validate_against_kubernetes_schemas(folder: str, version: str):
    docs = render(K8S / folder)
    assert docs
    for doc in docs:
        where = f"{folder}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is invalid for Kubernetes {version}: {exc.message}")


def test_podmonitor_component_renders_and_matches_the_aggregator(tmp_path: Path):
    overlay = tmp_path / "with-podmonitor"
    overlay.mkdir()
    # As in an overlay: components' resources take the overlay's namespace.
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "namespace": "dermafed-monitored",
                "resources": [os.path.relpath(K8S / "base", overlay)],
                "components": [os.path.relpath(K8S / "components" / "podmonitor", overlay)],
            }
        )
    )
    docs = render(overlay)
    monitor = one(docs, "PodMonitor")
    statefulset = one(docs, "StatefulSet")
    # A CRD: no bundled schema, so check what matters by hand.
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["metadata"]["namespace"]
        == statefulset["metadata"]["namespace"]
        == "dermafed-monitored"
    )
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {
        p["name"] for p in statefulset["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert {"PodMonitor"} & {d["kind"] for d in render(K8S / "base")} == set(), (
        "the PodMonitor must stay optional (it needs the operator's CRDs)"
    )


# --- hardening -------------------------------------------------------------------------


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def assert_hardened(workload: dict[str, Any]) -> None:
    spec = pod_spec(workload)
    assert spec["automountServiceAccountToken"] is False
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == IMAGE_UID
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
        # Read-only root: the only writable places are mounted volumes.
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_workloads_are_hardened(base: list[dict[str, Any]], clinic: list[dict[str, Any]]):
    assert_hardened(one(base, "StatefulSet"))
    assert_hardened(one(clinic, "Deployment"))
    for docs in (base, clinic):
        ns = one(docs, "Namespace")
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_aggregator_is_a_single_stateful_replica_with_its_own_volume(base):
    sts = one(base, "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m for m in pod_spec(sts)["containers"][0]["volumeMounts"]}
    assert mounts["state"]["mountPath"] == "/var/lib/dermafed" and "state" in claims
    assert claims["state"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one(base, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    for secret_mount in ("tls", "crl"):
        # No subPath: rotated certificates and new CRLs must reach the running process.
        assert mounts[secret_mount]["readOnly"] is True and "subPath" not in mounts[secret_mount]


def test_clinic_agent_is_never_two_writers_of_its_privacy_ledger(clinic):
    deployment = one(clinic, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    pvc = one(clinic, "PersistentVolumeClaim")
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mounts = {m["name"]: m for m in pod_spec(deployment)["containers"][0]["volumeMounts"]}
    assert mounts["images"]["readOnly"] is True
    assert volumes["images"]["persistentVolumeClaim"]["readOnly"] is True


def test_network_policies(base, clinic):
    policy = one(base, "NetworkPolicy")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["egress"] == [], "the aggregator never opens connections"
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert set(rules) == {7443, 9464}
    assert "from" not in rules[7443], "clinics connect from anywhere (mTLS decides)"
    assert rules[9464]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    agent_policy = one(clinic, "NetworkPolicy")
    assert [r["ports"][0]["port"] for r in agent_policy["spec"]["ingress"]] == [9464]
    egress_ports = {p["port"] for r in agent_policy["spec"]["egress"] for p in r["ports"]}
    assert egress_ports == {53, 7443}


# --- manifests agree with the shipped configs, and the loaders accept those ---------------


def config_text(docs: list[dict[str, Any]], key: str) -> str:
    maps = [d for d in docs if d["kind"] == "ConfigMap" and key in d.get("data", {})]
    assert len(maps) == 1, f"no single ConfigMap carries {key}"
    text: str = maps[0]["data"][key]
    return text


def port_of(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])


def container_ports(workload: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in pod_spec(workload)["containers"][0]["ports"]}


def test_aggregator_manifests_match_its_config(base):
    sts = one(base, "StatefulSet")
    container = pod_spec(sts)["containers"][0]
    config = tomllib.loads(config_text(base, "aggregator.toml"))
    ports = container_ports(sts)
    assert ports["grpc"] == port_of(config["server"]["listen"]) == 7443
    assert ports["metrics"] == port_of(config["metrics"]["listen"])
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    # Every probe targets the plaintext health-only port, never the mTLS port.
    health_port = port_of(config["server"]["health_listen"])
    assert ports["grpc-health"] == health_port != ports["grpc"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == "dermafed.v1.Federation"
    service = one(base, "Service", "dermafed-aggregator")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": ports["grpc"],
        "metrics": ports["metrics"],
        "admin": ports["grpc-admin"],
    }
    # The Admin API has its own port, apart from the clinics'.
    assert ports["grpc-admin"] == port_of(config["server"]["admin_listen"]) != ports["grpc"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"][-1] == f"{mounts['config']}/aggregator.toml"
    assert config["storage"]["state_dir"] == mounts["state"]
    for key in ("ca_cert", "cert", "key"):
        assert Path(config["tls"][key]).parent == Path(mounts["tls"]), key
    assert Path(config["tls"]["crl"]).parent == Path(mounts["crl"])


def test_agent_manifests_match_its_config(clinic):
    deployment = one(clinic, "Deployment")
    container = pod_spec(deployment)["containers"][0]
    config = tomllib.loads(config_text(clinic, "agent.toml"))
    assert container_ports(deployment)["metrics"] == port_of(config["metrics"]["listen"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["args"][-1] == f"{mounts['config']}/agent.toml"
    assert config["storage"]["state_dir"] == mounts["state"]
    assert config["data"]["path"] == mounts["images"]
    for key in ("ca_cert", "cert", "key"):
        assert Path(config["tls"][key]).parent == Path(mounts["tls"]), key
    assert port_of(config["aggregator"]["address"]) == 7443


def test_container_args_are_real_cli_commands(base, clinic):
    for workload in (one(base, "StatefulSet"), one(clinic, "Deployment")):
        args = pod_spec(workload)["containers"][0]["args"]
        parsed = build_parser().parse_args(args)  # exits (fails the test) if unknown
        assert callable(parsed.func)


def pod_env(paths: dict[str, Path]) -> dict[str, str]:
    """Overrides pointing what the pod's mounts provide at real files in tmp."""
    return {f"DERMAFED__{key}": str(path) for key, path in paths.items()}


def test_shipped_aggregator_configs_load_with_the_real_loader(base, example, pki, tmp_path):
    holdout = tmp_path / "holdout.csv"
    holdout.write_text("image_id,dx,lesion_id\n")
    env = pod_env(
        {
            "TLS__CA_CERT": pki.ca_cert,
            "TLS__CERT": pki.aggregator.cert,
            "TLS__KEY": pki.aggregator.key,
            "TLS__CRL": pki.crl,
            "STORAGE__STATE_DIR": tmp_path / "state",
            "VALIDATION__HOLDOUT": holdout,
        }
    )
    for name, docs in (("base", base), ("example", example)):
        path = tmp_path / f"{name}-aggregator.toml"
        path.write_text(config_text(docs, "aggregator.toml"))
        config = load_aggregator_config(path, env=env)
        assert config.server.listen == "0.0.0.0:7443"
        assert port_of(config.server.health_listen) == 7444
        # Admin never shares the port the example's load balancer exposes.
        assert port_of(config.server.admin_listen) == 7445
    assert (
        load_aggregator_config(tmp_path / "example-aggregator.toml", env=env).federation
        == "example-fed"
    )


def test_shipped_agent_config_loads_with_the_real_loader(clinic, pki, tmp_path):
    pair = pki.clinics["clinic-a"]
    (tmp_path / "data").mkdir()
    env = pod_env(
        {
            "TLS__CA_CERT": pki.ca_cert,
            "TLS__CERT": pair.cert,
            "TLS__KEY": pair.key,
            "DATA__PATH": tmp_path / "data",
            "STORAGE__STATE_DIR": tmp_path / "state",
        }
    )
    path = tmp_path / "agent.toml"
    path.write_text(config_text(clinic, "agent.toml"))
    config = load_clinic_config(path, env=env)
    assert config.metrics.listen == "0.0.0.0:9464"


def test_example_overlay_customises_the_base(base, example):
    assert {d["metadata"].get("namespace") for d in example if d["kind"] != "Namespace"} == {
        "dermafed-example"
    }
    assert one(example, "Namespace")["metadata"]["name"] == "dermafed-example"
    sts = one(example, "StatefulSet")
    assert pod_spec(sts)["containers"][0]["image"] == "registry.example.org/dermafed:0.1.0"
    service = one(example, "Service", "dermafed-aggregator")
    assert service["spec"]["type"] == "LoadBalancer"
    # Only the clinics' mTLS port is exposed to the outside; /metrics and admin stay inside.
    assert [p["port"] for p in service["spec"]["ports"]] == [7443]
    config = tomllib.loads(config_text(example, "aggregator.toml"))
    mounts = {m["name"]: m["mountPath"] for m in pod_spec(sts)["containers"][0]["volumeMounts"]}
    assert Path(config["validation"]["holdout"]).is_relative_to(mounts["holdout"])
    # The generated ConfigMap's hashed name is what the pod mounts.
    cm_name = next(d["metadata"]["name"] for d in example if d["kind"] == "ConfigMap")
    volumes = {v["name"]: v for v in pod_spec(sts)["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm_name != "dermafed-aggregator-config"


# --- the probe port answers on a real aggregator -----------------------------------------


@pytest.fixture
def aggregator_with_health_port(tmp_path: Path) -> Iterator[Federation]:
    data = tmp_path / "empty-data"
    data.mkdir()
    fed = Federation(tmp_path, make_federation(tmp_path / "pki"), {"clinic-a": data}, data)
    try:
        fed.start_aggregator(
            fed.aggregator_config(
                server=ServerSection(listen="127.0.0.1:0", health_listen="127.0.0.1:0"),
                validation=ValidationSection(),
            )
        )
        yield fed
    finally:
        fed.stop()


def test_kubelet_can_probe_the_health_port_but_not_the_mtls_port(aggregator_with_health_port):
    service = aggregator_with_health_port.service
    assert service is not None and service.health_port
    with grpc.insecure_channel(f"127.0.0.1:{service.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "dermafed.v1.Federation"):  # liveness, readiness
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        # Nothing but health is served there.
        with pytest.raises(grpc.RpcError) as err:
            federation_pb2_grpc.FederationStub(channel).Poll(
                federation_pb2.PollRequest(), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # What a probe without a client certificate gets from the federation port.
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# --- Dockerfile lint -------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_is_multistage_cpu_only_and_runs_as_the_manifests_user(base, clinic):
    instructions = dockerfile_instructions()
    stages = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    assert len(stages) >= 2, "build tools must stay out of the runtime stage"
    final = instructions[stages[-1] :]
    users = [arg for kw, arg in final if kw == "USER"]
    assert users, "the runtime stage must drop root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot needs it)"
    for docs, kind in ((base, "StatefulSet"), (clinic, "Deployment")):
        assert pod_spec(one(docs, kind))["securityContext"]["runAsUser"] == int(uid)
    entrypoint = [arg for kw, arg in final if kw == "ENTRYPOINT"]
    assert entrypoint == ['["dermafed"]'], "exec-form ENTRYPOINT of the project's CLI"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "dermafed" in pyproject["project"]["scripts"]

    runs = [arg for kw, arg in instructions if kw == "RUN"]
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    torch_runs = [i for i, r in enumerate(runs) if torch_pin in shlex.split(r)]
    assert torch_runs, f"the image must install {torch_pin} (the project's pin)"
    assert "--index-url" in runs[torch_runs[0]] and "/whl/cpu" in runs[torch_runs[0]]
    project_runs = [i for i, r in enumerate(runs) if re.search(r"pip install .*\s\.(\s|$)", r)]
    assert project_runs and torch_runs[0] < project_runs[0], (
        "CPU torch first, or pip resolves the CUDA build for the project's dependency"
    )
    locked = "--require-hashes -r requirements/runtime.lock"
    lock_runs = [i for i, r in enumerate(runs) if locked in r]
    assert lock_runs and torch_runs[0] < lock_runs[0] < project_runs[0], (
        "the locked dependencies, hash-checked, between torch and the project"
    )
    assert "--no-deps" in shlex.split(runs[project_runs[0]]), "the project must resolve nothing"


def test_dockerfile_copies_no_secrets():
    instructions = dockerfile_instructions()
    assert not [arg for kw, arg in instructions if kw == "ADD"], "use COPY, not ADD"
    for kw, arg in instructions:
        if kw in ("ENV", "ARG"):
            assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN)\w*=", arg, re.I), arg
        if kw == "COPY":
            sources = [s for s in shlex.split(arg) if not s.startswith("--")][:-1]
            for source in sources:
                assert not re.search(r"pki|\.key|\.pem|\.venv|tests|demo", source), source
                if "--from=" not in arg:
                    assert (REPO / source).exists(), f"COPY {source}: no such path"
    ignore = DOCKERIGNORE.read_text().splitlines()
    assert "*" in ignore, "the context starts from nothing and lets back what is needed"
    assert "**/*.key" in ignore and "**/*.pem" in ignore
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for package in packages:
        assert f"!{package.rstrip('*')}/" in ignore, f"{package} missing from the build context"


def test_dockerfile_exposes_the_manifests_ports(base):
    exposed = {
        int(p) for kw, arg in dockerfile_instructions() if kw == "EXPOSE" for p in arg.split()
    }
    assert set(container_ports(one(base, "StatefulSet")).values()) == exposed


def test_the_readme_steps_give_the_example_overlay_certificates_and_volumes_it_accepts(
    example, tmp_path: Path
):
    """README's Kubernetes block, run with the real CLI: a CA for the overlay's federation,
    an aggregator certificate that names the Service clinics in the cluster dial; and
    every volume claim the overlay mounts is one it creates."""
    from cryptography import x509

    from common.identity import identity_from_certificate
    from common.pki import load_certificate
    from dermafed.cli import main

    readme = (REPO / "README.md").read_text()
    start = readme.index("dermafed pki init --federation example-fed")
    block = readme[start : readme.index("```", start)].replace("\\\n", " ")
    federation = tomllib.loads((K8S / "overlays" / "example" / "aggregator.toml").read_text())[
        "federation"
    ]
    for line in block.splitlines():
        if line.startswith("dermafed pki "):
            args = [a for a in shlex.split(line)[1:] if a != "--encrypt"]
            args = [str(tmp_path / a) if a.startswith("pki/") else a for a in args]
            assert main(args) == 0, line
    cert = load_certificate(tmp_path / "pki" / "aggregator" / "aggregator.crt")
    identity = identity_from_certificate(cert, federation)
    assert identity.role == "aggregator"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    service = one(example, "Service", "dermafed-aggregator")
    in_cluster = f"dermafed-aggregator.{service['metadata']['namespace']}.svc"
    assert in_cluster in names.get_values_for_type(x509.DNSName)

    claims = {
        volume["persistentVolumeClaim"]["claimName"]
        for volume in one(example, "StatefulSet", "dermafed-aggregator")["spec"]["template"][
            "spec"
        ]["volumes"]
        if "persistentVolumeClaim" in volume
    }
    created = {d["metadata"]["name"] for d in example if d["kind"] == "PersistentVolumeClaim"}
    assert claims and claims <= created
