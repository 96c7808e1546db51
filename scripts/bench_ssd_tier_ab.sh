#!/usr/bin/env bash
# The SSD tier end to end (scripts/bench_ssd_tier.py) for two builds of PegaFlow in the
# same run, alternating, so a noisy cloud disk treats both alike: one line per run.
#
#   scripts/bench_ssd_tier_ab.sh OLD.whl NEW.whl [PAIRS] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2 pairs=${3:-3} dir=${4:-/var/tmp}
work=$(mktemp -d)
trap 'rm -rf "$work" "$dir/pf-tier-ab"' EXIT
python -m pip install -q --no-deps --target "$work/old" "$old"
python -m pip install -q --no-deps --target "$work/new" "$new"
for _ in $(seq "$pairs"); do
  for build in old new; do
    for shape in "--blocks 512 --layers 32 --pool-size 8gb" "--blocks 2048 --layers 2 --pool-size 4gb"; do
      rm -rf "$dir/pf-tier-ab"
      # shellcheck disable=SC2086  # the shape is several arguments
      PYTHONPATH="$work/$build" python scripts/bench_ssd_tier.py --path "$dir/pf-tier-ab" $shape \
        2> /dev/null | grep '^{' | sed "s/^{/{\"build\": \"$build\", /"
    done
  done
done
