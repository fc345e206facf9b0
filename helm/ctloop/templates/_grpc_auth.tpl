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

{{/* ------------------------------------------------------------------ gRPC mutual TLS */}}
{{/* The Secret with a party's TLS pair: (dict "root" $ "party" "ingest"). */}}
{{- define "ctloop.grpcTls.secretName" -}}
{{- index .root.Values.grpcTls.existingSecrets .party | default (include "ctloop.componentName" (dict "root" .root "component" (printf "grpc-tls-%s" .party))) -}}
{{- end -}}

{{/* Where a pod finds its pair: env, volume mount and volume for (dict "root" $ "party" X);
     nothing when grpcTls is off. */}}
{{- define "ctloop.grpcTlsEnv" -}}
{{- if .root.Values.grpcTls.enabled -}}
- name: CTLOOP_GRPC__TLS_DIR
  value: /etc/ctloop/grpc-tls
{{- end }}
{{- end -}}

{{- define "ctloop.grpcTlsMount" -}}
{{- if .root.Values.grpcTls.enabled -}}
- name: grpc-tls
  mountPath: /etc/ctloop/grpc-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "ctloop.grpcTlsVolume" -}}
{{- if .root.Values.grpcTls.enabled -}}
- name: grpc-tls
  secret:
    secretName: {{ include "ctloop.grpcTls.secretName" . }}
    defaultMode: 0440  # group: the pod's fsGroup
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: tls.crt, path: {{ .party }}.crt}
      - {key: tls.key, path: {{ .party }}.key}
{{- end }}
{{- end -}}
