#!/usr/bin/env bash
# Build the `debian/bookworm64` box for vagrant-libvirt from Debian's packages alone: no
# Vagrant Cloud, no other download than the Debian mirror apt uses (and PyPI through pip,
# for the Python wheels). Run as root on Debian 12; prints the box file's path.
#
#   vagrant/box/build.sh            build unless a box for the same inputs is cached
#   vagrant/box/build.sh --force    build again anyway
#   vagrant/box/build.sh --hash     print the inputs' hash and exit
#
# What is inside, so that `vagrant up` spends minutes, not half an hour, under QEMU TCG:
# a minimal Debian 12 (systemd, sshd, ifupdown with DHCP on eth0, sudo, rsync) with the
# `vagrant` user and Vagrant's insecure key; every package vagrant/provision.sh would
# apt-install (`provision.sh packages`); /opt/l3fabric/venv with l3fabric's dependencies
# and a wheelhouse (/opt/l3fabric/wheels, named in /etc/pip.conf with no-index) so that
# provisioning installs l3fabric without reaching any package index; this host's extra
# CA certificates (/usr/local/share/ca-certificates), trusted. Debian's own etcd.service
# and apt's timers are disabled; update-initramfs is off (one rebuild under TCG took 19
# minutes); host keys and machine-id are made at each VM's first boot.
#
# The cache (FABRIC_BOX_CACHE, default /var/cache/l3fabric-box) holds the box as
# bookworm64-HASH.box, where HASH covers this script, the package list, the Python
# dependencies, the CA certificates and the mirror: change any and the next run
# rebuilds. Downloaded .debs and wheels are kept there too, so a rebuild fetches little.
#
# The kernel here may lack partition-table support (no `losetup -P`, nbd or
# device-mapper): the root file system is made on a loop device at the partition's
# offset, and booted by extlinux with syslinux's MBR.
set -euo pipefail

HERE="$(cd "$(dirname "$(readlink -f "$0")")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${FABRIC_BOX_CACHE:-/var/cache/l3fabric-box}"
PYTHON="${PYTHON:-python3}"
SUITE=bookworm
SIZE_GB=8
BASE_PACKAGES=(systemd-sysv linux-image-amd64 openssh-server sudo ifupdown isc-dhcp-client
               rsync ca-certificates iproute2 netbase procps)
VAGRANT_KEY="$(dpkg -L vagrant 2>/dev/null | grep '/keys/vagrant.pub$' | head -1 || true)"

log() { echo "box: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The Debian mirror apt uses on this host (deb822 or one-line sources).
mirror() {
  if [ -n "${FABRIC_BOX_MIRROR:-}" ]; then
    echo "$FABRIC_BOX_MIRROR"
    return
  fi
  local found
  found=$(grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
          | awk '{print $2}' | grep -v -- '-security' | head -1 || true)
  [ -n "$found" ] || found=$(grep -h -E '^deb ' /etc/apt/sources.list 2>/dev/null \
          | awk '{print $2}' | grep -v -- '-security' | head -1 || true)
  echo "${found:-http://deb.debian.org/debian}"
}

packages() { "$REPO/vagrant/provision.sh" packages; }

python_requirements() {
  "$PYTHON" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
for requirement in project["project"]["dependencies"] + project["build-system"]["requires"]:
    print(requirement)
print("wheel")
EOF
}

ca_files() { find /usr/local/share/ca-certificates -type f -name '*.crt' 2>/dev/null | sort; }

inputs_hash() {
  {
    cat "$HERE/build.sh"
    echo "suite=$SUITE mirror=$(mirror) size=$SIZE_GB base=${BASE_PACKAGES[*]}"
    packages
    python_requirements
    local f
    for f in $(ca_files); do echo "$f"; cat "$f"; done
  } | sha256sum | cut -c1-16
}

# -- the build -------------------------------------------------------------------------
WORK="" LOOP="" ROOT=""
stop_chroot_processes() {  # anything a package script left running in the new system
  local proc pid
  for proc in /proc/[0-9]*; do
    [ "$(readlink "$proc/root" 2>/dev/null)" = "$ROOT" ] || continue
    pid="${proc#/proc/}"
    log "stopping pid $pid ($(cat "$proc/comm" 2>/dev/null)), left running in the new system"
    kill "$pid" 2>/dev/null
    sleep 1
    kill -9 "$pid" 2>/dev/null
  done
  return 0
}

cleanup() {
  set +e
  if [ -n "$ROOT" ]; then
    stop_chroot_processes
    for m in dev/pts dev proc sys var/cache/apt/archives; do
      mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m"
    done
    mountpoint -q "$ROOT" && umount "$ROOT"
  fi
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
  [ -n "$WORK" ] && rm -rf "$WORK"
}

in_root() {  # a command inside the new system, with a clean environment
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive chroot "$ROOT" "$@"
}

build() {
  local hash="$1" out="$2" base
  base="$(mirror)"
  [ -n "$VAGRANT_KEY" ] || die "the vagrant package is not installed (its insecure key goes into the box)"
  for tool in debootstrap sfdisk losetup mkfs.ext4 extlinux qemu-img blkid; do
    command -v "$tool" >/dev/null || die "$tool not found (./run vagrant installs the host packages)"
  done
  [ -f /usr/lib/syslinux/mbr/mbr.bin ] || die "/usr/lib/syslinux/mbr/mbr.bin missing (syslinux-common)"
  mkdir -p "$CACHE/debs/partial" "$CACHE/wheels"
  WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
  trap cleanup EXIT
  ROOT="$WORK/root"
  mkdir -p "$ROOT"

  log "wheels for l3fabric's dependencies ($PYTHON -m pip download)"
  local requirements=()
  mapfile -t requirements < <(python_requirements)
  "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    -d "$CACHE/wheels" "${requirements[@]}" 2> >(grep -v "WARNING: Location" >&2)

  log "disk image: ${SIZE_GB} GB, one partition at 1 MiB"
  local image="$WORK/disk.raw" offset=$((2048 * 512))
  truncate -s "${SIZE_GB}G" "$image"
  echo 'start=2048, type=83, bootable' | sfdisk -q "$image"
  LOOP="$(losetup -f --show -o "$offset" --sizelimit $((SIZE_GB * 1024 * 1024 * 1024 - offset)) "$image")"
  mkfs.ext4 -q -O ^64bit -L root "$LOOP"
  local uuid
  uuid="$(blkid -s UUID -o value "$LOOP")"
  mount "$LOOP" "$ROOT"

  log "debootstrap $SUITE from $base"
  local include
  include="$(IFS=,; echo "${BASE_PACKAGES[*]}")"
  debootstrap --variant=minbase --include="$include" --cache-dir="$CACHE/debs" \
    "$SUITE" "$ROOT" "$base" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

  mount --bind /dev "$ROOT/dev"
  mount --bind /dev/pts "$ROOT/dev/pts"
  mount -t proc proc "$ROOT/proc"
  mount -t sysfs sys "$ROOT/sys"
  mount --bind "$CACHE/debs" "$ROOT/var/cache/apt/archives"
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"  # start nothing here
  chmod 0755 "$ROOT/usr/sbin/policy-rc.d"

  log "apt sources, this host's CA certificates"
  cat > "$ROOT/etc/apt/sources.list" <<EOF
deb $base $SUITE main
deb $base $SUITE-updates main
deb ${base%/debian}/debian-security $SUITE-security main
EOF
  local f
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  for f in $(ca_files); do cp "$f" "$ROOT/usr/local/share/ca-certificates/"; done
  in_root update-ca-certificates >/dev/null 2>&1

  local fabric_packages=()
  mapfile -t fabric_packages < <(packages)
  log "packages provisioning installs: ${fabric_packages[*]}"
  in_root apt-get update -q >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; die "apt-get update failed"; }
  in_root apt-get install -y -q --no-install-recommends "${fabric_packages[@]}" \
    >>"$WORK/apt.log" 2>&1 || { tail -30 "$WORK/apt.log" >&2; die "apt-get install failed"; }

  log "l3fabric's Python dependencies in /opt/l3fabric/venv, wheelhouse /opt/l3fabric/wheels"
  mkdir -p "$ROOT/opt/l3fabric/wheels"
  cp "$CACHE"/wheels/*.whl "$ROOT/opt/l3fabric/wheels/"
  cat > "$ROOT/etc/pip.conf" <<'EOF'
# Written by l3fabric's vagrant/box/build.sh: every wheel provisioning needs is here,
# so pip needs no package index (pass --index-url to reach one anyway).
[global]
no-index = true
find-links = /opt/l3fabric/wheels
cert = /etc/ssl/certs/ca-certificates.crt
EOF
  in_root python3 -m venv /opt/l3fabric/venv
  in_root /opt/l3fabric/venv/bin/pip install -q --disable-pip-version-check \
    "${requirements[@]}"

  log "boot: fstab, network, extlinux"
  echo bookworm > "$ROOT/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tbookworm\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$ROOT/etc/hosts"
  echo "UUID=$uuid / ext4 errors=remount-ro 0 1" > "$ROOT/etc/fstab"
  cat > "$ROOT/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
EOF
  local kernel initrd
  kernel="$(find "$ROOT/boot" -maxdepth 1 -name "vmlinuz-*" -printf "%f\n" | sort -V | tail -1)"
  initrd="initrd.img-${kernel#vmlinuz-}"
  [ -f "$ROOT/boot/$initrd" ] || die "no $initrd in the new system"
  mkdir -p "$ROOT/boot/extlinux"
  cat > "$ROOT/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
PROMPT 0
TIMEOUT 1
LABEL debian
  LINUX /boot/$kernel
  INITRD /boot/$initrd
  APPEND root=UUID=$uuid ro net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200n8
EOF
  extlinux --install "$ROOT/boot/extlinux" >/dev/null 2>&1
  # No initramfs rebuilds in the VMs (TCG: 19 minutes each); the box's one has virtio.
  sed -i 's/^update_initramfs=.*/update_initramfs=no/' \
    "$ROOT/etc/initramfs-tools/update-initramfs.conf"

  log "the vagrant user, sshd, first-boot host keys"
  in_root useradd -m -s /bin/bash -G sudo vagrant
  echo vagrant:vagrant | in_root chpasswd
  echo 'vagrant ALL=(ALL) NOPASSWD:ALL' > "$ROOT/etc/sudoers.d/vagrant"
  chmod 0440 "$ROOT/etc/sudoers.d/vagrant"
  mkdir -p "$ROOT/home/vagrant/.ssh"
  cp "$VAGRANT_KEY" "$ROOT/home/vagrant/.ssh/authorized_keys"
  chmod 0700 "$ROOT/home/vagrant/.ssh"
  chmod 0600 "$ROOT/home/vagrant/.ssh/authorized_keys"
  in_root chown -R vagrant:vagrant /home/vagrant/.ssh
  echo 'UseDNS no' > "$ROOT/etc/ssh/sshd_config.d/vagrant.conf"
  rm -f "$ROOT"/etc/ssh/ssh_host_*
  cat > "$ROOT/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Make this VM's own SSH host keys (the box ships none)
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
  in_root systemctl enable ssh-host-keys.service ssh.service >/dev/null 2>&1
  # Debian's etcd.service would hold 127.0.0.1:2379 on every VM; ours is
  # l3fabric-etcd.service. apt's and others' timers only cost CPU under TCG.
  local unit
  for unit in etcd.service apt-daily.timer apt-daily-upgrade.timer man-db.timer \
              e2scrub_all.timer fstrim.timer; do
    in_root systemctl disable "$unit" >/dev/null 2>&1 || true
  done
  # An empty machine-id makes each VM its own at first boot; that first boot must not
  # wait for systemd-firstboot's questions on a console nobody reads.
  in_root systemctl mask systemd-firstboot.service >/dev/null 2>&1
  : > "$ROOT/etc/machine-id"
  rm -f "$ROOT/var/lib/dbus/machine-id"

  log "clean up and pack"
  rm -f "$ROOT/usr/sbin/policy-rc.d" "$ROOT/etc/resolv.conf"
  touch "$ROOT/etc/resolv.conf"
  rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/tmp/* \
    "$ROOT"/root/.cache
  stop_chroot_processes
  for m in var/cache/apt/archives sys proc dev/pts dev; do umount "$ROOT/$m"; done
  # No fstrim here: on this host's loop device (with an offset) it corrupted the file
  # system (bitmaps that fail their checksums, a journal that needs recovery).
  umount "$ROOT"
  ROOT=""
  sync
  e2fsck -fn "$LOOP" >"$WORK/fsck.log" 2>&1 \
    || { tail -20 "$WORK/fsck.log" >&2; die "the new file system is not clean"; }
  losetup -d "$LOOP"
  LOOP=""
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$image" bs=440 count=1 conv=notrunc status=none

  local boxdir="$WORK/box"
  mkdir -p "$boxdir"
  qemu-img convert -c -O qcow2 "$image" "$boxdir/box.img"
  rm -f "$image"
  printf '{"provider":"libvirt","format":"qcow2","virtual_size":%d}\n' "$SIZE_GB" \
    > "$boxdir/metadata.json"
  cat > "$boxdir/Vagrantfile" <<'EOF'
# debian/bookworm64 for libvirt, built by l3fabric's vagrant/box/build.sh
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
  end
end
EOF
  echo "$hash" > "$boxdir/l3fabric-box-hash"
  tar -C "$boxdir" -cf "$out.tmp" metadata.json Vagrantfile box.img l3fabric-box-hash
  mv "$out.tmp" "$out"
  log "built $out ($(du -h "$out" | cut -f1))"
}

main() {
  local force=0
  case "${1:-}" in
    --hash) inputs_hash; return ;;
    --force) force=1 ;;
    "") ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
  [ "$(id -u)" -eq 0 ] || die "run as root (loop devices, mounts, chroot)"
  mkdir -p "$CACHE"
  local hash out
  hash="$(inputs_hash)"
  out="$CACHE/bookworm64-$hash.box"
  if [ -f "$out" ] && [ "$force" = 0 ]; then
    log "cached: $out"
  else
    local started=$SECONDS
    build "$hash" "$out"
    log "build took $((SECONDS - started)) s"
    # Older boxes (other inputs) are of no further use.
    find "$CACHE" -maxdepth 1 -name 'bookworm64-*.box' ! -name "bookworm64-$hash.box" -delete
  fi
  echo "$out"
}

main "$@"
