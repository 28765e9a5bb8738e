#!/usr/bin/env bash
# One device call: bench/lane_starts.py on the working tree (as is, and with precomputed lane starts) and on
# the commit packed in bench/ab_ref.tar (see bench/ab_session.sh), timed in turn; then ncu's launch,
# occupancy and memory sections for one launch of each kernel of both. `.whl` (zstandard) carried.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_whl .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site_A . || exit 1
rm -rf /tmp/ab_B && mkdir -p /tmp/ab_B && tar -xf bench/ab_ref.tar -C /tmp/ab_B && cp bench/lane_starts.py /tmp/ab_B/bench/ || exit 1
(cd /tmp/ab_B && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site_B .) || exit 1
export PYTHONUNBUFFERED=1
run() {  # run VERSION NAME ARGS...: lane_starts.py of that version
  local v=$1 name=$2; shift 2; local dir=$PWD; [ $v = B ] && dir=/tmp/ab_B
  (cd $dir && PYTHONPATH=/tmp/site_$v:/tmp/site_whl timeout ${RUN_S:-120} "$@") 2>&1 | tee $OUT/$name.log | grep -E "GB/s|Error|error"
}
for round in $(seq 1 ${ROUNDS:-1}); do
  echo "=== round $round"
  run A ls_A_$round python3 -P bench/lane_starts.py --out $OUT/ls_A_$round.json
  run A ls_As_$round python3 -P bench/lane_starts.py --starts --out $OUT/ls_As_$round.json
  run B ls_B_$round python3 -P bench/lane_starts.py --out $OUT/ls_B_$round.json
done
if [ "${NCU:-1}" != 0 ]; then
  for v in A B; do
    run $v ncu_$v ncu --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis --section SpeedOfLight \
        -k regex:rans python3 -P bench/lane_starts.py --once
    grep -E "rans_|Registers Per|Achieved Occupancy|Theoretical Occupancy|L1/TEX Hit|L2 Hit|Duration|Block Limit|Shared Memory Configuration Size|Static Shared" $OUT/ncu_$v.log
  done
fi
