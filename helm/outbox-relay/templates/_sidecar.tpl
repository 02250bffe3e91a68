{{/*
The relay as a Kubernetes native sidecar of an application's pod.

An application's chart lists this chart as a dependency (values under the key
"outbox-relay", with mode: sidecar) and includes, in its pod template:

  metadata:
    labels:
      {{- include "outbox-relay.sidecar.podLabels" . | nindent 8 }}
    annotations:
      {{- include "outbox-relay.sidecar.podAnnotations" . | nindent 8 }}
  spec:
    terminationGracePeriodSeconds: {{ add <the application's own drain> (include "outbox-relay.sidecar.terminationGracePeriodSeconds" .) }}
    imagePullSecrets:
      {{- include "outbox-relay.sidecar.imagePullSecrets" . | nindent 8 }}
    initContainers:
      {{- include "outbox-relay.sidecar" . | nindent 8 }}
    volumes:
      {{- include "outbox-relay.sidecar.volumes" . | nindent 8 }}

Each takes the application chart's root context `.` (the relay's values are then read
from .Values "outbox-relay"), or a dict with "Values" (the relay's values) and
"Release", e.g. for a dependency with an alias:
  (dict "Values" .Values.relay "Release" .Release)

The container is an init container with restartPolicy: Always: it starts before the
application's containers and, when the pod stops, gets its SIGTERM only after they have
exited, so it publishes what they committed until the end. The pod's
terminationGracePeriodSeconds must cover both: the application's drain and the relay's
(sidecar.terminationGracePeriodSeconds gives the relay's share).
*/}}

{{- define "outbox-relay.sidecar" -}}
{{- $values := ternary (index .Values "outbox-relay") .Values (hasKey .Values "outbox-relay") -}}
{{- $s := dict "Values" $values "Release" .Release -}}
{{- if ne $values.mode "sidecar" -}}
{{- fail "outbox-relay.sidecar: set mode: sidecar in the relay's values (outbox-relay.mode), or the chart also renders a standalone Deployment" -}}
{{- end -}}
{{- /* Before 1.29 the API server drops restartPolicy: Always from an init container: the
relay would become an init container that never ends, and the application never start. */ -}}
{{- if not (semverCompare ">=1.29-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "outbox-relay.sidecar: native sidecars need Kubernetes 1.29 or later (this cluster: %s); deploy the relay standalone (mode: standalone) instead" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- include "outbox-relay.container" (dict "scope" $s "name" $values.sidecar.containerName "portName" $values.sidecar.portName "restartPolicy" "Always" "readiness" $values.sidecar.gatePodReadiness "startup" $values.sidecar.holdApplicationUntilStarted "configVolume" "outbox-relay-config" "tmpVolume" "outbox-relay-tmp") -}}
{{- end -}}

{{- define "outbox-relay.sidecar.volumes" -}}
{{- $values := ternary (index .Values "outbox-relay") .Values (hasKey .Values "outbox-relay") -}}
{{- $s := dict "Values" $values "Release" .Release -}}
{{- include "outbox-relay.volumes" (dict "scope" $s "configVolume" "outbox-relay-config" "tmpVolume" "outbox-relay-tmp") }}
{{- with $values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The label the chart's PodMonitor selects sidecar pods by. */}}
{{- define "outbox-relay.sidecar.podLabels" -}}
{{- $values := ternary (index .Values "outbox-relay") .Values (hasKey .Values "outbox-relay") -}}
{{- $s := dict "Values" $values "Release" .Release -}}
outbox-relay/sidecar: {{ include "outbox-relay.fullname" $s | quote }}
{{- end -}}

{{/* A checksum of the relay's config: a changed config rolls the application's pods. */}}
{{- define "outbox-relay.sidecar.podAnnotations" -}}
{{- $values := ternary (index .Values "outbox-relay") .Values (hasKey .Values "outbox-relay") -}}
{{- $s := dict "Values" $values "Release" .Release -}}
checksum/outbox-relay-config: {{ include "outbox-relay.configChecksum" $s | quote }}
{{- end -}}

{{- define "outbox-relay.sidecar.imagePullSecrets" -}}
{{- $values := ternary (index .Values "outbox-relay") .Values (hasKey .Values "outbox-relay") -}}
{{- $s := dict "Values" $values "Release" .Release -}}
{{- include "outbox-relay.imagePullSecrets" $s -}}
{{- end -}}

{{/* The relay's share of the pod's terminationGracePeriodSeconds, in seconds. */}}
{{- define "outbox-relay.sidecar.terminationGracePeriodSeconds" -}}
{{- $values := ternary (index .Values "outbox-relay") .Values (hasKey .Values "outbox-relay") -}}
{{- $s := dict "Values" $values "Release" .Release -}}
{{- include "outbox-relay.terminationGracePeriodSeconds" $s -}}
{{- end -}}
