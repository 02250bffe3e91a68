"""The Helm chart (helm/outbox-relay), its example application chart and the plain-YAML
sidecar example.

- `helm lint --strict` of both charts, with every ci/*-values.yaml (the relay chart's
  defaults alone are refused: no brokers, no routes; ci/stdout-values.yaml adds only
  those) and the example chart's defaults;
- `helm template` of every example, each rendered object validated by kubernetes-validate
  against Kubernetes 1.30 and 1.33 in strict mode (unknown fields fail). Its schemas have
  no Prometheus Operator CRDs: ServiceMonitor, PodMonitor and PrometheusRule get a
  structural check here instead (apiVersion, required fields, ports and selectors that
  match the rendered Service and pods, every expression parsed by promql_parser);
- the relay.yaml the chart renders is loaded by the relay's own config loader, and its
  adapters built (so the chart cannot ship a config the relay refuses);
- every metric name in the dashboard and the alerts is served by a running relay's /metrics;
- no Secret and no credential is ever rendered, and a literal password is refused;
- terminationGracePeriodSeconds above relay.shutdown_timeout in every example.

helm comes from scripts/services/helm.sh (built from the Go module proxy on first use, a
few minutes, then cached): hence the module's larger timeout.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import psycopg
import pytest
import yaml

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from outbox_relay.config import Config, parse
from tests.deploy.helm_support import (
    APP_CHART,
    CHART,
    CONFIG_MOUNT,
    CONSOLE_TOKEN_VARIABLE,
    CONSOLE_VALUES,
    CRD_KINDS,
    DASHBOARD,
    DEFAULTS,
    ENDPOINT_FIELDS,
    KUBE_VERSIONS,
    METRIC,
    MONITOR_SPEC_FIELDS,
    MONITORING_API,
    NAMESPACE,
    PLAIN_SCHEMA_JOB,
    PLAIN_SIDECAR,
    RELEASE,
    RULE_FIELDS,
    RULE_GROUP_FIELDS,
    STDOUT_VALUES,
    Example,
    Helm,
    HelmError,
    Obj,
    alert_rules,
    all_variables,
    as_promql,
    console_objects,
    console_pod,
    dashboard,
    dashboard_expressions,
    env_of,
    examples,
    exposition_names,
    families_without_samples,
    install_helm,
    load_objects,
    mounted_config,
    notes_chart,
    of_kind,
    one,
    pod_specs,
    relay_config_maps,
    relay_containers,
    relay_pod,
    rendered_notes,
    required_variables,
    strings_in,
)
from tests.support.configs import make_config
from tests.support.relay import running_relay
from tests.support.waiting import wait_until

# The first test builds helm when it is not cached yet (about 2-3 minutes on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

EXAMPLES = examples()
PROMETHEUS_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
APP_DRAIN_SECONDS = 20
FAKE_DSN = "postgresql://relay:not-a-real-password@db.invalid:5432/app"


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(install_helm(), tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[tuple[str, str], list[Obj]]:
    """Every example rendered for every Kubernetes version: (example name, version) -> objects."""
    return {(example.name, version): helm.render(example, version) for example in EXAMPLES for version in KUBE_VERSIONS}


def renders(rendered: dict[tuple[str, str], list[Obj]]) -> Iterator[tuple[Example, list[Obj]]]:
    """Each example once (the newest Kubernetes version)."""
    for example in EXAMPLES:
        yield example, rendered[(example.name, KUBE_VERSIONS[-1])]


def plain_objects() -> list[Obj]:
    return [*load_objects(PLAIN_SIDECAR.read_text()), *load_objects(PLAIN_SCHEMA_JOB.read_text())]


def load_relay_config(text: str, source: str = "relay.yaml") -> Config:
    """The relay's own loader, with a fake environment for every ${VAR} the text uses."""
    env = {name: FAKE_DSN if name == "DATABASE_URL" else f"fake-{name.lower()}" for name in all_variables(text)}
    return parse(text, source=source, env=env)


# -- helm lint, helm template ---------------------------------------------------------


def test_the_examples_are_the_expected_ones() -> None:
    names = {e.name for e in EXAMPLES}
    assert {
        DEFAULTS,
        "outbox-relay:standalone-values",
        "outbox-relay:minimal-values",
        "outbox-relay:sidecar-values",
        "outbox-relay:existing-configmap-values",
        "outbox-relay:console-values",
        "app-chart:defaults",
    } <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_helm_lint_strict(helm: Helm, example: Example) -> None:
    args = ["lint", "--strict", str(example.chart)]
    if example.values:
        args += ["--values", str(example.values)]
    output = helm.run(*args)
    assert "0 chart(s) failed" in output, output
    assert "[WARNING]" not in output and "[ERROR]" not in output, output


def test_every_example_renders_something(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    for (name, version), objects in rendered.items():
        assert objects, f"{name} ({version}) rendered nothing"
        for obj in objects:
            assert obj.get("apiVersion") and obj.get("kind"), f"{name}: incomplete object {obj}"
            assert obj.get("metadata", {}).get("name"), f"{name}: unnamed object {obj}"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes_in_strict_mode(
    rendered: dict[tuple[str, str], list[Obj]], version: str
) -> None:
    """kubernetes-validate --strict: schemas of that version, unknown fields refused."""
    problems: list[str] = []
    checked = 0
    sources = [(e.name, rendered[(e.name, version)]) for e in EXAMPLES] + [("plain examples", plain_objects())]
    for name, objects in sources:
        for obj in objects:
            if obj["kind"] in CRD_KINDS:
                continue  # not in kubernetes-validate's schemas: see test_monitoring_objects_*
            label = f"{name}: {obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')}"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except Exception as exc:  # ValidationError, SchemaNotFoundError: both are failures here
                problems.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 30


def test_kubernetes_validate_strict_mode_catches_an_unknown_field(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    """The validation above is not vacuous: a misspelt field of a native sidecar fails it."""
    deployment = copy.deepcopy(one(rendered[("app-chart:defaults", "1.30.0")], "Deployment"))
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


# -- the relay's config --------------------------------------------------------------


def test_the_rendered_relay_config_is_accepted_by_the_relays_own_loader(
    rendered: dict[tuple[str, str], list[Obj]],
) -> None:
    loaded = 0
    for example, objects in renders(rendered):
        maps = relay_config_maps(objects)
        if example.values and "existing-configmap" in example.values.name:
            assert not maps, "with existingConfigMap the chart renders no config of its own"
            continue
        assert len(maps) == 1, f"{example.name}: expected one relay ConfigMap, found {sorted(maps)}"
        for name, text in maps.items():
            config = load_relay_config(text, source=f"{example.name}/{name}")
            build_adapters(config)  # the adapters' own option checks, as `outbox-relay run` does
            assert config.http.enabled and config.http.host == "0.0.0.0"
            loaded += 1
    assert loaded >= 5


NO_ROUTE = "outbox-relay: config.brokers and config.routes are empty, and the chart routes nothing by default"


@pytest.mark.parametrize("chart", [CHART, APP_CHART], ids=["standalone", "sidecar"])
def test_the_chart_has_no_default_route(helm: Helm, tmp_path: Path, chart: Path) -> None:
    # Without brokers and routes the chart routed every topic to a stdout broker: every
    # message was written to the pod's log and marked dispatched, and retention deleted
    # its row. The only warning was NOTES.txt, which Helm does not show for a dependency
    # (the sidecar). Now the render stops, saying so; stdout is an explicit choice.
    def values(name: str, relay: Obj) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(relay if chart == CHART else {"outbox-relay": relay}))
        return path

    empty = values("empty.yaml", {"config": {"brokers": None, "routes": None}})  # null: no defaults either
    with pytest.raises(HelmError) as caught:
        helm.template(chart, values=[empty])
    assert NO_ROUTE in caught.value.stderr and "ci/stdout-values.yaml" in caught.value.stderr
    if chart == CHART:
        with pytest.raises(HelmError) as caught:
            helm.template(CHART)  # the chart's own defaults
        assert NO_ROUTE in caught.value.stderr
    # Configured explicitly, stdout renders (and NOTES.txt warns: test_notes_warn_...).
    explicit = values("explicit.yaml", yaml.safe_load(STDOUT_VALUES.read_text()))
    (text,) = relay_config_maps(helm.template(chart, values=[empty, explicit])).values()
    assert [(r.topic, r.broker) for r in load_relay_config(text).routes] == [("*", "stdout")]
    # A ConfigMap of one's own carries the routes: nothing to refuse then.
    if chart == CHART:
        assert one(helm.template(CHART, sets={"existingConfigMap": "shop-relay-config"}), "Deployment")


def test_the_relay_pods_read_the_rendered_config_on_the_probed_port_with_its_variables_provided(
    rendered: dict[tuple[str, str], list[Obj]],
) -> None:
    """Each relay container mounts a ConfigMap that exists (or the existing one named), its
    probes and metrics port are the config's http.port, and every ${VAR} without a default
    comes from the container's environment."""
    seen = 0
    for example, objects in renders(rendered):
        maps = relay_config_maps(objects)
        for workload, pod in pod_specs(objects):
            for container in relay_containers(pod):
                seen += 1
                where = f"{example.name}: {workload['kind']}/{workload['metadata']['name']}"
                name, key = mounted_config(pod, container)
                if example.values and "existing-configmap" in example.values.name:
                    assert (name, key) == ("shop-relay-config", "config.yaml"), where
                    continue
                assert key == "relay.yaml" and name in maps, f"{where}: mounts {name}/{key}, not a rendered config"
                config = load_relay_config(maps[name])
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert config.http.port in ports.values(), where
                probe_port = container["livenessProbe"]["httpGet"]["port"]
                assert ports[probe_port] == config.http.port, where
                assert container["livenessProbe"]["httpGet"]["path"] == "/livez", where
                provided = {e["name"] for e in container.get("env", [])}
                missing = required_variables(maps[name]) - provided
                if container.get("envFrom"):
                    # Keys of an envFrom Secret are not known here; the DSN must still come
                    # from existingSecret (an explicit secretKeyRef).
                    missing &= {"DATABASE_URL"}
                if example.name == DEFAULTS:
                    # No Secret configured: NOTES.txt says so (test_notes_warn_...).
                    assert missing == {"DATABASE_URL"}, where
                else:
                    assert not missing, f"{where}: nothing provides {sorted(missing)}"
                assert {"name": "OUTBOX_RELAY_CONFIG", "value": f"{CONFIG_MOUNT}/relay.yaml"} in container["env"]
    assert seen >= 5


def test_termination_grace_period_exceeds_shutdown_timeout_in_every_example(
    rendered: dict[tuple[str, str], list[Obj]],
) -> None:
    checked = 0
    sources = [(e.name, rendered[(e.name, KUBE_VERSIONS[-1])]) for e in EXAMPLES]
    sources.append(("sidecar-plain.yaml", plain_objects()))
    for name, objects in sources:
        maps = relay_config_maps(objects)
        for workload, pod in pod_specs(objects):
            for container in relay_containers(pod):
                config_name, _ = mounted_config(pod, container)
                # An existing ConfigMap is not rendered: the relay's default (30 s) then.
                shutdown = load_relay_config(maps[config_name]).relay.shutdown_timeout if config_name in maps else 30.0
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                assert grace > shutdown, f"{name}: {workload['metadata']['name']}: {grace} <= {shutdown}"
                if container.get("restartPolicy") == "Always":
                    # A sidecar stops after the application: the pod needs both drains
                    # (the examples' application drains for 20 s).
                    assert grace >= APP_DRAIN_SECONDS + shutdown + 15, f"{name}: no room for the application's drain"
                checked += 1
    assert checked >= 6


def test_the_chart_refuses_a_grace_period_not_above_the_shutdown_timeout(helm: Helm) -> None:
    with pytest.raises(HelmError) as caught:
        helm.template(
            CHART,
            values=[STDOUT_VALUES],
            sets={"config.relay.shutdown_timeout": "1m30s", "terminationGracePeriodSeconds": "90"},
        )
    assert "terminationGracePeriodSeconds (90) must be above relay.shutdown_timeout (90 s)" in caught.value.stderr
    objects = helm.template(CHART, values=[STDOUT_VALUES], sets={"config.relay.shutdown_timeout": "1m30s"})
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 105
    objects = helm.template(CHART, values=[STDOUT_VALUES], sets={"config.relay.shutdown_timeout": "1500ms"})
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 17
    with pytest.raises(HelmError) as caught:
        helm.template(CHART, values=[STDOUT_VALUES], sets={"config.relay.shutdown_timeout": "soon"})
    assert "invalid duration" in caught.value.stderr


# -- secrets ---------------------------------------------------------------------------

CREDENTIAL = re.compile(
    r"://[^/\s:@'\"]+:(?!\$\{)[^/@\s'\"]+@"  # scheme://user:password@
    r"|password\s*=\s*['\"]?(?!\$\{)[^\s'\"]+"  # password=... in a DSN, quoted or not
    r"|(?im:^\s*[\"']?[a-z_]*(password|token|secret)[a-z_]*[\"']?\s*:\s*(?!\$\{)[^\s{].*$)"
)


def test_default_values_render_no_secret_and_no_credential_in_any_config_map(
    rendered: dict[tuple[str, str], list[Obj]],
) -> None:
    for example, objects in renders(rendered):
        assert not of_kind(objects, "Secret"), f"{example.name} renders a Secret"
        for config_map in of_kind(objects, "ConfigMap"):
            for key, value in (config_map.get("data") or {}).items():
                found = CREDENTIAL.search(value)
                assert not found, f"{example.name}: {config_map['metadata']['name']}/{key}: {found.group(0)!r}"
    defaults = rendered[(DEFAULTS, KUBE_VERSIONS[-1])]
    (text,) = relay_config_maps(defaults).values()
    assert yaml.safe_load(text)["database"]["dsn"] == "${DATABASE_URL}"
    assert "postgresql://" not in text and "postgres://" not in text


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"database": {"dsn": "postgresql://relay:hunter2@db:5432/app"}}},
        {"config": {"database": {"dsn": "host=db user=relay password=hunter2 dbname=app"}}},
        {"config": {"database": {"dsn": "host=db user=relay password='hunter2' dbname=app"}}},
        {
            "config": {
                "brokers": {
                    "k": {
                        "type": "kafka",
                        "bootstrap_servers": "k:9092",
                        "sasl": {"mechanism": "PLAIN", "username": "u", "password": "hunter2"},
                    }
                },
                "routes": [{"topic": "*", "broker": "k"}],
            }
        },
        {
            "config": {
                "brokers": {
                    "w": {"type": "webhook", "url": "https://h/x", "headers": {"authorization": "Bearer hunter2"}}
                },
                "routes": [{"topic": "*", "broker": "w"}],
            }
        },
        {
            "config": {
                "brokers": {"r": {"type": "rabbitmq", "url": "amqp://u:hunter2@rabbit:5672/"}},
                "routes": [{"topic": "*", "broker": "r"}],
            }
        },
    ],
    ids=["dsn-uri", "dsn-keywords", "dsn-keywords-quoted", "sasl-password", "webhook-token", "amqp-url"],
)
def test_the_chart_refuses_a_literal_secret_in_the_config(helm: Helm, tmp_path: Path, values: Obj) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(HelmError) as caught:
        helm.template(CHART, values=[STDOUT_VALUES, path])  # the case's brokers and routes, if any, win
    assert "from the environment" in caught.value.stderr
    assert "hunter2" not in caught.value.stderr


def test_secrets_reach_the_relay_only_as_environment_from_secrets(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    objects = rendered[("outbox-relay:standalone-values", KUBE_VERSIONS[-1])]
    deployment = one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "orders-relay-database", "key": "dsn"}
    assert {"secretRef": {"name": "orders-relay-brokers"}} in container["envFrom"]
    job = one(objects, "Job")
    (job_container,) = job["spec"]["template"]["spec"]["containers"]
    job_env = {e["name"]: e for e in job_container["env"]}
    assert job_env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "orders-relay-ddl", "key": "dsn"}


# -- workloads ----------------------------------------------------------------------------


def assert_hardened(container: Obj, where: str) -> None:
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True, where
    assert context["readOnlyRootFilesystem"] is True, where
    assert context["allowPrivilegeEscalation"] is False, where
    assert context["capabilities"] == {"drop": ["ALL"]}, where
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), f"{where}: no writable /tmp"


def test_standalone_deployment_probes_security_and_scheduling(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    objects = rendered[("outbox-relay:standalone-values", KUBE_VERSIONS[-1])]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert deployment["spec"]["replicas"] == 3
    assert container["image"].startswith("registry.example.com/platform/outbox-relay@sha256:")
    assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert container["args"][:3] == ["run", "--config", f"{CONFIG_MOUNT}/relay.yaml"]
    probes = {kind: container[kind]["httpGet"]["path"] for kind in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes == {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/livez"}
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert {
            "initialDelaySeconds",
            "periodSeconds",
            "timeoutSeconds",
            "failureThreshold",
            "successThreshold",
        } <= set(container[kind])
    assert_hardened(container, "standalone")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert spec["terminationGracePeriodSeconds"] == 75
    assert spec["priorityClassName"] == "messaging-critical"
    assert spec["nodeSelector"] and spec["tolerations"] and spec["topologySpreadConstraints"]
    assert spec["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "shop"
    assert "requiredDuringSchedulingIgnoredDuringExecution" in spec["affinity"]["podAntiAffinity"]
    assert pod["metadata"]["labels"]["team"] == "orders" and "checksum/config" in pod["metadata"]["annotations"]
    assert {"name": "kafka-ca", "configMap": {"name": "kafka-ca"}} in spec["volumes"]
    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector and pdb["spec"]["minAvailable"] == 2
    service = one(objects, "Service")
    assert service["spec"]["selector"] == selector and service["spec"]["publishNotReadyAddresses"] is True
    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 9187, "protocol": "TCP"}]
    assert len(policy["spec"]["egress"]) == 4  # DNS + the three extraEgress rules


def test_default_values_give_a_hardened_standalone_relay(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    objects = rendered[(DEFAULTS, KUBE_VERSIONS[-1])]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "ServiceAccount"]
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert_hardened(container, "defaults")
    assert container["image"] == f"ghcr.io/outbox-relay/outbox-relay:{chart_app_version()}"
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    # A broker outage makes every relay unready: a drain must still be able to evict them.
    assert one(objects, "PodDisruptionBudget")["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_the_pdb_eviction_policy_is_rendered_only_where_kubernetes_has_it(helm: Helm) -> None:
    older = one(helm.template(CHART, values=[STDOUT_VALUES], kube_version="1.26.0"), "PodDisruptionBudget")
    assert "unhealthyPodEvictionPolicy" not in older["spec"] and older["spec"]["maxUnavailable"] == 1
    first = one(helm.template(CHART, values=[STDOUT_VALUES], kube_version="1.27.0"), "PodDisruptionBudget")
    assert first["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    cluster_default = one(
        helm.template(CHART, values=[STDOUT_VALUES], sets={"pdb.unhealthyPodEvictionPolicy": ""}), "PodDisruptionBudget"
    )
    assert "unhealthyPodEvictionPolicy" not in cluster_default["spec"]


def chart_app_version() -> str:
    version: str = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    return version


def test_the_default_image_tag_is_the_charts_app_version() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    match = re.search(r'define "outbox-relay.appVersion" -}}([^{]+){{', helpers)
    assert match and match.group(1) == chart_app_version()


def test_the_schema_hook_job_installs_the_schema_before_install_and_upgrade(
    rendered: dict[tuple[str, str], list[Obj]],
) -> None:
    for name in ("outbox-relay:standalone-values", "outbox-relay:sidecar-values", "app-chart:defaults"):
        objects = rendered[(name, KUBE_VERSIONS[-1])]
        job = one(objects, "Job")
        annotations = job["metadata"]["annotations"]
        assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}, name
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"], name
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["args"] == ["schema", "install", "--schema", "outbox"], name
        assert_hardened(container, name)
        # A pre-install hook runs before the release's ServiceAccount exists.
        service_accounts = {o["metadata"]["name"] for o in of_kind(objects, "ServiceAccount")}
        assert spec.get("serviceAccountName") not in service_accounts, name
        assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert not of_kind(rendered[(DEFAULTS, KUBE_VERSIONS[-1])], "Job")


def test_sidecar_mode_renders_no_workload_of_its_own(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    objects = rendered[("outbox-relay:sidecar-values", KUBE_VERSIONS[-1])]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "ConfigMap", "Job", "PodMonitor", "PrometheusRule"]


def test_the_app_chart_runs_the_relay_as_a_native_sidecar(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    objects = rendered[("app-chart:defaults", KUBE_VERSIONS[-1])]
    standalone = one(rendered[(DEFAULTS, KUBE_VERSIONS[-1])], "Deployment")
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "outbox-relay" and sidecar["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert sidecar["securityContext"] == standalone["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert_hardened(sidecar, "sidecar")
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "relay-metrics"}
    # A native sidecar's readiness is the pod's, and its startup probe holds the app: both
    # off by default (sidecar.gatePodReadiness, sidecar.holdApplicationUntilStarted).
    assert "readinessProbe" not in sidecar and "startupProbe" not in sidecar
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in sidecar["volumeMounts"]:
        assert mount["name"] in volumes
    config_name, _ = mounted_config(pod, sidecar)
    assert config_name in relay_config_maps(objects)
    config = load_relay_config(relay_config_maps(objects)[config_name])
    app_values = yaml.safe_load((APP_CHART / "values.yaml").read_text())
    assert spec["terminationGracePeriodSeconds"] == app_values["drainSeconds"] + config.relay.shutdown_timeout + 15
    assert "checksum/outbox-relay-config" in pod["metadata"]["annotations"]
    monitor = one(objects, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in sidecar["ports"]}


def test_the_sidecar_options_add_the_probes(helm: Helm) -> None:
    objects = helm.template(
        APP_CHART,
        sets={
            "outbox-relay.sidecar.gatePodReadiness": "true",
            "outbox-relay.sidecar.holdApplicationUntilStarted": "true",
        },
    )
    (sidecar,) = one(objects, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/livez"


def test_the_sidecar_template_refuses_a_relay_chart_in_standalone_mode(helm: Helm) -> None:
    with pytest.raises(HelmError) as caught:
        helm.template(APP_CHART, sets={"outbox-relay.mode": "standalone"})
    assert "set mode: sidecar" in caught.value.stderr


def test_the_plain_sidecar_example_is_what_the_chart_renders(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    """helm/examples/sidecar-plain.yaml, for teams without Helm, is the app chart's render
    written out: the same relay container, the same relay config, the same grace period."""
    chart_objects = rendered[("app-chart:defaults", KUBE_VERSIONS[-1])]
    plain = plain_objects()
    chart_pod = one(chart_objects, "Deployment")["spec"]["template"]
    plain_pod = one(plain, "Deployment")["spec"]["template"]
    (chart_sidecar,) = chart_pod["spec"]["initContainers"]
    (plain_sidecar,) = plain_pod["spec"]["initContainers"]
    assert plain_sidecar == chart_sidecar
    relay_volumes = {m["name"] for m in chart_sidecar["volumeMounts"]}
    assert [v for v in plain_pod["spec"]["volumes"] if v["name"] in relay_volumes] == [
        v for v in chart_pod["spec"]["volumes"] if v["name"] in relay_volumes
    ]
    assert plain_pod["spec"]["terminationGracePeriodSeconds"] == chart_pod["spec"]["terminationGracePeriodSeconds"]
    assert (
        plain_pod["metadata"]["labels"]["outbox-relay/sidecar"]
        == chart_pod["metadata"]["labels"]["outbox-relay/sidecar"]
    )
    (chart_text,) = relay_config_maps(chart_objects).values()
    (plain_text,) = relay_config_maps(plain).values()
    assert load_relay_config(plain_text).model_dump() == load_relay_config(chart_text).model_dump()
    build_adapters(load_relay_config(plain_text))
    plain_job = one(plain, "Job")["spec"]["template"]["spec"]["containers"][0]
    chart_job = one(chart_objects, "Job")["spec"]["template"]["spec"]["containers"][0]
    assert (plain_job["args"], plain_job["env"], plain_job["securityContext"]) == (
        chart_job["args"],
        chart_job["env"],
        chart_job["securityContext"],
    )


def test_the_app_chart_dependency_builds_offline_from_the_file_repository(helm: Helm, tmp_path: Path) -> None:
    """Without the vendored charts/ symlink: `helm dependency build` packs
    file://../../outbox-relay (no network), and the render is the same."""
    copy_root = tmp_path / "helm"
    shutil.copytree(CHART, copy_root / "outbox-relay")
    app = copy_root / "examples" / "app-chart"
    shutil.copytree(APP_CHART, app, symlinks=True)
    (app / "charts" / "outbox-relay").unlink()
    helm.run("dependency", "build", str(app))
    assert [p.name for p in (app / "charts").iterdir()] == ["outbox-relay-0.1.0.tgz"]
    assert helm.template(app) == helm.template(APP_CHART)


def test_notes_warn_about_a_missing_database_secret_and_the_stdout_broker(helm: Helm, tmp_path: Path) -> None:
    chart = notes_chart(tmp_path)
    defaults = rendered_notes(helm, chart, chart / "ci" / STDOUT_VALUES.name)
    assert "no Secret provides it" in defaults and 'broker "stdout" is of type stdout' in defaults
    configured = rendered_notes(helm, chart, CHART / "ci" / "minimal-values.yaml")
    assert "WARNING" not in configured and "kubectl -n shop exec deploy/shop-outbox-relay" in configured


# -- the operator console (console.enabled) -------------------------------------------------

CONSOLE = "outbox-relay:console-values"
SIDECAR_VALUES = CHART / "ci" / "sidecar-values.yaml"
HELM_NOISE = re.compile(r"^(\w+\.go:\d+: warning: |Use --debug flag to render out invalid YAML$)")
LITERAL_TOKEN = [{"name": CONSOLE_TOKEN_VARIABLE, "value": "hunter2-console"}]
TOKEN_IN_VALUES = "holds the console's sign-in token: it comes only from a Secret you create"
WORKLOAD_SELECTORS = {"Deployment", "PodDisruptionBudget"}  # kinds whose spec.selector has matchLabels
PROBE_TIMINGS = {"initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"}


def test_only_the_console_example_renders_a_console(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    for (name, version), objects in rendered.items():
        kinds = sorted(o["kind"] for o in console_objects(objects))
        expected = ["Deployment", "NetworkPolicy", "Service"] if name == CONSOLE else []
        assert kinds == expected, f"{name} ({version}): {kinds}"
    assert CONSOLE in {e.name for e in EXAMPLES}


def test_the_console_runs_its_command_hardened_with_its_probes_and_the_relays_config(
    rendered: dict[tuple[str, str], list[Obj]],
) -> None:
    objects = rendered[(CONSOLE, KUBE_VERSIONS[-1])]
    deployment, pod, container = console_pod(objects)
    _, relay_template, relay = relay_pod(objects)
    spec = pod["spec"]
    assert deployment["spec"]["replicas"] == 1
    config = f"{CONFIG_MOUNT}/relay.yaml"
    assert container["args"] == ["console", "--config", config, "--host", "0.0.0.0", "--port", "8080"]
    assert "command" not in container and container["image"] == relay["image"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/console/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/console/readyz", "port": "http"}
    for kind in ("livenessProbe", "readinessProbe"):
        assert set(container[kind]) >= PROBE_TIMINGS, kind
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert_hardened(container, "console")
    assert container["securityContext"] == relay["securityContext"]
    assert spec["securityContext"] == relay_template["spec"]["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is False
    # The relay's config, from the same ConfigMap; a changed config rolls the console too.
    assert mounted_config(pod, container) == mounted_config(relay_template, relay)
    assert mounted_config(pod, container)[0] in relay_config_maps(objects)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_MOUNT)
    assert mount["readOnly"] is True
    checksum = pod["metadata"]["annotations"]["checksum/config"]
    assert checksum == relay_template["metadata"]["annotations"]["checksum/config"]
    # Its own scheduling, none of the relay's.
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert [t["value"] for t in spec["tolerations"]] == ["tools"] and "affinity" not in spec


def test_no_selector_of_the_relays_counts_a_console_pod_and_the_consoles_selects_no_relay(
    rendered: dict[tuple[str, str], list[Obj]],
) -> None:
    objects = rendered[(CONSOLE, KUBE_VERSIONS[-1])]
    deployment, pod, _ = console_pod(objects)
    _, relay_template, _ = relay_pod(objects)
    console_labels = pod["metadata"]["labels"]
    relay_labels = relay_template["metadata"]["labels"]
    consoles = console_objects(objects)
    own = [deployment["spec"]["selector"]["matchLabels"]]
    own += [o["spec"]["selector"] for o in consoles if o["kind"] == "Service"]
    own += [o["spec"]["podSelector"]["matchLabels"] for o in consoles if o["kind"] == "NetworkPolicy"]
    assert len(own) == 3 and all(_matches(s, console_labels) and not _matches(s, relay_labels) for s in own)
    relays = [o for o in objects if o not in consoles]
    theirs = [o["spec"]["selector"]["matchLabels"] for o in relays if o["kind"] in WORKLOAD_SELECTORS]
    theirs += [o["spec"]["selector"] for o in relays if o["kind"] == "Service"]
    theirs += [o["spec"]["podSelector"]["matchLabels"] for o in relays if o["kind"] == "NetworkPolicy"]
    assert len(theirs) == 4 and all(_matches(s, relay_labels) and not _matches(s, console_labels) for s in theirs)
    # The ServiceMonitor selects Services by the relay's labels: the console's has none of them.
    (service,) = [o for o in consoles if o["kind"] == "Service"]
    relay_service = next(o for o in relays if o["kind"] == "Service")
    assert not _matches(relay_service["spec"]["selector"], service["metadata"]["labels"])


def test_the_console_reads_its_database_and_token_from_secrets_only(
    helm: Helm, rendered: dict[tuple[str, str], list[Obj]], tmp_path: Path
) -> None:
    objects = rendered[(CONSOLE, KUBE_VERSIONS[-1])]
    _, _, container = console_pod(objects)
    env = env_of(container)
    assert env["DATABASE_URL"] == {
        "name": "DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": "orders-console-database", "key": "dsn"}},
    }
    assert env[CONSOLE_TOKEN_VARIABLE] == {
        "name": CONSOLE_TOKEN_VARIABLE,
        "valueFrom": {"secretKeyRef": {"name": "orders-console-token", "key": "token"}},
    }
    assert env["OUTBOX_RELAY_CONFIG"]["value"] == f"{CONFIG_MOUNT}/relay.yaml"
    # The relay's extra environment, which the config they share interpolates.
    assert container["envFrom"] == [{"secretRef": {"name": "orders-relay-webhook"}}]
    (text,) = relay_config_maps(objects).values()
    assert required_variables(text) - set(env) <= {"WEBHOOK_TOKEN"}  # WEBHOOK_TOKEN: the envFrom Secret
    _, _, relay = relay_pod(objects)
    assert CONSOLE_TOKEN_VARIABLE not in env_of(relay), "the relay needs no sign-in token"

    # No token Secret: no token (a read-only console); no Secret of its own: the relay's.
    objects = helm.template(
        CHART, values=[CONSOLE_VALUES], sets={"console.token.existingSecret": "", "console.existingSecret": ""}
    )
    env = env_of(console_pod(objects)[2])
    assert CONSOLE_TOKEN_VARIABLE not in env
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "orders-relay-database", "key": "DATABASE_URL"}
    # A key of its own for the token; a DATABASE_URL among the relay's extraEnvVars never
    # replaces the console's own DSN; inheritExtraEnv off: only the console's variables.
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "extraEnvVars": [
                    {"name": "PGAPPNAME", "value": "outbox-relay"},
                    {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "elsewhere", "key": "dsn"}}},
                ],
                "console": {"token": {"key": "console-token"}, "extraEnvVars": [{"name": "TZ", "value": "UTC"}]},
            }
        )
    )
    _, _, container = console_pod(helm.template(CHART, values=[CONSOLE_VALUES, extra]))
    env = env_of(container)
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "orders-console-database"
    assert env[CONSOLE_TOKEN_VARIABLE]["valueFrom"]["secretKeyRef"]["key"] == "console-token"
    assert env["PGAPPNAME"]["value"] == "outbox-relay" and env["TZ"]["value"] == "UTC"
    _, _, container = console_pod(
        helm.template(CHART, values=[CONSOLE_VALUES, extra], sets={"console.inheritExtraEnv": "false"})
    )
    assert "envFrom" not in container and "PGAPPNAME" not in env_of(container)
    assert set(env_of(container)) == {"OUTBOX_RELAY_CONFIG", "DATABASE_URL", CONSOLE_TOKEN_VARIABLE, "TZ"}


def test_the_token_appears_in_the_manifest_only_as_a_secret_reference(helm: Helm) -> None:
    text = helm.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values", str(CONSOLE_VALUES))
    objects = load_objects(text)
    assert not of_kind(objects, "Secret")
    references = [
        entry
        for _, pod in pod_specs(objects)
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
        for entry in container.get("env", [])
        if entry["name"] == CONSOLE_TOKEN_VARIABLE
    ]
    secret_ref = {"secretKeyRef": {"name": "orders-console-token", "key": "token"}}
    assert references == [{"name": CONSOLE_TOKEN_VARIABLE, "valueFrom": secret_ref}]
    # Named once in the whole manifest (that reference), and in no ConfigMap.
    assert text.count(CONSOLE_TOKEN_VARIABLE) == 1
    for config_map in of_kind(objects, "ConfigMap"):
        for key, value in (config_map.get("data") or {}).items():
            assert not CREDENTIAL.search(value), f"{config_map['metadata']['name']}/{key}"


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"console": {"enabled": True, "token": "hunter2-console"}}, "console.token"),
        ({"console": {"token": {"existingSecret": "t", "value": "hunter2-console"}}}, "console.token.value"),
        ({"extraEnvVars": LITERAL_TOKEN}, "extraEnvVars"),
        ({"console": {"enabled": True, "extraEnvVars": LITERAL_TOKEN}}, "console.extraEnvVars"),
    ],
    ids=["token-string", "token-value-key", "relay-extra-env", "console-extra-env"],
)
def test_the_chart_refuses_a_console_token_in_values_with_one_line(
    helm: Helm, tmp_path: Path, values: Obj, where: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(HelmError) as caught:
        helm.template(CHART, values=[STDOUT_VALUES, path])
    stderr = caught.value.stderr
    # Helm's own lines aside (a warning for a string where the defaults have a table,
    # which names the default, not the value; its --debug hint), the refusal is one line.
    (line,) = [line for line in stderr.splitlines() if line.strip() and not HELM_NOISE.match(line)]
    assert f"outbox-relay: {where} {TOKEN_IN_VALUES}" in line, stderr
    assert "hunter2" not in stderr


def test_a_console_token_in_the_relay_config_is_refused_like_any_literal_secret(helm: Helm) -> None:
    with pytest.raises(HelmError) as caught:
        helm.template(CHART, values=[STDOUT_VALUES], sets={"config.console.token": "hunter2-console"})
    assert 'config key "token" holds a literal value' in caught.value.stderr
    assert "hunter2" not in caught.value.stderr


def test_the_consoles_settings_pass_through_the_relay_config(helm: Helm) -> None:
    objects = helm.template(
        CHART,
        values=[STDOUT_VALUES],
        sets={
            "console.enabled": "true",
            "config.console.enabled": "true",
            "config.console.show_payloads": "false",
            "config.console.trusted_user_header": "X-Forwarded-User",
            "config.console.page_size": "50",
        },
    )
    (text,) = relay_config_maps(objects).values()
    assert yaml.safe_load(text)["console"] == {
        "enabled": True,
        "show_payloads": False,
        "trusted_user_header": "X-Forwarded-User",
        "page_size": 50,
    }


def test_the_console_service_and_network_policy(
    helm: Helm, rendered: dict[tuple[str, str], list[Obj]], tmp_path: Path
) -> None:
    objects = rendered[(CONSOLE, KUBE_VERSIONS[-1])]
    consoles = console_objects(objects)
    service = one(consoles, "Service")
    assert service["metadata"]["name"] == "shop-outbox-relay-console"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    policy = one(consoles, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"outbox-relay/console-client": "shop-outbox-relay"}}},
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}},
        },
    ]
    dns = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    database = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 5432, "protocol": "TCP"}]}
    assert policy["spec"]["egress"] == [dns, database]  # its own extraEgress: no broker

    # Without rules of its own: the relay's egress; with open egress: open; and none at all
    # without networkPolicy.enabled.
    no_own = tmp_path / "no-own-egress.yaml"
    no_own.write_text(yaml.safe_dump({"console": {"networkPolicy": {"extraEgress": []}}}))
    objects = helm.template(CHART, values=[CONSOLE_VALUES, no_own])
    relay_policy = next(o for o in of_kind(objects, "NetworkPolicy") if o not in console_objects(objects))
    assert one(console_objects(objects), "NetworkPolicy")["spec"]["egress"] == relay_policy["spec"]["egress"]
    assert len(relay_policy["spec"]["egress"]) == 3
    objects = helm.template(CHART, values=[CONSOLE_VALUES], sets={"networkPolicy.allowExternalEgress": "true"})
    assert one(console_objects(objects), "NetworkPolicy")["spec"]["egress"] == [{}]
    objects = helm.template(CHART, values=[CONSOLE_VALUES], sets={"networkPolicy.enabled": "false"})
    assert not of_kind(objects, "NetworkPolicy") and one(console_objects(objects), "Service")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_in_sidecar_mode_the_console_is_a_deployment_of_its_own(helm: Helm, version: str) -> None:
    cases = {
        "sidecar-values": helm.template(
            CHART, values=[SIDECAR_VALUES], sets={"console.enabled": "true"}, kube_version=version
        ),
        "app-chart": helm.template(APP_CHART, sets={"outbox-relay.console.enabled": "true"}, kube_version=version),
    }
    for name, objects in cases.items():
        consoles = console_objects(objects)
        assert sorted(o["kind"] for o in consoles) == ["Deployment", "NetworkPolicy", "Service"], name
        for obj in [*consoles, *of_kind(objects, "ServiceAccount")]:
            kubernetes_validate.validate(obj, version, strict=True)
        _, pod, container = console_pod(objects)
        # Its ServiceAccount is rendered in sidecar mode too.
        assert pod["spec"]["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"], name
        assert container["args"][0] == "console" and container["readinessProbe"]["httpGet"]["path"] == "/console/readyz"
        # Not a sidecar's optional references: a missing Secret or ConfigMap stops the
        # console alone, as it should, visibly.
        config = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
        assert "optional" not in config["configMap"], name
        refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
        refs += [next(iter(e.values())) for e in container.get("envFrom", [])]
        assert refs and not any("optional" in ref for ref in refs), name
        assert env_of(container)["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "shop-database", name
    # The relay stays in the application's pods, the app chart's only other Deployment.
    objects = cases["app-chart"]
    (app,) = [d for d in of_kind(objects, "Deployment") if d not in console_objects(objects)]
    assert relay_containers(app["spec"]["template"])
    assert not of_kind(cases["sidecar-values"], "Deployment")[1:], "sidecar mode renders no relay Deployment"


def test_notes_tell_how_to_reach_the_console(helm: Helm, tmp_path: Path) -> None:
    chart = notes_chart(tmp_path)
    notes = rendered_notes(helm, chart, CONSOLE_VALUES)
    assert "kubectl -n shop port-forward svc/shop-outbox-relay-console 8080:80" in notes
    assert "http://localhost:8080/console/" in notes
    assert "sign in with the token in Secret orders-console-token" in notes
    assert "outbox-relay/console-client=shop-outbox-relay" in notes
    read_only = rendered_notes(helm, chart, CONSOLE_VALUES, sets={"console.token.existingSecret": ""})
    assert "read-only: no console.token.existingSecret" in read_only
    without = rendered_notes(helm, chart, CHART / "ci" / "minimal-values.yaml")
    assert "console" not in without


# -- monitoring objects (CRDs: a structural check) ----------------------------------------


def test_monitoring_objects_are_structurally_valid(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    """ServiceMonitor, PodMonitor, PrometheusRule: monitoring.coreos.com/v1, required fields,
    and they point at what the chart renders (the Service's port, the pods' labels and port)."""
    counts = {kind: 0 for kind in CRD_KINDS}
    for example, objects in renders(rendered):
        for obj in objects:
            if obj["kind"] not in CRD_KINDS:
                continue
            where = f"{example.name}: {obj['kind']}"
            counts[obj["kind"]] += 1
            assert obj["apiVersion"] == MONITORING_API, where
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj["metadata"]["name"]), where
            assert obj["metadata"]["namespace"] == NAMESPACE, where
            assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, where
            spec = obj["spec"]
            if obj["kind"] != "PrometheusRule":
                assert set(spec) <= MONITOR_SPEC_FIELDS and "selector" in spec, f"{where}: {sorted(spec)}"
                for endpoint in spec.get("endpoints", []) + spec.get("podMetricsEndpoints", []):
                    assert set(endpoint) <= ENDPOINT_FIELDS and "port" in endpoint, f"{where}: {sorted(endpoint)}"
            if obj["kind"] == "ServiceMonitor":
                service = one(objects, "Service")
                assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(), where
                assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}, where
                (endpoint,) = spec["endpoints"]
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, where
                assert endpoint["path"] == "/metrics" and PROMETHEUS_DURATION.match(endpoint["interval"]), where
            elif obj["kind"] == "PodMonitor":
                (endpoint,) = spec["podMetricsEndpoints"]
                assert endpoint["path"] == "/metrics", where
                pods = [
                    pod
                    for _, pod in pod_specs(objects)
                    if relay_containers(pod)
                    and spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
                ]
                if example.values and "sidecar" in example.values.name:
                    # The relay chart alone: the application's pods carry the label.
                    assert spec["selector"]["matchLabels"] == {"outbox-relay/sidecar": "shop-outbox-relay"}
                    continue
                assert pods, f"{where}: selects no relay pod"
                for pod in pods:
                    ports = {p["name"] for c in relay_containers(pod) for p in c["ports"]}
                    assert endpoint["port"] in ports, where
            else:
                assert spec["groups"], where
                assert set(spec) == {"groups"}, where
                for group in spec["groups"]:
                    assert group["name"] and group["rules"] and set(group) <= RULE_GROUP_FIELDS, where
                    for rule in group["rules"]:
                        assert ("alert" in rule) != ("record" in rule), f"{where}: {rule}"
                        assert set(rule) <= RULE_FIELDS, f"{where}: {rule}"
                        for mapping in ("labels", "annotations"):
                            assert all(isinstance(v, str) for v in rule.get(mapping, {}).values()), where
                        assert isinstance(rule["expr"], str) and rule["expr"].strip(), where
                        if "for" in rule:
                            assert PROMETHEUS_DURATION.match(rule["for"]), f"{where}: for: {rule['for']}"
    assert counts == {"ServiceMonitor": 1, "PodMonitor": 2, "PrometheusRule": 3}, counts


def test_every_alert_expression_parses_and_says_what_to_do(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    alerts = 0
    for example, objects in renders(rendered):
        for rule in alert_rules(objects):
            where = f"{example.name}: {rule.get('alert') or rule.get('record')}"
            try:
                promql_parser.parse(rule["expr"])
            except Exception as exc:
                pytest.fail(f"{where}: {rule['expr']!r} does not parse: {exc}")
            if rule.get("alert", "").startswith("OutboxRelay") and "runbook_url" in rule.get("annotations", {}):
                alerts += 1
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}, where
                assert rule["annotations"]["summary"] and rule["annotations"]["description"], where
                anchor = rule["alert"].lower()
                assert rule["annotations"]["runbook_url"].endswith(f"#{anchor}"), where
    names = {r["alert"] for r in alert_rules(rendered[("outbox-relay:standalone-values", KUBE_VERSIONS[-1])])}
    assert names == {
        "OutboxRelayDown",
        "OutboxRelayDatabaseDisconnected",
        "OutboxRelayLagHigh",
        "OutboxRelayBrokerDisconnected",
        "OutboxRelayDeadLetters",
        "OutboxRelayLongTransaction",
        "OutboxRelayWalRetentionHigh",
        "OutboxRelayWalLagHigh",
        "OutboxRelayWalStreamPaused",
        "OutboxRelayPublishFailuresHigh",
    }
    assert alerts == 27  # nine alerts in each of the three rule objects


def test_the_alerts_select_the_job_their_monitor_scrapes(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    standalone = alert_rules(rendered[("outbox-relay:standalone-values", KUBE_VERSIONS[-1])])
    lag = next(r for r in standalone if r["alert"] == "OutboxRelayLagHigh")
    # A ServiceMonitor's job label is the Service's name; a PodMonitor's is namespace/name.
    assert 'job="shop-outbox-relay"' in lag["expr"] and "> 120" in lag["expr"]
    sidecar = alert_rules(rendered[("app-chart:defaults", KUBE_VERSIONS[-1])])
    lag = next(r for r in sidecar if r["alert"] == "OutboxRelayLagHigh")
    assert 'job="shop/shop-outbox-relay"' in lag["expr"]


def test_the_wal_alerts_watch_the_slot_with_their_thresholds(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    rules = {r["alert"]: r for r in alert_rules(rendered[("outbox-relay:standalone-values", KUBE_VERSIONS[-1])])}
    selector = 'namespace="shop", job="shop-outbox-relay"'
    # The default 1 GiB as an integer: Helm reads numbers as floats (1.073741824e+09).
    assert rules["OutboxRelayWalRetentionHigh"]["expr"] == (
        f"max by (namespace, job) (outbox_relay_wal_slot_retained_bytes{{{selector}}}) > 1073741824"
    )
    assert rules["OutboxRelayWalLagHigh"]["expr"] == (
        f"max by (namespace, job) (outbox_relay_wal_slot_lag_seconds{{{selector}}}) > 300"
    )
    assert rules["OutboxRelayWalStreamPaused"]["expr"] == (
        f'max by (namespace, job, pod) (outbox_relay_wal_source_state{{{selector}, state="paused"}}) == 1'
    )
    assert rules["OutboxRelayWalStreamPaused"]["for"] == "5m"
    assert rules["OutboxRelayWalRetentionHigh"]["labels"]["severity"] == "critical"


def test_the_dashboard_is_valid_and_shipped_as_a_grafana_sidecar_config_map(
    rendered: dict[tuple[str, str], list[Obj]],
) -> None:
    board = dashboard()
    assert board["uid"] == "outbox-relay" and board["panels"]
    datasource = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for expr in dashboard_expressions(board):
        promql_parser.parse(as_promql(expr))
        # `up` is every target's: with "All" (.*) selected it must be narrowed to the
        # relays' targets by one of their own metrics, or it counts unrelated pods.
        if re.search(r"\bup\{", expr):
            assert re.search(r"\band on \(namespace, job, pod\) outbox_relay_\w+", expr), expr
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for topic in (
        "by broker and destination",
        "lag",
        "pending",
        "in flight",
        "failures",
        "dead letters",
        "commit-to-ack",
        "publish call duration",
        "wake-ups",
        "wal slot lag (bytes)",
        "wal slot lag (seconds)",
        "wal source state",
        "parked",
    ):
        assert topic in titles, topic
    for name in ("outbox-relay:standalone-values", "outbox-relay:sidecar-values"):
        maps = [
            o
            for o in of_kind(rendered[(name, KUBE_VERSIONS[-1])], "ConfigMap")
            if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        ]
        assert len(maps) == 1, name
        assert json.loads(maps[0]["data"]["outbox-relay.json"]) == board
    assert json.loads(DASHBOARD.read_text()) == board


# -- metric names against a running relay ------------------------------------------------


async def test_every_metric_in_the_dashboard_and_alerts_is_served_by_a_running_relay(
    db: str, tmp_path: Path, rendered: dict[tuple[str, str], list[Obj]]
) -> None:
    referenced: dict[str, set[str]] = {}
    for text in strings_in(dashboard()):
        for name in METRIC.findall(text):
            referenced.setdefault(name, set()).add("dashboard")
    for example, objects in renders(rendered):
        for rule in alert_rules(objects):
            for name in METRIC.findall(rule["expr"]):
                referenced.setdefault(name, set()).add(f"{example.name} {rule.get('alert')}")
    assert len(referenced) >= 14

    # A real relay with the file broker: messages delivered and one dead-lettered (no
    # route), so that the labelled series exist too.
    with psycopg.connect(db) as conn:
        for i in range(3):
            enqueue(conn, "orders.created", {"i": i}, key=f"order-{i}")
        enqueue(conn, "unrouted.topic", {"x": 1})
        conn.commit()
    config = make_config(
        db,
        brokers={"events": {"type": "file", "path": str(tmp_path / "events.jsonl")}},
        routes=[{"topic": "orders.*", "broker": "events", "destination": "orders"}],
    )
    async with running_relay(config, build_adapters(config), heartbeat_every=0.1) as relay:
        assert relay.http is not None
        url = f"http://127.0.0.1:{relay.http.port}/metrics"
        scraped = ""
        async with httpx.AsyncClient() as client:

            async def every_family_has_samples() -> bool:
                nonlocal scraped
                scraped = (await client.get(url)).text
                return "# TYPE outbox_relay_" in scraped and not families_without_samples(scraped)

            # The counters appear with their first event, the gauges after a heartbeat.
            await wait_until(every_family_has_samples, timeout=30, interval=0.1)
    samples, declared = exposition_names(scraped)
    missing = {name: sorted(where) for name, where in referenced.items() if name not in samples}
    assert not missing, f"not on /metrics: {missing}"
    assert set(referenced) <= declared
    # And the dashboard leaves out no metric the relay has.
    families = {n for n in samples if n.startswith("outbox_relay_") and not n.endswith("_created")}
    on_dashboard = {n for n, where in referenced.items() if "dashboard" in where}
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in on_dashboard}
    not_shown = {n for n in families if n not in on_dashboard and re.sub(r"_(bucket|sum|count)$", "", n) not in bases}
    assert not not_shown, f"metrics the dashboard does not show: {sorted(not_shown)}"


def test_metric_name_extraction_sees_histogram_and_counter_suffixes() -> None:
    text = (
        '# TYPE outbox_relay_x_total counter\noutbox_relay_x_total{a="b"} 1\n'
        '# TYPE outbox_relay_h histogram\noutbox_relay_h_bucket{le="1"} 0\n'
    )
    samples, declared = exposition_names(text)
    assert samples == {"outbox_relay_x_total", "outbox_relay_h_bucket"}
    assert {"outbox_relay_x_total", "outbox_relay_h_sum", "outbox_relay_h_count"} <= declared
    assert "outbox_relay_x_total_total" not in declared


def _matches(selector: Obj, labels: Obj) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def test_no_selector_counts_the_schema_hook_pod_as_a_relay(rendered: dict[tuple[str, str], list[Obj]]) -> None:
    # A PDB that matches a Job's pod blocks every eviction (a Job has no scale); the
    # Service, the NetworkPolicy and the monitors must not take it for a relay either.
    for (name, _version), objects in rendered.items():
        jobs = of_kind(objects, "Job")
        if not jobs:
            continue
        job_labels = jobs[0]["spec"]["template"]["metadata"]["labels"]
        selectors = [
            o["spec"]["selector"].get("matchLabels", {})
            for o in objects
            if o["kind"] in {"PodDisruptionBudget", "Deployment", "PodMonitor"}
        ]
        selectors += [o["spec"]["selector"] for o in of_kind(objects, "Service") if "selector" in o["spec"]]
        selectors += [o["spec"]["podSelector"].get("matchLabels", {}) for o in of_kind(objects, "NetworkPolicy")]
        assert selectors, name
        assert not any(_matches(s, job_labels) for s in selectors), name


def test_the_schema_hook_needs_its_own_ddl_secret(helm: Helm) -> None:
    # The relay's role is least-privileged and must not be the one that creates the
    # schema: no fallback to existingSecret.
    with pytest.raises(HelmError) as caught:
        helm.template(
            CHART, values=[STDOUT_VALUES], sets={"schemaInstall.enabled": "true", "existingSecret": "relay-database"}
        )
    assert "schemaInstall.existingSecret" in caught.value.stderr


def test_a_sidecar_never_keeps_the_application_pod_from_starting(
    helm: Helm, rendered: dict[tuple[str, str], list[Obj]], tmp_path: Path
) -> None:
    # A missing Secret or ConfigMap fails the relay container alone (optional refs), and
    # a cluster without native sidecars is refused instead of getting an init container
    # that never ends.
    pod = one(rendered[("app-chart:defaults", KUBE_VERSIONS[-1])], "Deployment")["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in sidecar["env"] if "valueFrom" in e]
    refs += [next(iter(e.values())) for e in sidecar.get("envFrom", [])]
    assert refs and all(ref.get("optional") is True for ref in refs), refs
    config = next(v for v in pod["volumes"] if "configMap" in v and v["name"] == "outbox-relay-config")
    assert config["configMap"]["optional"] is True
    # The sidecar template's own guard, in a user's chart that sets no kubeVersion.
    chart = tmp_path / "app"
    shutil.copytree(APP_CHART, chart, symlinks=False)
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta.pop("kubeVersion", None)
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(HelmError) as caught:
        helm.template(chart, kube_version="1.28.0")
    assert "native sidecars need Kubernetes 1.29" in caught.value.stderr
    assert one(helm.template(chart, kube_version="1.29.0"), "Deployment")
