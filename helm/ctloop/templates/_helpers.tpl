{{/* ------------------------------------------------------------------ names and labels */}}
{{- define "ctloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ctloop.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "ctloop.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "ctloop.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>"; call with (dict "root" $ "component" "ingest") */}}
{{- define "ctloop.componentName" -}}
{{- printf "%s-%s" (include "ctloop.fullname" .root) .component -}}
{{- end -}}

{{- define "ctloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ctloop.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ctloop.labels" -}}
{{ include "ctloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ctloop
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Pod labels and annotations: the mesh's injection marks when mTLS is on. */}}
{{- define "ctloop.podLabels" -}}
{{ include "ctloop.selectorLabels" . }}
{{- if and .root.Values.mtls.enabled (eq .root.Values.mtls.provider "istio") }}
sidecar.istio.io/inject: "true"
{{- end }}
{{- end -}}

{{- define "ctloop.podAnnotations" -}}
{{- if and .root.Values.mtls.enabled (eq .root.Values.mtls.provider "linkerd") }}
linkerd.io/inject: enabled
{{- end }}
{{- end -}}

{{/* ------------------------------------------------------------------ images */}}
{{/* call with (dict "root" $ "image" .Values.x.image) */}}
{{- define "ctloop.image" -}}
{{- $registry := .root.Values.global.imageRegistry | default .image.registry -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion | toString -}}
{{- if eq $tag "latest" -}}{{- fail "image tags must be pinned: \"latest\" is not allowed" -}}{{- end -}}
{{- if $registry -}}{{ printf "%s/%s:%s" $registry .image.repository $tag }}{{- else -}}{{ printf "%s:%s" .image.repository $tag }}{{- end -}}
{{- end -}}

{{- define "ctloop.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* ------------------------------------------------------------------ where things are */}}
{{- define "ctloop.kafka.bootstrap" -}}
{{- if .Values.kafka.enabled -}}
{{- printf "%s:%d" (include "ctloop.componentName" (dict "root" . "component" "kafka")) (int .Values.kafka.port) -}}
{{- else -}}
{{- required "kafka.external.bootstrapServers is required when kafka.enabled is false" .Values.kafka.external.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{- /* Replicas of each ctloop topic: the release's brokers (at most 3, as the brokers' own
       default.replication.factor), or what the external cluster is said to need. */ -}}
{{- define "ctloop.kafka.replicationFactor" -}}
{{- if .Values.kafka.enabled -}}
{{- min 3 (int .Values.kafka.replicas) -}}
{{- else -}}
{{- int .Values.kafka.external.replicationFactor -}}
{{- end -}}
{{- end -}}

{{- define "ctloop.s3.endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s:%d" (include "ctloop.componentName" (dict "root" . "component" "minio")) (int .Values.minio.port) -}}
{{- else -}}
{{- required "objectStore.external.endpoint is required when minio.enabled is false" .Values.objectStore.external.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "ctloop.s3.secure" -}}
{{- if .Values.minio.enabled }}false{{ else }}{{ .Values.objectStore.external.secure }}{{ end -}}
{{- end -}}

{{- define "ctloop.s3.secretName" -}}
{{- if .Values.objectStore.existingSecret -}}
{{- .Values.objectStore.existingSecret -}}
{{- else if .Values.minio.enabled -}}
{{- include "ctloop.componentName" (dict "root" . "component" "s3") -}}
{{- else -}}
{{- fail "objectStore.existingSecret is required when minio.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding an S3 identity's keys: (dict "root" $ "identity" "triton"). */}}
{{- define "ctloop.s3.identitySecretName" -}}
{{- $os := .root.Values.objectStore -}}
{{- if or (eq .identity "root") (not $os.leastPrivilege) -}}
{{- include "ctloop.s3.secretName" .root -}}
{{- else if index $os.identities.existingSecrets .identity -}}
{{- index $os.identities.existingSecrets .identity -}}
{{- else -}}
{{- include "ctloop.componentName" (dict "root" .root "component" (printf "s3-%s" .identity)) -}}
{{- end -}}
{{- end -}}

{{/* Does the release run the Job that creates the S3 identities? */}}
{{- define "ctloop.s3.provisions" -}}
{{- if and .Values.objectStore.leastPrivilege .Values.objectStore.identities.provision }}true{{ end -}}
{{- end -}}

{{- define "ctloop.db.host" -}}
{{- if .Values.postgresql.enabled -}}
{{- include "ctloop.componentName" (dict "root" . "component" "postgresql") -}}
{{- else -}}
{{- required "database.external.host is required when postgresql.enabled is false" .Values.database.external.host -}}
{{- end -}}
{{- end -}}

{{- define "ctloop.db.port" -}}
{{- if .Values.postgresql.enabled }}{{ .Values.postgresql.port }}{{ else }}{{ .Values.database.external.port }}{{ end -}}
{{- end -}}

{{- define "ctloop.db.secretName" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else if .Values.postgresql.enabled -}}
{{- include "ctloop.componentName" (dict "root" . "component" "postgresql") -}}
{{- else -}}
{{- fail "database.existingSecret is required when postgresql.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/* Where Triton runs the models: on its GPUs when the chart gives it any. */}}
{{- define "ctloop.triton.instanceKind" -}}
{{- $limits := .Values.triton.resources.limits | default dict -}}
{{- if gt (int (index $limits "nvidia.com/gpu" | default 0)) 0 -}}gpu{{- else -}}cpu{{- end -}}
{{- end -}}

{{/* The Secret holding the first admin's API token. */}}
{{- define "ctloop.adminTokenSecret" -}}
{{- include "ctloop.componentName" (dict "root" . "component" "admin-token") -}}
{{- end -}}

{{/* A generated secret value that survives upgrades: the live Secret's, else random. */}}
{{- define "ctloop.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $existing (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum .length | b64enc -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ the settings every ctloop process reads */}}
{{- define "ctloop.s3Env" -}}
- name: CTLOOP_S3__EXTERNAL_ENDPOINT
  value: {{ include "ctloop.s3.endpoint" . | quote }}
- name: CTLOOP_S3__SECURE
  value: {{ include "ctloop.s3.secure" . | quote }}
- name: CTLOOP_S3__REGION
  value: {{ .Values.objectStore.region | quote }}
- name: CTLOOP_S3__BUCKET
  value: {{ .Values.objectStore.bucket | quote }}
- name: CTLOOP_S3__MODEL_BUCKET
  value: {{ .Values.objectStore.modelBucket | quote }}
- name: CTLOOP_TRITON__MODEL_PREFIX
  value: {{ .Values.objectStore.modelPrefix | quote }}
{{- end -}}

{{/* The S3 identity of a pod (ctloop/s3_grants.py) and its keys, from that identity's Secret
     alone: (dict "root" $ "identity" "ingest"); identity "root" (the provisioning Job) or
     objectStore.leastPrivilege false: the root keys. */}}
{{- define "ctloop.s3CredentialEnv" -}}
{{- $os := .root.Values.objectStore -}}
{{- $own := and $os.leastPrivilege (ne .identity "root") -}}
{{- if $own }}
- name: CTLOOP_S3__IDENTITY
  value: {{ .identity | quote }}
{{- end }}
- name: CTLOOP_S3__ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "ctloop.s3.identitySecretName" . }}
      key: {{ $os.accessKeyKey }}
- name: CTLOOP_S3__SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "ctloop.s3.identitySecretName" . }}
      key: {{ $os.secretKeyKey }}
{{- end -}}

{{- define "ctloop.env" -}}
- name: CTLOOP_RUN_DIR
  value: /var/lib/ctloop
- name: CTLOOP_RUNS_DIR  # run reports the metrics service writes (its default is beside the code)
  value: /var/lib/ctloop/runs
- name: HOME
  value: /tmp
- name: CTLOOP_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: CTLOOP_SERVICES__HOST
  value: "0.0.0.0"
{{- range $svc := list "ingest" "inference" "training" "metrics" }}
{{- $v := index $.Values $svc }}
- name: CTLOOP_SERVICES__{{ upper $svc }}__HTTP_PORT
  value: {{ $v.httpPort | quote }}
- name: CTLOOP_SERVICES__{{ upper $svc }}__GRPC_PORT
  value: {{ $v.grpcPort | quote }}
- name: CTLOOP_SERVICES__{{ upper $svc }}__ADDRESS
  value: {{ include "ctloop.componentName" (dict "root" $ "component" $svc) }}
{{- end }}
- name: CTLOOP_SERVICES__MAX_UPLOAD_MB
  value: {{ .Values.ingest.maxUploadMb | quote }}
- name: CTLOOP_SERVICES__REVIEW_REQUIRED
  value: {{ .Values.ingest.reviewRequired | quote }}
- name: CTLOOP_SERVICES__DICOMWEB_SOURCES
  value: {{ .Values.ingest.dicomwebSources | toJson | quote }}
- name: CTLOOP_KAFKA__EXTERNAL_BOOTSTRAP
  value: {{ include "ctloop.kafka.bootstrap" . | quote }}
- name: CTLOOP_KAFKA__TOPIC_PARTITIONS
  value: {{ .Values.kafka.topicPartitions | quote }}
- name: CTLOOP_KAFKA__TOPIC_REPLICATION_FACTOR
  value: {{ include "ctloop.kafka.replicationFactor" . | quote }}
- name: CTLOOP_KAFKA__TOPIC_RETENTION_MS
  value: {{ .Values.kafka.topicRetentionMs | int64 | quote }}
{{ include "ctloop.s3Env" . }}
- name: CTLOOP_TRITON__INSTANCE_KIND
  value: {{ include "ctloop.triton.instanceKind" . | quote }}
- name: CTLOOP_TRITON__CPU_RUNTIME
  value: {{ .Values.triton.cpuRuntime | quote }}
- name: CTLOOP_TRITON__EXTERNAL_URL
  value: {{ printf "%s:%d" (include "ctloop.componentName" (dict "root" . "component" "triton")) (int .Values.triton.grpcPort) | quote }}
- name: CTLOOP_TRITON__REPLICAS
  value: {{ printf "%s:%d" (include "ctloop.componentName" (dict "root" . "component" "triton-replicas")) (int .Values.triton.grpcPort) | quote }}
- name: CTLOOP_DB__BACKEND
  value: postgresql
- name: CTLOOP_DB__PG_HOST
  value: {{ include "ctloop.db.host" . | quote }}
- name: CTLOOP_DB__PG_PORT
  value: {{ include "ctloop.db.port" . | quote }}
- name: CTLOOP_DB__PG_USER
  value: {{ .Values.database.user | quote }}
- name: CTLOOP_DB__PG_DATABASE
  value: {{ .Values.database.name | quote }}
- name: CTLOOP_DB__PG_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ctloop.db.secretName" . }}
      key: {{ .Values.database.passwordKey }}
{{- with .Values.auth.oidcIssuer }}
- name: CTLOOP_AUTH__OIDC_ISSUER
  value: {{ . | quote }}
{{- end }}
{{- with .Values.auth.workbenchClientId }}
- name: CTLOOP_AUTH__OIDC_CLIENT_ID
  value: {{ . | quote }}
{{- end }}
- name: CTLOOP_AUTH__OIDC_AUDIENCE
  value: {{ .Values.auth.oidcAudience | quote }}
- name: CTLOOP_AUTH__ROLES_CLAIM
  value: {{ .Values.auth.rolesClaim | quote }}
- name: CTLOOP_AUTH__SITES_CLAIM
  value: {{ .Values.auth.sitesClaim | quote }}
{{- end -}}

{{/* The init container that waits for S3 (and Kafka) and makes buckets and topics exist. */}}
{{- define "ctloop.provisionContainer" -}}
- name: provision
  image: {{ include "ctloop.image" (dict "root" .root "image" .root.Values.image) }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["python", "-m", "ctloop.provision", {{ range $i, $a := .args }}{{ if $i }}, {{ end }}{{ $a | quote }}{{ end }}]
  env:
    {{- if .s3Only }}
    - name: HOME
      value: /tmp
    - name: CTLOOP_LOG_LEVEL
      value: {{ .root.Values.logLevel | quote }}
    {{- include "ctloop.s3Env" .root | nindent 4 }}
    {{- else }}
    {{- include "ctloop.env" .root | nindent 4 }}
    {{- include "ctloop.kafkaAuthEnv" . | nindent 4 }}  {{- /* waits for its topics */}}
    {{- end }}
    {{- /* with its own S3 identity it waits until its grants work (the provisioning Job ran) */}}
    {{- include "ctloop.s3CredentialEnv" (dict "root" .root "identity" .component) | nindent 4 }}
  securityContext:
    {{- toYaml .root.Values.containerSecurityContext | nindent 4 }}
  resources:
    {{- toYaml .root.Values.provision.resources | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end -}}
