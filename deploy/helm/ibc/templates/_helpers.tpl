{{/*
Names and labels shared by every template. Resource names are "<fullname>-<component>"; with the
release named "ibc" they match the plain manifests in deploy/ (ibc-proxy, ibc-webhook, ...).
*/}}

{{/* app.kubernetes.io/name: the same value as in the plain manifests, so selectors and docs agree. */}}
{{- define "ibc.name" -}}
{{- default "inference-budget-controller" .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ibc.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := .Chart.Name -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>", e.g. include "ibc.componentName" (list . "proxy") */}}
{{- define "ibc.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "ibc.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ibc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object: include "ibc.labels" (list . "proxy") */}}
{{- define "ibc.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "ibc.chart" $root }}
{{ include "ibc.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: inference-budget-controller
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels (stable across upgrades): include "ibc.selectorLabels" (list . "proxy") */}}
{{- define "ibc.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "ibc.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "ibc.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "ibc.serviceAccountName" -}}
{{- include "ibc.componentName" . -}}
{{- end -}}

{{/* Pod-level security context (restricted Pod Security Standard). */}}
{{- define "ibc.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{/* Container-level security context (restricted Pod Security Standard). */}}
{{- define "ibc.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* Common pod spec fields: image pull secrets, priority class. */}}
{{- define "ibc.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* Preferred anti-affinity spreading a component's replicas over nodes: (list . "proxy") */}}
{{- define "ibc.spreadAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "ibc.selectorLabels" . | nindent 12 }}
{{- end -}}

{{/* Scheduling knobs for a component: (list . .Values.proxy "proxy") */}}
{{- define "ibc.scheduling" -}}
{{- $root := index . 0 -}}
{{- $c := index . 1 -}}
{{- $name := index . 2 -}}
{{- with (default $root.Values.nodeSelector $c.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.tolerations $c.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
affinity:
{{- if $c.affinity }}
  {{- toYaml $c.affinity | nindent 2 }}
{{- else }}
  {{- include "ibc.spreadAffinity" (list $root $name) | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The /tmp emptyDir every container needs under a read-only root filesystem. */}}
{{- define "ibc.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{/* Name of the webhook's admission ledger ConfigMap. */}}
{{- define "ibc.ledgerName" -}}
{{- include "ibc.componentName" (list . "admission-ledger") -}}
{{- end -}}

{{/* KubeSchedulerConfiguration of the second scheduler (ConfigMap data and its checksum). */}}
{{- define "ibc.schedulerConfig" -}}
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
leaderElection:
  leaderElect: {{ .Values.scheduler.leaderElection }}
  resourceLock: leases
  resourceName: {{ include "ibc.componentName" (list . "scheduler") }}
  resourceNamespace: {{ .Release.Namespace }}
profiles:
  - schedulerName: {{ .Values.scheduler.schedulerName }}
extenders:
  - urlPrefix: https://{{ include "ibc.componentName" (list . "extender") }}.{{ .Release.Namespace }}.svc:{{ .Values.extender.port }}
    filterVerb: filter
    prioritizeVerb: prioritize
    bindVerb: bind
    weight: 5
    nodeCacheCapable: true
    enableHTTPS: true
    tlsConfig:
      caFile: /etc/ibc-extender-tls/ca.crt
    httpTimeout: 10s
    # A model pod is never placed without the budget's say: with the extender down it waits.
    ignorable: false
    managedResources: []
{{- end -}}

{{/* Resources of the short-lived `ibc certs bootstrap` containers. */}}
{{- define "ibc.certsResources" -}}
requests:
  cpu: 50m
  memory: 64Mi
limits:
  memory: 256Mi
{{- end -}}

{{/* The controller's liveness path (it also answers /healthz for older probes). */}}
{{- define "ibc.controllerLivenessPath" -}}
/livez
{{- end -}}
