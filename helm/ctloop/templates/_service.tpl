{{/*
One ctloop service (`python -m services.<component>`): Deployment, Service, PodDisruptionBudget
and, when enabled, a HorizontalPodAutoscaler. Call with
  (dict "root" $ "component" "ingest" "serviceAccount" "<name>" "env" "<extra env YAML>")
*/}}
{{- define "ctloop.service" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .component -}}
{{- $name := include "ctloop.componentName" . -}}
{{- $ctx := dict "root" $root "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "ctloop.labels" $ctx | nindent 4 }}
spec:
  {{- if not (and $v.autoscaling $v.autoscaling.enabled) }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "ctloop.selectorLabels" $ctx | nindent 6 }}
  {{- if eq .component "training" }}
  strategy:
    type: Recreate  # one round at a time: never two training services side by side
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "ctloop.podLabels" $ctx | nindent 8 }}
      {{- with include "ctloop.podAnnotations" $ctx }}
      annotations:
        {{- . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ .serviceAccount }}
      automountServiceAccountToken: {{ eq .component "training" }}
      enableServiceLinks: false
      terminationGracePeriodSeconds: 45
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- include "ctloop.imagePullSecrets" $root | nindent 6 }}
      initContainers:
        {{- include "ctloop.provisionContainer" (dict "root" $root "component" .component "args" (list "--s3" "--kafka")) | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "ctloop.image" (dict "root" $root "image" $root.Values.image) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", "services.{{ .component }}"]
          ports:
            - name: http
              containerPort: {{ $v.httpPort }}
              protocol: TCP
            - name: grpc
              containerPort: {{ $v.grpcPort }}
              protocol: TCP
          env:
            {{- include "ctloop.env" $root | nindent 12 }}
            {{- include "ctloop.s3CredentialEnv" (dict "root" $root "identity" .component) | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- include "ctloop.grpcAuthEnv" $ctx | nindent 12 }}
            {{- include "ctloop.grpcTlsEnv" (dict "root" $root "party" .component) | nindent 12 }}
            {{- include "ctloop.kafkaAuthEnv" $ctx | nindent 12 }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: 5
            failureThreshold: 120
          livenessProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 3
          readinessProbe:
            httpGet: {path: /readyz, port: http}
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 3
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          volumeMounts:
            - name: run
              mountPath: /var/lib/ctloop
            - name: tmp
              mountPath: /tmp
            {{- include "ctloop.grpcTlsMount" (dict "root" $root) | nindent 12 }}
      volumes:
        - name: run
          emptyDir:
            sizeLimit: {{ $v.scratchSize | default "2Gi" }}
        - name: tmp
          emptyDir:
            sizeLimit: 2Gi
        {{- include "ctloop.grpcTlsVolume" (dict "root" $root "party" .component) | nindent 8 }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "ctloop.labels" $ctx | nindent 4 }}
    ctloop.org/metrics: "true"
spec:
  type: ClusterIP
  selector:
    {{- include "ctloop.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: http
      port: {{ $v.httpPort }}
      targetPort: http
      protocol: TCP
    - name: grpc
      port: {{ $v.grpcPort }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
---
{{ include "ctloop.pdb" $ctx }}
{{- if and $v.autoscaling $v.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "ctloop.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ $v.autoscaling.minReplicas }}
  maxReplicas: {{ $v.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $v.autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget from <component>.pdb (minAvailable or maxUnavailable). */}}
{{- define "ctloop.pdb" -}}
{{- $v := index .root.Values .component -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "ctloop.componentName" . }}
  labels:
    {{- include "ctloop.labels" . | nindent 4 }}
spec:
  {{- if hasKey $v.pdb "minAvailable" }}
  minAvailable: {{ $v.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "ctloop.selectorLabels" . | nindent 6 }}
{{- end -}}
