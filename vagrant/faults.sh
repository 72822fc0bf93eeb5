#!/usr/bin/env bash
# The fault round, on a running Vagrant cluster of at least 3 VMs after smoke.sh (which
# leaves a container named smoke on each). `./run vagrant` runs it; by hand:
#
#   FABRIC_ETCD_CLUSTER=1 ./faults.sh [agent-kill] [halt] [reboot] [etcd] [final]
#
# (default: all, in this order). Each check prints PASS or FAIL with its numbers; the
# exit status is 1 if any FAILed.
#   agent-kill  kill -9 of node2's agent under continuous ping between containers on
#               node1 and node3 (and to node2's): systemd restarts it, no ping lost
#   halt        `vagrant halt node2`: its routes leave node1 and node3 within the BGP
#               hold time; `vagrant up node2`: they come back
#   reboot      node3 rebooted (vagrant halt, vagrant up) with 3 containers on it: once the grace period
#               (the agent's [ipam] gone_grace) is over, none of their registrations or
#               addresses is held (`fabricctl workloads`, `fabricctl ipam check`)
#   etcd        the etcd leader's VM powered off (virsh destroy) while the two others ADD containers
#               (needs FABRIC_ETCD_CLUSTER=1): no ADD fails beyond one retry, and
#               `fabricctl ipam check` is clean, with the member down and once it is back;
#               the powered-off VM's routes leave the others within the hold time
#   final       every registered workload is a running container; ipam check clean
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")" || exit 2
# shellcheck disable=SC1091  # lib.sh: checked on its own
. ./lib.sh

NODES="${FABRIC_NODES:-3}"
SUBNET="${FABRIC_SUBNET:-192.168.56}"
SUBNET6="${FABRIC_SUBNET6-fd56::}"
HOLD="${FABRIC_HOLD_TIME:-9}"             # the agent's default [bgp] hold_time
GONE_GRACE="${FABRIC_GONE_GRACE:-60}"     # the agent's default [ipam] gone_grace
ADDS="${FAULT_ADDS:-8}"                   # container ADDs per VM in the etcd fault
PROTO=73                                  # the agent's route protocol number
TMP="$(mktemp -d /tmp/l3fabric-faults.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
failures=0
passes=0

pass() { echo "PASS $*"; passes=$((passes + 1)); }
fail() { echo "FAIL $*"; failures=$((failures + 1)); }
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; }  # le A B: A <= B
addr() { echo "$SUBNET.$((10 + $1))"; }
addr6() { if [ -n "$SUBNET6" ]; then printf '%s%x\n' "$SUBNET6" $((10 + $1)); fi; }

routes_via() {  # routes_via NODE N: the agent's routes on NODE whose next hop is nodeN
  local a4 a6
  a4=$(addr "$2")
  a6=$(addr6 "$2")
  on "$1" "{ ip -o route show proto $PROTO; ip -o -6 route show proto $PROTO; } \
           | grep -F -e ' via $a4 ' -e ' via ${a6:-no-such-address} ' | awk '{print \$1}' | sort" \
    | tr -d '\r'
}

# watch_routes_gone NODE N: on NODE, look at the kernel's routes every 0.1 s and return
# (status 0) as soon as none goes via nodeN. Run in the background: the moment it exits
# is when the routes went, give or take 0.1 s and one ssh message, where polling with a
# new ssh each time (1.5-3 s a call to these TCG VMs) would be seconds late.
watch_routes_gone() {
  local a4 a6
  a4=$(addr "$2")
  a6=$(addr6 "$2")
  on "$1" "while { ip -o route show proto $PROTO; ip -o -6 route show proto $PROTO; } \
             | grep -q -F -e ' via $a4 ' -e ' via ${a6:-no-such-address} '; do sleep 0.1; done"
}

# watched_gone PID VAR: if the watch PID has ended, set VAR (once) to the time it ended,
# or to "error" if it failed (ssh); nothing while it runs. (Not in a $(subshell): only
# this shell can wait for its children.)
watched_gone() {
  local t
  [ -z "${!2}" ] || return 0
  kill -0 "$1" 2>/dev/null && return 0
  t=$(now)
  if wait "$1"; then printf -v "$2" %s "$t"; else printf -v "$2" %s error; fi
}

domain_of() { cat ".vagrant/machines/$1/libvirt/id" 2>/dev/null; }  # libvirt's id of NODE
domain_off() { [ "$(virsh -c qemu:///system domstate "$1" 2>/dev/null)" = "shut off" ]; }

workload_ids() {  # workload_ids NODE: container ids of every registered workload
  fab "$1" -o json workloads | python3 -c '
import json, sys
for w in json.load(sys.stdin):
    print(w["container_id"])'
}

ipam_clean() {  # ipam_clean NODE: fabricctl ipam check finds nothing
  fab "$1" ipam check >"$TMP/ipam-check" 2>&1
}

agent_ready() {  # agent_ready NODE: the agent runs and every BGP session is Established
  fab "$1" node status >/dev/null 2>&1
}

ping_result() {  # ping_result FILE: "sent received" from busybox ping's summary
  awk '/packets transmitted/ { print $1, $4; found = 1 } END { if (!found) print "0 0" }' "$1"
}

fault_agent_kill() {
  local victim=node2 a=node1 b=node3 ip_a ip_b ip_v count=300
  echo "--- agent-kill: kill -9 of $victim's fabric-agent under continuous ping"
  # smoke.sh left one on each VM; a VM halted since (another check run first, by
  # hand) has lost its own: start it again.
  ip_a=$(container_ip $a smoke)
  [ -n "$ip_a" ] || ip_a=$(container_run $a smoke)
  ip_b=$(container_ip $b smoke)
  [ -n "$ip_b" ] || ip_b=$(container_run $b smoke)
  ip_v=$(container_ip $victim smoke)
  [ -n "$ip_v" ] || ip_v=$(container_run $victim smoke)
  if [ -z "$ip_a" ] || [ -z "$ip_b" ] || [ -z "$ip_v" ]; then
    fail "agent-kill: no smoke container (node1 '$ip_a', node3 '$ip_b', node2 '$ip_v')"
    return
  fi
  local pid0 restarts0
  pid0=$(on $victim "systemctl show -p MainPID --value fabric-agent" | tr -d '\r')
  restarts0=$(on $victim "systemctl show -p NRestarts --value fabric-agent" | tr -d '\r')
  # 300 pings, one each 0.2 s: 60 s, the kill 10 s in.
  on $a "podman exec smoke ping -q -i 0.2 -c $count $ip_b" >"$TMP/ping-ab" 2>&1 &
  local p1=$!
  on $b "podman exec smoke ping -q -i 0.2 -c $count $ip_a" >"$TMP/ping-ba" 2>&1 &
  local p2=$!
  on $a "podman exec smoke ping -q -i 0.2 -c $count $ip_v" >"$TMP/ping-av" 2>&1 &
  local p3=$!
  sleep 10
  local t0 pid1=0 t_restart="" t_ready=""
  t0=$(now)
  on $victim "kill -9 $pid0"
  local deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    if [ -z "$t_restart" ]; then
      pid1=$(on $victim "systemctl show -p MainPID --value fabric-agent" | tr -d '\r')
      if [ "$pid1" != 0 ] && [ "$pid1" != "$pid0" ]; then t_restart=$(now); fi
    elif agent_ready $victim; then
      t_ready=$(now)
      break
    fi
    sleep 0.5
  done
  wait $p1 $p2 $p3
  local restarts1
  restarts1=$(on $victim "systemctl show -p NRestarts --value fabric-agent" | tr -d '\r')
  if [ -n "$t_restart" ] && [ -n "$t_ready" ]; then
    pass "agent-kill: systemd restarted $victim's agent (pid $pid0 -> $pid1, NRestarts $restarts0 -> $restarts1): new process after $(since "$t0" "$t_restart") s, all sessions Established after $(since "$t0" "$t_ready") s"
  else
    fail "agent-kill: $victim's agent not back within 120 s (pid $pid0 -> ${pid1:-?}, NRestarts $restarts0 -> $restarts1)"
  fi
  local pair file sent received
  for pair in "node1->node3:ab" "node3->node1:ba" "node1->node2 (the killed agent's VM):av"; do
    file="$TMP/ping-${pair##*:}"
    read -r sent received < <(ping_result "$file")
    if [ "$sent" -gt 0 ] && [ "$sent" = "$received" ]; then
      pass "agent-kill: ping ${pair%:*}: $sent sent, $received received, 0 lost"
    else
      fail "agent-kill: ping ${pair%:*}: $sent sent, $received received, $((sent - received)) lost ($(tr '\n' ' ' <"$file" | cut -c1-200))"
    fi
  done
}

fault_halt() {
  local victim=node2 n=2 watchers=(node1 node3)
  echo "--- halt: vagrant halt $victim, then vagrant up $victim"
  local w before=()
  for w in "${watchers[@]}"; do
    before+=("$(routes_via "$w" $n | tr '\n' ' ')")
  done
  if [ -z "${before[0]// }" ] || [ -z "${before[1]// }" ]; then
    fail "halt: no routes via $victim before the halt (node1: '${before[0]}', node3: '${before[1]}')"
    return
  fi
  echo "routes via $victim before: node1: ${before[0]}; node3: ${before[1]}"
  local domain
  domain=$(domain_of $victim)
  [ -n "$domain" ] || { fail "halt: no libvirt domain for $victim in .vagrant/"; return; }
  # The clock that matters starts when the VM is off: its peers cannot know earlier.
  # Routes gone at G, last seen running at R (domstate, every 0.1 s): G <= R + hold
  # time means the routes went within the hold time of the VM's end, whatever the
  # polling's delays (both are measured late, never early).
  local t0 t_halted="" t_off="" t_running gone=("" "") i hp watch=()
  for i in 0 1; do
    watch_routes_gone "${watchers[$i]}" $n >/dev/null 2>&1 &
    watch+=($!)
  done
  t0=$(now)
  t_running=$t0
  vagrant halt $victim >"$TMP/halt.log" 2>&1 &
  hp=$!
  local deadline=$((SECONDS + 300))
  while [ $SECONDS -lt $deadline ]; do
    for i in 0 1; do
      watched_gone "${watch[$i]}" "gone[$i]"
    done
    if [ -z "$t_off" ]; then
      if domain_off "$domain"; then t_off=$(now); else t_running=$(now); fi
    fi
    if [ -z "$t_halted" ] && ! kill -0 $hp 2>/dev/null; then t_halted=$(now); fi
    [ -n "${gone[0]}" ] && [ -n "${gone[1]}" ] && [ -n "$t_off" ] && [ -n "$t_halted" ] && break
    sleep 0.1
  done
  for i in 0 1; do
    [ -n "${gone[$i]}" ] || kill "${watch[$i]}" 2>/dev/null
  done
  wait $hp || { fail "halt: vagrant halt $victim failed: $(tail -3 "$TMP/halt.log")"; return; }
  [ -n "$t_halted" ] || t_halted=$(now)
  [ -n "$t_off" ] || t_off=$(now)
  local off
  off="the VM was off after $(since "$t0" "$t_off") s (seen running at $(since "$t0" "$t_running") s; 'vagrant halt' returned after $(since "$t0" "$t_halted") s)"
  for i in 0 1; do
    if [ "${gone[$i]}" = error ]; then
      fail "halt: could not watch ${watchers[$i]}'s routes (ssh failed)"
    elif [ -z "${gone[$i]}" ]; then
      fail "halt: ${watchers[$i]} still routes via $victim 300 s after the halt began"
    elif le "$(since "$t0" "${gone[$i]}")" "$(awk -v a="$(since "$t0" "$t_running")" -v h="$HOLD" 'BEGIN { print a + h }')"; then
      pass "halt: $victim's routes gone from ${watchers[$i]} $(since "$t0" "${gone[$i]}") s after 'vagrant halt' began; $off (hold time $HOLD s)"
    else
      fail "halt: $victim's routes gone from ${watchers[$i]} only $(since "$t0" "${gone[$i]}") s after 'vagrant halt' began, more than the hold time ($HOLD s) after the VM was last seen running; $off"
    fi
  done

  local t1 t_up back=("" "")
  t1=$(now)
  if ! vagrant up $victim >"$TMP/up.log" 2>&1; then
    fail "halt: vagrant up $victim failed: $(tail -5 "$TMP/up.log")"
    return
  fi
  t_up=$(now)
  ssh_refresh $victim
  deadline=$((SECONDS + 300))
  while [ $SECONDS -lt $deadline ]; do
    for i in 0 1; do
      if [ -z "${back[$i]}" ] && [ -n "$(routes_via "${watchers[$i]}" $n)" ]; then
        back[i]=$(now)
      fi
    done
    [ -n "${back[0]}" ] && [ -n "${back[1]}" ] && agent_ready $victim && break
    sleep 1
  done
  for i in 0 1; do
    if [ -n "${back[$i]}" ]; then
      pass "halt: $victim's routes back on ${watchers[$i]} ($(routes_via "${watchers[$i]}" $n | tr '\n' ' ')) $(since "$t_up" "${back[$i]}") s after 'vagrant up $victim' returned (which took $(since "$t1" "$t_up") s)"
    else
      fail "halt: no route via $victim on ${watchers[$i]} 300 s after 'vagrant up $victim' returned"
    fi
  done
  agent_ready $victim || fail "halt: $victim's sessions not all Established after it came back"
}

fault_reboot() {
  local victim=node3 names=(smoke fault-a fault-b) name
  echo "--- reboot: $victim halted and started again (vagrant halt, vagrant up) with ${#names[@]} containers on it"
  for name in "${names[@]}"; do
    [ -n "$(container_ip $victim "$name")" ] || container_run $victim "$name" >/dev/null
  done
  local ids=() id
  for name in "${names[@]}"; do
    id=$(on $victim "podman inspect -f '{{.Id}}' $name" | tr -d '\r')
    ids+=("$id")
  done
  local registered
  registered=$(workload_ids node1 | grep -c -F -f <(printf '%s\n' "${ids[@]}") || true)
  echo "containers on $victim: ${names[*]} ($registered of ${#ids[@]} registered)"
  # `vagrant halt` and `vagrant up`, which is what `vagrant reload` does, but in one
  # vagrant-libvirt 0.11.2 process that, when the guest took a while to power off,
  # asked libvirt to start a domain it still believed running: it never started.
  local t0 t_up
  t0=$(now)
  if ! vagrant halt $victim >"$TMP/reload.log" 2>&1 || ! vagrant up $victim >>"$TMP/reload.log" 2>&1; then
    fail "reboot: vagrant halt/up $victim failed: $(tail -5 "$TMP/reload.log")"
    return
  fi
  t_up=$(now)
  ssh_refresh $victim
  echo "vagrant halt + up of $victim took $(since "$t0" "$t_up") s"
  local held=${#ids[@]} clean=1 t_free="" deadline=$((SECONDS + GONE_GRACE + 240))
  while [ $SECONDS -lt $deadline ]; do
    held=$(workload_ids node1 | grep -c -F -f <(printf '%s\n' "${ids[@]}") || true)
    if [ "$held" = 0 ]; then
      if ipam_clean node1; then clean=0; t_free=$(now); break; fi
    fi
    sleep 5
  done
  if [ -n "$t_free" ]; then
    pass "reboot: registrations and addresses of $registered containers released $(since "$t_up" "$t_free") s after $victim was back up (gone_grace $GONE_GRACE s); ipam check clean"
  else
    fail "reboot: $held of ${#ids[@]} registrations still held $((GONE_GRACE + 240)) s after $victim was back up; ipam check: $(tr '\n' ' ' <"$TMP/ipam-check" | cut -c1-300)"
  fi
  [ "$clean" = 0 ] || true
  # The runtime still lists the old containers (exited); removing them must not disturb
  # anything, and a new container there must work.
  on $victim "podman rm -f -t 0 ${names[*]}" >/dev/null 2>&1 || true
  local ip
  ip=$(container_run $victim smoke)
  if [ -n "$ip" ] && on node1 "podman exec smoke ping -c 2 -W 2 $ip" >/dev/null 2>&1 \
      && ipam_clean node1; then
    pass "reboot: after removing the old containers, a new one on $victim ($ip) is reachable from node1; ipam check clean"
  else
    fail "reboot: new container on $victim ('$ip') not reachable from node1, or ipam check: $(tr '\n' ' ' <"$TMP/ipam-check" | cut -c1-300)"
  fi
}

etcd_leader() {  # the index of the VM whose etcd member leads
  local endpoints
  endpoints="http://$(addr 1):2379,http://$(addr 2):2379,http://$(addr 3):2379"
  on node1 "ETCDCTL_API=3 etcdctl --endpoints=$endpoints endpoint status -w json" \
    | python3 -c '
import json, sys
for e in json.load(sys.stdin):
    if e["Status"]["leader"] == e["Status"]["header"]["member_id"]:
        print(int(e["Endpoint"].split(":")[1].rsplit(".", 1)[1]) - 10)'
}

# A loop on a VM: ADDS containers, each retried once if its ADD fails; one line each:
# "I RESULT START END [ERROR]" with RESULT ok, retried or failed.
# shellcheck disable=SC2016  # expanded on the VM
ADD_LOOP='for i in $(seq 1 %s); do
  s=$(date +%%s.%%N)
  if podman run -d --name fault-etcd-$i --network l3fabric %s >/dev/null 2>/tmp/add-err; then r=ok
  else
    podman rm -f -t 0 fault-etcd-$i >/dev/null 2>&1; sleep 1
    if podman run -d --name fault-etcd-$i --network l3fabric %s >/dev/null 2>>/tmp/add-err; then r=retried
    else r=failed; fi
  fi
  echo "$i $r $s $(date +%%s.%%N) $(tr "\\n" " " </tmp/add-err | cut -c1-200)"
  sleep 0.5
done'

fault_etcd() {
  echo "--- etcd: the etcd leader's VM powered off (virsh destroy) during container ADDs on the others"
  if [ "${FABRIC_ETCD_CLUSTER:-0}" != 1 ]; then
    echo "SKIP etcd: the cluster has one etcd member (FABRIC_ETCD_CLUSTER=1 makes three)"
    return
  fi
  local leader victim workers=() i
  leader=$(etcd_leader | tr -d '\r')
  [ -n "$leader" ] || { fail "etcd: no etcd leader found"; return; }
  victim=node$leader
  for i in 1 2 3; do [ "$i" = "$leader" ] || workers+=("node$i"); done
  echo "etcd leader: $victim; ADDs on ${workers[*]}, $ADDS each"
  local w pids=()
  for w in "${workers[@]}"; do
    container_run "$w" fault-etcd-warmup >/dev/null  # the image exists; podman is warm
    on "$w" "podman rm -f -t 0 fault-etcd-warmup" >/dev/null 2>&1
    # shellcheck disable=SC2059  # the loop is the format
    on "$w" "$(printf "$ADD_LOOP" "$ADDS" "$IMAGE $SLEEPER" "$IMAGE $SLEEPER")" >"$TMP/adds-$w" 2>&1 &
    pids+=($!)
  done
  sleep 6
  # A power cut: libvirt destroys the domain. (`vagrant halt --force` first asks the
  # guest by ACPI, which nothing in these VMs answers, for graceful_halt_timeout.)
  # A power cut says nothing to the peers: their hold timer must notice it. The time
  # runs from just before the power-off (so it is never too short) to when a watch on
  # each peer saw the routes go (0.1 s polling there, then one ssh message).
  local t_halt domain watch=() gone=("" "")
  domain=$(domain_of "$victim")
  for i in 0 1; do
    if [ -z "$(routes_via "${workers[$i]}" "$leader")" ]; then
      fail "etcd: ${workers[$i]} has no route via $victim before the power-off"
    fi
    watch_routes_gone "${workers[$i]}" "$leader" >/dev/null 2>&1 &
    watch+=($!)
  done
  t_halt=$(now)
  virsh -c qemu:///system destroy "$domain" >"$TMP/etcd-halt.log" 2>&1 \
    || fail "etcd: virsh destroy $victim ($domain) failed: $(tail -3 "$TMP/etcd-halt.log")"
  local deadline=$((SECONDS + 60))
  while [ $SECONDS -lt $deadline ]; do
    for i in 0 1; do watched_gone "${watch[$i]}" "gone[$i]"; done
    [ -n "${gone[0]}" ] && [ -n "${gone[1]}" ] && break
    sleep 0.1
  done
  # The hold timer runs from the last message received, before the power-off. ExaBGP
  # counts it in whole seconds and acts when more than the hold time has passed: up
  # to hold + 1 s after that message. ExaBGP and the agent, on one emulated vCPU busy
  # with the ADDs, then need a moment to take the routes out (seen: up to 1.1 s more):
  # 3 s are allowed in all.
  for i in 0 1; do
    if [ "${gone[$i]}" = error ]; then
      fail "etcd: could not watch ${workers[$i]}'s routes (ssh failed)"
    elif [ -z "${gone[$i]}" ]; then
      kill "${watch[$i]}" 2>/dev/null
      fail "etcd: ${workers[$i]} still routes via $victim 60 s after it was powered off"
    elif le "$(since "$t_halt" "${gone[$i]}")" $((HOLD + 3)); then
      pass "etcd: $victim's routes gone from ${workers[$i]} $(since "$t_halt" "${gone[$i]}") s after the power-off (hold time $HOLD s, + 3 s allowed)"
    else
      fail "etcd: $victim's routes gone from ${workers[$i]} only $(since "$t_halt" "${gone[$i]}") s after the power-off (hold time $HOLD s, + 3 s allowed)"
    fi
  done
  wait "${pids[@]}"
  local total=0 retried=0 failed=0 after=0 slowest=0 n r s e
  for w in "${workers[@]}"; do
    while read -r n r s e _; do
      [[ "$n" =~ ^[0-9]+$ ]] || continue
      total=$((total + 1))
      [ "$r" = retried ] && retried=$((retried + 1))
      [ "$r" = failed ] && failed=$((failed + 1))
      le "$t_halt" "$e" && after=$((after + 1))
      slowest=$(awk -v a="$slowest" -v d="$(since "$s" "$e")" 'BEGIN { print (d > a ? d : a) }')
    done <"$TMP/adds-$w"
  done
  for w in "${workers[@]}"; do
    grep -v ' ok ' "$TMP/adds-$w" | sed "s/^/$w: /" || true
  done
  if [ "$total" = $((ADDS * ${#workers[@]})) ] && [ "$failed" = 0 ]; then
    pass "etcd: $total ADDs on ${workers[*]}, $after of them ending after $victim (the etcd leader) was powered off: $retried needed a retry, 0 failed; slowest ADD $slowest s"
  else
    fail "etcd: $total of $((ADDS * ${#workers[@]})) ADDs done, $retried needed a retry, $failed failed even so (slowest $slowest s)"
  fi
  if ipam_clean "${workers[0]}"; then
    pass "etcd: ipam check clean with $victim's member down"
  else
    fail "etcd: ipam check with $victim's member down: $(tr '\n' ' ' <"$TMP/ipam-check" | cut -c1-300)"
  fi

  local t1
  t1=$(now)
  if ! vagrant up "$victim" >"$TMP/etcd-up.log" 2>&1; then
    fail "etcd: vagrant up $victim failed: $(tail -5 "$TMP/etcd-up.log")"
    return
  fi
  ssh_refresh "$victim"
  local healthy=""
  for _ in $(seq 1 60); do
    if on "$victim" "ETCDCTL_API=3 etcdctl --endpoints=http://$(addr "$leader"):2379 endpoint health" >/dev/null 2>&1 \
        && agent_ready "$victim"; then
      healthy=$(now)
      break
    fi
    sleep 3
  done
  if [ -n "$healthy" ]; then
    pass "etcd: $victim's member healthy and its agent's sessions Established $(since "$t1" "$healthy") s after 'vagrant up $victim' began"
  else
    fail "etcd: $victim's member or agent not back 180 s after 'vagrant up $victim' returned"
  fi
  for w in "${workers[@]}"; do
    on "$w" "podman rm -f -t 0 \$(podman ps -a --format '{{.Names}}' | grep '^fault-etcd-')" >/dev/null 2>&1
  done
  if ipam_clean "${workers[0]}"; then
    pass "etcd: the $total containers removed (CNI DEL), ipam check clean with all members back"
  else
    fail "etcd: after removing the containers, ipam check: $(tr '\n' ' ' <"$TMP/ipam-check" | cut -c1-300)"
  fi
}

fault_final() {
  echo "--- final: every registered workload is a running container"
  local running registered i
  : >"$TMP/running"
  for i in $(seq 1 "$NODES"); do
    on "node$i" "podman ps -q --no-trunc" | tr -d '\r' >>"$TMP/running"
  done
  # Registrations of containers gone with a VM's halt are released after the grace.
  local deadline=$((SECONDS + GONE_GRACE + 120)) stale=""
  while [ $SECONDS -lt $deadline ]; do
    workload_ids node1 | sort >"$TMP/registered"
    stale=$(comm -23 "$TMP/registered" <(sort "$TMP/running") | wc -l)
    [ "$stale" = 0 ] && ipam_clean node1 && break
    sleep 5
  done
  running=$(wc -l <"$TMP/running")
  registered=$(wc -l <"$TMP/registered")
  if [ "$stale" = 0 ] && ipam_clean node1; then
    pass "final: $registered registered workloads, $running running containers, none registered without its container; ipam check clean"
  else
    fail "final: $stale of $registered registered workloads have no running container; ipam check: $(tr '\n' ' ' <"$TMP/ipam-check" | cut -c1-300)"
  fi
  local what
  for what in nodes workloads "ipam show" "ipam check"; do
    echo "--- node1: fabricctl $what"
    # shellcheck disable=SC2086  # two words: a subcommand
    fab node1 $what
  done
  for i in $(seq 1 "$NODES"); do
    echo "--- node$i: fabricctl node status"; fab "node$i" node status
  done
}

main() {
  [ "$NODES" -ge 3 ] || { echo "faults.sh needs at least 3 VMs (FABRIC_NODES=$NODES)" >&2; exit 2; }
  local checks=("$@") check started=$SECONDS
  [ ${#checks[@]} -gt 0 ] || checks=(agent-kill halt reboot etcd final)
  local nodes=()
  for i in $(seq 1 "$NODES"); do nodes+=("node$i"); done
  ssh_refresh "${nodes[@]}"
  for check in "${checks[@]}"; do
    local t=$SECONDS
    case "$check" in
      agent-kill) fault_agent_kill ;;
      halt) fault_halt ;;
      reboot) fault_reboot ;;
      etcd) fault_etcd ;;
      final) fault_final ;;
      *) echo "unknown check $check" >&2; exit 2 ;;
    esac
    echo "($check took $((SECONDS - t)) s)"
  done
  echo "fault round: $passes PASS, $failures FAIL in $((SECONDS - started)) s"
  [ "$failures" = 0 ]
}

main "$@"
