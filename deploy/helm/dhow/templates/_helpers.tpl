{{/* The release's base name, at most 63 characters less room for a pool suffix. */}}
{{- define "dhow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dhow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dhow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dhow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Pods of every pool and stream of the release (the NetworkPolicy's and ServiceMonitor's selector). */}}
{{- define "dhow.releaseSelector" -}}
app.kubernetes.io/name: {{ include "dhow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The pods of one pool: call with (dict "root" $ "pool" $poolName). */}}
{{- define "dhow.poolSelector" -}}
{{ include "dhow.releaseSelector" .root }}
app.kubernetes.io/component: server
dhow.dev/pool: {{ .pool }}
{{- end -}}

{{- define "dhow.poolName" -}}
{{- printf "%s-%s" (include "dhow.fullname" .root) .pool -}}
{{- end -}}

{{- define "dhow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dhow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dhow.secretName" -}}
{{- default (include "dhow.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The image of a pool: the CUDA variant where the pool has GPUs. */}}
{{- define "dhow.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- if gt (int .config.gpus) 0 -}}
{{- $tag = default (printf "%s-cuda" $tag) .root.Values.image.cudaTag -}}
{{- end -}}
{{- printf "%s:%s" .root.Values.image.repository $tag -}}
{{- end -}}

{{/* The models a pool loads: those placed on it and those it is the fallback of, as a JSON list. */}}
{{- define "dhow.poolModels" -}}
{{- $models := list -}}
{{- range .root.Values.models -}}
{{- if or (eq .pool $.pool) (eq (default "" .fallback) $.pool) -}}
{{- $models = append $models .name -}}
{{- end -}}
{{- end -}}
{{- toJson $models -}}
{{- end -}}

{{/* The pools that are enabled, in name order, as a JSON list. */}}
{{- define "dhow.enabledPools" -}}
{{- $pools := list -}}
{{- range $name, $pool := .Values.pools -}}
{{- if $pool.enabled -}}
{{- $pools = append $pools $name -}}
{{- end -}}
{{- end -}}
{{- toJson $pools -}}
{{- end -}}

{{/* Fail the render with a message when the values contradict each other. */}}
{{- define "dhow.validate" -}}
{{- $pools := include "dhow.enabledPools" . | fromJsonArray -}}
{{- if not $pools -}}
{{- fail "pools: enable at least one pool (pools.cpu.enabled or pools.gpu.enabled)" -}}
{{- end -}}
{{- range .Values.models -}}
{{- if not (has .pool $pools) -}}
{{- fail (printf "models: model %q is placed on pool %q, which is not enabled; enabled pools: %s" .name .pool (join ", " $pools)) -}}
{{- end -}}
{{- if and .fallback (not (has .fallback $pools)) -}}
{{- fail (printf "models: model %q falls back to pool %q, which is not enabled; enabled pools: %s" .name .fallback (join ", " $pools)) -}}
{{- end -}}
{{- if and .fallback (eq .fallback .pool) -}}
{{- fail (printf "models: model %q falls back to its own pool %q; name another pool or leave fallback out" .name .pool) -}}
{{- end -}}
{{- end -}}
{{- if not (has .Values.autoscaling.engine (list "keda" "hpa" "none")) -}}
{{- fail (printf "autoscaling.engine: expected keda, hpa or none, got %q" .Values.autoscaling.engine) -}}
{{- end -}}
{{- if and .Values.httpAddon.enabled (not (has .Values.httpAddon.pool $pools)) -}}
{{- fail (printf "httpAddon.pool: pool %q is not enabled" .Values.httpAddon.pool) -}}
{{- end -}}
{{- if and .Values.gateway.enabled (not (has .Values.gateway.failover (list "envoy" "none"))) -}}
{{- fail (printf "gateway.failover: expected envoy or none, got %q" .Values.gateway.failover) -}}
{{- end -}}
{{- range $name := $pools -}}
{{- $pool := index $.Values.pools $name -}}
{{- if and (eq (int $pool.minReplicas) 0) (not (and $.Values.httpAddon.enabled (eq $.Values.httpAddon.pool $name))) (ne $.Values.autoscaling.engine "none") -}}
{{- fail (printf "pools.%s.minReplicas: 0 needs the KEDA HTTP add-on in front of the pool (httpAddon.enabled, httpAddon.pool: %s), or requests would find no replica; set minReplicas to 1 or more" $name $name) -}}
{{- end -}}
{{- end -}}
{{- if .Values.persistence.enabled -}}
{{- range $name := $pools -}}
{{- $pool := index $.Values.pools $name -}}
{{- if or (gt (int $pool.replicas) 1) (and (ne $.Values.autoscaling.engine "none") (gt (int $pool.maxReplicas) 1)) -}}
{{- fail (printf "persistence.enabled keeps the data folder (SQLite) on one ReadWriteOnce volume, which one replica uses, but pool %s may run more; give secrets.registryUrl and secrets.auditStoreUrl a PostgreSQL URL and turn persistence off, or keep pools.%s.replicas at 1 and autoscaling.engine none" $name $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range .Values.streams -}}
{{- if not (has (default "cpu" .pool) $pools) -}}
{{- fail (printf "streams: %q runs on pool %q, which is not enabled; enabled pools: %s" .name (default "cpu" .pool) (join ", " $pools)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.gateway.enabled .Values.httpAddon.enabled -}}
{{- fail "gateway.enabled with httpAddon.enabled: the routes would go around the HTTP add-on's interceptor to a pool that may have no replica; send the gateway's traffic to the interceptor (keda-add-ons-http-interceptor-proxy) and leave gateway.enabled false" -}}
{{- end -}}
{{- if and .Values.gateway.enabled (not (has .Values.gateway.defaultPool $pools)) -}}
{{- fail (printf "gateway.defaultPool: pool %q is not enabled" .Values.gateway.defaultPool) -}}
{{- end -}}
{{- end -}}

{{/* A route rule's backends: the pool's, then (Envoy Gateway failover) the fallback pool's fallback Backend. */}}
{{- define "dhow.routeBackends" -}}
{{- $failover := eq .root.Values.gateway.failover "envoy" -}}
{{- $first := include "dhow.poolName" (dict "root" .root "pool" .pool) -}}
{{- if $failover }}
- {group: gateway.envoyproxy.io, kind: Backend, name: {{ printf "%s-%s" $first .port }}, port: {{ index .root.Values.ports .port }}}
{{- if .fallback }}
- {group: gateway.envoyproxy.io, kind: Backend, name: {{ printf "%s-%s-fallback" (include "dhow.poolName" (dict "root" .root "pool" .fallback)) .port }}, port: {{ index .root.Values.ports .port }}}
{{- end }}
{{- else }}
- {name: {{ $first }}, port: {{ index .root.Values.ports .port }}}
{{- end }}
{{- end -}}
