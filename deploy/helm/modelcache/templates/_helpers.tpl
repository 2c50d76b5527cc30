{{/* The CSI driver's name: compiled into the plugin, so not a value. */}}
{{- define "modelcache.driverName" -}}
csi.modelcache.dev
{{- end }}

{{- define "modelcache.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name for namespaced objects and cluster-scoped ones alike. */}}
{{- define "modelcache.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "modelcache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "modelcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component (node or controller): pass (list $ "node"). */}}
{{- define "modelcache.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "modelcache.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "modelcache.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "modelcache.nodeServiceAccount" -}}
{{- if .Values.serviceAccount.create }}
{{- printf "%s-node" (include "modelcache.fullname" .) }}
{{- else }}
{{- required "serviceAccount.node: name the node's ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.node }}
{{- end }}
{{- end }}

{{- define "modelcache.controllerServiceAccount" -}}
{{- if .Values.serviceAccount.create }}
{{- printf "%s-controller" (include "modelcache.fullname" .) }}
{{- else }}
{{- required "serviceAccount.controller: name the controller's ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.controller }}
{{- end }}
{{- end }}

{{- define "modelcache.catalogueName" -}}
{{- printf "%s-catalogue" (include "modelcache.fullname" .) }}
{{- end }}

{{/* Where the plugin's socket lives on the host, for kubelet and the registrar. */}}
{{- define "modelcache.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) (include "modelcache.driverName" .) }}
{{- end }}

{{- define "modelcache.podsDir" -}}
{{- printf "%s/pods" (trimSuffix "/" .Values.kubeletDir) }}
{{- end }}

{{/* Checks no JSON schema can express. */}}
{{- define "modelcache.checks" -}}
{{- if ge (int .Values.store.lowWatermark) (int .Values.store.highWatermark) }}
{{- fail (printf "store.lowWatermark (%v) must be below store.highWatermark (%v): eviction runs from high down to low" .Values.store.lowWatermark .Values.store.highWatermark) }}
{{- end }}
{{- if and .Values.sharedCache.enabled (not .Values.sharedCache.claimName) }}
{{- fail "sharedCache.claimName: name the PVC that holds the shared HF cache, or set sharedCache.enabled=false" }}
{{- end }}
{{- if and (not .Values.controller.enabled) .Values.storageClasses }}
{{- fail "storageClasses need the controller (external-provisioner): set controller.enabled=true" }}
{{- end }}
{{- end }}
