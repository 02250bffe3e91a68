# shellcheck shell=bash
# What helm.sh and toxiproxy.sh share to build a pinned Go program from the Go module
# proxy; sourced by them, not run.
#
#   go_binary            print the Go to build with: $GO if set, else go on PATH, else
#                        /usr/local/go/bin/go (either 1.21 or later), else the toolchain fetched from the module
#                        proxy into the cache (golang.org/toolchain, as go itself does);
#                        fails (status 1, nothing printed) if there is none
#   go_build_env         export the module and build caches under the cache root (a
#                        second build reuses the downloaded modules), a proxy's CA given
#                        as PIP_CERT as SSL_CERT_FILE, and GOFLAGS=-mod=mod
#
# The sourcing script defines `log MESSAGE...` and sets CACHE_ROOT.
#
# Environment:
#   GO             Go executable (default: go on PATH, else /usr/local/go/bin/go)
#   GO_TOOLCHAIN   toolchain fetched when there is no Go (default: the pin below)
#   GOPROXY        module proxy (default: https://proxy.golang.org)

GO_TOOLCHAIN="${GO_TOOLCHAIN:-go1.26.8}"

# Go 1.21 or later: it fetches the toolchain a module asks for by itself
# (GOTOOLCHAIN=auto); an older one (Debian 12's golang is 1.19) cannot build them.
new_enough() {
  local version
  version="$("$1" env GOVERSION 2>/dev/null)" || return 1
  [[ "$version" =~ ^go1\.([0-9]+) ]] && ((BASH_REMATCH[1] >= 21))
}

find_go() {
  local go
  if [[ -n "${GO:-}" ]]; then
    command -v "$GO" && return 0
    return 1
  fi
  for go in "$(command -v go)" /usr/local/go/bin/go; do
    if [[ -x "$go" ]] && new_enough "$go"; then
      printf '%s\n' "$go"
      return 0
    fi
  done
  return 1
}

# No Go on this machine: fetch the Go toolchain itself from the same module proxy, as
# `go` does when a module needs a newer toolchain (golang.org/toolchain), into the
# cache. python3 does the download and the unzip: it is the one thing every machine
# of ours has. A certificate bundle in PIP_CERT or SSL_CERT_FILE is used if set (a
# proxy's CA). Concurrent fetches (helm.sh and toxiproxy.sh at once) serialize on a
# flock; the toolchain is unpacked under a temporary name and renamed.
fetch_go() {
  local arch dir
  case "$(uname -m)" in x86_64) arch=amd64 ;; aarch64|arm64) arch=arm64 ;; *) return 1 ;; esac
  dir="$CACHE_ROOT/go-toolchain/$GO_TOOLCHAIN.linux-$arch"
  mkdir -p "$CACHE_ROOT/go-toolchain"
  (
    exec 8>"$CACHE_ROOT/go-toolchain/.lock"
    flock 8
    [[ -x "$dir/bin/go" ]] && exit 0
    log "no Go here: fetching the $GO_TOOLCHAIN toolchain from the Go module proxy (once; cached in $dir) ..."
    python3 - "$GO_TOOLCHAIN" "$arch" "$dir" "${GOPROXY:-https://proxy.golang.org}" <<'PY'
import os, ssl, sys, tempfile, urllib.request, zipfile
version, arch, target, proxy = sys.argv[1:]
proxy = proxy.split(",")[0].rstrip("/")
url = f"{proxy}/golang.org/toolchain/@v/v0.0.1-{version}.linux-{arch}.zip"
bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
context = ssl.create_default_context(cafile=bundle) if bundle else None
prefix = f"golang.org/toolchain@v0.0.1-{version}.linux-{arch}/"
stage = tempfile.mkdtemp(dir=os.path.dirname(target))
with tempfile.TemporaryFile() as data:
    with urllib.request.urlopen(url, context=context, timeout=120) as response:
        while chunk := response.read(1 << 20):
            data.write(chunk)
    with zipfile.ZipFile(data) as archive:
        for info in archive.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            path = os.path.join(stage, info.filename[len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with archive.open(info) as source, open(path, "wb") as out:
                out.write(source.read())
            os.chmod(path, (info.external_attr >> 16) & 0o777 or 0o644)
os.rename(stage, target)
PY
  ) || return 1
  printf '%s\n' "$dir/bin/go"
}

go_binary() { find_go || fetch_go; }

go_build_env() {
  export GOMODCACHE="$CACHE_ROOT/go/mod" GOCACHE="$CACHE_ROOT/go/build" GOPATH="$CACHE_ROOT/go/path"
  # Go reads the system's certificates; a proxy's CA handed in as PIP_CERT (our
  # containers) must reach it as SSL_CERT_FILE.
  if [[ -z "${SSL_CERT_FILE:-}" && -n "${PIP_CERT:-}" ]]; then
    export SSL_CERT_FILE="$PIP_CERT"
  fi
  # GOFLAGS=-mod=mod keeps a GOFLAGS=-mod=vendor from the environment out of the way.
  export GOFLAGS="-mod=mod"
}
