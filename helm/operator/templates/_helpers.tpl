{{/* The chart's short name. */}}
{{- define "operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: <release>-operator, or the release name alone when it already says
"operator". */}}
{{- define "operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "operator.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dynamo-snapshot
{{- end -}}

{{- define "operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The one namespace the operator watches when restricted; empty when it watches all of them. */}}
{{- define "operator.watchNamespace" -}}
{{- if .Values.namespaceRestricted -}}
{{- default .Release.Namespace .Values.watchNamespace -}}
{{- end -}}
{{- end -}}

{{/* The leader-election Lease's name: the operator's default, passed explicitly so that the Role's
resourceNames and the flag cannot drift apart. Kept fixed (not the release name): a rolling upgrade's old
and new pods must compete for the same Lease. */}}
{{- define "operator.leaderElectionId" -}}
dynamo-snapshot-operator
{{- end -}}

{{- define "operator.image" -}}
{{- printf "%s:%s" (required "image.repository is required" .Values.image.repository) (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The checkpoint values: `checkpoint`, with upstream's platform-chart shape `dynamo-operator.checkpoint`
laid over it (same meaning; docs/compatibility.md). As upstream, `pvc.create: true` without a
`storage.accessMode` of its own means podMount. */}}
{{- define "operator.checkpointValues" -}}
{{- $c := deepCopy .Values.checkpoint -}}
{{- $platform := index .Values "dynamo-operator" | default dict -}}
{{- range $key, $_ := $platform -}}
{{- if ne $key "checkpoint" -}}
{{- fail (printf "dynamo-operator.%s is not a setting of this chart (only dynamo-operator.checkpoint is read): remove it" $key) -}}
{{- end -}}
{{- end -}}
{{- $up := $platform.checkpoint | default dict -}}
{{- if $up -}}
{{- $c = mustMergeOverwrite $c (deepCopy $up) -}}
{{- $upStorage := $up.storage | default dict -}}
{{- if and (not (hasKey $upStorage "accessMode")) ($upStorage.pvc | default dict).create -}}
{{- $_ := set $c.storage "accessMode" "podMount" -}}
{{- end -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{/* The operator's configuration file, built field by field so that a misspelt value fails here instead
of being ignored by the operator. */}}
{{- define "operator.config" -}}
{{- $c := include "operator.checkpointValues" . | fromYaml -}}
{{- $pvc := $c.storage.pvc -}}
{{- $pvcOut := dict "pvcName" $pvc.pvcName "basePath" (clean $pvc.basePath) "create" $pvc.create "storageClassName" $pvc.storageClassName "accessMode" $pvc.accessMode -}}
{{- if $pvc.size -}}
{{- $_ := set $pvcOut "size" ($pvc.size | toString) -}}
{{- end -}}
{{- $storage := dict "type" $c.storage.type "accessMode" $c.storage.accessMode "pvc" $pvcOut -}}
{{- if eq $c.storage.type "s3" -}}
{{- $s3 := $c.storage.s3 | default dict -}}
{{- $_ := set $storage "s3" (dict "bucket" $s3.bucket "prefix" ($s3.prefix | default "")) -}}
{{- end -}}
{{- $staging := dict "maxNodes" (int (($c.staging | default dict).maxNodes | default 0)) -}}
{{- toYaml (dict "checkpoint" (dict "enabled" $c.enabled "storage" $storage "cleanupImage" $c.cleanupImage "staging" $staging)) -}}
{{- end -}}

{{/* "true" when pre-staging is on (checkpoint.staging.maxNodes > 0): the operator watches Nodes. */}}
{{- define "operator.stagingOn" -}}
{{- $c := include "operator.checkpointValues" . | fromYaml -}}
{{- if gt (int (($c.staging | default dict).maxNodes | default 0)) 0 -}}true{{- end -}}
{{- end -}}

{{/* Values that would give an operator that starts but cannot work: refuse them, naming the value. */}}
{{- define "operator.validate" -}}
{{- $c := include "operator.checkpointValues" . | fromYaml -}}
{{- $pvc := $c.storage.pvc -}}
{{- if not (kindIs "bool" $c.enabled) -}}
{{- fail (printf "checkpoint.enabled must be true or false, got %v" $c.enabled) -}}
{{- end -}}
{{- if not (has $c.storage.type (list "pvc" "s3")) -}}
{{- fail (printf "checkpoint.storage.type must be pvc or s3, got %q" $c.storage.type) -}}
{{- end -}}
{{- if and (eq $c.storage.type "s3") (not ($c.storage.s3 | default dict).bucket) -}}
{{- fail "checkpoint.storage.s3.bucket is required when checkpoint.storage.type=s3 (the snapshot chart's storage.s3.bucket)" -}}
{{- end -}}
{{- if not (has $c.storage.accessMode (list "agentMount" "podMount")) -}}
{{- fail (printf "checkpoint.storage.accessMode must be agentMount or podMount, got %q" $c.storage.accessMode) -}}
{{- end -}}
{{- if not $pvc.pvcName -}}
{{- fail "checkpoint.storage.pvc.pvcName must not be empty (the snapshot chart's default is snapshot-pvc)" -}}
{{- end -}}
{{- $base := $pvc.basePath | toString -}}
{{- if or (not (hasPrefix "/" $base)) (eq (clean $base) "/") -}}
{{- fail (printf "checkpoint.storage.pvc.basePath must be an absolute directory other than /, got %q" $base) -}}
{{- end -}}
{{- if and $pvc.create (not $pvc.size) -}}
{{- fail "checkpoint.storage.pvc.size is required when checkpoint.storage.pvc.create=true: set it (e.g. --set checkpoint.storage.pvc.size=1Ti), or set create=false to use PVCs that already exist" -}}
{{- end -}}
{{- if not (has $pvc.accessMode (list "ReadWriteMany" "ReadWriteOnce" "ReadWriteOncePod" "ReadOnlyMany")) -}}
{{- fail (printf "checkpoint.storage.pvc.accessMode must be ReadWriteMany, ReadWriteOnce, ReadWriteOncePod or ReadOnlyMany, got %q" $pvc.accessMode) -}}
{{- end -}}
{{- if not $c.cleanupImage -}}
{{- fail "checkpoint.cleanupImage must not be empty: it runs the Jobs that delete removed checkpoints" -}}
{{- end -}}
{{- if and .Values.watchNamespace (not .Values.namespaceRestricted) -}}
{{- fail (printf "watchNamespace=%s needs namespaceRestricted=true (without it the operator watches every namespace)" .Values.watchNamespace) -}}
{{- end -}}
{{- end -}}
