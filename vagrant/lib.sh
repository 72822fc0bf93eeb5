# shellcheck shell=bash
# Helpers that smoke.sh and faults.sh source: commands on the cluster's VMs over ssh.
# `vagrant ssh` costs a few seconds of Ruby start-up per call; plain ssh with the
# configuration `vagrant ssh-config` writes costs a fraction of one. Run from vagrant/.

LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SSH_DIR="$LIB_DIR/.vagrant/l3fabric-ssh"
IMAGE="localhost/l3box:1"
# A container's command: sleeps, and exits on SIGTERM. A bare `sleep` as a container's
# PID 1 ignores SIGTERM, so a VM's shutdown waited for systemd to give up on each
# container's scope (90 s) and `vagrant halt` took 100 s instead of 20.
SLEEPER="sh -c 'trap \"exit 0\" TERM; sleep 86400 & wait'"

ssh_refresh() {  # ssh_refresh NODE...: (re)learn how to reach these VMs (after up/reload)
  local node
  mkdir -p "$SSH_DIR"
  for node in "$@"; do
    vagrant ssh-config "$node" > "$SSH_DIR/$node.tmp"
    mv "$SSH_DIR/$node.tmp" "$SSH_DIR/$node"
  done
}

on() {  # on NODE COMMAND...: run as root on a VM
  local node="$1"
  shift
  [ -s "$SSH_DIR/$node" ] || ssh_refresh "$node" >&2
  ssh -F "$SSH_DIR/$node" -o LogLevel=ERROR -o ConnectTimeout=10 \
    -o ServerAliveInterval=5 -o ServerAliveCountMax=3 "$node" \
    "sudo bash -c $(printf '%q' "$*")"
}

fab() {  # fab NODE ARGS...: fabricctl on a VM, against the cluster's etcd
  local node="$1"
  shift
  on "$node" "set -a; . /etc/l3fabric/fabricctl.env; set +a; fabricctl $(printf '%q ' "$@")"
}

# container_run NODE NAME: (re)start container NAME on NODE's l3fabric network (through
# podman's CNI backend and the installed plugin); prints its IPv4 address.
#
# NET_RAW: podman 4.3 leaves it out of a container's default capabilities, so busybox
# ping (a raw ICMP socket) says "permission denied". The test containers ask for it
# themselves; the fabric does not need it, and provisioning does not grant it to every
# container on the host (podman dropped it on purpose: raw sockets let a container
# forge packets).
container_run() {
  on "$1" "
    set -e
    if ! podman image exists $IMAGE; then
      dir=\$(mktemp -d); mkdir -p \$dir/bin; cp /bin/busybox \$dir/bin/
      for a in sh ip ping sleep cat; do ln -s busybox \$dir/bin/\$a; done
      tar -C \$dir -cf \$dir.tar . && podman import -q \$dir.tar $IMAGE >/dev/null
      rm -rf \$dir \$dir.tar
    fi
    podman rm -f -t 0 $2 >/dev/null 2>&1 || true
    podman run -d --name $2 --cap-add NET_RAW --network l3fabric $IMAGE $SLEEPER >/dev/null
    podman inspect -f '{{.NetworkSettings.Networks.l3fabric.IPAddress}}' $2" | tr -d '\r' | tail -1
}

container_ip() {  # container_ip NODE NAME: its IPv4 address, if it runs
  on "$1" "podman inspect -f '{{if .State.Running}}{{.NetworkSettings.Networks.l3fabric.IPAddress}}{{end}}' $2 2>/dev/null" \
    | tr -d '\r' | tail -1
}
