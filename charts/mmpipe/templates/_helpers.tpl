{{/* Names ------------------------------------------------------------------------------------------------ */}}
{{- define "mmpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mmpipe.fullname" -}}
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

{{/* <fullname>-<component>, e.g. "demo-mmpipe-encoder". Call with (dict "root" $ "component" "encoder"). */}}
{{- define "mmpipe.componentName" -}}
{{- printf "%s-%s" (include "mmpipe.fullname" .root | trunc 52 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "mmpipe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------------------------------------- */}}
{{- define "mmpipe.labels" -}}
helm.sh/chart: {{ include "mmpipe.chart" . }}
app.kubernetes.io/name: {{ include "mmpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mmpipe
{{- end -}}

{{/* Call with (dict "root" $ "component" "encoder"). */}}
{{- define "mmpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mmpipe.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mmpipe.componentLabels" -}}
{{ include "mmpipe.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mmpipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mmpipe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Images ----------------------------------------------------------------------------------------------- */}}
{{/* repository:tag of a component; tag defaults to "<appVersion>-<flavor>". Call with (dict "root" $ "component" "encoder"). */}}
{{- define "mmpipe.image" -}}
{{- $img := merge (dict) (index .root.Values .component).image .root.Values.image -}}
{{- $flavor := default "cpu" $img.flavor -}}
{{- $tag := default (printf "%s-%s" .root.Chart.AppVersion $flavor) $img.tag -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}

{{- define "mmpipe.imagePullPolicy" -}}
{{- $img := merge (dict) (index .root.Values .component).image .root.Values.image -}}
{{- default "IfNotPresent" $img.pullPolicy -}}
{{- end -}}

{{/* Addresses -------------------------------------------------------------------------------------------- */}}
{{/* Fully qualified DNS name of a component's Service. */}}
{{- define "mmpipe.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "mmpipe.componentName" .) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* gRPC target of a stage service: dns:/// over the headless Service, so clients see every pod and balance
     with round_robin. Call with (dict "root" $ "component" "encoder"). */}}
{{- define "mmpipe.grpcTarget" -}}
{{- printf "dns:///%s:%d" (include "mmpipe.serviceHost" .) (int (index .root.Values .component).port) -}}
{{- end -}}

{{- define "mmpipe.redisHost" -}}
{{- include "mmpipe.serviceHost" (dict "root" . "component" "redis") -}}
{{- end -}}

{{/* Secrets ---------------------------------------------------------------------------------------------- */}}
{{- define "mmpipe.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "mmpipe.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{- define "mmpipe.redisSecretName" -}}
{{- default (printf "%s-redis" (include "mmpipe.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* A value kept across upgrades: the existing Secret's key if the release already has one, else `value`,
     else a random string. `lookup` returns nothing under `helm template`, so renderings stay offline. */}}
{{- define "mmpipe.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $existing (index ($existing.data | default dict) .key) -}}
{{- index $existing.data .key -}}
{{- else if .value -}}
{{- .value | b64enc -}}
{{- else -}}
{{- randAlphaNum 32 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Pods ------------------------------------------------------------------------------------------------- */}}
{{- define "mmpipe.gpuCount" -}}
{{- $c := index .root.Values .component -}}
{{- if $c.gpu -}}{{ int $c.gpu.count }}{{- else -}}0{{- end -}}
{{- end -}}

{{/* Environment of an mmpipe container, limited to what that service reads (each flag of `mmpipe <service>`
     defaults to its MMPIPE_* variable). Settings that shape cache keys (model, dtype, media_io_kwargs) go to
     every stage that has them, from the same values, so all stages compute the same keyspace.
     Call with (dict "root" $ "component" "encoder"). */}}
{{- define "mmpipe.env" -}}
{{- $v := .root.Values -}}
{{- $comp := .component -}}
{{- $c := index $v $comp -}}
{{- $isStage := has $comp (list "ingest" "encoder" "generator") -}}
{{- $gpus := include "mmpipe.gpuCount" . | int -}}
- name: MMPIPE_MODEL
  value: {{ ternary "/models/tiny" $v.model.name $v.model.tiny.enabled | quote }}
- name: MMPIPE_HOST
  value: {{ $v.bindHost | quote }}
- name: MMPIPE_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
{{- $ownOmp := false -}}
{{- range (concat ($v.extraEnv | default list) ($c.extraEnv | default list)) }}
{{- if eq .name "OMP_NUM_THREADS" }}{{ $ownOmp = true }}{{ end }}
{{- end }}
{{- if and (gt (int $v.ompNumThreads) 0) (not $ownOmp) (or (has $comp (list "gateway" "ingest")) (gt $gpus 0)) }}
# one OpenMP thread, as `mmpipe serve` gives its children (values.yaml ompNumThreads)
- name: OMP_NUM_THREADS
  value: {{ int $v.ompNumThreads | quote }}
{{- end }}
# connections close after this long, so callers re-resolve the headless Services and find new replicas
- name: MMPIPE_GRPC_MAX_CONNECTION_AGE_MS
  value: {{ int $v.grpc.maxConnectionAgeMs | quote }}
- name: MMPIPE_GRPC_MAX_CONNECTION_AGE_GRACE_MS
  value: {{ int $v.grpc.maxConnectionAgeGraceMs | quote }}
{{- include "mmpipe.grpcTlsEnv" . }}
{{- if eq $comp "gateway" }}
- name: MMPIPE_PORT
  value: {{ $c.httpPort | quote }}
- name: MMPIPE_GRPC_PORT
  value: {{ $c.grpcPort | quote }}
- name: MMPIPE_INGEST_ADDR
  value: {{ include "mmpipe.grpcTarget" (dict "root" .root "component" "ingest") | quote }}
- name: MMPIPE_ENCODER_ADDR
  value: {{ include "mmpipe.grpcTarget" (dict "root" .root "component" "encoder") | quote }}
- name: MMPIPE_GENERATOR_ADDR
  value: {{ include "mmpipe.grpcTarget" (dict "root" .root "component" "generator") | quote }}
{{- with $v.model.servedModelName }}
- name: MMPIPE_SERVED_MODEL_NAME
  value: {{ . | quote }}
{{- end }}
{{- if $v.apiKey.enabled }}
- name: MMPIPE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "mmpipe.apiKeySecretName" .root }}
      key: {{ $v.apiKey.secretKey }}
{{- end }}
{{- else }}
- name: MMPIPE_PORT
  value: {{ $c.port | quote }}
- name: MMPIPE_METRICS_PORT
  value: {{ $v.metrics.port | quote }}
- name: MMPIPE_DTYPE
  value: {{ $v.model.dtype | quote }}
{{- end }}
{{- if eq $comp "ingest" }}
# ingest sends the processed tensors of cache misses to the encoder
- name: MMPIPE_ENCODER_ADDR
  value: {{ include "mmpipe.grpcTarget" (dict "root" .root "component" "encoder") | quote }}
{{- end }}
{{- if has $comp (list "encoder" "generator") }}
- name: MMPIPE_DEVICE
  value: {{ ternary "cuda" "cpu" (gt $gpus 0) | quote }}
{{- end }}
{{- if and $v.model.maxModelLen (has $comp (list "gateway" "generator")) }}
- name: MMPIPE_MAX_MODEL_LEN
  value: {{ $v.model.maxModelLen | quote }}
{{- end }}
{{- with $v.multimodal.mediaIoKwargs }}
- name: MMPIPE_MEDIA_IO_KWARGS
  value: {{ toJson . | quote }}
{{- end }}
{{- if has $comp (list "gateway" "ingest") }}
{{- with $v.multimodal.limitMmPerPrompt }}
- name: MMPIPE_LIMIT_MM_PER_PROMPT
  value: {{ toJson . | quote }}
{{- end }}
{{- with $v.multimodal.allowedMediaDomains }}
# the gateway splits this list on spaces, ingest on commas
- name: MMPIPE_ALLOWED_MEDIA_DOMAINS
  value: {{ join (ternary " " "," (eq $comp "gateway")) . | quote }}
{{- end }}
{{- with $v.multimodal.allowedLocalMediaPath }}
- name: MMPIPE_ALLOWED_LOCAL_MEDIA_PATH
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- if and $v.multimodal.enableMmEmbeds (has $comp (list "gateway" "encoder")) }}
- name: MMPIPE_ENABLE_MM_EMBEDS
  value: "1"
{{- end }}
{{- if ne $comp "ingest" }}
{{- include "mmpipe.redisEnv" .root }}
{{- end }}
- name: HF_HOME
  value: /models/hf
- name: MMPIPE_CACHE_DIR
  value: /models/mmpipe
{{- if $v.model.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with $v.model.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: HF_TOKEN
{{- end }}
# read-only root filesystem: every runtime cache goes to /tmp (an emptyDir)
- name: HOME
  value: /tmp
- name: NUMBA_CACHE_DIR
  value: /tmp/numba
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/inductor
{{- end -}}

{{/* MMPIPE_REDIS_URL; with auth, the password comes from the Secret through $(REDIS_PASSWORD), which
     Kubernetes expands because REDIS_PASSWORD is defined first. */}}
{{- define "mmpipe.redisEnv" -}}
{{- $v := .Values -}}
{{- if $v.redis.enabled }}
{{- if $v.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "mmpipe.redisSecretName" . }}
      key: {{ $v.redis.auth.secretKey }}
- name: MMPIPE_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:%d/%d" (include "mmpipe.redisHost" .) (int $v.redis.port) (int $v.redis.db) | quote }}
{{- else }}
- name: MMPIPE_REDIS_URL
  value: {{ printf "redis://%s:%d/%d" (include "mmpipe.redisHost" .) (int $v.redis.port) (int $v.redis.db) | quote }}
{{- end }}
{{- else if $v.redis.externalUrlSecret.name }}
- name: MMPIPE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.externalUrlSecret.name }}
      key: {{ $v.redis.externalUrlSecret.key }}
{{- else if $v.redis.externalUrl }}
- name: MMPIPE_REDIS_URL
  value: {{ $v.redis.externalUrl | quote }}
{{- end }}
{{- end -}}

{{/* Redis or Valkey: image, server and cli binaries of redis.flavor (an explicit redis.image wins). */}}
{{- define "mmpipe.redisImage" -}}
{{- $r := .Values.redis -}}
{{- $valkey := eq (default "redis" $r.flavor) "valkey" -}}
{{- $repo := default (ternary "docker.io/valkey/valkey" "docker.io/library/redis" $valkey) $r.image.repository -}}
{{- $tag := default (ternary "8.1-alpine" "7.4-alpine" $valkey) $r.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "mmpipe.redisServer" -}}
{{- ternary "valkey-server" "redis-server" (eq (default "redis" .Values.redis.flavor) "valkey") -}}
{{- end -}}

{{- define "mmpipe.redisCli" -}}
{{- ternary "valkey-cli" "redis-cli" (eq (default "redis" .Values.redis.flavor) "valkey") -}}
{{- end -}}

{{/* Pod-level scheduling keys of a component: runtimeClassName, priorityClassName, topologySpreadConstraints
     (a constraint without labelSelector gets the component's own pod labels). Call with (dict "root" $ "component" "encoder"). */}}
{{- define "mmpipe.podScheduling" -}}
{{- $c := index .root.Values .component -}}
{{- with $c.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $c.topologySpreadConstraints }}
{{- $sel := include "mmpipe.selectorLabels" $ | fromYaml }}
topologySpreadConstraints:
{{- range . }}
{{- $t := deepCopy . }}
{{- if not $t.labelSelector }}
{{- $_ := set $t "labelSelector" (dict "matchLabels" $sel) }}
{{- end }}
  - {{- toYaml $t | nindent 4 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* gRPC TLS between the services (grpc.tls): the Secret is mounted at /etc/mmpipe/grpc-tls. Servers (the stages)
     serve with it; callers (the gateway, ingest) verify with its CA and, with mutual, present it. The gateway's own
     public gRPC API is not changed by it. */}}
{{- define "mmpipe.grpcTlsDir" -}}/etc/mmpipe/grpc-tls{{- end -}}

{{- define "mmpipe.grpcTlsEnv" -}}
{{- $t := .root.Values.grpc.tls -}}
{{- $d := include "mmpipe.grpcTlsDir" . -}}
{{- if $t.enabled }}
{{- if ne .component "gateway" }}
- name: MMPIPE_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" $d | quote }}
- name: MMPIPE_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" $d | quote }}
{{- if $t.mutual }}
- name: MMPIPE_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" $d | quote }}
{{- end }}
{{- end }}
{{- if has .component (list "gateway" "ingest") }}
- name: MMPIPE_STAGE_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" $d | quote }}
{{- if $t.mutual }}
- name: MMPIPE_STAGE_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" $d | quote }}
- name: MMPIPE_STAGE_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" $d | quote }}
{{- end }}
{{- with $t.serverName }}
- name: MMPIPE_STAGE_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A stage's gRPC health probe. Plaintext: kubelet's own grpc probe. TLS: kubelet cannot speak it, so the
     container runs the image's docker/healthcheck.py (grpc.health.v1 over TLS with the container's MMPIPE_*TLS*
     files, its own certificate for mTLS), naming the Service's host, which the certificate covers. */}}
{{- define "mmpipe.grpcProbe" -}}
{{- $t := .root.Values.grpc.tls -}}
{{- if $t.enabled }}
exec:
  command: ["env", {{ printf "MMPIPE_STAGE_TLS_SERVER_NAME=%s" (default (include "mmpipe.serviceHost" .) $t.serverName) | quote }}, "python", "/opt/mmpipe/healthcheck.py"]
{{- else }}
grpc: {port: {{ .port }}}
{{- end }}
{{- end -}}

{{/* The queue a GPU stage scales on (services/encoder/core.py, services/generator/core.py). */}}
{{- define "mmpipe.queueMetric" -}}
{{- if eq . "encoder" -}}mmpipe_encoder_queue_depth{{- else if eq . "generator" -}}mmpipe_generator_engine_waiting_requests{{- end -}}
{{- end -}}
