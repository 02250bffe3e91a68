{{/*
The operator console (console.enabled): `outbox-relay console`, its own Deployment in both
modes, beside the relays (standalone) or the application's pods (sidecar). It reads the
relay's relay.yaml (the same ConfigMap) and its database DSN from DATABASE_URL, as the
relay does, and its sign-in token from OUTBOX_RELAY_CONSOLE_TOKEN, which only a Secret the
user creates provides (console.token.existingSecret): the chart refuses a token in values.
*/}}

{{/* Its objects' name: <fullname>-console. */}}
{{- define "outbox-relay.console.fullname" -}}
{{- printf "%s-console" (include "outbox-relay.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{/* Its pods' labels: not the relay's selector labels, so that the relay's Service, PDB,
NetworkPolicy, monitors and anti-affinity never count a console pod as a relay, and the
ServiceMonitor (which selects Services by the relay's labels) never scrapes the console. */}}
{{- define "outbox-relay.console.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-console" (include "outbox-relay.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: console
{{- end -}}

{{- define "outbox-relay.console.labels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
{{ include "outbox-relay.console.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbox-relay
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The label a pod needs for the console's NetworkPolicy to let it in (key: value). */}}
{{- define "outbox-relay.console.clientLabel" -}}
outbox-relay/console-client: {{ include "outbox-relay.fullname" . | quote }}
{{- end -}}

{{/* The one message for a console token given in values; `.` says where it was found. */}}
{{- define "outbox-relay.console.tokenInValues" -}}
{{- fail (printf "outbox-relay: %s holds the console's sign-in token: it comes only from a Secret you create, named by console.token.existingSecret (its key: console.token.key, default \"token\"), never from values" .) -}}
{{- end -}}

{{/*
Refuses a sign-in token in values, whether or not the console is enabled: console.token as
a string, any key of console.token but existingSecret and key, or OUTBOX_RELAY_CONSOLE_TOKEN
among extraEnvVars or console.extraEnvVars (the way around console.token). The schema lets
these shapes through so that this one line, which never echoes the value, is what the
user reads. Called before anything reads console.token.
*/}}
{{- define "outbox-relay.console.validateToken" -}}
{{- $console := .Values.console | default dict -}}
{{- $token := $console.token | default dict -}}
{{- if not (kindIs "map" $token) -}}
{{- include "outbox-relay.console.tokenInValues" "console.token" -}}
{{- end -}}
{{- range $key, $_ := $token -}}
{{- if not (has $key (list "existingSecret" "key")) -}}
{{- include "outbox-relay.console.tokenInValues" (printf "console.token.%s" $key) -}}
{{- end -}}
{{- end -}}
{{- range $where, $vars := dict "extraEnvVars" .Values.extraEnvVars "console.extraEnvVars" $console.extraEnvVars -}}
{{- range $vars | default list -}}
{{- if and (kindIs "map" .) (eq (toString .name) "OUTBOX_RELAY_CONSOLE_TOKEN") -}}
{{- include "outbox-relay.console.tokenInValues" $where -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The console container's environment: the config's path; DATABASE_URL from
console.existingSecret (a role of its own), or else from the relay's existingSecret; the
sign-in token from its Secret only (none: the console is read-only); with
console.inheritExtraEnv the relay's extraEnvVars (the relay.yaml they share may interpolate
any of them: the config does not load with one unset), without a DATABASE_URL there that
would replace the console's own; then console.extraEnvVars.
*/}}
{{- define "outbox-relay.console.env" -}}
{{- include "outbox-relay.console.validateToken" . -}}
{{- $c := .Values.console -}}
{{- $secret := .Values.existingSecret -}}
{{- $key := .Values.existingSecretDsnKey -}}
{{- if $c.existingSecret -}}
{{- $secret = $c.existingSecret -}}
{{- $key = $c.existingSecretDsnKey -}}
{{- end -}}
- name: OUTBOX_RELAY_CONFIG
  value: /etc/outbox-relay/relay.yaml
{{- if $secret }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret | quote }}
      key: {{ $key | quote }}
{{- end }}
{{- with ($c.token | default dict).existingSecret }}
- name: OUTBOX_RELAY_CONSOLE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ default "token" $c.token.key | quote }}
{{- end }}
{{- if $c.inheritExtraEnv }}
{{- range .Values.extraEnvVars }}
{{- if not (and $c.existingSecret (eq (toString .name) "DATABASE_URL")) }}
{{ list . | toYaml }}
{{- end }}
{{- end }}
{{- end }}
{{- with $c.extraEnvVars }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The relay's extraEnvVarsCM and extraEnvVarsSecret (console.inheritExtraEnv), not
optional: the console is a Deployment of its own, whose missing Secret stops only it. */}}
{{- define "outbox-relay.console.envFrom" -}}
{{- if .Values.console.inheritExtraEnv }}
{{- with .Values.extraEnvVarsCM }}
- configMapRef:
    name: {{ . | quote }}
{{- end }}
{{- with .Values.extraEnvVarsSecret }}
- secretRef:
    name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}
