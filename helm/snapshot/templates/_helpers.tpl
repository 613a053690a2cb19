{{/* The chart's short name. */}}
{{- define "snapshot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: the release name, unless it already contains the chart name. */}}
{{- define "snapshot.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "snapshot.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "snapshot.agentName" -}}
{{- printf "%s-agent" (include "snapshot.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Cluster-scoped objects carry the namespace too: in agentMount mode the chart is installed once per
workload namespace, often under the same release name, and those installs must not collide. */}}
{{- define "snapshot.clusterScopedName" -}}
{{- printf "%s-%s" (include "snapshot.agentName" .) .Release.Namespace -}}
{{- end -}}

{{- define "snapshot.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "snapshot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dynamo-snapshot
{{- end -}}

{{/* The operator finds the agent (and, in agentMount mode, the checkpoint PVC) by this component label:
keep it exactly `snapshot-agent`. */}}
{{- define "snapshot.agentSelectorLabels" -}}
app.kubernetes.io/name: {{ include "snapshot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: snapshot-agent
{{- end -}}

{{- define "snapshot.keySecretName" -}}
{{- .Values.keys.secretName | default (printf "%s-keys" (include "snapshot.agentName" .)) -}}
{{- end -}}

{{/* "true" when the agent mounts the checkpoint PVC (agentMount with PVC storage). */}}
{{- define "snapshot.agentMount" -}}
{{- if and (eq .Values.storage.accessMode "agentMount") (eq .Values.storage.type "pvc") -}}true{{- end -}}
{{- end -}}

{{- define "snapshot.s3" -}}
{{- if eq .Values.storage.type "s3" -}}true{{- end -}}
{{- end -}}

{{/* The agent's --storage-base-path: the PVC's base path, or with s3 the node-local directory. */}}
{{- define "snapshot.basePath" -}}
{{- if include "snapshot.s3" . -}}{{ clean .Values.storage.s3.localDirectory }}{{- else -}}{{ clean .Values.storage.pvc.basePath }}{{- end -}}
{{- end -}}

{{- define "snapshot.s3CAPath" -}}/etc/dynamo-snapshot/s3-ca/ca.crt{{- end -}}

{{/* With s3: the storage section of the agent's configuration file (storage.s3.* as the agent reads them). */}}
{{- define "snapshot.s3Storage" -}}
{{- $s3 := .Values.storage.s3 -}}
{{- $want := dict "bucket" $s3.bucket "prefix" $s3.prefix "endpoint" $s3.endpoint "region" $s3.region "forcePathStyle" $s3.forcePathStyle "insecureSkipTLSVerify" $s3.insecureSkipTLSVerify "concurrency" $s3.concurrency "partMiB" $s3.partMiB -}}
{{- if $s3.caConfigMap -}}
{{- $_ := set $want "caBundle" (include "snapshot.s3CAPath" .) -}}
{{- end -}}
{{- toYaml (dict "type" "s3" "s3" $want) -}}
{{- end -}}

{{/* "true" when the agent is confined to the release namespace. Unset means: restricted in agentMount
(the agent serves only its own namespace), cluster-wide in podMount (one agent serves every namespace). */}}
{{- define "snapshot.namespaceRestricted" -}}
{{- $restricted := .Values.rbac.namespaceRestricted -}}
{{- /* unset: restricted exactly when the agent mounts its namespace's PVC */ -}}
{{- if kindIs "bool" $restricted -}}
{{- if $restricted -}}true{{- end -}}
{{- else if kindIs "invalid" $restricted -}}
{{- include "snapshot.agentMount" . -}}
{{- else -}}
{{- fail (printf "rbac.namespaceRestricted must be true, false or unset, got %v" $restricted) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the cluster-wide agent's writes are limited to checkpoint objects by a
ValidatingAdmissionPolicy (admissionPolicy.checkpointObjectsOnly). Unset: whenever the cluster serves that
API (Kubernetes 1.30+). */}}
{{- define "snapshot.labelPolicy" -}}
{{- $want := .Values.admissionPolicy.checkpointObjectsOnly -}}
{{- $served := .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy" -}}
{{- if kindIs "invalid" $want -}}
{{- if $served -}}true{{- end -}}
{{- else if not (kindIs "bool" $want) -}}
{{- fail (printf "admissionPolicy.checkpointObjectsOnly must be true, false or unset, got %v" $want) -}}
{{- else if and $want (not $served) -}}
{{- fail "admissionPolicy.checkpointObjectsOnly=true needs admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy (Kubernetes 1.30+): upgrade, or unset it" -}}
{{- else if $want -}}true
{{- end -}}
{{- end -}}

{{- define "snapshot.socketPath" -}}
{{- if .Values.runtime.socketPath -}}
{{- .Values.runtime.socketPath -}}
{{- else if eq .Values.runtime.type "crio" -}}
/var/run/crio/crio.sock
{{- else -}}
/run/containerd/containerd.sock
{{- end -}}
{{- end -}}

{{/* The seccomp profile's file name, under the kubelet's seccomp root's profiles/ (seccomp.deploy). */}}
{{- define "snapshot.seccompProfile" -}}
block-iouring.json
{{- end -}}

{{- define "snapshot.image" -}}
{{- $image := .Values.daemonset.image -}}
{{- printf "%s:%s" (required "daemonset.image.repository is required" $image.repository) (default .Chart.AppVersion $image.tag) -}}
{{- end -}}

{{/* Values that would render a chart that installs cleanly but cannot work: refuse them, naming the value
and what to set instead. Every template includes this first, so the error a user sees is about the values
whatever order Helm renders the templates in. */}}
{{- /* "true" when the node-local checkpoint cache is on: cache.budgetGiB set, and cache.hostPath (with
storage.type=s3 it has a default: a restore fetches into the cache, so s3 always has one). */ -}}
{{- define "snapshot.cacheOn" -}}
{{- $c := .Values.cache | default dict -}}
{{- if and (include "snapshot.cacheHostPath" .) $c.budgetGiB -}}true{{- end -}}
{{- end -}}

{{- /* The cache's directory on the node: cache.hostPath, else with s3 the default beside localDirectory's. */ -}}
{{- define "snapshot.cacheHostPath" -}}
{{- $c := .Values.cache | default dict -}}
{{- if $c.hostPath -}}{{ clean (toString $c.hostPath) }}{{- else if include "snapshot.s3" . -}}/var/lib/dynamo-snapshot/cache{{- end -}}
{{- end -}}

{{- /* "true" when the directories $a and $b (clean, absolute) are one, or one holds the other. */ -}}
{{- define "snapshot.overlap" -}}
{{- $a := index . 0 -}}{{- $b := index . 1 -}}
{{- if or (eq $a $b) (hasPrefix (printf "%s/" $a) $b) (hasPrefix (printf "%s/" $b) $a) -}}true{{- end -}}
{{- end -}}

{{- define "snapshot.cacheMountPath" -}}/var/lib/dynamo-snapshot/cache{{- end -}}

{{- define "snapshot.validateCache" -}}
{{- $c := .Values.cache | default dict -}}
{{- $b := $c.budgetGiB | default 0 -}}
{{- if not (or (kindIs "int" $b) (kindIs "int64" $b) (kindIs "float64" $b)) -}}
{{- fail (printf "cache.budgetGiB must be a number of GiB, got %q (--set passes a fraction as text: give whole GiB, or use --set-json or a values file)" (toString $b)) -}}
{{- end -}}
{{- if lt (float64 $b) 0.0 -}}
{{- fail (printf "cache.budgetGiB must be 0 (no cache) or more, got %v" $b) -}}
{{- end -}}
{{- if and $c.hostPath (not $c.budgetGiB) -}}
{{- fail (printf "cache.hostPath is %q but cache.budgetGiB is 0: set both for a node cache, or neither" (toString $c.hostPath)) -}}
{{- end -}}
{{- if and $c.budgetGiB (not (include "snapshot.cacheHostPath" .)) -}}
{{- fail "cache.budgetGiB is set but cache.hostPath is empty: set both for a node cache (a directory on local disk), or neither" -}}
{{- end -}}
{{- if $c.hostPath -}}
{{- $p := toString $c.hostPath -}}
{{- if or (not (hasPrefix "/" $p)) (eq (clean $p) "/") -}}
{{- fail (printf "cache.hostPath must be an absolute directory on the node other than /, got %q" $p) -}}
{{- end -}}
{{- end -}}
{{- if hasKey (.Values.config | default dict) "cache" -}}
{{- fail "config.cache is set by the chart: use cache.hostPath and cache.budgetGiB instead" -}}
{{- end -}}
{{- if hasKey (.Values.config | default dict) "storage" -}}
{{- fail "config.storage is set by the chart: use storage.type and storage.s3.* instead" -}}
{{- end -}}
{{- end -}}

{{- define "snapshot.validate" -}}
{{- include "snapshot.validateCache" . -}}
{{- $s := .Values.storage -}}
{{- if not (has $s.type (list "pvc" "s3")) -}}
{{- fail (printf "storage.type must be pvc or s3, got %q" $s.type) -}}
{{- end -}}
{{- if eq $s.type "s3" -}}
{{- if not $s.s3.bucket -}}
{{- fail "storage.s3.bucket is required when storage.type=s3: the bucket checkpoints are uploaded to (it must exist)" -}}
{{- end -}}
{{- if and (include "snapshot.s3" .) (not (.Values.cache | default dict).budgetGiB) -}}
{{- fail "cache.budgetGiB is required with storage.type=s3: a restore fetches the checkpoint from the bucket into the node cache (cache.hostPath, default /var/lib/dynamo-snapshot/cache), and the budget is what it may hold there - set it to the GiB that directory's disk can spare (e.g. --set cache.budgetGiB=500)" -}}
{{- end -}}
{{- if ne $s.accessMode "agentMount" -}}
{{- fail (printf "storage.accessMode %s cannot be used with storage.type=s3: no pod mounts storage; leave storage.accessMode at agentMount" $s.accessMode) -}}
{{- end -}}
{{- if not (hasPrefix "/" ($s.s3.localDirectory | toString)) -}}
{{- fail (printf "storage.s3.localDirectory must be an absolute directory on the node, got %q" $s.s3.localDirectory) -}}
{{- end -}}
{{- if and $s.s3.caConfigMap $s.s3.insecureSkipTLSVerify -}}
{{- fail "storage.s3: set caConfigMap or insecureSkipTLSVerify, not both" -}}
{{- end -}}
{{- $local := clean (toString $s.s3.localDirectory) -}}
{{- if include "snapshot.overlap" (list $local (include "snapshot.cacheHostPath" .)) -}}
{{- fail (printf "cache.hostPath %q overlaps storage.s3.localDirectory %q (where checkpoints are written before their upload): give the node cache a directory of its own" (include "snapshot.cacheHostPath" .) $local) -}}
{{- end -}}
{{- if include "snapshot.overlap" (list $local (include "snapshot.cacheMountPath" .)) -}}
{{- fail (printf "storage.s3.localDirectory %q overlaps %s, where the agent sees its node cache: choose another directory" $local (include "snapshot.cacheMountPath" .)) -}}
{{- end -}}
{{- end -}}
{{- if not (has $s.accessMode (list "agentMount" "podMount")) -}}
{{- fail (printf "storage.accessMode must be agentMount or podMount, got %q" $s.accessMode) -}}
{{- end -}}
{{- if not (has .Values.runtime.type (list "containerd" "crio")) -}}
{{- fail (printf "runtime.type must be containerd or crio, got %q (for a socket in another place, keep the type and set runtime.socketPath)" .Values.runtime.type) -}}
{{- end -}}
{{- if not (hasPrefix "/" (include "snapshot.socketPath" .)) -}}
{{- fail (printf "runtime.socketPath must be an absolute path on the node, got %q" .Values.runtime.socketPath) -}}
{{- end -}}
{{- $base := $s.pvc.basePath | toString -}}
{{- if or (not (hasPrefix "/" $base)) (eq (clean $base) "/") -}}
{{- fail (printf "storage.pvc.basePath must be an absolute directory other than /, got %q" $base) -}}
{{- end -}}
{{- if .Values.seccomp.deploy -}}
{{- $seccompRoot := clean (toString .Values.seccomp.hostPath) -}}
{{- if or (not (isAbs $seccompRoot)) (eq $seccompRoot "/") -}}
{{- fail (printf "seccomp.hostPath must be the kubelet's seccomp directory, an absolute path other than / (default /var/lib/kubelet/seccomp), got %q" (toString .Values.seccomp.hostPath)) -}}
{{- end -}}
{{- end -}}
{{- if and (include "snapshot.agentMount" .) (not $s.pvc.name) -}}
{{- fail "storage.pvc.name is required in agentMount mode: the PVC the agent mounts (the chart's or an existing one)" -}}
{{- end -}}
{{- if and (include "snapshot.agentMount" .) $s.pvc.create (not $s.pvc.size) -}}
{{- fail "storage.pvc.size is required when storage.pvc.create=true: set it (e.g. --set storage.pvc.size=1Ti), or set storage.pvc.create=false and storage.pvc.name to reuse an existing PVC" -}}
{{- end -}}
{{- /* Evaluated only for its check: a non-boolean rbac.namespaceRestricted fails here. */ -}}
{{- $_ := include "snapshot.namespaceRestricted" . -}}
{{- $_ := include "snapshot.labelPolicy" . -}}
{{- if not (has $s.pvc.accessMode (list "ReadWriteMany" "ReadWriteOnce" "ReadWriteOncePod")) -}}
{{- fail (printf "storage.pvc.accessMode must be ReadWriteMany, ReadWriteOnce or ReadWriteOncePod (the agent writes checkpoints), got %q" $s.pvc.accessMode) -}}
{{- end -}}
{{- end -}}
