#!/usr/bin/env bash
# The SSD tier's I/O engine against fio on the same file system, same file, block size,
# queue depth and engine (io_uring, O_DIRECT), in one run. Installs fio (Debian) if absent.
# Each cell runs both tools REPS times, alternating, and compares the medians: cloud
# disks throttle in bursts, so one run each says little.
#
#   scripts/bench_ssd.sh [DIR] [SECONDS]    # DIR: a directory on the disk to measure
#
# On a machine without Rust or network (the lent GPU machine), point FIO at a carried fio
# and PEGAFLOW_SSD_BENCH_BIN at a prebuilt target/release/examples/ssd_io_bench.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/var/tmp}
seconds=${2:-3}
reps=${PEGAFLOW_SSD_BENCH_REPS:-3}
size_mib=${PEGAFLOW_SSD_BENCH_MIB:-2048}
fio=${FIO:-fio}
command -v "$fio" > /dev/null || { apt-get update -qq && apt-get install -y -qq fio > /dev/null; }
bench=${PEGAFLOW_SSD_BENCH_BIN:-}
if [ -z "$bench" ]; then
  cargo build -q --release -p pegaflow-core --example ssd_io_bench
  bench=target/release/examples/ssd_io_bench
fi
file="$dir/pegaflow-ssd-bench.$$"
trap 'rm -f "$file"' EXIT
# Lay the file out once for both tools.
"$bench" "$file" "$size_mib" 1024 16 write 0.1 > /dev/null
printf '%-6s %6s %5s %10s %10s %7s %18s %18s\n' op block depth ours_GB/s fio_GB/s ratio \
  "ours p50/p99 us" "fio p50/p99 us"
for op in read write; do
  for kib in 32 512 2048; do
    for depth in 1 4 16 64; do
      ours=() theirs=()
      for _ in $(seq "$reps"); do
        ours+=("$("$bench" "$file" "$size_mib" "$kib" "$depth" "$op" "$seconds" | python3 -c \
          'import json,sys; j=json.load(sys.stdin); print("%s:%s:%s" % (j["gb_per_s"], j["lat_p50_us"], j["lat_p99_us"]))')")
        theirs+=("$("$fio" --name=bench --filename="$file" --size="${size_mib}m" --rw="rand$op" \
          --bs="${kib}k" --iodepth="$depth" --ioengine=io_uring --direct=1 --time_based \
          --runtime="$seconds" --output-format=json | python3 -c \
          'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; p=d["clat_ns"]["percentile"]; print("%s:%s:%s" % (d["bw_bytes"]/1e9, p["50.000000"]/1e3, p["99.000000"]/1e3))')")
      done
      python3 - "$op" "$kib" "$depth" "${ours[*]}" "${theirs[*]}" <<'PY'
import statistics, sys
op, kib, depth, ours, theirs = sys.argv[1:]
def medians(runs):
    cols = list(zip(*(map(float, r.split(":")) for r in runs.split())))
    return [statistics.median(c) for c in cols]
o, t = medians(ours), medians(theirs)
print("%-6s %6s %5s %10.3f %10.3f %7.2f %18s %18s" % (
    op, kib + "K", depth, o[0], t[0], o[0] / t[0] if t[0] else 0,
    "%.0f/%.0f" % (o[1], o[2]), "%.0f/%.0f" % (t[1], t[2])))
PY
    done
  done
done
