{{/*
The prefill and decode pools run the same worker with different roles, ports and sizes,
so their resources share these bodies. Each takes (dict "ctx" $ "component" "prefill").
*/}}

{{- define "splitserve.worker.deployment" -}}
{{- $ := .ctx -}}
{{- $pool := index $.Values .component -}}
{{- $name := include "splitserve.componentName" . -}}
{{- $tp := int $pool.tpSize -}}
{{- $mtls := $.Values.internalTLS -}}
{{- /* The kubelet's gRPC probe speaks plaintext only, so a TLS listener is probed by TCP. */ -}}
{{- $probe := ternary (dict "tcpSocket" (dict "port" "grpc")) (dict "grpc" (dict "port" (int $pool.ports.grpc))) $mtls.enabled -}}
{{- if le (int $.Values.kvTransfer.endPort) (int $.Values.kvTransfer.port) -}}
{{- fail (printf "kvTransfer.endPort (%d) must be above kvTransfer.port (%d)" (int $.Values.kvTransfer.endPort) (int $.Values.kvTransfer.port)) -}}
{{- end -}}
{{- if gt (len (without (list $pool.autoscaling.enabled $pool.keda.enabled $.Values.planner.enabled) false)) 1 -}}
{{- fail (printf "%s.autoscaling.enabled, %s.keda.enabled and planner.enabled each set the %s Deployment's replicas: enable one" .component .component .component) -}}
{{- end -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "splitserve.labels" . | nindent 4 }}
spec:
  {{- if not (include "splitserve.replicasManaged" .) }}
  replicas: {{ int $pool.replicas }}
  {{- end }}
  strategy:
    {{- toYaml $pool.strategy | nindent 4 }}
  selector:
    matchLabels:
      {{- include "splitserve.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "splitserve.podLabels" . | nindent 8 }}
      {{- with merge (dict) $pool.podAnnotations (include "splitserve.scrapeAnnotations" (dict "ctx" $ "port" $pool.ports.metrics) | fromYaml) }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "splitserve.serviceAccountName" $ }}
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ int $pool.terminationGracePeriodSeconds }}
      {{- include "splitserve.podPlacement" . | nindent 6 }}
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "splitserve.initContainers" . }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "splitserve.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          command: ["splitserve"]
          args:
            - {{ .component }}
            - --model={{ include "splitserve.modelDir" $ }}
            - --host=0.0.0.0
            - --port={{ int $pool.ports.grpc }}
            - --metrics-port={{ int $pool.ports.metrics }}
            - --drain-seconds={{ include "splitserve.drainSeconds" $pool }}
            - --advertise-address=$(POD_IP):{{ int $pool.ports.grpc }}
            - --worker-id=$(POD_NAME)
            - --device=cuda
            - --tp-size={{ $tp }}
            - --max-num-seqs={{ int $pool.maxNumSeqs }}
            - --max-num-batched-tokens={{ int $pool.maxNumBatchedTokens }}
            {{- $async := toString $pool.asyncScheduling }}
            - --async-scheduling={{ if eq $async "true" }}on{{ else if eq $async "false" }}off{{ else }}{{ $async }}{{ end }}
            - --kv-cache-dtype={{ $pool.kvCacheDtype | default "auto" }}
            {{- if gt (int ($pool.hostKVCacheMB | default 0)) 0 }}
            - --host-kv-cache-mb={{ int $pool.hostKVCacheMB }}
            {{- end }}
            {{- if $pool.acceptPrefill }}
            {{- if ne .component "decode" }}
            {{- fail (printf "%s.acceptPrefill: only a decode pool can take prefill work for others" .component) }}
            {{- end }}
            - --accept-prefill
            {{- end }}
            {{- with $pool.quantization }}
            - --quantization={{ . }}
            {{- end }}
            - --control-plane={{ include "splitserve.redisUrl" $ }}
            {{- if include "splitserve.redisPasswordSecretName" $ }}
            - --control-plane-password-env=REDIS_PASSWORD
            {{- end }}
            {{- if $mtls.enabled }}
            - --tls-cert=/etc/splitserve/internal-tls/tls.crt
            - --tls-key=/etc/splitserve/internal-tls/tls.key
            - --tls-ca=/etc/splitserve/internal-tls/ca.crt
            - --tls-server-name={{ $mtls.serverName }}
            {{- end }}
            {{- include "splitserve.workerKeysArg" $ | nindent 12 }}
            {{- range $pool.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            - name: POD_NAME
              valueFrom: {fieldRef: {fieldPath: metadata.name}}
            - name: POD_IP
              valueFrom: {fieldRef: {fieldPath: status.podIP}}
            - name: UCX_TCP_PORT_RANGE
              value: {{ printf "%d-%d" (int $.Values.kvTransfer.port) (int $.Values.kvTransfer.endPort) | quote }}
            {{- include "splitserve.scratchEnv" $ | nindent 12 }}
            {{- with concat (include "splitserve.redisEnv" $ | fromYamlArray) $pool.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - {name: grpc, containerPort: {{ int $pool.ports.grpc }}, protocol: TCP}
            - {name: metrics, containerPort: {{ int $pool.ports.metrics }}, protocol: TCP}
            - {name: kv-transfer, containerPort: {{ int $.Values.kvTransfer.port }}, protocol: TCP}
          # Model loading can take minutes; liveness starts only once startup succeeded.
          startupProbe:
            {{- toYaml $probe | nindent 12 }}
            periodSeconds: 10
            failureThreshold: {{ div (int $pool.startupTimeoutSeconds) 10 | max 1 }}
          readinessProbe:
            {{- toYaml $probe | nindent 12 }}
            periodSeconds: 5
            failureThreshold: 2
          livenessProbe:
            {{- toYaml $probe | nindent 12 }}
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 6
          {{- include "splitserve.preStop" $pool.preStopSleepSeconds | nindent 10 }}
          resources:
            {{- $gpu := dict $.Values.gpuResourceName $tp }}
            requests:
              {{- toYaml (merge (dict) $gpu ($pool.resources.requests | default dict)) | nindent 14 }}
            limits:
              {{- toYaml (merge (dict) $gpu ($pool.resources.limits | default dict)) | nindent 14 }}
          securityContext:
            {{- include "splitserve.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "splitserve.modelVolumeMount" $ | nindent 12 }}
            - {name: dshm, mountPath: /dev/shm}
            {{- include "splitserve.scratchMount" $ | nindent 12 }}
            {{- if $mtls.enabled }}
            - {name: internal-tls, mountPath: /etc/splitserve/internal-tls, readOnly: true}
            {{- end }}
            {{- include "splitserve.workerKeysMount" $ | nindent 12 }}
            {{- with $pool.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "splitserve.modelVolume" $ | nindent 8 }}
        {{- if $mtls.enabled }}
        {{- include "splitserve.internalTLSVolume" $ | nindent 8 }}
        {{- end }}
        {{- include "splitserve.workerKeysVolume" $ | nindent 8 }}
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $pool.shmSize }}
        {{- include "splitserve.scratchVolume" $ | nindent 8 }}
        {{- with $pool.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end -}}

{{/* Headless: workers are found through the control plane; this names them for metrics. */}}
{{- define "splitserve.worker.service" -}}
{{- $ := .ctx -}}
{{- $pool := index $.Values .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "splitserve.componentName" . }}
  labels:
    {{- include "splitserve.labels" . | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "splitserve.selectorLabels" . | nindent 4 }}
  ports:
    - {name: grpc, port: {{ int $pool.ports.grpc }}, targetPort: grpc, protocol: TCP}
    - {name: metrics, port: {{ int $pool.ports.metrics }}, targetPort: metrics, protocol: TCP}
    - {name: kv-transfer, port: {{ int $.Values.kvTransfer.port }}, targetPort: kv-transfer, protocol: TCP}
{{- end -}}

{{- define "splitserve.pdb" -}}
{{- $pdb := (index .ctx.Values .component).pdb -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "splitserve.componentName" . }}
  labels:
    {{- include "splitserve.labels" . | nindent 4 }}
spec:
  {{- if hasKey $pdb "minAvailable" }}
  minAvailable: {{ $pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "splitserve.selectorLabels" . | nindent 6 }}
{{- end -}}

{{- define "splitserve.worker.hpa" -}}
{{- $as := (index .ctx.Values .component).autoscaling -}}
{{- if gt (int $as.minReplicas) (int $as.maxReplicas) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%d) is above %s.autoscaling.maxReplicas (%d)" .component (int $as.minReplicas) .component (int $as.maxReplicas)) -}}
{{- end -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "splitserve.componentName" . }}
  labels:
    {{- include "splitserve.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "splitserve.componentName" . }}
  minReplicas: {{ int $as.minReplicas }}
  maxReplicas: {{ int $as.maxReplicas }}
  metrics:
    {{- toYaml $as.metrics | nindent 4 }}
  {{- with $as.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
Workers accept gRPC from the router, KV transfer from workers only, and metrics from
networkPolicy.metricsFrom and the planner. Prefill also takes gRPC from decode: the decode
side renews and releases KV leases and asks for transfer metadata (worker.proto).
*/}}
{{- define "splitserve.worker.networkPolicy" -}}
{{- $ := .ctx -}}
{{- $pool := index $.Values .component -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "splitserve.componentName" . }}
  labels:
    {{- include "splitserve.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "splitserve.selectorLabels" . | nindent 6 }}
  policyTypes: [Ingress]
  ingress:
    - from:
        {{- range (eq .component "prefill" | ternary (list "router" "decode") (list "router")) }}
        - podSelector:
            matchLabels:
              {{- include "splitserve.selectorLabels" (dict "ctx" $ "component" .) | nindent 14 }}
        {{- end }}
      ports:
        - {port: {{ int $pool.ports.grpc }}, protocol: TCP}
    - from:
        - podSelector:
            matchLabels:
              {{- include "splitserve.selectorLabels" (dict "ctx" $ "component" "prefill") | nindent 14 }}
        - podSelector:
            matchLabels:
              {{- include "splitserve.selectorLabels" (dict "ctx" $ "component" "decode") | nindent 14 }}
      ports:
        - {port: {{ int $.Values.kvTransfer.port }}, endPort: {{ int $.Values.kvTransfer.endPort }}, protocol: TCP}
    {{- include "splitserve.metricsIngress" (dict "ctx" $ "port" $pool.ports.metrics "planner" true) | nindent 4 }}
{{- end -}}

{{- define "splitserve.metricsIngress" -}}
{{- $ := .ctx -}}
{{- $planner := and $.Values.planner.enabled .planner -}}
{{- if or $.Values.networkPolicy.metricsFrom $planner -}}
- from:
    {{- with $.Values.networkPolicy.metricsFrom }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if $planner }}
    - podSelector:
        matchLabels:
          {{- include "splitserve.selectorLabels" (dict "ctx" $ "component" "planner") | nindent 10 }}
    {{- end }}
  ports:
    - {port: {{ int .port }}, protocol: TCP}
{{- end }}
{{- end -}}


{{/*
KEDA: a ScaledObject per pool from a Prometheus query (KEDA then owns the pool's HPA). The
default queries read vLLM's names: prefill scales on waiting requests, decode on KV-cache use.
*/}}
{{- define "splitserve.worker.scaledObject" -}}
{{- $ := .ctx -}}
{{- $k := (index $.Values .component).keda -}}
{{- $name := include "splitserve.componentName" . -}}
{{- if gt (int $k.minReplicas) (int $k.maxReplicas) -}}
{{- fail (printf "%s.keda.minReplicas (%d) is above %s.keda.maxReplicas (%d)" .component (int $k.minReplicas) .component (int $k.maxReplicas)) -}}
{{- end -}}
{{- $selector := printf "namespace=\"%s\",role=\"%s\",pod=~\"%s-.*\"" $.Release.Namespace .component $name -}}
{{- $default := ternary (printf "sum(vllm:num_requests_waiting{%s})" $selector) (printf "sum(vllm:kv_cache_usage_perc{%s})" $selector) (eq .component "prefill") -}}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ $name }}
  labels:
    {{- include "splitserve.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    name: {{ $name }}
  minReplicaCount: {{ int $k.minReplicas }}
  maxReplicaCount: {{ int $k.maxReplicas }}
  pollingInterval: {{ int $k.pollingInterval }}
  cooldownPeriod: {{ int $k.cooldownPeriod }}
  triggers:
    - type: prometheus
      metadata:
        serverAddress: {{ required (printf "%s.keda.serverAddress is required when %s.keda.enabled" .component .component) $k.serverAddress | quote }}
        query: {{ default $default $k.query | quote }}
        threshold: {{ $k.threshold | quote }}
{{- end -}}
