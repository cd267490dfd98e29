{{/* tradingstack.name: the chart name, or nameOverride. */}}
{{- define "tradingstack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* tradingstack.fullname: release-scoped prefix of every object name. */}}
{{- define "tradingstack.fullname" -}}
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

{{/* tradingstack.labels: the standard labels of every object (pass dict "ctx" . "component" "x"). */}}
{{- define "tradingstack.labels" -}}
{{ include "tradingstack.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: tradingstack
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* tradingstack.selectorLabels: the immutable subset used in selectors. */}}
{{- define "tradingstack.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tradingstack.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* tradingstack.serviceAccountName: the operator's ServiceAccount. */}}
{{- define "tradingstack.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tradingstack.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* tradingstack.image: registry/repository:tag or @digest (pass an image values map and the root). */}}
{{- define "tradingstack.image" -}}
{{- $ref := printf "%s/%s" .image.registry .image.repository | trimPrefix "/" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $ref .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (default .root.Chart.AppVersion .image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* tradingstack.clusterWide: "true" when watchNamespaces asks for every namespace. */}}
{{- define "tradingstack.clusterWide" -}}
{{- if has "*" .Values.operator.watchNamespaces -}}true{{- end -}}
{{- end -}}

{{/* tradingstack.watchNamespaces: the namespaces watched when not cluster-wide. */}}
{{- define "tradingstack.watchNamespaces" -}}
{{- if .Values.operator.watchNamespaces -}}
{{- toJson .Values.operator.watchNamespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* tradingstack.s3Secret: the Secret holding S3 credentials ("" when there is none). */}}
{{- define "tradingstack.s3Secret" -}}
{{- if .Values.s3.existingSecret -}}
{{- .Values.s3.existingSecret -}}
{{- else if .Values.s3.enabled -}}
{{- printf "%s-s3" (include "tradingstack.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* tradingstack.endpoints: infrastructure endpoints for a TradingStack, in-release or external. */}}
{{- define "tradingstack.endpoints" -}}
{{- $full := include "tradingstack.fullname" . -}}
{{- $ns := .Release.Namespace -}}
nats:
  url: {{ ternary (printf "nats://%s-nats.%s.svc:4222" $full $ns) .Values.nats.externalUrl .Values.nats.enabled | quote }}
redis:
  url: {{ ternary (printf "redis://%s-redis.%s.svc:6379/0" $full $ns) .Values.redis.externalUrl .Values.redis.enabled | quote }}
questdb:
  url: {{ ternary (printf "http://%s-questdb.%s.svc:9000" $full $ns) .Values.questdb.externalUrl .Values.questdb.enabled | quote }}
s3:
  endpoint: {{ ternary (printf "http://%s-s3.%s.svc:9000" $full $ns) .Values.s3.externalEndpoint .Values.s3.enabled | quote }}
  allowHttp: {{ .Values.s3.enabled }}
  region: {{ .Values.s3.region | quote }}
  bucket: {{ .Values.s3.bucket | quote }}
  {{- with (include "tradingstack.s3Secret" .) }}
  secretRef:
    name: {{ . }}
  {{- end }}
{{- end -}}

{{/* tradingstack.rbacRules: exactly what the operator calls (see operator/DESIGN.md). */}}
{{- define "tradingstack.rbacRules" -}}
- apiGroups: ["tradingstack.io"]
  resources: ["tradingstacks"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["tradingstack.io"]
  resources: ["tradingstacks/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end -}}

{{/* tradingstack.validateValues: every value rule, reported at once before rendering. */}}
{{- define "tradingstack.validateValues" -}}
{{- $errors := list -}}
{{- if and (has "*" .Values.operator.watchNamespaces) (gt (len .Values.operator.watchNamespaces) 1) -}}
{{- $errors = append $errors "operator.watchNamespaces: \"*\" (every namespace) cannot be combined with names" -}}
{{- end -}}
{{- if and .Values.sample.enabled (not .Values.s3.enabled) (hasPrefix "http://" .Values.s3.externalEndpoint) -}}
{{- $errors = append $errors "s3.externalEndpoint is plain http: the sample TradingStack would need allowHttp; use https or s3.enabled" -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\nVALUES VALIDATION:\n  %s" (join "\n  " $errors)) -}}
{{- end -}}
{{- end -}}
