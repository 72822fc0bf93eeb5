#!/usr/bin/env bash
# The Vagrant cluster on real VMs, end to end, on this machine (libvirt, offline). This
# is what `./run vagrant` runs after installing the host packages:
#
#   ./run vagrant          libvirt daemons (started if none run), the box (built if its
#                          inputs changed), vagrant up, smoke.sh, faults.sh, vagrant
#                          destroy, daemons stopped again; exit 1 if any step failed
#   KEEP=1 ./run vagrant   the same, but leave the cluster (and the daemons) up
#   ./run vagrant down     remove what a KEEP=1 (or killed) run left: VMs, networks,
#                          disks, daemons; also after a reboot (libvirtd started for it)
#
# Settings (environment): FABRIC_NODES (3), FABRIC_ETCD_CLUSTER (1 here: three etcd
# members, which the etcd fault needs), FAULTS=0 to skip the fault round,
# FABRIC_LIBVIRT_DRIVER (kvm or qemu; guessed: kvm where kvm_intel or kvm_amd is loaded),
# FABRIC_BOX_CACHE (/var/cache/l3fabric-box: the box, .debs, wheels, the libvirt storage
# pool, VAGRANT_HOME, the pid files of the daemons this script started).
set -euo pipefail
HERE="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
cd "$HERE"

CACHE="${FABRIC_BOX_CACHE:-/var/cache/l3fabric-box}"
STATE="$CACHE/run"
POOL_DIR="$CACHE/pool"
BOX_NAME="debian/bookworm64"
KEEP="${KEEP:-0}"
export VAGRANT_HOME="${VAGRANT_HOME:-$CACHE/vagrant-home}"
export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_BOX_UPDATE_CHECK_DISABLE=1
export VAGRANT_DEFAULT_PROVIDER=libvirt LIBVIRT_DEFAULT_URI=qemu:///system
export FABRIC_VM_PREFIX="${FABRIC_VM_PREFIX:-l3fv-}"
export FABRIC_LIBVIRT_POOL="${FABRIC_LIBVIRT_POOL:-${FABRIC_VM_PREFIX}pool}"
export FABRIC_ETCD_CLUSTER="${FABRIC_ETCD_CLUSTER:-1}"
export FABRIC_NODES="${FABRIC_NODES:-3}"
export FABRIC_CONSOLE_LOG_DIR="${FABRIC_CONSOLE_LOG_DIR:-$CACHE/console}"

TIMES=()
CURRENT=""  # "NAME STARTED" of the step under way: a signal may end it
log() { echo "vagrant: $*" >&2; }

step() {  # step NAME COMMAND...: run it, time it, remember the time
  local name="$1" started=$SECONDS rc=0
  shift
  interrupted
  log "== $name"
  CURRENT="$started $name"
  "$@" || rc=$?
  CURRENT=""
  TIMES+=("$(printf '%-28s %5d s  %s' "$name" $((SECONDS - started)) \
             "$([ $rc = 0 ] && echo ok || echo "FAILED ($rc)")")")
  log "== $name: $((SECONDS - started)) s$([ $rc = 0 ] || echo ", FAILED ($rc)")"
  return $rc
}

interrupted() {  # a step a signal ended (the EXIT trap runs after it): say so
  [ -n "$CURRENT" ] || return 0
  TIMES+=("$(printf '%-28s %5d s  %s' "${CURRENT#* }" $((SECONDS - ${CURRENT%% *})) interrupted)")
  CURRENT=""
}

summary() {
  local line
  interrupted
  echo "---- steps (seconds)"
  for line in "${TIMES[@]}"; do echo "$line"; done
}

driver() {
  if [ -n "${FABRIC_LIBVIRT_DRIVER:-}" ]; then
    echo "$FABRIC_LIBVIRT_DRIVER"
  elif [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; then
    echo kvm
  else
    echo qemu
  fi
}

# -- libvirt ---------------------------------------------------------------------------
QEMU_CONF="${FABRIC_QEMU_CONF:-/etc/libvirt/qemu.conf}"
KVM_DEV="${FABRIC_KVM_DEV:-/dev/kvm}"

qemu_conf() {
  # Without udev, /dev/kvm stays root's (crw------- root root) and libvirt re-probes
  # QEMU at every domain define (52 s each) when its QEMU runs as libvirt-qemu: run
  # QEMU as root. Only then: where udev gave /dev/kvm to the kvm group (a machine with
  # real KVM, or none at all) nothing changes, and the configuration of a libvirtd
  # that already runs is not ours to change (it would read it at its next start, for
  # every VM it runs).
  [ -e "$KVM_DEV" ] || return 0
  local group mode
  read -r group mode < <(stat -L -c '%G %a' "$KVM_DEV")
  if { [ "$group" = kvm ] && [ $((8#$mode & 8#060)) = $((8#060)) ]; } \
      || [ $((8#$mode & 8#006)) = $((8#006)) ]; then
    return 0  # udev's root:kvm 0660 (or open to all): QEMU as libvirt-qemu can use it
  fi
  if grep -q '^user = "root"' "$QEMU_CONF" && grep -q '^group = "root"' "$QEMU_CONF"; then
    return 0
  fi
  if virsh version >/dev/null 2>&1; then
    log "warning: $KVM_DEV is root's alone (no udev?): the running libvirtd will take"
    log "about a minute per VM definition; user = \"root\", group = \"root\" in $QEMU_CONF"
    log "and a restart of libvirtd avoid it (not done here: that libvirtd is not ours)"
    return 0
  fi
  log "$KVM_DEV is root's alone (no udev): setting user = \"root\", group = \"root\" in $QEMU_CONF"
  printf '\n# l3fabric (vagrant/cluster.sh): QEMU as root, see vagrant/README.md\nuser = "root"\ngroup = "root"\n' >>"$QEMU_CONF"
}

libvirt_chains() {  # the LIBVIRT_* iptables chains, one "CMD TABLE CHAIN" a line
  local cmd table
  for cmd in iptables ip6tables; do
    command -v "$cmd" >/dev/null || continue
    for table in filter nat mangle; do
      "$cmd" -t "$table" -S 2>/dev/null | awk -v c="$cmd" -v t="$table" \
        '$1 == "-N" && $2 ~ /^LIBVIRT_/ { print c, t, $2 }'
    done
  done
}

remove_libvirt_chains() {
  local cmd table chain rule args
  for cmd in iptables ip6tables; do
    command -v "$cmd" >/dev/null || continue
    for table in filter nat mangle; do
      # First the jumps into them from the built-in chains, then the chains.
      while read -r rule; do
        read -ra args <<<"${rule/#-A/-D}"
        "$cmd" -t "$table" "${args[@]}" 2>/dev/null || true
      done < <("$cmd" -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j LIBVIRT_' || true)
      for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^LIBVIRT_/ { print $2 }'); do
        "$cmd" -t "$table" -F "$chain" 2>/dev/null || true
      done
      for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^LIBVIRT_/ { print $2 }'); do
        "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
}

start_daemons() {
  mkdir -p "$STATE"
  if virsh version >/dev/null 2>&1; then
    if [ "$(cat "/proc/$(cat "$STATE/libvirtd.pid" 2>/dev/null)/comm" 2>/dev/null)" = libvirtd ]; then
      log "libvirtd an earlier run started (pid $(cat "$STATE/libvirtd.pid")) still runs: using it (stopped at the end, unless KEEP=1)"
    else
      log "libvirtd already runs: using it (and leaving it running)"
    fi
    return
  fi
  # Kept if there: then an earlier run started libvirtd and left before stopping it
  # (KEEP=1, a reboot), and what was there before that run is what counts.
  [ -f "$STATE/chains-before" ] || libvirt_chains >"$STATE/chains-before"
  if ! pidof -q virtlogd; then
    virtlogd -d -p "$STATE/virtlogd.pid"
    log "started virtlogd (pid $(cat "$STATE/virtlogd.pid"))"
  fi
  libvirtd -d -p "$STATE/libvirtd.pid"
  for _ in $(seq 1 60); do
    virsh version >/dev/null 2>&1 && break
    sleep 0.5
  done
  virsh version >/dev/null 2>&1 || { log "libvirtd did not answer"; return 1; }
  log "started libvirtd (pid $(cat "$STATE/libvirtd.pid"))"
}

stop_pid() {  # stop_pid FILE NAME: stop the process FILE names, if it is NAME
  local file="$1" name="$2" pid
  [ -f "$file" ] || return 0
  pid="$(cat "$file")"
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    kill "$pid"
    for _ in $(seq 1 40); do
      [ -d "/proc/$pid" ] || break
      sleep 0.5
    done
    [ -d "/proc/$pid" ] && kill -9 "$pid"
    log "stopped $name (pid $pid)"
  fi
  rm -f "$file"
}

stop_daemons() {
  [ -f "$STATE/libvirtd.pid" ] || [ -f "$STATE/virtlogd.pid" ] || return 0
  stop_pid "$STATE/libvirtd.pid" libvirtd
  stop_pid "$STATE/virtlogd.pid" virtlogd
  if [ ! -s "$STATE/chains-before" ]; then
    remove_libvirt_chains
    log "removed the LIBVIRT_* iptables chains libvirtd left"
  fi
  rm -f "$STATE/chains-before"
}

ensure_pool() {
  if ! virsh pool-info "$FABRIC_LIBVIRT_POOL" >/dev/null 2>&1; then
    mkdir -p "$POOL_DIR"
    # Transient: its definition goes with libvirtd; the volumes stay in $POOL_DIR.
    virsh pool-create-as "$FABRIC_LIBVIRT_POOL" dir --target "$POOL_DIR" >/dev/null
    touch "$STATE/pool-created"
    log "storage pool $FABRIC_LIBVIRT_POOL in $POOL_DIR"
  fi
}

# -- the box ---------------------------------------------------------------------------
box_volumes() {  # the box's copies in the storage pool, by vagrant-libvirt
  virsh vol-list "$FABRIC_LIBVIRT_POOL" 2>/dev/null \
    | awk '$1 ~ /^debian-VAGRANTSLASH-bookworm64_vagrant_box_image_/ { print $1 }'
}

ensure_box() {
  local box marker="$CACHE/box-added" volume
  box="$("$HERE/box/build.sh")"
  if [ "$(cat "$marker" 2>/dev/null)" = "$box" ] \
      && vagrant box list 2>/dev/null | grep -q "^$BOX_NAME .*libvirt"; then
    log "box $BOX_NAME is $box"
    # vagrant-libvirt copies the box into the pool at the first `up` and uses any
    # volume of that name from then on; a copy cut short (the run interrupted during
    # the upload: vagrant-libvirt removes it only on Ctrl-C) would be the disk of
    # every VM after. A copy that is not the box goes: the next `up` copies it again.
    local image
    image="$(find "$VAGRANT_HOME/boxes/${BOX_NAME//\//-VAGRANTSLASH-}" -path '*/libvirt/box.img' | head -1)"
    for volume in $(box_volumes); do
      if [ -n "$image" ] \
          && ! cmp -s "$image" "$(virsh vol-path --pool "$FABRIC_LIBVIRT_POOL" "$volume")"; then
        log "the pool's copy of the box, $volume, is not the box (an interrupted upload?): removing it"
        virsh vol-delete --pool "$FABRIC_LIBVIRT_POOL" "$volume" >/dev/null
      fi
    done
    return
  fi
  # vagrant-libvirt copies a box into the storage pool once, by name: drop an older copy.
  for volume in $(box_volumes); do
    virsh vol-delete --pool "$FABRIC_LIBVIRT_POOL" "$volume" >/dev/null
  done
  vagrant box add --force --name "$BOX_NAME" "$box"
  echo "$box" >"$marker"
}

# -- the cluster -----------------------------------------------------------------------
vm_resources() {  # each VM's QEMU: resident memory and CPU since it started
  ps -C qemu-system-x86_64 -o pid=,rss=,pcpu=,etimes=,args= 2>/dev/null \
    | awk '{ name = "?"; for (i = 5; i <= NF; i++) if ($i ~ /^guest=/) { name = $i; sub(/^guest=/, "", name); sub(/,.*/, "", name) }
             printf "vagrant: %s: QEMU pid %s, %.0f MB resident, %s%% CPU over %s s\n", name, $1, $2 / 1024, $3, $4 }' >&2 || true
}

remove_leftovers() {  # domains and networks named with our prefix that destroy left
  local name
  for name in $(virsh list --all --name 2>/dev/null | grep "^$FABRIC_VM_PREFIX" || true); do
    virsh destroy "$name" >/dev/null 2>&1 || true
    virsh undefine --remove-all-storage "$name" >/dev/null 2>&1 || true
    log "removed leftover domain $name"
  done
  # A disk made just before its domain was defined, when the run was interrupted in
  # between: the next `vagrant up` would refuse to make it again ("already exists").
  virsh pool-refresh "$FABRIC_LIBVIRT_POOL" >/dev/null 2>&1 || true
  for name in $(virsh vol-list "$FABRIC_LIBVIRT_POOL" 2>/dev/null \
                | awk -v p="$FABRIC_VM_PREFIX" 'index($1, p) == 1 { print $1 }'); do
    virsh vol-delete --pool "$FABRIC_LIBVIRT_POOL" "$name" >/dev/null 2>&1 || true
    log "removed leftover disk $name"
  done
  for name in $(virsh net-list --all --name 2>/dev/null | grep "^$FABRIC_VM_PREFIX" || true); do
    virsh net-destroy "$name" >/dev/null 2>&1 || true
    virsh net-undefine "$name" >/dev/null 2>&1 || true
    log "removed network $name"
  done
}

leftovers_defined() {  # a domain or network of ours in libvirt's configuration
  compgen -G "/etc/libvirt/qemu/${FABRIC_VM_PREFIX}*.xml" >/dev/null \
    || compgen -G "/etc/libvirt/qemu/networks/${FABRIC_VM_PREFIX}*.xml" >/dev/null
}

teardown() {
  set +e
  if virsh version >/dev/null 2>&1; then
    step "vagrant destroy" vagrant destroy -f || true
    remove_leftovers
    if [ -f "$STATE/pool-created" ]; then
      virsh pool-destroy "$FABRIC_LIBVIRT_POOL" >/dev/null 2>&1 || true
      rm -f "$STATE/pool-created"
    fi
  fi
  stop_daemons
}

up() {
  local rc=0
  log "driver: $(driver) ($( [ "$(driver)" = kvm ] && echo "kvm_intel/kvm_amd loaded" \
      || echo "no kvm_intel/kvm_amd: QEMU TCG emulation")); $FABRIC_NODES VMs; etcd cluster: $FABRIC_ETCD_CLUSTER"
  log "commit $(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$HERE" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
  qemu_conf
  mkdir -p "$FABRIC_CONSOLE_LOG_DIR"
  step "libvirt daemons" start_daemons || return 1
  ensure_pool
  # A cluster an earlier KEEP=1 (or interrupted) run left goes first: a new box would
  # delete the volume its disks are backed by.
  vagrant destroy -f >/dev/null 2>&1 || true
  remove_leftovers
  step "box" ensure_box || return 1
  step "vagrant up" vagrant up --provider=libvirt || return 1
  vm_resources
  step "smoke" ./smoke.sh || rc=1
  if [ "${FAULTS:-1}" != 0 ]; then
    step "fault round" ./faults.sh || rc=1
  fi
  return $rc
}

main() {
  [ "$(id -u)" -eq 0 ] || { log "run as root"; exit 2; }
  case "${1:-up}" in
    down)
      # After a reboot (or a libvirtd stopped by hand) the VMs and networks are still
      # defined, and their disks still in the pool: libvirtd is needed to remove them.
      if ! virsh version >/dev/null 2>&1 && leftovers_defined; then
        log "libvirtd does not run, but domains or networks named $FABRIC_VM_PREFIX* are defined: starting it to remove them"
        start_daemons && ensure_pool
      fi
      teardown
      summary
      return
      ;;
    up) ;;
    *) sed -n '2,16p' "$HERE/cluster.sh" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
  local rc=0 started=$SECONDS
  if [ "$KEEP" = 1 ]; then
    up || rc=$?
    log "KEEP=1: the cluster stays up. In $HERE, with VAGRANT_HOME=$VAGRANT_HOME and"
    log "FABRIC_ETCD_CLUSTER=$FABRIC_ETCD_CLUSTER: vagrant ssh node1; ./smoke.sh; ./faults.sh."
    log "Remove it all with: ./run vagrant down"
  else
    trap 'teardown; summary' EXIT
    up || rc=$?
  fi
  log "total: $((SECONDS - started)) s; $([ $rc = 0 ] && echo passed || echo FAILED)"
  [ "$KEEP" = 1 ] && summary
  return $rc
}

# (Sourced by the tests, which call its functions alone.)
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
