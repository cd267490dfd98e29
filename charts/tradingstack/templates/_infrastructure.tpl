{{/*
tradingstack.infrastructure: a StatefulSet with a data PVC, its Service, probes, resources and
the hardened security context, for one infrastructure component. Takes a dict:
  ctx (root), component (name suffix), values (the component's values), ports (list of
  {name, port}), env (list), probe (the default probe handler), dataPath, and optionally
  config (a file's text, mounted from a ConfigMap at configPath and named by configArg).
The component's values give image, command (empty: the image's entrypoint), args and probe
(a handler that replaces the default one), so any image that speaks the protocol can stand in.
*/}}
{{- define "tradingstack.infrastructure" -}}
{{- $ctx := .ctx -}}
{{- $name := printf "%s-%s" (include "tradingstack.fullname" $ctx) .component -}}
{{- if .config }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ $name }}-config
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "tradingstack.labels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
data:
  {{ base .configPath }}: |
    {{- .config | nindent 4 }}
---
{{- end }}
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "tradingstack.labels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "tradingstack.selectorLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
  ports:
    {{- range .ports }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
      protocol: TCP
    {{- end }}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ $name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "tradingstack.labels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
spec:
  serviceName: {{ $name }}
  replicas: 1
  selector:
    matchLabels:
      {{- include "tradingstack.selectorLabels" (dict "ctx" $ctx "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tradingstack.labels" (dict "ctx" $ctx "component" .component) | nindent 8 }}
      {{- if .config }}
      annotations:
        checksum/config: {{ .config | sha256sum }}
      {{- end }}
    spec:
      automountServiceAccountToken: false
      securityContext:
        {{- toYaml $ctx.Values.infrastructure.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ .component }}
          image: {{ include "tradingstack.image" (dict "image" .values.image "root" $ctx) }}
          imagePullPolicy: {{ .values.image.pullPolicy }}
          {{- with .values.command }}
          command:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- $args := .values.args }}
          {{- if .config }}
          {{- $args = append $args (printf "%s%s" .configArg .configPath) }}
          {{- end }}
          {{- with $args }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with .env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            {{- range .ports }}
            - name: {{ .name }}
              containerPort: {{ .port }}
              protocol: TCP
            {{- end }}
          {{- $probe := .values.probe | default .probe }}
          startupProbe:
            {{- toYaml $probe | nindent 12 }}
            periodSeconds: 2
            timeoutSeconds: 5
            failureThreshold: 60
          readinessProbe:
            {{- toYaml $probe | nindent 12 }}
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 3
          livenessProbe:
            {{- toYaml $probe | nindent 12 }}
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 6
          resources:
            {{- toYaml .values.resources | nindent 12 }}
          securityContext:
            {{- toYaml $ctx.Values.infrastructure.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: data
              mountPath: {{ .dataPath }}
            - name: tmp
              mountPath: /tmp
            {{- if .config }}
            - name: config
              mountPath: {{ .configPath }}
              subPath: {{ base .configPath }}
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        {{- if .config }}
        - name: config
          configMap:
            name: {{ $name }}-config
        {{- end }}
  volumeClaimTemplates:
    - metadata:
        name: data
        labels:
          {{- include "tradingstack.selectorLabels" (dict "ctx" $ctx "component" .component) | nindent 10 }}
      spec:
        accessModes: ["ReadWriteOnce"]
        {{- with .values.persistence.storageClass }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ .values.persistence.size }}
{{- end -}}
