{{/* Names */}}
{{- define "sfumato.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sfumato.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "sfumato.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "sfumato.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* "sfumato.component" (dict "root" $ "name" "api") -> <fullname>-api (at most 63 characters) */}}
{{- define "sfumato.component" -}}
{{- printf "%s-%s" (include "sfumato.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sfumato.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sfumato.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "name" "api") */}}
{{- define "sfumato.selector" -}}
app.kubernetes.io/name: {{ include "sfumato.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "sfumato.componentLabels" -}}
{{ include "sfumato.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* An image reference: (dict "root" $ "image" .Values.images.triton) */}}
{{- define "sfumato.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "sfumato.secretName" -}}
{{- default (include "sfumato.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* True ("true") when the database is the operator's PostgreSQL, not the embedded SQLite. */}}
{{- define "sfumato.externalDatabase" -}}
{{- if or .Values.database.url .Values.database.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* True when something lives on the data volume (SQLite, or the local object store). */}}
{{- define "sfumato.usesDataVolume" -}}
{{- if or (not (include "sfumato.externalDatabase" .)) (not .Values.storage.url) -}}true{{- end -}}
{{- end -}}

{{- define "sfumato.dataClaim" -}}
{{- default (printf "%s-data" (include "sfumato.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{- define "sfumato.storageSecretName" -}}
{{- default (printf "%s-storage" (include "sfumato.fullname" .)) .Values.storage.credentials.existingSecret -}}
{{- end -}}

{{- define "sfumato.hasStorageCredentials" -}}
{{- if or .Values.storage.credentials.existingSecret .Values.storage.credentials.accessKeyId -}}true{{- end -}}
{{- end -}}

{{/* Triton's model repository as Triton names it. */}}
{{- define "sfumato.modelRepository" -}}
{{- $type := .Values.triton.modelRepository.type -}}
{{- if eq $type "objectStore" -}}
{{- $url := trimSuffix "/" .Values.storage.url -}}
{{- if .Values.storage.endpointUrl -}}
{{- /* Triton's syntax for an S3-compatible endpoint: s3://<scheme>://<host:port>/<bucket>/<path> */ -}}
{{- printf "s3://%s/%s/model_repository" (trimSuffix "/" .Values.storage.endpointUrl) (trimPrefix "s3://" $url) -}}
{{- else -}}
{{- printf "%s/model_repository" $url -}}
{{- end -}}
{{- else -}}
/models/repository
{{- end -}}
{{- end -}}

{{/* The environment every Sfumato container gets: settings, secrets, database, store. */}}
{{- define "sfumato.env" -}}
- name: SFUMATO_DATA_DIR
  value: /var/lib/sfumato
- name: HOME
  value: /tmp
{{- if include "sfumato.externalDatabase" . }}
- name: SFUMATO_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "sfumato.fullname" .) .Values.database.existingSecret }}
      key: {{ if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}SFUMATO_DATABASE_URL{{ end }}
{{- end }}
{{- if or .Values.redis.url .Values.redis.existingSecret }}
- name: SFUMATO_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "sfumato.fullname" .) .Values.redis.existingSecret }}
      key: {{ if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}SFUMATO_REDIS_URL{{ end }}
{{- end }}
{{- range $name := list "SFUMATO_SECRET_KEY" "SFUMATO_TRITON_ADMIN_KEY" "SFUMATO_EDGE_KEY" }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "sfumato.secretName" $ }}
      key: {{ $name }}
{{- end }}
{{- if include "sfumato.hasStorageCredentials" . }}
{{- range $name := list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "sfumato.storageSecretName" $ }}
      key: {{ $name }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Volumes of a control-plane pod: a writable /tmp, and the data volume when it is used. */}}
{{- define "sfumato.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if include "sfumato.usesDataVolume" . }}
- name: data
  {{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "sfumato.dataClaim" . }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.persistence.size }}
  {{- end }}
{{- else }}
- name: data
  emptyDir:
    sizeLimit: 1Gi
{{- end }}
{{- end -}}

{{- define "sfumato.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/sfumato
{{- end -}}

{{- define "sfumato.podSecurity" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{- define "sfumato.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The settings ConfigMap's name, and its checksum for rollouts. */}}
{{- define "sfumato.configName" -}}
{{- printf "%s-config" (include "sfumato.fullname" .) -}}
{{- end -}}

{{/* The body of an export container: (dict "root" $ "out" "/path") */}}
{{- define "sfumato.exportContainer" -}}
{{- $v := .root.Values -}}
image: {{ include "sfumato.image" (dict "root" .root "image" $v.images.training) }}
imagePullPolicy: {{ $v.images.training.pullPolicy }}
args:
  - export
  - {{ if hasPrefix "store:" $v.modelExport.source }}/work/source{{ else }}{{ $v.modelExport.source }}{{ end }}
  - --out={{ .out }}
  - --target={{ $v.modelExport.target }}
  {{- if ne $v.modelExport.target "cpu" }}
  - --precision={{ $v.modelExport.precision }}
  {{- end }}
  {{- range $v.modelExport.extraArgs }}
  - {{ . | quote }}
  {{- end }}
env:
  - name: HOME
    value: /tmp
resources:
  {{- $resources := deepCopy $v.modelExport.resources }}
  {{- if and (gt (int $v.modelExport.gpus) 0) (ne $v.modelExport.target "cpu") }}
  {{- $_ := set $resources.limits "nvidia.com/gpu" (int $v.modelExport.gpus) }}
  {{- end }}
  {{- toYaml $resources | nindent 2 }}
securityContext:
  {{- toYaml $v.containerSecurityContext | nindent 2 }}
volumeMounts:
  - {name: tmp, mountPath: /tmp}
  - {name: work, mountPath: /work}
  {{- if ne $v.triton.modelRepository.type "objectStore" }}
  - name: models
    mountPath: /models
    {{- if eq $v.triton.modelRepository.type "pvc" }}
    {{- with $v.triton.modelRepository.subPath }}
    subPath: {{ . }}
    {{- end }}
    {{- end }}
  {{- end }}
{{- end -}}
