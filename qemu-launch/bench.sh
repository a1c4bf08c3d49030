#!/usr/bin/env bash
# Measures the test guest's boot time (QEMU start to a working command channel) and a live
# migration of the idle guest between two QEMUs (QEMU's total time and downtime), N runs each,
# one at a time, and prints the medians. Needs QEMU 10 and the guest image (scripts/setup).
#
# Usage: qemu-launch/bench.sh [runs]     (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build -q -p qemu-launch
bin=target/debug/qemu-launch
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
boot=() total=() down=()
for i in $(seq 1 "$runs"); do
    ms=$("$bin" run --name "bench-boot-$$-$i" --test-netdev user --mac "02:00:00:00:02:$(printf %02x "$i")" \
        --exec true 2>&1 | sed -n 's/.* is up \([0-9]*\) ms after.*/\1/p')
    boot+=("$ms")
done
for i in $(seq 1 "$runs"); do
    read -r t d < <("$bin" migrate --name "bench-mig-$$-$i" --test-netdev user \
        --mac "02:00:00:00:03:$(printf %02x "$i")" 2>/dev/null |
        python3 -c 'import json,sys; m=json.load(sys.stdin)["migration"]; print(m["total_ms"], m["downtime_ms"])')
    total+=("$t")
    down+=("$d")
done
echo "boot_ms      ${boot[*]}  median $(printf '%s\n' "${boot[@]}" | median)"
echo "migrate_ms   ${total[*]}  median $(printf '%s\n' "${total[@]}" | median)"
echo "downtime_ms  ${down[*]}  median $(printf '%s\n' "${down[@]}" | median)"
