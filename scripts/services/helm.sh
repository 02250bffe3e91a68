#!/usr/bin/env bash
# Install a pinned Helm v3 once, built from source with Go, and print its path.
#
#   helm.sh            build helm into the cache unless it is there; print its path on stdout
#   helm.sh path       print where helm is (or would be) installed, build nothing
#
# Helm comes from the Go module proxy (`go install helm.sh/helm/v3/cmd/helm@VERSION`),
# not from a download site. Without Go on the machine, the Go toolchain comes from the
# module proxy too (golang.org/toolchain), so python3 is the only prerequisite. The binary, the module cache
# and the build cache live under the cache root, so a second build (another version,
# a wiped binary) reuses the downloaded modules. Concurrent runs serialize on a flock;
# the binary is installed under a temporary name and renamed, so a reader never sees a
# half-written one. A missing Go is one line on stderr and exit 1.
#
# Environment:
#   OUTBOX_RELAY_CACHE   cache root (default: $HOME/.cache/outbox-relay)
#   HELM_VERSION         Helm version to install (default: the pin below)
#   GO                   Go executable (default: go on PATH, else /usr/local/go/bin/go)
#   GO_TOOLCHAIN         the toolchain fetched when there is no Go (see go.sh)
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.21.4}"
CACHE_ROOT="${OUTBOX_RELAY_CACHE:-$HOME/.cache/outbox-relay}"
BIN_DIR="$CACHE_ROOT/bin"
# One binary per version: bumping the pin never runs a stale helm.
HELM="$BIN_DIR/helm-$HELM_VERSION"

log() { printf 'helm.sh: %s\n' "$*" >&2; }

# shellcheck source=scripts/services/go.sh
source "$(dirname "${BASH_SOURCE[0]}")/go.sh"

case "${1:-install}" in
  path) printf '%s\n' "$HELM"; exit 0 ;;
  install) ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
  *) log "unknown command '$1' (use: helm.sh [install|path])"; exit 2 ;;
esac

if [[ -x "$HELM" ]]; then
  printf '%s\n' "$HELM"
  exit 0
fi

if ! GO_BIN="$(go_binary)"; then
  log "Go is needed to build helm $HELM_VERSION: none was found and the $GO_TOOLCHAIN toolchain could not be fetched from the module proxy (install Go 1.21 or later, or set GO=/path/to/go)"
  exit 1
fi

mkdir -p "$BIN_DIR"
exec 9>"$BIN_DIR/.helm.lock"
flock 9
# Another run may have built it while this one waited for the lock.
if [[ ! -x "$HELM" ]]; then
  log "building helm $HELM_VERSION with $GO_BIN (once; cached in $BIN_DIR) ..."
  start=$SECONDS
  stage="$(mktemp -d "$BIN_DIR/.build.XXXXXX")"
  trap 'rm -rf "$stage"' EXIT
  go_build_env
  # Helm's Makefile stamps the Kubernetes version of its client-go (the version that
  # `helm template` and `helm lint` assume without --kube-version) and its own version
  # into the binary; without them a source build assumes Kubernetes 1.20. Same here.
  if ! gomod="$("$GO_BIN" mod download -json "helm.sh/helm/v3@$HELM_VERSION" 2>"$stage/build.log" |
                tee "$stage/download.json" |
                sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')" || [[ -z "$gomod" ]]; then
    # `go mod download -json` reports its error in the JSON, not on stderr.
    tail -n 20 "$stage/build.log" "$stage/download.json" >&2
    log "go mod download helm.sh/helm/v3@$HELM_VERSION failed"
    exit 1
  fi
  k8s_minor="$(sed -n 's/^[[:space:]]*\(require[[:space:]]\{1,\}\)\{0,1\}k8s\.io\/client-go v0\.\([0-9][0-9]*\)\..*/\2/p' \
                "$gomod" | head -n1)"
  [[ -n "$k8s_minor" ]] || { log "cannot read the client-go version from $gomod"; exit 1; }
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  # CGO off gives a static binary, as helm's own releases are.
  if ! GOBIN="$stage" CGO_ENABLED=0 "$GO_BIN" install -trimpath -ldflags "$ldflags" \
       "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >>"$stage/build.log" 2>&1; then
    tail -n 20 "$stage/build.log" >&2
    log "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed"
    exit 1
  fi
  mv -f "$stage/helm" "$HELM"
  log "built helm $HELM_VERSION in $((SECONDS - start)) s"
fi
printf '%s\n' "$HELM"
