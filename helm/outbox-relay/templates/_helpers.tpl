{{/*
Helpers. Every helper takes a "scope": anything with .Values (this chart's values) and
.Release. In this chart's own templates that is `.`; the sidecar templates, called from
an application's chart, build one from the relay's values (see _sidecar.tpl). So names
are computed from a constant base, "outbox-relay", never from .Chart.Name, which is the
application's chart when a parent chart calls in.
*/}}

{{- define "outbox-relay.name" -}}
{{- default "outbox-relay" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "outbox-relay.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{/* Labels of the schema-install Job's pods: not the relay's selector labels, so that
the PDB, the Service, the NetworkPolicy and the monitors never count a hook pod as a
relay (a PDB matching a Job's pod stops every eviction: a Job has no scale). */}}
{{- define "outbox-relay.schemaJobLabels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
app.kubernetes.io/name: {{ printf "%s-schema" (include "outbox-relay.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbox-relay
app.kubernetes.io/component: schema-install
{{- end -}}

{{/* Labels of every object this chart renders (its own templates only: needs .Chart). */}}
{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbox-relay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The relay's version, the default image tag. The same as Chart.yaml's appVersion (a test
checks): a constant because an application's chart that includes the sidecar template
has its own .Chart.
*/}}
{{- define "outbox-relay.appVersion" -}}0.1.0{{- end -}}

{{/* registry/repository:tag or registry/repository@digest; global.imageRegistry wins. */}}
{{- define "outbox-relay.image" -}}
{{- $global := .Values.global | default dict -}}
{{- $registry := default .Values.image.registry $global.imageRegistry -}}
{{- $repository := required "image.repository is required" .Values.image.repository -}}
{{- $ref := "" -}}
{{- if .Values.image.digest -}}
{{- if not (regexMatch "^sha256:[a-f0-9]{64}$" .Values.image.digest) -}}
{{- fail (printf "outbox-relay: image.digest must look like sha256:<64 hex digits>, got %q" .Values.image.digest) -}}
{{- end -}}
{{- $ref = printf "@%s" .Values.image.digest -}}
{{- else -}}
{{- $ref = printf ":%s" (default (include "outbox-relay.appVersion" .) .Values.image.tag) -}}
{{- end -}}
{{- if $registry -}}
{{- printf "%s/%s%s" $registry $repository $ref -}}
{{- else -}}
{{- printf "%s%s" $repository $ref -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets entries (names or {name:}), global ones first, no duplicates. */}}
{{- define "outbox-relay.imagePullSecrets" -}}
{{- $global := .Values.global | default dict -}}
{{- $names := list -}}
{{- range concat ($global.imagePullSecrets | default list) (.Values.imagePullSecrets | default list) -}}
{{- $name := . -}}
{{- if kindIs "map" . }}{{ $name = .name }}{{ end -}}
{{- if and $name (not (has $name $names)) -}}
{{- $names = append $names $name -}}
{{- end -}}
{{- end -}}
{{- range $names }}
- name: {{ . }}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "outbox-relay.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.configMapName" -}}
{{- if .Values.existingConfigMap -}}
{{- .Values.existingConfigMap -}}
{{- else -}}
{{- printf "%s-config" (include "outbox-relay.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.configMapKey" -}}
{{- if .Values.existingConfigMap -}}{{ .Values.existingConfigMapKey }}{{- else -}}relay.yaml{{- end -}}
{{- end -}}

{{/*
Seconds in a duration of the relay's syntax ("500ms", "30s", "1m30s", "2h", "1d"),
rounded up to a whole second; fails on anything else.
*/}}
{{- define "outbox-relay.durationSeconds" -}}
{{- $text := toString . | replace " " "" -}}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(ms|s|m|h|d))+$" $text) -}}
{{- fail (printf "outbox-relay: invalid duration %q: give a number with a unit, e.g. 500ms, 30s, 5m" $text) -}}
{{- end -}}
{{- $units := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ms|s|m|h|d)" $text -1 -}}
{{- $unit := regexFind "(ms|s|m|h|d)$" . -}}
{{- $total = addf $total (mulf (float64 (trimSuffix $unit .)) (get $units $unit)) -}}
{{- end -}}
{{- ceil $total | int -}}
{{- end -}}

{{/* relay.shutdown_timeout in whole seconds (the relay's default, 30 s, when unset). */}}
{{- define "outbox-relay.shutdownTimeoutSeconds" -}}
{{- $relay := (.Values.config | default dict).relay | default dict -}}
{{- include "outbox-relay.durationSeconds" (default "30s" $relay.shutdown_timeout) -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds the relay needs: the value given (refused unless it is above
shutdown_timeout), or shutdown_timeout + 15 (the relay exits within shutdown_timeout and
about 5 s more; the rest is margin for the kubelet).
*/}}
{{- define "outbox-relay.terminationGracePeriodSeconds" -}}
{{- $shutdown := include "outbox-relay.shutdownTimeoutSeconds" . | int -}}
{{- $value := toString (.Values.terminationGracePeriodSeconds | default "") -}}
{{- if $value -}}
{{- $given := $value | int -}}
{{- if le $given $shutdown -}}
{{- fail (printf "outbox-relay: terminationGracePeriodSeconds (%d) must be above relay.shutdown_timeout (%d s): the kubelet would kill the relay while it drains; leave it empty for shutdown_timeout + 15" $given $shutdown) -}}
{{- end -}}
{{- $given -}}
{{- else -}}
{{- add $shutdown 15 -}}
{{- end -}}
{{- end -}}

{{/*
The relay's YAML: `config` with the chart's http block. Fails if a value that looks like a
secret (a password, token, secret or authorization key, or a URL/DSN with a password) is a
literal instead of a ${VAR} reference: secrets come from the environment, never from a
ConfigMap.
*/}}
{{- define "outbox-relay.configYaml" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- if hasKey $config "http" -}}
{{- fail "outbox-relay: config.http is set by the chart (0.0.0.0 and containerPorts.http, which the probes use): remove it and set containerPorts.http instead" -}}
{{- end -}}
{{- if and (not $config.brokers) (not $config.routes) -}}
{{- /* No default route: a default broker would mark every message dispatched without
delivering it (stdout: its payload in the pod's log), and a sidecar's NOTES.txt, where a
warning would go, is never shown. */ -}}
{{- fail "outbox-relay: config.brokers and config.routes are empty, and the chart routes nothing by default: name your brokers and route topics to them (values.yaml, config), or set existingConfigMap; a trial that writes every message to the pod's log and marks it dispatched: ci/stdout-values.yaml" -}}
{{- else if not $config.brokers -}}
{{- fail "outbox-relay: config.routes is set but config.brokers is empty: name the brokers the routes use" -}}
{{- else if not $config.routes -}}
{{- fail "outbox-relay: config.brokers is set but config.routes is empty: route at least one topic pattern (\"*\" for all) to a broker" -}}
{{- end -}}
{{- $_ := set $config "http" (dict "enabled" true "host" "0.0.0.0" "port" (.Values.containerPorts.http | int)) -}}
{{- $text := toYaml $config -}}
{{- range regexFindAll "(?im)^[ \\t-]*[\"']?[a-z0-9_.-]*(password|passwd|secret|token|authorization|api[_-]?key|credentials?)[a-z0-9_.-]*[\"']?[ \\t]*:[ \\t]*[^ \\t\\n].*$" $text -1 -}}
{{- $key := regexFind "^[ \\t-]*[\"']?[a-zA-Z0-9_.-]*" . | trimAll " \t-\"'" | lower -}}
{{- $value := regexReplaceAll "^[^:]*:[ \\t]*" . "" -}}
{{- if and (not (regexMatch "(_file|_path|_dir)$" $key)) (not (contains "${" $value)) (not (regexMatch "^[{\\[]" $value)) -}}
{{- fail (printf "outbox-relay: config key %q holds a literal value: secrets must come from the environment as ${VAR} (existingSecret, extraEnvVarsSecret), never from the ConfigMap" $key) -}}
{{- end -}}
{{- end -}}
{{- range regexFindAll "[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\\s:\"']+:[^/@\\s\"']+@" $text -1 -}}
{{- if not (contains "${" .) -}}
{{- fail "outbox-relay: a URL in config holds a literal password (scheme://user:password@...): use ${VAR} from the environment instead" -}}
{{- end -}}
{{- end -}}
{{- range regexFindAll "(?i)password[ \\t]*=[ \\t]*['\"]?[^ \\t'\"]+" $text -1 -}}
{{- if not (contains "${" .) -}}
{{- fail "outbox-relay: a DSN in config holds a literal password= parameter: use ${DATABASE_URL} from the environment (existingSecret) instead" -}}
{{- end -}}
{{- end -}}
{{- $text -}}
{{- end -}}

{{/* Environment of the relay container (and the schema Job, with its own DSN secret). */}}
{{- define "outbox-relay.env" -}}
{{- $secret := .Values.existingSecret -}}
{{- $key := .Values.existingSecretDsnKey -}}
- name: OUTBOX_RELAY_CONFIG
  value: /etc/outbox-relay/relay.yaml
{{- if $secret }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret | quote }}
      key: {{ $key | quote }}
      {{- if eq (.Values.mode | default "") "sidecar" }}
      # A sidecar's missing Secret must not keep the application's pod from starting:
      # the relay starts without it, says what is missing in one line, and restarts.
      optional: true
      {{- end }}
{{- end }}
{{- with .Values.extraEnvVars }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "outbox-relay.envFrom" -}}
{{- $optional := eq (.Values.mode | default "") "sidecar" }}
{{- with .Values.extraEnvVarsCM }}
- configMapRef:
    name: {{ . | quote }}
    {{- if $optional }}
    optional: true
    {{- end }}
{{- end }}
{{- with .Values.extraEnvVarsSecret }}
- secretRef:
    name: {{ . | quote }}
    {{- if $optional }}
    optional: true
    {{- end }}
{{- end }}
{{- end -}}

{{/* A probe from its values block (enabled + timings) or its custom replacement. */}}
{{- define "outbox-relay.probe" -}}
{{- $custom := .custom | default dict -}}
{{- if $custom -}}
{{- toYaml $custom -}}
{{- else -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
{{ omit .probe "enabled" | toYaml }}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.containerSecurityContext" -}}
{{- if .Values.containerSecurityContext.enabled -}}
{{- omit .Values.containerSecurityContext "enabled" | toYaml -}}
{{- end -}}
{{- end -}}

{{/*
The relay container, shared by the Deployment and the sidecar. Parameters (a dict):
  scope: the scope (.Values, .Release); name: container name; portName: metrics port name;
  readiness, startup: whether to add those probes.
*/}}
{{- define "outbox-relay.container" -}}
{{- $s := .scope -}}
{{- $v := $s.Values -}}
- name: {{ .name }}
  image: {{ include "outbox-relay.image" $s }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- with .restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  {{- if $v.command }}
  command:
    {{- toYaml $v.command | nindent 4 }}
  {{- end }}
  args:
    {{- if $v.args }}
    {{- toYaml $v.args | nindent 4 }}
    {{- else }}
    - run
    - --config
    - /etc/outbox-relay/relay.yaml
    - --log-level
    - {{ $v.logLevel | quote }}
    {{- end }}
  ports:
    - name: {{ .portName }}
      containerPort: {{ $v.containerPorts.http }}
      protocol: TCP
  env:
    {{- include "outbox-relay.env" $s | nindent 4 }}
  {{- with (include "outbox-relay.envFrom" $s | trim) }}
  envFrom:
    {{- . | nindent 4 }}
  {{- end }}
  {{- if or $v.customLivenessProbe $v.livenessProbe.enabled }}
  livenessProbe:
    {{- include "outbox-relay.probe" (dict "custom" $v.customLivenessProbe "probe" $v.livenessProbe "path" "/livez" "port" .portName) | nindent 4 }}
  {{- end }}
  {{- if and .readiness (or $v.customReadinessProbe $v.readinessProbe.enabled) }}
  readinessProbe:
    {{- include "outbox-relay.probe" (dict "custom" $v.customReadinessProbe "probe" $v.readinessProbe "path" "/readyz" "port" .portName) | nindent 4 }}
  {{- end }}
  {{- if and .startup (or $v.customStartupProbe $v.startupProbe.enabled) }}
  startupProbe:
    {{- include "outbox-relay.probe" (dict "custom" $v.customStartupProbe "probe" $v.startupProbe "path" "/livez" "port" .portName) | nindent 4 }}
  {{- end }}
  {{- with $v.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (include "outbox-relay.containerSecurityContext" $s) }}
  securityContext:
    {{- . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: {{ .configVolume }}
      mountPath: /etc/outbox-relay
      readOnly: true
    - name: {{ .tmpVolume }}
      mountPath: /tmp
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The relay's volumes: its config (relay.yaml) and a writable /tmp. `ownPod`: for a
workload of the chart's own in sidecar mode (the console), whose ConfigMap is not optional. */}}
{{- define "outbox-relay.volumes" -}}
{{- $s := .scope -}}
- name: {{ .configVolume }}
  configMap:
    name: {{ include "outbox-relay.configMapName" $s }}
    {{- if and (not .ownPod) (eq ($s.Values.mode | default "") "sidecar") }}
    optional: true  # a missing ConfigMap stops the relay alone, never the application's pod
    {{- end }}
    items:
      - key: {{ include "outbox-relay.configMapKey" $s }}
        path: relay.yaml
- name: {{ .tmpVolume }}
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{/* Checksum of the rendered config: a changed config rolls the pods. */}}
{{- define "outbox-relay.configChecksum" -}}
{{- if .Values.existingConfigMap -}}
{{- printf "%s/%s" .Values.existingConfigMap .Values.existingConfigMapKey | sha256sum -}}
{{- else -}}
{{- include "outbox-relay.configYaml" . | sha256sum -}}
{{- end -}}
{{- end -}}

{{/* Checks run once per render (from the ConfigMap template, rendered in both modes). */}}
{{- define "outbox-relay.validateValues" -}}
{{- if not (has .Values.mode (list "standalone" "sidecar")) -}}
{{- fail (printf "outbox-relay: mode must be standalone or sidecar, got %q" (toString .Values.mode)) -}}
{{- end -}}
{{- $_ := include "outbox-relay.terminationGracePeriodSeconds" . -}}
{{- if not .Values.existingConfigMap -}}
{{- $_ := include "outbox-relay.configYaml" . -}}
{{- end -}}
{{- if and .Values.schemaInstall.enabled (not .Values.schemaInstall.existingSecret) -}}
{{- fail "outbox-relay: schemaInstall.enabled needs schemaInstall.existingSecret: a Secret with the DSN of a role that may create the schema (the relay's own role should not: keep it least-privileged)" -}}
{{- end -}}
{{- if gt (len .Values.sidecar.portName) 15 -}}
{{- fail "outbox-relay: sidecar.portName must be at most 15 characters (a Kubernetes port name)" -}}
{{- end -}}
{{- include "outbox-relay.console.validateToken" . -}}
{{- end -}}

{{/* The PromQL label matchers of the alerts (see metrics.prometheusRule.selector). */}}
{{- define "outbox-relay.alertSelector" -}}
{{- $rule := .Values.metrics.prometheusRule -}}
{{- if $rule.selector -}}
{{- $rule.selector -}}
{{- else -}}
{{- $fullname := include "outbox-relay.fullname" . -}}
{{- $ns := include "outbox-relay.namespace" . -}}
{{- if and (eq .Values.mode "standalone") (or .Values.metrics.serviceMonitor.enabled (not .Values.metrics.podMonitor.enabled)) -}}
{{- printf "namespace=%q, job=%q" $ns $fullname -}}
{{- else -}}
{{- printf "namespace=%q, job=%q" $ns (printf "%s/%s" (default $ns .Values.metrics.podMonitor.namespace) $fullname) -}}
{{- end -}}
{{- end -}}
{{- end -}}
