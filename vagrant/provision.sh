#!/usr/bin/env bash
# Provision one l3fabric node on Debian 12: packages, l3fabric itself, its config, the
# CNI plugin, systemd units; then wait until the node's BGP sessions are Established.
# Vagrant runs it on every VM; a person can run it by hand on any Debian host:
#
#   sudo FABRIC_SRC=/path/to/l3fabric FABRIC_NODE_ADDRESS=192.168.56.11 \
#        FABRIC_ETCD_ENDPOINTS=http://192.168.56.11:2379 ./provision.sh
#
# Inputs (environment):
#   FABRIC_SRC                  the l3fabric source tree to install (required)
#   FABRIC_NODE_ADDRESS         this node's underlay IPv4 address (required)
#   FABRIC_ETCD_ENDPOINTS       etcd URLs, comma-separated (required)
#   FABRIC_NODE_ADDRESS6        this node's underlay IPv6 address: IPv6 sessions, dual stack
#   FABRIC_UNDERLAY_DEV         the interface for FABRIC_NODE_ADDRESS6 (default: the one
#                               holding FABRIC_NODE_ADDRESS)
#   FABRIC_NODE_NAME            default: the short hostname
#   FABRIC_ETCD_MEMBER          run an etcd member of this name here...
#   FABRIC_ETCD_INITIAL_CLUSTER ...in this initial cluster (name=http://addr:2380,...)
#   FABRIC_POOL                 make sure this IP pool exists (default 10.244.0.0/16)
#   FABRIC_POOL6                and this IPv6 one, when the node has an IPv6 address
#                               (default fd00:244::/64; empty: none)
#   FABRIC_EXPECT_PEERS         sessions that must be Established before it returns (0)
#   FABRIC_WAIT                 1 (default) to wait for etcd and the sessions, 0 not to
#   FABRIC_WAIT_TIMEOUT         seconds (default 180)
#   DESTDIR                     install root, for tests (default /)
#   FABRIC_SKIP_APT=1           do not install Debian packages
#   FABRIC_SYSTEMD=0            write the units but do not enable or start them
#
#   provision.sh wait           only the final step: wait for etcd and the sessions
#   provision.sh packages       print the Debian packages it installs (etcd members'
#                               included), one a line: what vagrant/box/build.sh preinstalls
set -euo pipefail

DESTDIR="${DESTDIR:-}"
PREFIX="/opt/l3fabric"
VENV="$PREFIX/venv"
CONF_DIR="/etc/l3fabric"
UNIT_DIR="/etc/systemd/system"
CNI_BIN="/opt/cni/bin"
CNI_CONF="/etc/cni/net.d"
PODMAN_CONF="/etc/containers/containers.conf.d"
NODE_NAME="${FABRIC_NODE_NAME:-$(hostname -s)}"
POOL="${FABRIC_POOL:-10.244.0.0/16}"
ADDRESS6="${FABRIC_NODE_ADDRESS6:-}"
POOL6="${FABRIC_POOL6-fd00:244::/64}"
[ -n "$ADDRESS6" ] || POOL6=""
EXPECT_PEERS="${FABRIC_EXPECT_PEERS:-0}"
WAIT="${FABRIC_WAIT:-1}"
WAIT_TIMEOUT="${FABRIC_WAIT_TIMEOUT:-180}"
PACKAGES=(python3 python3-venv iproute2 iptables nftables iputils-ping procps
          containernetworking-plugins podman runc busybox-static)
ETCD_PACKAGES=(etcd-server etcd-client)

# Ready: at least the expected number of sessions, and every session Established.
READY_CHECK='import json, sys
peers = json.loads(sys.argv[2])["peers"]
up = [p for p in peers if p["state"] == "Established"]
sys.exit(0 if len(up) >= int(sys.argv[1]) and len(up) == len(peers) else 1)'

log() { echo "provision[$NODE_NAME]: $*" >&2; }
die() { log "error: $*"; exit 1; }

require() {
  local name
  for name in "$@"; do
    [ -n "${!name:-}" ] || die "$name is required (see the header of $0)"
  done
}

install_packages() {
  [ "${FABRIC_SKIP_APT:-0}" = 1 ] && return
  local packages=("${PACKAGES[@]}") missing=() package
  [ -n "${FABRIC_ETCD_MEMBER:-}" ] && packages+=("${ETCD_PACKAGES[@]}")
  # A box that has them already (vagrant/box/build.sh) needs neither the mirror nor time.
  for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    log "packages already installed: ${packages[*]}"
  fi
  # Debian starts a default etcd on install; ours is l3fabric-etcd.service.
  if [ -n "${FABRIC_ETCD_MEMBER:-}" ] && [ "${FABRIC_SYSTEMD:-1}" = 1 ]; then
    systemctl disable --now etcd.service 2>/dev/null || true
  fi
}

install_l3fabric() {
  log "installing l3fabric from $FABRIC_SRC into $VENV"
  [ -f "$FABRIC_SRC/pyproject.toml" ] || die "FABRIC_SRC=$FABRIC_SRC is not an l3fabric tree"
  mkdir -p "$DESTDIR$PREFIX"
  [ -x "$DESTDIR$VENV/bin/python" ] || /usr/bin/python3 -m venv "$DESTDIR$VENV"
  "$DESTDIR$VENV/bin/python" -m pip install -q --disable-pip-version-check "$FABRIC_SRC"
  mkdir -p "$DESTDIR/usr/local/bin"
  ln -sf "$VENV/bin/fabricctl" "$DESTDIR/usr/local/bin/fabricctl"
  if ! getent passwd l3fabric >/dev/null; then
    if [ -z "$DESTDIR" ]; then
      useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin l3fabric
    fi
  fi
}

write_config() {
  log "writing $CONF_DIR/agent.toml"
  mkdir -p "$DESTDIR$CONF_DIR"
  cat > "$DESTDIR$CONF_DIR/agent.toml" <<EOF
# Written by provision.sh. Every setting: docs/operations.md; check with
# fabric-agent --config $CONF_DIR/agent.toml --check-config
[node]
name = "$NODE_NAME"
address = "$FABRIC_NODE_ADDRESS"
${ADDRESS6:+address6 = \"$ADDRESS6\"}

[etcd]
endpoints = "$FABRIC_ETCD_ENDPOINTS"

[paths]
run_dir = "/run/l3fabric"
EOF
  chmod 0644 "$DESTDIR$CONF_DIR/agent.toml"
  cat > "$DESTDIR$CONF_DIR/fabricctl.env" <<EOF
FABRIC_ETCD_ENDPOINTS=$FABRIC_ETCD_ENDPOINTS
EOF
}

install_cni() {
  log "installing the CNI plugin into $CNI_BIN and $CNI_CONF"
  local families=()
  [ -z "$ADDRESS6" ] || families=(--ipv6)  # dual stack: an address of each family
  "$DESTDIR$VENV/bin/fabricctl" cni install --bin-dir "$DESTDIR$CNI_BIN" \
    --conf-dir "$DESTDIR$CNI_CONF" --network l3fabric "${families[@]}" >/dev/null
  # The copies must name the interpreter as installed, not as seen under DESTDIR.
  local plugin
  for plugin in l3fabric l3fabric-ipam; do
    sed -i "1s|^#!$DESTDIR|#!|" "$DESTDIR$CNI_BIN/$plugin"
  done
  mkdir -p "$DESTDIR$PODMAN_CONF"
  cat > "$DESTDIR$PODMAN_CONF/l3fabric.conf" <<EOF
# podman uses CNI and finds the l3fabric network here (written by provision.sh).
[network]
network_backend = "cni"
cni_plugin_dirs = ["$CNI_BIN", "/usr/lib/cni"]
network_config_dir = "$CNI_CONF"
EOF
}

write_units() {
  log "writing systemd units into $UNIT_DIR"
  mkdir -p "$DESTDIR$UNIT_DIR"
  install -m 0644 "$FABRIC_SRC/vagrant/fabric-agent.service" "$DESTDIR$UNIT_DIR/"
  if [ -n "${FABRIC_ETCD_MEMBER:-}" ]; then
    local cluster="${FABRIC_ETCD_INITIAL_CLUSTER:-$FABRIC_ETCD_MEMBER=http://$FABRIC_NODE_ADDRESS:2380}"
    mkdir -p "$DESTDIR$CONF_DIR"
    cat > "$DESTDIR$CONF_DIR/etcd.env" <<EOF
ETCD_NAME=$FABRIC_ETCD_MEMBER
ETCD_DATA_DIR=/var/lib/l3fabric-etcd
ETCD_LISTEN_CLIENT_URLS=http://$FABRIC_NODE_ADDRESS:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$FABRIC_NODE_ADDRESS:2379
ETCD_LISTEN_PEER_URLS=http://$FABRIC_NODE_ADDRESS:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$FABRIC_NODE_ADDRESS:2380
ETCD_INITIAL_CLUSTER=$cluster
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=l3fabric
EOF
    install -m 0644 "$FABRIC_SRC/vagrant/l3fabric-etcd.service" "$DESTDIR$UNIT_DIR/"
  fi
  if [ -n "$ADDRESS6" ]; then
    # The IPv6 underlay address goes on the interface that holds the IPv4 one, at
    # every boot, whatever the VM provider could or could not configure itself.
    local dev="${FABRIC_UNDERLAY_DEV:-}"
    [ -n "$dev" ] || dev=$(ip -o -4 addr show | awk -v a="$FABRIC_NODE_ADDRESS" \
                           'index($4, a "/") == 1 {print $2; exit}')
    [ -n "$dev" ] || die "no interface holds $FABRIC_NODE_ADDRESS: cannot place $ADDRESS6"
    cat > "$DESTDIR$UNIT_DIR/l3fabric-underlay6.service" <<EOF
[Unit]
Description=l3fabric: the node's IPv6 underlay address ($ADDRESS6 on $dev)
Before=fabric-agent.service
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip -6 addr replace $ADDRESS6/64 dev $dev nodad

[Install]
WantedBy=multi-user.target
EOF
    # ifupdown (Debian's default): again whenever the interface comes up. Tools that
    # reconfigure it flush its addresses first; Vagrant does at every `vagrant up` or
    # `reload` of a VM that already booted (ifdown, ip addr flush, ifup).
    if [ -d "$DESTDIR/etc/network/if-up.d" ] || [ -n "$DESTDIR" ]; then
      mkdir -p "$DESTDIR/etc/network/if-up.d"
      cat > "$DESTDIR/etc/network/if-up.d/l3fabric-underlay6" <<EOF
#!/bin/sh
# Written by l3fabric's provision.sh: the node's IPv6 underlay address on $dev.
[ "\$IFACE" = "$dev" ] || exit 0
exec /sbin/ip -6 addr replace $ADDRESS6/64 dev $dev nodad
EOF
      chmod 0755 "$DESTDIR/etc/network/if-up.d/l3fabric-underlay6"
    fi
  fi
}

start_units() {
  [ "${FABRIC_SYSTEMD:-1}" = 1 ] || return 0
  systemctl daemon-reload
  if [ -n "${FABRIC_ETCD_MEMBER:-}" ]; then
    # --no-block: a member of a new cluster waits for its peers, which come later.
    systemctl enable --now --no-block l3fabric-etcd.service
  fi
  if [ -n "$ADDRESS6" ]; then
    systemctl enable --now l3fabric-underlay6.service
  fi
  systemctl enable fabric-agent.service
  systemctl restart fabric-agent.service
}

fabricctl_() {
  FABRIC_ETCD_ENDPOINTS="$FABRIC_ETCD_ENDPOINTS" "$DESTDIR$VENV/bin/fabricctl" "$@"
}

wait_ready() {
  [ "$WAIT" = 1 ] || { log "not waiting (FABRIC_WAIT=0)"; return 0; }
  local deadline=$((SECONDS + WAIT_TIMEOUT))
  log "waiting for etcd at $FABRIC_ETCD_ENDPOINTS"
  until fabricctl_ ipam pool list >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "etcd not reachable after ${WAIT_TIMEOUT}s"
    sleep 2
  done
  if [ -n "$POOL" ] && ! fabricctl_ ipam pool list | grep -q " $POOL "; then
    fabricctl_ ipam pool add default "$POOL" --nat-outgoing 2>/dev/null \
      || fabricctl_ ipam pool list | grep -q " $POOL " \
      || die "could not create the IP pool $POOL"
    log "IP pool $POOL created"
  fi
  if [ -n "$POOL6" ] && ! fabricctl_ ipam pool list | grep -q " $POOL6 "; then
    fabricctl_ ipam pool add default6 "$POOL6" 2>/dev/null \
      || fabricctl_ ipam pool list | grep -q " $POOL6 " \
      || die "could not create the IP pool $POOL6"
    log "IP pool $POOL6 created"
  fi
  log "waiting until $EXPECT_PEERS BGP session(s) are Established"
  local status
  while true; do
    # Exit 1 means "a session is not Established": the JSON still says which.
    status=$(fabricctl_ -o json node status 2>/dev/null || true)
    if [ -n "$status" ]; then
      if "$DESTDIR$VENV/bin/python" -c "$READY_CHECK" "$EXPECT_PEERS" "$status"; then
        log "ready: $(echo "$status" | grep -c '"Established"') session(s) Established"
        return 0
      fi
    fi
    [ $SECONDS -lt $deadline ] || { fabricctl_ node status || true;
                                     die "sessions not Established after ${WAIT_TIMEOUT}s"; }
    sleep 2
  done
}

main() {
  if [ "${1:-}" = packages ]; then
    printf '%s\n' "${PACKAGES[@]}" "${ETCD_PACKAGES[@]}"
    return
  fi
  require FABRIC_NODE_ADDRESS FABRIC_ETCD_ENDPOINTS
  if [ "${1:-}" = wait ]; then
    wait_ready
    return
  fi
  require FABRIC_SRC
  [ "$(id -u)" -eq 0 ] || die "run as root"
  install_packages
  install_l3fabric
  write_config
  install_cni
  write_units
  start_units
  wait_ready
  log "done"
}

main "$@"
