{{/* Names, labels and the small pieces every component shares. */}}

{{- define "splitserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "splitserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's resource name: (dict "ctx" $ "component" "prefill") */}}
{{- define "splitserve.componentName" -}}
{{- printf "%s-%s" (include "splitserve.fullname" .ctx | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "splitserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/part-of: splitserve
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{/* repository:tag, or repository@digest when image.digest pins it. */}}
{{- define "splitserve.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "splitserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.plannerServiceAccountName" -}}
{{- include "splitserve.componentName" (dict "ctx" . "component" "planner") -}}
{{- end -}}

{{/* The checkpoint directory as the processes see it. */}}
{{- define "splitserve.modelDir" -}}
{{- if .Values.model.dir -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.dir) -}}
{{- else -}}
{{- .Values.model.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.redisPasswordSecretName" -}}
{{- if .Values.redis.passwordSecret.name -}}
{{- .Values.redis.passwordSecret.name -}}
{{- else if eq .Values.redis.mode "bundled" -}}
{{- include "splitserve.componentName" (dict "ctx" . "component" "redis") -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.redisUrl" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- required "redis.external.url is required when redis.mode is external" .Values.redis.external.url -}}
{{- else -}}
{{- printf "redis://%s:6379/0" (include "splitserve.componentName" (dict "ctx" . "component" "redis")) -}}
{{- end -}}
{{- end -}}

{{/* Env for every process that talks to the control plane. */}}
{{- define "splitserve.redisEnv" -}}
{{- $secret := include "splitserve.redisPasswordSecretName" . -}}
{{- if $secret -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.redis.passwordSecret.key }}
{{- end }}
{{- end -}}

{{/* The model volume for the chosen source. */}}
{{- define "splitserve.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ required "model.hostPath.path is required when model.source is hostPath" .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.image.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "splitserve.modelVolumeMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end -}}

{{/* Copies the checkpoint out of model.image when that is the source. (dict "ctx" $ "component" "prefill") */}}
{{- define "splitserve.modelInitContainers" -}}
{{- $v := .ctx.Values -}}
{{- if eq $v.model.source "image" -}}
- name: copy-model
  image: {{ printf "%s:%s" (required "model.image.repository is required when model.source is image" $v.model.image.repository) (required "model.image.tag is required when model.source is image" $v.model.image.tag) }}
  imagePullPolicy: {{ $v.model.image.pullPolicy }}
  command: ["cp", "-a", "{{ trimSuffix "/" $v.model.image.sourcePath }}/.", "{{ $v.model.mountPath }}/"]
  resources:
    {{- toYaml $v.model.image.resources | nindent 4 }}
  securityContext:
    {{- include "splitserve.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $v.model.mountPath }}
{{- end }}
{{- end -}}

{{/* preStop: keep serving while endpoints and the control plane drop the pod. */}}
{{- define "splitserve.preStop" -}}
{{- if gt (int .) 0 -}}
lifecycle:
  preStop:
    sleep:
      seconds: {{ int . }}
{{- end }}
{{- end -}}

{{/* --drain-seconds: what is left of the grace period after preStop, less time to exit. */}}
{{- define "splitserve.drainSeconds" -}}
{{- sub (int .terminationGracePeriodSeconds) (add (int .preStopSleepSeconds) 10) | max 1 -}}
{{- end -}}

{{- define "splitserve.scrapeAnnotations" -}}
{{- if .ctx.Values.monitoring.scrapeAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* True when something other than the chart owns a pool's replica count. */}}
{{- define "splitserve.replicasManaged" -}}
{{- $pool := index .ctx.Values .component -}}
{{- if or $pool.autoscaling.enabled $pool.keda.enabled .ctx.Values.planner.enabled -}}true{{- end -}}
{{- end -}}

{{/* The internalTLS Secret (tls.crt, tls.key, ca.crt) as a pod volume: router and workers. */}}
{{- define "splitserve.internalTLSVolume" -}}
- name: internal-tls
  secret:
    secretName: {{ .Values.internalTLS.secretName }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end -}}

{{/* A component's pod labels: the chart's, then its podLabels. (dict "ctx" $ "component" "prefill") */}}
{{- define "splitserve.podLabels" -}}
{{ include "splitserve.labels" . }}
{{- with (index .ctx.Values .component).podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Pod spec fields every component takes the same way: priority and runtime class, the pod
securityContext, and where it may run. (dict "ctx" $ "component" "prefill")
*/}}
{{- define "splitserve.podPlacement" -}}
{{- $pool := index .ctx.Values .component -}}
{{- with $pool.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $pool.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .ctx.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* containerSecurityContext with the component's securityContext over it. */}}
{{- define "splitserve.containerSecurityContext" -}}
{{- $pool := index .ctx.Values .component -}}
{{- toYaml (mergeOverwrite (deepCopy .ctx.Values.containerSecurityContext) ($pool.securityContext | default dict)) -}}
{{- end -}}

{{/* Init containers: the model copy (model.source image), then the component's extraInitContainers. */}}
{{- define "splitserve.initContainers" -}}
{{- $pool := index .ctx.Values .component -}}
{{- with include "splitserve.modelInitContainers" (dict "ctx" .ctx "component" .component) }}
{{ . }}
{{- end }}
{{- with $pool.extraInitContainers }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The root filesystem is read-only: Python, Triton and torch write caches under HOME and /tmp,
so both point at an emptyDir.
*/}}
{{- define "splitserve.scratchEnv" -}}
- {name: HOME, value: /tmp}
{{- end -}}

{{- define "splitserve.scratchMount" -}}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{- define "splitserve.scratchVolume" -}}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* Who sets a pool's replicas, for NOTES.txt. */}}
{{- define "splitserve.replicasNote" -}}
{{- $pool := index .ctx.Values .component -}}
{{- if $pool.autoscaling.enabled -}}replicas set by its HPA
{{- else if $pool.keda.enabled -}}replicas set by KEDA
{{- else if .ctx.Values.planner.enabled -}}replicas set by the planner
{{- else -}}{{ int $pool.replicas }} replicas
{{- end -}}
{{- end -}}

{{/* The worker credential (auth.workerKeysSecret) as a flag, a mount and a volume: router and workers alike. */}}
{{- define "splitserve.workerKeysArg" -}}
{{- if .Values.auth.workerKeysSecret }}
- --worker-keys-file=/etc/splitserve/worker-auth/keys
{{- end }}
{{- end -}}

{{- define "splitserve.workerKeysMount" -}}
{{- if .Values.auth.workerKeysSecret }}
- {name: worker-keys, mountPath: /etc/splitserve/worker-auth, readOnly: true}
{{- end }}
{{- end -}}

{{- define "splitserve.workerKeysVolume" -}}
{{- if .Values.auth.workerKeysSecret }}
- name: worker-keys
  secret:
    secretName: {{ .Values.auth.workerKeysSecret }}
    defaultMode: 0440
    items:
      - {key: {{ .Values.auth.workerKeysSecretKey }}, path: keys}
{{- end }}
{{- end -}}
