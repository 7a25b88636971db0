#!/usr/bin/env bash
# Installs what vmferry needs on Debian 12: QEMU 10 from bookworm-backports, build tools.
set -euo pipefail
# QEMU runs as this unprivileged user ([qemu] user in the daemon config).
if ! getent passwd vmferry-qemu >/dev/null; then
  [ "$(id -u)" -eq 0 ] || { echo "run as root to create the QEMU user vmferry-qemu" >&2; exit 1; }
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "vmferry QEMU" vmferry-qemu
fi
need=()
command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 --version | grep -q 'version 10\.' || need+=(qemu-system-x86 qemu-utils)
command -v cpio >/dev/null || need+=(cpio)
command -v ip >/dev/null || need+=(iproute2)
dpkg -s libc6-dev >/dev/null 2>&1 || need+=(libc6-dev)
# etcd: the cluster lease backend ([cluster] etcd) and its tests
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
# Debian's python3 ships venv (ensurepip) separately.
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
[ ${#need[@]} -eq 0 ] && exit 0
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq
apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils
apt-get install -y -qq cpio iproute2 libc6-dev etcd-server etcd-client
# zsh: tests/unit/test_cli_completion.py checks the zsh completion script with it
apt-get install -y -qq zsh
python3 -c 'import ensurepip' 2>/dev/null || apt-get install -y -qq python3-venv
