{{/* ------------------------------------------------------------------ gRPC service tokens
Each calling service proves itself with its own token; each server holds only the SHA-256
digests of the callers it accepts (ctloop/rpc_auth.py). Who gets what follows CALLS there
(tests/helm/test_grpc_auth.py checks that they agree). The operator's token is mounted nowhere:
admins read it from the Secret to drive a release (`ctloop run` against it, benchmarks). */}}

{{- define "ctloop.grpcTokensSecret" -}}
{{- .Values.grpcAuth.existingSecret | default (include "ctloop.componentName" (dict "root" . "component" "grpc-tokens")) -}}
{{- end -}}

{{/* The services that call others over gRPC, and the callers each server accepts. */}}
{{- define "ctloop.grpcAuth.table" -}}
tokens: [ingest, training]
callers:
  ingest: [training]
  inference: [ingest, operator]
  training: [ingest, operator]
  metrics: [operator]
{{- end -}}

{{/* Env of one service's container; call with (dict "root" $ "component" "ingest"). */}}
{{- define "ctloop.grpcAuthEnv" -}}
{{- $table := include "ctloop.grpcAuth.table" . | fromYaml -}}
{{- $secret := include "ctloop.grpcTokensSecret" .root -}}
{{- if has .component $table.tokens }}
- name: CTLOOP_GRPC__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .component }}-token
{{- end }}
{{- range $caller := index $table.callers .component | default list }}
- name: CTLOOP_GRPC__CALLERS__{{ upper $caller }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $caller }}-sha256
{{- end }}
{{- end -}}
