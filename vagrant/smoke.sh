#!/usr/bin/env bash
# Run on the host after `vagrant up`: one container (podman, CNI backend, the l3fabric
# network) on each VM; every container pings every other one across VMs; then
# `fabricctl node status` on each VM. Exit status 0 only if all of it worked.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
# shellcheck disable=SC1091  # lib.sh: checked on its own
. ./lib.sh
NODES="${FABRIC_NODES:-3}"

nodes=()
for i in $(seq 1 "$NODES"); do nodes+=("node$i"); done
ssh_refresh "${nodes[@]}"

declare -A ADDRESS
for node in "${nodes[@]}"; do
  ADDRESS[$node]=$(container_run "$node" smoke)
  echo "$node: container smoke has ${ADDRESS[$node]}"
done

failed=0
for source in "${nodes[@]}"; do
  for target in "${nodes[@]}"; do
    [ "$source" = "$target" ] && continue
    address=${ADDRESS[$target]}
    if on "$source" "podman exec smoke ping -c 2 -W 2 $address" >/dev/null; then
      echo "$source -> $target ($address): ok"
    else
      echo "$source -> $target ($address): FAILED"
      failed=1
    fi
  done
done

for node in "${nodes[@]}"; do
  echo "--- $node: fabricctl node status"
  fab "$node" node status || failed=1
done

if [ "$failed" = 0 ]; then
  echo "smoke test passed: every container reaches every other one"
else
  echo "smoke test FAILED"
fi
exit "$failed"
