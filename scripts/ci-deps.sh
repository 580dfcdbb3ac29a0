#!/usr/bin/env bash
# Debian packages that some tests drive, installed only when missing (as root; CI runs as root).
# Each entry is BINARY:PACKAGE. gcc and the Python headers (python3-config) build the compiled
# build's wheel (make test-compiled).
set -euo pipefail
DEPS=(redis-server:redis-server chromium:chromium haproxy:haproxy slowhttptest:slowhttptest pebble:pebble pebble-challtestsrv:pebble squid:squid danted:dante-server htpasswd:apache2-utils curl:curl h2load:nghttp2-client gcc:gcc python3-config:python3-dev ${BACKHAUL_SYSTEM_DEPS:-})
need=()
for pair in "${DEPS[@]}"; do
  bin=${pair%%:*}; pkg=${pair##*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "ci-deps: missing ${need[*]}; run as root to install them" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
