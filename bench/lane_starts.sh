#!/usr/bin/env bash
# One device call: bench/lane_starts.py on the working tree (A) and on the commit packed in bench/ab_ref.tar
# (B, see bench/ab_session.sh), in turn, each as it is and with --starts (only a version whose kernels sum lane
# counts takes it, sessions 7-8; others say so and stop); then ncu's launch, occupancy and memory sections for
# one launch of each kernel of both. `.whl` (zstandard) carried. Brings back 4 files (a call returns at most 8):
# lane_starts.log (every run's lines), lane_starts.json (every run's rows), ncu_A.log, ncu_B.log.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_whl .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site_A . || exit 1
rm -rf /tmp/ab_B && mkdir -p /tmp/ab_B && tar -xf bench/ab_ref.tar -C /tmp/ab_B && cp bench/lane_starts.py /tmp/ab_B/bench/ || exit 1
(cd /tmp/ab_B && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site_B .) || exit 1
export PYTHONUNBUFFERED=1
mkdir -p /tmp/ls_json
in_version() {  # in_version VERSION ARGS...: a command in that version's folder, with its jcodec
  local v=$1 dir=$PWD; shift; [ $v = B ] && dir=/tmp/ab_B
  (cd $dir && PYTHONPATH=/tmp/site_$v:/tmp/site_whl "$@")
}
run() {  # run VERSION NAME ARGS...: lane_starts.py's lines, logged under NAME
  local v=$1 name=$2; shift 2
  echo "=== $name" >> $OUT/lane_starts.log
  in_version $v timeout ${RUN_S:-120} "$@" 2>&1 | tee -a $OUT/lane_starts.log \
      | grep -E "GB/s|Error|error|patches"
}
for round in $(seq 1 ${ROUNDS:-1}); do
  echo "=== round $round"
  for v in A B; do
    run $v ${v}_$round python3 -P bench/lane_starts.py --out /tmp/ls_json/${v}_$round.json
    run $v ${v}s_$round python3 -P bench/lane_starts.py --starts --out /tmp/ls_json/${v}s_$round.json
  done
done
python3 -c "import glob, json, os; print(json.dumps({os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob('/tmp/ls_json/*.json'))}, indent=1))" > $OUT/lane_starts.json
if [ "${NCU:-1}" != 0 ]; then
  for v in A B; do
    in_version $v timeout ${NCU_S:-150} ncu --section LaunchStats --section Occupancy \
        --section MemoryWorkloadAnalysis --section SpeedOfLight -k regex:rans \
        python3 -P bench/lane_starts.py --once > $OUT/ncu_$v.log 2>&1
    echo "=== ncu $v"
    grep -E "rans_|Registers Per|Achieved Occupancy|L1/TEX Hit|L2 Hit|Duration|Shared Memory Configuration Size|Static Shared|Dynamic Shared" $OUT/ncu_$v.log
  done
fi
