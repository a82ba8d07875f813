"""deploy/k8s: every manifest is valid Kubernetes (offline, against the schemas that the
kubernetes-validate package bundles) and agrees with the code it runs."""

from __future__ import annotations

import argparse
import pathlib
import shlex

import pytest
import yaml

from pdserve.config import ModelConfig, RouterConfig, ServerConfig, add_config_args, config_from_args

K8S = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.33.0"
NODE_ROLES = ("prefill", "decode")


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def containers(docs: list[dict], kind: str = "Deployment") -> list[tuple[dict, dict]]:
    return [(d, c) for d in docs if d["kind"] == kind for c in d["spec"]["template"]["spec"]["containers"]]


def pdserve_containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    return [(d, c) for d, c in containers(docs) if c["image"].startswith("pdserve:")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse a container's args with the real parser of its pdserve subcommand (flags must exist)."""
    command, rest = argv[0], argv[1:]
    if command == "router":
        from pdserve.router.server import build_parser
        args = build_parser().parse_args(rest)
        values = {k: v for k, v in vars(args).items() if k != "log_level"}
        config_from_args(RouterConfig, values)
        config_from_args(ModelConfig, values)
        return args
    assert command in NODE_ROLES, f"unexpected pdserve command {command!r}"
    parser = argparse.ArgumentParser(exit_on_error=False)   # as pdserve.node_base.run_node builds it
    add_config_args(parser, ServerConfig)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(rest)
    config_from_args(ServerConfig, {k: v for k, v in vars(args).items() if k != "log_level"}, role=command)
    return args


def test_every_manifest_is_valid_kubernetes_offline():
    import kubernetes_validate

    docs = documents()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PersistentVolumeClaim"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_validation_catches_a_broken_manifest():
    import kubernetes_validate

    deployment = next(d for d in documents() if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5   # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    with pytest.raises(SystemExit):
        parse_args(["decode", "--no-such-flag", "1"])


def test_container_args_are_real_flags_and_ports_line_up():
    docs = pdserve_containers(documents())
    assert sorted(c["args"][0] for _, c in docs) == ["decode", "prefill", "router"]
    for deployment, c in docs:
        args = parse_args(c["args"])
        ports = {p["containerPort"] for p in c["ports"]}
        assert args.model_path.startswith("/models/"), c["name"]
        assert args.registry_url == "redis://pdserve-redis:6379/0"
        if c["args"][0] == "router":
            assert ports == {args.port}
            continue
        assert ports == {args.port, args.bootstrap_port, args.metrics_port}, c["name"]
        assert args.host == "$(POD_IP)" and any(e["name"] == "POD_IP" for e in c["env"])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["image"] == "pdserve:gpu"


def test_probes_drain_and_grace_period():
    for deployment, c in pdserve_containers(documents()):
        pod = deployment["spec"]["template"]["spec"]
        args = parse_args(c["args"])
        ready = c["readinessProbe"]["httpGet"]
        assert ready["path"] == "/health"
        assert "livenessProbe" in c and "preStop" in c["lifecycle"]
        if c["args"][0] == "router":
            assert ready["port"] == args.port
            continue
        # nodes: probes on the node's own HTTP server; preStop starts the drain and waits for it
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": args.metrics_port}, probe
        hook = shlex.join(c["lifecycle"]["preStop"]["exec"]["command"])
        assert "kill -TERM 1" in hook and "kill -0 1" in hook
        assert 0 < args.drain_timeout_s < pod["terminationGracePeriodSeconds"]


def test_volumes_claims_services_and_registry_agree():
    docs = documents()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for deployment, c in containers(docs):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
            "labels"].items()
        for mount in c.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert any(svc["spec"]["selector"].items() <= labels.items() for labels in pods), svc["metadata"]["name"]
    from pdserve.redis_server import KEYSPACE_EVENTS
    (redis,) = [c for _, c in containers(docs) if c["name"] == "redis"]
    assert redis["args"] == ["--notify-keyspace-events", KEYSPACE_EVENTS]
