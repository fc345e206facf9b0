{{/* ------------------------------------------------------------------ Kafka SASL/SCRAM
Each service signs in to Kafka as its own principal (ctloop/contracts/kafka_acls.py: ingest,
inference, training, metrics; admin is the brokers and the ACL setup), with the password of its
own Secret (kafka.auth.existingSecrets.<principal>, else one the chart generates and keeps). */}}

{{- define "ctloop.kafka.principals" -}}
{{- list "admin" "ingest" "inference" "training" "metrics" | toJson -}}
{{- end -}}

{{- define "ctloop.kafka.secretName" -}}
{{- $given := index .root.Values.kafka.auth.existingSecrets .principal -}}
{{- default (printf "%s-kafka-%s" (include "ctloop.fullname" .root) .principal) $given -}}
{{- end -}}

{{/* Whether principal .principal signs in: always to the release's brokers (the chart makes
     its Secret); to an external Kafka only with the Secret the hospital names. */}}
{{- define "ctloop.kafka.signsIn" -}}
{{- $a := .root.Values.kafka.auth -}}
{{- if and $a.enabled (or .root.Values.kafka.enabled (index $a.existingSecrets .principal)) -}}
true
{{- end -}}
{{- end -}}

{{/* The principal and password of a ctloop container (dict "root" $ "component" "<service>"). */}}
{{- define "ctloop.kafkaAuthEnv" -}}
{{- if include "ctloop.kafka.signsIn" (dict "root" .root "principal" .component) }}
- name: CTLOOP_KAFKA__PRINCIPAL
  value: {{ .component | quote }}
- name: CTLOOP_KAFKA__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "ctloop.kafka.secretName" (dict "root" .root "principal" .component) }}
      key: {{ .root.Values.kafka.auth.passwordKey }}
{{- end }}
{{- end -}}

{{/* Every principal's password as KAFKA_PASSWORD_<PRINCIPAL> (the broker's start script) or
     CTLOOP_KAFKA_PASSWORD_<PRINCIPAL> (python -m ctloop.kafka_security): (dict "root" $ "prefix" "...") */}}
{{- define "ctloop.kafkaPasswordsEnv" -}}
{{- range $p := include "ctloop.kafka.principals" .root | fromJsonArray }}
- name: {{ $.prefix }}{{ upper $p }}
  valueFrom:
    secretKeyRef:
      name: {{ include "ctloop.kafka.secretName" (dict "root" $.root "principal" $p) }}
      key: {{ $.root.Values.kafka.auth.passwordKey }}
{{- end }}
{{- end -}}
