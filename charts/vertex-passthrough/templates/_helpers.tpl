{{/* Names ------------------------------------------------------------------ */}}

{{- define "vp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* RELEASE-vertex-passthrough, or RELEASE alone when it already says so. */}}
{{- define "vp.fullname" -}}
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

{{/* A name derived from the full name; `suffix` is kept whole when truncating. */}}
{{- define "vp.child" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "vp.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{- define "vp.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "vp.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vp.webhookServiceName" -}}{{ include "vp.child" (list . "webhook") }}{{- end -}}
{{- define "vp.webhookSecretName" -}}{{ include "vp.child" (list . "webhook-tls") }}{{- end -}}
{{- define "vp.webhookCertificateName" -}}{{ include "vp.child" (list . "webhook") }}{{- end -}}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "vp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The labels of an object, built as one map so that no key can appear twice (a
     duplicate key makes `helm install` fail: "mapping key already defined"). In rising
     precedence: the chart's informational labels, commonLabels, the labels selectors
     and Helm rely on (name, instance, managed-by), then the object's own `extra` maps.
     Use: include "vp.labels" .   or   include "vp.labelsWith" (list . $extra ...) */}}
{{- define "vp.labelsWith" -}}
{{- $root := index . 0 -}}
{{- $labels := dict
      "helm.sh/chart" (printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-")
      "app.kubernetes.io/version" $root.Chart.AppVersion
      "app.kubernetes.io/part-of" "vertex-passthrough" -}}
{{- range $key, $value := $root.Values.commonLabels }}
{{- $_ := set $labels $key (toString $value) }}
{{- end }}
{{- $_ := set $labels "app.kubernetes.io/name" (include "vp.name" $root) }}
{{- $_ := set $labels "app.kubernetes.io/instance" $root.Release.Name }}
{{- $_ := set $labels "app.kubernetes.io/managed-by" $root.Release.Service }}
{{- range $extra := rest . }}
{{- range $key, $value := $extra }}
{{- $_ := set $labels $key (toString $value) }}
{{- end }}
{{- end }}
{{- toYaml $labels }}
{{- end -}}

{{- define "vp.labels" -}}
{{- include "vp.labelsWith" (list .) }}
{{- end -}}

{{/* The operator pod's labels: podLabels, except that they never replace the selector
     labels (the Deployment and the Services select the pod by those). */}}
{{- define "vp.podLabels" -}}
{{- $labels := dict }}
{{- range $key, $value := .Values.operator.podLabels }}
{{- $_ := set $labels $key (toString $value) }}
{{- end }}
{{- toYaml (merge (include "vp.selectorLabels" . | fromYaml) $labels) }}
{{- end -}}

{{/* Images: repository:tag, or repository@digest when a digest is given. */}}
{{- define "vp.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Namespaces the webhook never sees: the system ones (the operator refuses them too)
     and the operator's own, so that a broken operator cannot block its own pods. */}}
{{- define "vp.excludedNamespaces" -}}
{{- $ns := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace -}}
{{- concat $ns .Values.webhook.excludeNamespaces | uniq | toJson -}}
{{- end -}}

{{/* RBAC ------------------------------------------------------------------- */}}

{{/* Exactly what the operator calls (tests/chart/test_rbac.py compares these rules with
     the requests recorded by the operator tests in tests/operator/rbac_requests.json), in
     two parts: what it needs wherever it watches (reading, and its own custom resources),
     and what writes into a namespace's workloads (granted per namespace). */}}
{{- define "vp.operatorRules" -}}
{{ include "vp.operatorWatchRules" . }}
{{ include "vp.operatorWriteRules" . }}
{{- end -}}

{{- define "vp.operatorWatchRules" -}}
# kopf posts handler warnings and errors as Events of the route.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# The repair loop lists pods where routes exist (to find pods lacking the sidecar).
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# Workloads: watched (indexes); patched only where vp.operatorWriteRules are granted.
- apiGroups: [apps]
  resources: [deployments, statefulsets, daemonsets]
  verbs: [list, watch]
# Routes: watched, finalizer/annotations patched by kopf, status written by the operator.
- apiGroups: [vertex.passthrough.dev]
  resources: [vertexroutes]
  verbs: [list, watch, patch]
- apiGroups: [vertex.passthrough.dev]
  resources: [vertexroutes/status]
  verbs: [patch]
# Credentials: watched, finalizer/annotations patched by kopf, status written by the operator.
- apiGroups: [vertex.passthrough.dev]
  resources: [vertexcredentials]
  verbs: [list, watch, patch]
- apiGroups: [vertex.passthrough.dev]
  resources: [vertexcredentials/status]
  verbs: [patch]
{{- if .Values.showback.teamLabel }}
# Showback: the team label of the namespace a pod is admitted in (read, cached a minute).
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get]
{{- end }}
{{- end -}}

{{- define "vp.operatorWriteRules" -}}
# Sidecar configs: one ConfigMap per VertexRoute (read, create, merge-patch).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# Workloads: their pod template annotated with the config hash.
- apiGroups: [apps]
  resources: [deployments, statefulsets, daemonsets]
  verbs: [patch]
# Kubernetes service accounts of VertexCredentials: created (owned) or adopted, annotated
# for GKE Workload Identity, deleted only when the operator created them.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, patch, delete]
# binding.backend configConnector: owned IAMPolicyMember objects (never the authoritative IAMPolicy).
- apiGroups: [iam.cnrm.cloud.google.com]
  resources: [iampolicymembers]
  verbs: [get, create, delete]
{{- end -}}

{{/* Namespaces the operator must never be granted writes in: the system ones and its own
     (never injected, so nothing there needs it). Listing one is an install error. */}}
{{- define "vp.checkServedNamespaces" -}}
{{- $never := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace -}}
{{- range $ns := concat .Values.operator.watchNamespaces .Values.rbac.workloadNamespaces -}}
{{- if has $ns $never -}}
{{- fail (printf "namespace %s cannot be served (operator.watchNamespaces / rbac.workloadNamespaces): it is a system namespace or the release's own, which the operator never injects" $ns) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Webhook certificate (generated mode) -------------------------------------- */}}

{{/* "reuse" when the Secret in the cluster holds a certificate for this Service that
     is valid for 30 more days, else "generate". Deterministic for one render, so the
     Deployment can tell whether the certificate it mounts is about to change. */}}
{{- define "vp.webhookCertDecision" -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace (include "vp.webhookSecretName" .) -}}
{{- $data := dig "data" dict $secret -}}
{{- $notes := dig "metadata" "annotations" dict $secret -}}
{{- $host := printf "%s.%s.svc" (include "vp.webhookServiceName" .) .Release.Namespace -}}
{{- $notAfter := index $notes "vertex.passthrough.dev/not-after" | default "0" | int64 -}}
{{- $margin := mul 30 86400 -}}
{{- if and (index $data "tls.crt") (index $data "tls.key") (index $data "ca.crt")
        (eq (index $notes "vertex.passthrough.dev/issued-for" | default "") $host)
        (gt $notAfter (add (now | unixEpoch | int64) $margin)) -}}
reuse
{{- else -}}
generate
{{- end -}}
{{- end -}}
