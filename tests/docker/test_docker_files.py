"""docker/k8s, docker/compose*.yaml and docker/Dockerfile, checked offline (runs in CI, no
cluster, no Docker engine).

Every Kubernetes manifest and the output of both kustomizations (CPU: docker/k8s, GPU:
docker/k8s/gpu) are validated against the Kubernetes 1.31 OpenAPI schema with
kubernetes-validate --strict. The kustomizations use `resources` only, so a small loader renders
them here; where `kubectl kustomize` exists its output must be the same resources. Then the
things the schema cannot know: the Indexed Job's shard count, probes on the plaintext health
ports, metrics annotations, the restricted security settings, flags the CLI really has, and
environment variables from the shared contract.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
K8S_VERSION = "1.31.0"
VARIANTS = {"cpu-variant": K8S, "gpu-variant": K8S / "gpu"}  # ids: not the gpu marker

# environment variables a container may be given (the shared contract, plus runtime basics)
CONTRACT_ENV = {
    "DFF_HOST", "DFF_TLS_CERT", "DFF_TLS_KEY", "DFF_TLS_CLIENT_CA", "DFF_AUTH_TOKENS",
    "DFF_HEALTH_PORT", "DFF_METRICS_PORT", "DFF_CLIENT_TLS_CA", "DFF_CLIENT_TLS_CERT",
    "DFF_CLIENT_TLS_KEY", "DFF_TOKEN_FILE", "DFF_TOKEN", "DFF_FEATURE_TLS_CA",
    "DFF_FEATURE_TLS_CERT", "DFF_FEATURE_TLS_KEY", "DFF_FEATURE_TOKEN_FILE",
    "JOB_COMPLETIONS", "DFF_HOME", "TMPDIR", "MPLCONFIGDIR",
    # tuning an operator sets in the manifest (README's table of environment variables)
    "DFF_WORKERS", "DFF_PINNED_MB",
}
PORTS = {"feature-server": (50051, 50061, 9101), "engine": (50052, 50062, 9102)}


def load_docs(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization with only `resources:` produces, in order."""
    kust = load_docs(directory / "kustomization.yaml")[0]
    unsupported = set(kust) - {"apiVersion", "kind", "resources"}
    assert not unsupported, f"{directory}: this loader renders `resources` only, not {unsupported}"
    docs: list[dict[str, Any]] = []
    for entry in kust["resources"]:
        target = (directory / entry).resolve()
        docs += render(target) if target.is_dir() else load_docs(target)
    return docs


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(d) for name, d in VARIANTS.items()}


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job")]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_file_valid(path):
    import kubernetes_validate

    docs = load_docs(path)
    assert docs, f"{path} holds no resource"
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kustomization_output_valid(rendered, variant):
    import kubernetes_validate

    docs = rendered[variant]
    keys = [key(d) for d in docs]
    assert len(keys) == len(set(keys)), f"duplicate resources in {variant}"
    kinds = {k[0] for k in keys}
    assert {"Namespace", "Deployment", "Service", "Job", "HorizontalPodAutoscaler",
            "PersistentVolumeClaim"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # every manifest file is part of some variant (tools/ holds helpers applied by hand)
    used = {key(d) for v in rendered.values() for d in v}
    for path in manifest_files():
        if path.parent.name == "tools":
            continue
        for doc in load_docs(path):
            assert key(doc) in used, f"{path}: {key(doc)} is in no kustomization"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loader_matches_kubectl_kustomize(rendered, variant):
    res = subprocess.run(["kubectl", "kustomize", str(VARIANTS[variant])], capture_output=True,
                         text=True, timeout=120, check=False)
    if res.returncode != 0 and "unknown command" in res.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert res.returncode == 0, res.stderr
    theirs = {key(d): d for d in yaml.safe_load_all(res.stdout) if d}
    ours = {key(d): d for d in rendered[variant]}
    assert theirs == ours


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_indexed_export_job(rendered, variant):
    (job,) = [d for d in rendered[variant] if d["kind"] == "Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert 1 < spec["parallelism"] <= spec["completions"]
    (container,) = pod_spec(job)["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    # Kubernetes sets JOB_COMPLETION_INDEX itself but not the shard count: it must match
    assert env["JOB_COMPLETIONS"] == str(spec["completions"])
    assert container["args"][0] == "/data" and "--engine" in container["args"]
    assert "--shard" not in container["args"], "the shard comes from the Job's environment"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_servers_probes_metrics_secrets(rendered, variant):
    docs = rendered[variant]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["dff-feature-server"]["spec"]["clusterIP"] == "None"  # headless
    for name, (grpc_port, health, metrics) in PORTS.items():
        (dep,) = [d for d in docs if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == f"dff-{name}"]
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics)
        (c,) = pod_spec(dep)["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["DFF_HEALTH_PORT"] == str(health) and env["DFF_METRICS_PORT"] == str(metrics)
        assert {p["containerPort"] for p in c["ports"]} == {grpc_port, health, metrics}
        for probe in ("readinessProbe", "livenessProbe"):
            # kubelet probes speak plaintext gRPC without a token: the health-only port
            assert c[probe]["grpc"]["port"] == health, (name, probe)
        assert c["args"][c["args"].index("--port") + 1] == str(grpc_port)
        assert c["args"][c["args"].index("--host") + 1] == "0.0.0.0"
        for var in ("DFF_TLS_CERT", "DFF_TLS_KEY", "DFF_TLS_CLIENT_CA", "DFF_AUTH_TOKENS"):
            mounted = [m["mountPath"] for m in c["volumeMounts"]]
            assert any(env[var].startswith(m + "/") for m in mounted), (name, var)
        secret_volumes = [v for v in pod_spec(dep)["volumes"] if "secret" in v]
        assert len(secret_volumes) == 2  # TLS files and tokens, mounted as files
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "dff-feature-server"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_restricted_security(rendered, variant):
    for doc in workloads(rendered[variant]):
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
            unknown = {e["name"] for e in c.get("env", [])} - CONTRACT_ENV
            assert not unknown, f"{doc['metadata']['name']}: env not in the contract: {unknown}"


def _cli_options(*command: str) -> set[str]:
    from exporter.cli import build_parser

    parser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[word]
    return {o for a in parser._actions for o in a.option_strings}


def _flags(args: list[str]) -> set[str]:
    return {a for a in args if a.startswith("--")}


def test_args_are_real_cli_flags(rendered):
    commands = {"feature-server": ("serve", "features"), "engine": ("serve", "engine"),
                "export": ("discover",)}
    for docs in rendered.values():
        for doc in workloads(docs):
            (c,) = pod_spec(doc)["containers"]
            role = c["name"]
            missing = _flags(c["args"]) - _cli_options(*commands[role])
            assert not missing, f"{role}: the CLI has no {missing}"


def test_compose_files():
    base = load_docs(ROOT / "docker" / "compose.yaml")[0]
    secure = load_docs(ROOT / "docker" / "compose.secure.yaml")[0]
    gpu = load_docs(ROOT / "docker" / "compose.gpu.yaml")[0]
    assert "name" not in base, "Compose 1.29 refuses a top-level name: (use -p)"
    assert set(base["services"]) == {"feature-server", "engine", "export"}
    commands = {"feature-server": ("serve", "features"), "engine": ("serve", "engine"),
                "export": ("discover",)}
    for name, svc in base["services"].items():
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert any(t.startswith("/tmp") for t in svc["tmpfs"]), name
        missing = _flags(svc["command"]) - _cli_options(*commands[name])
        assert not missing, f"{name}: the CLI has no {missing}"
    for name in ("feature-server", "engine"):
        assert base["services"][name]["restart"] == "unless-stopped"
        assert "exporter.healthcheck" in " ".join(base["services"][name]["healthcheck"]["test"])
    # the secure override: every service gets its secrets as files and contract variables only
    declared = set(secure["secrets"])
    for name, svc in secure["services"].items():
        assert set(svc["secrets"]) <= declared, name
        env = svc["environment"]
        assert set(env) <= CONTRACT_ENV, name
        files = [v for k, v in env.items()
                 if k.endswith(("_CERT", "_KEY", "_CA", "_FILE", "TOKENS"))]
        assert files and all(f.startswith("/run/secrets/") and f[13:] in svc["secrets"]
                             for f in files), name
    for name, (_, health, metrics) in PORTS.items():
        env = secure["services"][name]["environment"]
        assert env["DFF_HEALTH_PORT"] == str(health) and env["DFF_METRICS_PORT"] == str(metrics)
    gpu_fs = gpu["services"]["feature-server"]
    assert gpu_fs["build"]["target"] == "feature-server-gpu"
    assert _flags(gpu_fs["command"]) <= _cli_options("serve", "features")
    (device,) = gpu_fs["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_1_29_parses(tmp_path):
    """Compose 1.29 (Debian's docker-compose) accepts every combination of the compose files."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in load_docs(ROOT / "docker" / "compose.secure.yaml")[0]["secrets"]:
        (secrets / name).write_text("x")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "DFF_SECRETS": str(secrets)}
    for extra in ([], ["compose.secure.yaml"], ["compose.gpu.yaml"]):
        files = [a for f in ["compose.yaml", *extra] for a in ("-f", str(ROOT / "docker" / f))]
        res = subprocess.run(["docker-compose", "-p", "dff", *files, "config", "-q"], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, (extra, res.stderr)


def _dockerfile_stages() -> dict[str, list[str]]:
    """name -> the instructions of that stage (continuation lines joined), in file order."""
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return stages


def test_dockerfile_roles():
    stages = _dockerfile_stages()
    order = list(stages)
    # Docker's legacy builder runs every stage before the target: the heavy optional stages
    # (torch for the bundled models, the CUDA wheels) must come after the CPU roles
    for heavy in ("models", "build-gpu"):
        assert order.index(heavy) > max(order.index(r) for r in ("feature-server", "engine",
                                                                   "exporter")), heavy
    servers = {"feature-server": "50051", "feature-server-gpu": "50051", "engine": "50052"}
    for role in (*servers, "exporter"):
        body = " ".join(stages[role])
        assert 'ENTRYPOINT ["dff",' in body, role  # exec form
        if role in servers:
            # the health check falls back to the service port when DFF_HEALTH_PORT is unset
            assert "exporter.healthcheck" in body and f"p={servers[role]}" in body, role
            assert '"--host", "0.0.0.0"' in body, role
    # non-root: USER dff in every role (directly or through the runtime stage)
    for role in ("feature-server", "feature-server-gpu", "runtime"):
        assert "USER dff" in stages[role], role
    # the serving venvs carry no pip/setuptools; the feature server's no matplotlib
    for venv in ("venv", "venv-features", "build-gpu"):
        body = " ".join(stages[venv])
        assert "uninstall -y -q pip setuptools" in body, venv
    assert "matplotlib" in " ".join(stages["venv-features"])
    assert "COPY --from=venv-features /opt/venv /opt/venv" in stages["feature-server"]
