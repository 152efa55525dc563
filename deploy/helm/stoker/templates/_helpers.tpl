{{/*
Helpers of the Stoker chart. deploy/k8s/stoker.yaml is this chart's `helm template` output
(`make manifests`); tests/k8s/test_chart.py renders it again with Helm and compares.
*/}}

{{/* Labels of every object; call with (dict "root" $ "component" "gateway"). */}}
{{- define "stoker.labels" -}}
app.kubernetes.io/name: stoker
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: stoker
helm.sh/chart: stoker-{{ .root.Chart.Version }}
{{- end }}

{{/* Selector labels (immutable once applied); same argument as stoker.labels. */}}
{{- define "stoker.selectorLabels" -}}
app.kubernetes.io/name: stoker
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The one image of every service; call with $. */}}
{{- define "stoker.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Where management pods run and how their containers are locked down; call with $. */}}
{{- define "stoker.managementPlacement" -}}
nodeSelector:
  {{- toYaml .Values.management.nodeSelector | nindent 2 }}
{{- with .Values.management.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The shared settings, into a container's envFrom; call with $. */}}
{{- define "stoker.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ .Release.Name }}-config
  {{- with .Values.kafka.credentialsSecret }}
  - secretRef:
      name: {{ . }}
  {{- end }}
{{- end }}

{{/* A worker's readiness: the file services.common.runner writes once the service is up, named
     after the copy ($STOKER_INSTANCE_NAME) where it has a name. Call with (dict "component" "dispatcher"). */}}
{{- define "stoker.readyProbe" -}}
readinessProbe:
  exec:
    command: ["sh", "-c", "test -f \"$STOKER_HOME/run/${STOKER_INSTANCE_NAME:-{{ .component }}}.ready\""]
  initialDelaySeconds: 2
  periodSeconds: 5
  failureThreshold: 3
{{- end }}

{{/* The per-copy name of a service run as several replicas (STOKER_INSTANCE_NAME, as `stoker up
     --dispatchers N` gives each copy): the pod's name, unique among the copies. A Deployment's
     replaced pod gets a new name. */}}
{{- define "stoker.instanceEnv" -}}
- name: STOKER_INSTANCE_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
