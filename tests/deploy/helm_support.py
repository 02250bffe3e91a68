"""Rendering the Helm charts under helm/ for the deployment tests.

helm comes from scripts/services/helm.sh: a pinned Helm v3 built once from the Go module
proxy and cached in ~/.cache/outbox-relay/bin. Every helm call runs with its own
HELM_{CACHE,CONFIG,DATA}_HOME, so the tests neither read nor change a user's helm setup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM_DIR = ROOT / "helm"
CHART = HELM_DIR / "outbox-relay"
# The chart's defaults plus the one thing it requires, brokers and routes: every topic to
# a stdout broker, chosen explicitly (the chart has no default route).
STDOUT_VALUES = CHART / "ci" / "stdout-values.yaml"
DEFAULTS = "outbox-relay:stdout-values"
APP_CHART = HELM_DIR / "examples" / "app-chart"
PLAIN_SIDECAR = HELM_DIR / "examples" / "sidecar-plain.yaml"
PLAIN_SCHEMA_JOB = HELM_DIR / "examples" / "schema-install-job.yaml"
DASHBOARD = CHART / "dashboards" / "outbox-relay.json"
HELM_SCRIPT = ROOT / "scripts" / "services" / "helm.sh"

KUBE_VERSIONS = ("1.30.0", "1.33.0")
MONITORING_API = "monitoring.coreos.com/v1"
CRD_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})
# Fields of the Prometheus Operator's v1 CRDs (monitoring.coreos.com_*.yaml) that a
# structural check accepts; kubernetes-validate has no schemas for them.
MONITOR_SPEC_FIELDS = frozenset(
    {
        "attachMetadata",
        "bodySizeLimit",
        "endpoints",
        "podMetricsEndpoints",
        "jobLabel",
        "keepDroppedTargets",
        "labelLimit",
        "labelNameLengthLimit",
        "labelValueLengthLimit",
        "namespaceSelector",
        "podTargetLabels",
        "sampleLimit",
        "scrapeClass",
        "scrapeProtocols",
        "selector",
        "targetLabels",
        "targetLimit",
    }
)
ENDPOINT_FIELDS = frozenset(
    {
        "authorization",
        "basicAuth",
        "bearerTokenFile",
        "bearerTokenSecret",
        "enableHttp2",
        "filterRunning",
        "followRedirects",
        "honorLabels",
        "honorTimestamps",
        "interval",
        "metricRelabelings",
        "oauth2",
        "params",
        "path",
        "port",
        "portNumber",
        "proxyUrl",
        "relabelings",
        "scheme",
        "scrapeTimeout",
        "targetPort",
        "tlsConfig",
        "trackTimestampsStaleness",
    }
)
RULE_FIELDS = frozenset({"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"})
RULE_GROUP_FIELDS = frozenset(
    {"name", "rules", "interval", "limit", "partial_response_strategy", "query_offset", "labels"}
)
CONFIG_MOUNT = "/etc/outbox-relay"
RELEASE = "shop"
NAMESPACE = "shop"
# The operator console (console.enabled): the example that turns it on, the variable its
# sign-in token comes in, and the label its objects carry (the relay's objects do not).
CONSOLE_VALUES = CHART / "ci" / "console-values.yaml"
CONSOLE_TOKEN_VARIABLE = "OUTBOX_RELAY_CONSOLE_TOKEN"
COMPONENT = "app.kubernetes.io/component"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Example:
    """A chart and one values file (None: the chart's defaults)."""

    name: str
    chart: Path
    values: Path | None


def examples() -> list[Example]:
    # The chart alone does not render (no brokers, no routes): its defaults are the
    # DEFAULTS example, which adds only those.
    found = [Example(f"outbox-relay:{p.stem}", CHART, p) for p in sorted((CHART / "ci").glob("*-values.yaml"))]
    found.append(Example("app-chart:defaults", APP_CHART, None))
    found += [Example(f"app-chart:{p.stem}", APP_CHART, p) for p in sorted((APP_CHART / "ci").glob("*-values.yaml"))]
    return found


def install_helm() -> Path:
    """The cached helm binary; built on first use (a few minutes, once per machine)."""
    result = subprocess.run([str(HELM_SCRIPT)], capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/services/helm.sh failed (rc={result.returncode}): {result.stderr.strip()}")
    return Path(result.stdout.strip().splitlines()[-1])


class HelmError(RuntimeError):
    def __init__(self, args: Sequence[str], result: subprocess.CompletedProcess[str]):
        self.stderr = result.stderr
        super().__init__(f"helm {' '.join(args)} failed (rc={result.returncode}):\n{result.stderr}")


class Helm:
    def __init__(self, binary: Path, home: Path):
        self.binary = binary
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, cwd=cwd, timeout=300, check=False
        )
        if result.returncode != 0:
            raise HelmError(args, result)
        return result.stdout

    def template(
        self,
        chart: Path,
        *,
        values: Sequence[Path] = (),
        kube_version: str = KUBE_VERSIONS[-1],
        sets: Mapping[str, str] | None = None,
    ) -> list[Obj]:
        args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version", kube_version]
        for path in values:
            args += ["--values", str(path)]
        for key, value in (sets or {}).items():
            args += ["--set", f"{key}={value}"]
        return load_objects(self.run(*args))

    def render(self, example: Example, kube_version: str) -> list[Obj]:
        return self.template(
            example.chart, values=[example.values] if example.values else [], kube_version=kube_version
        )


def load_objects(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def of_kind(objects: Sequence[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o.get("kind") == kind]


def one(objects: Sequence[Obj], kind: str) -> Obj:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_specs(objects: Sequence[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod template) for every object that has one."""
    for obj in objects:
        template = obj.get("spec", {}).get("template")
        if obj.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "Job"} and template:
            yield obj, template


def relay_containers(pod: Obj) -> list[Obj]:
    """Containers and init containers of a pod template that run the relay."""
    spec = pod["spec"]
    return [
        c
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]
        if (c.get("args") or [None])[0] == "run"
        and any(m.get("mountPath") == CONFIG_MOUNT for m in c.get("volumeMounts", []))
    ]


def console_objects(objects: Sequence[Obj]) -> list[Obj]:
    """The console's objects: labelled component=console, or named <fullname>-console."""
    return [
        o
        for o in objects
        if o["metadata"].get("labels", {}).get(COMPONENT) == "console" or o["metadata"]["name"].endswith("-console")
    ]


def console_pod(objects: Sequence[Obj]) -> tuple[Obj, Obj, Obj]:
    """(Deployment, pod template, container) of the one console."""
    deployment = one(console_objects(objects), "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return deployment, pod, container


def relay_pod(objects: Sequence[Obj]) -> tuple[Obj, Obj, Obj]:
    """(Deployment, pod template, container) of the standalone relays, beside a console."""
    (deployment,) = [d for d in of_kind(objects, "Deployment") if d not in console_objects(objects)]
    pod = deployment["spec"]["template"]
    (container,) = relay_containers(pod)
    return deployment, pod, container


def env_of(container: Obj) -> dict[str, Obj]:
    """A container's env entries by name; a name set twice fails."""
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"{container['name']}: a variable set twice: {names}"
    return {e["name"]: e for e in container.get("env", [])}


def relay_config_maps(objects: Sequence[Obj]) -> dict[str, str]:
    """name -> relay.yaml text, for the relay ConfigMaps among the objects."""
    return {
        o["metadata"]["name"]: o["data"]["relay.yaml"]
        for o in of_kind(objects, "ConfigMap")
        if "relay.yaml" in o.get("data", {})
    }


def mounted_config(pod: Obj, container: Obj) -> tuple[str, str]:
    """(ConfigMap name, key) that the relay container reads its relay.yaml from."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_MOUNT)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    item = next(i for i in volume["configMap"]["items"] if i["path"] == "relay.yaml")
    return volume["configMap"]["name"], item["key"]


def notes_chart(dest: Path) -> Path:
    """A copy of the chart that also renders its NOTES.txt, as the ConfigMap "notes" (helm
    renders NOTES.txt only on install, and `helm template` never shows it)."""
    chart = dest / "outbox-relay"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_test.tpl").write_text('{{- define "notes-test" -}}\n' + notes + "\n{{- end -}}\n")
    (chart / "templates" / "notes-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "notes-test" . | quote }}\n'
    )
    return chart


def rendered_notes(helm: Helm, chart: Path, *values: Path, sets: Mapping[str, str] | None = None) -> str:
    """NOTES.txt as a chart made by notes_chart() renders it."""
    objects = helm.template(chart, values=values, sets=sets)
    text: str = next(o for o in objects if o["metadata"]["name"] == "notes")["data"]["notes"]
    return text


VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def required_variables(text: str) -> set[str]:
    """${VAR} references without a default in a relay config."""
    return {m.group(1) for m in VARIABLE.finditer(text) if m.group(2) is None}


def all_variables(text: str) -> set[str]:
    return {m.group(1) for m in VARIABLE.finditer(text)}


# Metric names -----------------------------------------------------------------------

METRIC = re.compile(r"\boutbox_relay_[a-z0-9_]*[a-z0-9]\b")


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def dashboard() -> Obj:
    loaded: Obj = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def dashboard_expressions(board: Obj) -> list[str]:
    """Every PromQL expression of the dashboard's panels and variables."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(board.get("panels", []))
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            found.append(query["query"] if isinstance(query, Mapping) else str(query))
    return found


GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "$namespace": ".*",
    "$job": ".*",
    "$pod": ".*",
}
LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?([a-zA-Z_][a-zA-Z0-9_]*)\)$")


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, label_values() unwrapped."""
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    match = LABEL_VALUES.match(expr.strip())
    if match:
        return match.group(1) or "up"
    return expr


def alert_rules(objects: Sequence[Obj]) -> list[Obj]:
    return [
        rule for o in of_kind(objects, "PrometheusRule") for group in o["spec"]["groups"] for rule in group["rules"]
    ]


def exposition_names(text: str) -> tuple[set[str], set[str]]:
    """(names of samples, names that the declared families expose) in Prometheus text."""
    samples: set[str] = set()
    declared: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "untyped": ("",),
    }
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind.strip() == "counter":
                name = name.removesuffix("_total")
            declared.update(name + suffix for suffix in suffixes.get(kind.strip(), ("",)))
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return samples, declared


def families_without_samples(text: str) -> set[str]:
    """Metric families declared in Prometheus text that have no sample yet."""
    samples, _ = exposition_names(text)
    empty: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            kinds = {"counter": name, "histogram": f"{name}_count", "summary": f"{name}_count"}
            expected = kinds.get(kind.strip(), name)
            if expected not in samples:
                empty.add(name)
    return empty
