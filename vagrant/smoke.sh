#!/usr/bin/env bash
# Run on the host after `vagrant up`: one container (podman, CNI backend, the l3fabric
# network) on each VM; every container pings every other one across VMs; then
# `fabricctl node status` on each VM. Exit status 0 only if all of it worked.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
NODES="${FABRIC_NODES:-3}"
IMAGE="localhost/l3box:1"

on() {  # on NODE COMMAND...: run as root on a VM
  local node="$1"
  shift
  vagrant ssh "$node" -c "sudo bash -c $(printf '%q' "$*")" -- -q
}

start_container() {
  on "$1" "
    set -e
    if ! podman image exists $IMAGE; then
      dir=\$(mktemp -d); mkdir -p \$dir/bin; cp /bin/busybox \$dir/bin/
      for a in sh ip ping sleep cat; do ln -s busybox \$dir/bin/\$a; done
      tar -C \$dir -cf \$dir.tar . && podman import -q \$dir.tar $IMAGE >/dev/null
      rm -rf \$dir \$dir.tar
    fi
    podman rm -f -t 0 smoke >/dev/null 2>&1 || true
    podman run -d --name smoke --network l3fabric $IMAGE sleep 3600 >/dev/null
    podman inspect -f '{{.NetworkSettings.Networks.l3fabric.IPAddress}}' smoke"
}

declare -A ADDRESS
for i in $(seq 1 "$NODES"); do
  ADDRESS[node$i]=$(start_container "node$i" | tr -d '\r' | tail -1)
  echo "node$i: container smoke has ${ADDRESS[node$i]}"
done

failed=0
for i in $(seq 1 "$NODES"); do
  for j in $(seq 1 "$NODES"); do
    [ "$i" = "$j" ] && continue
    target=${ADDRESS[node$j]}
    if on "node$i" "podman exec smoke ping -c 2 -W 2 $target" >/dev/null; then
      echo "node$i -> node$j ($target): ok"
    else
      echo "node$i -> node$j ($target): FAILED"
      failed=1
    fi
  done
done

for i in $(seq 1 "$NODES"); do
  echo "--- node$i: fabricctl node status"
  on "node$i" "set -a; . /etc/l3fabric/fabricctl.env; fabricctl node status" || failed=1
done

if [ "$failed" = 0 ]; then
  echo "smoke test passed: every container reaches every other one"
else
  echo "smoke test FAILED"
fi
exit "$failed"
