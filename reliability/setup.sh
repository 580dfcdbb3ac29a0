#!/usr/bin/env bash
# `make reliability` system tools: nft (nftables) drops packets in the scenarios' own network
# namespaces; iproute2 (ip, tc) builds them. Installed from Debian only when missing and root;
# without them the scenarios fall back to reliability/linkproxy.py on loopback.
set -euo pipefail
need=()
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "reliability: ${need[*]} missing and not root: the link scenarios use the loopback link proxy" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
