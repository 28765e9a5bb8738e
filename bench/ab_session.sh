#!/usr/bin/env bash
# A/B in one device call: bench/decode.py (or AB_SCRIPT, e.g. bench/ablate.py) with the same arguments on two versions of jcodec, alternating
# (A B A B), so that both are timed on the same machine, warm, side by side.
# A is the working tree; B is a commit, packed beside it before the call (the device copy has no .git):
#   git archive -o bench/ab_ref.tar <commit> pyproject.toml README.md jcodec pallas_kernels models bench
# (AB_REF names another such tar) then on the device, from the repository root, with `.whl` (zstandard for Python 3.12) carried:
#   AB_ARGS='--steps 240 --skip int8,...' ROUNDS=2 bash bench/ab_session.sh
# AB_ARGS_B replaces AB_ARGS for B where the two decode.py versions spell an option differently.
# AB_SAME_BENCH=1 runs A's bench/decode.py on both libraries (B's jcodec, A's timing), with AB_ARGS.
# AB_PROFILE (decode.py --profile flags, e.g. '--profile-codec pairs --profile-layer') then times that one
# launch of each under ncu at the running clocks: the kernel's own duration, no host in it.
# Writes $OUT/ab_{A,B}_{round}.{log,json}; prints each run's table.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_whl .whl/*.whl || exit 1
rm -rf /tmp/site_A  # (a warm machine keeps the last call's copy: A must be this tree)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site_A . || exit 1
rm -rf /tmp/ab_B /tmp/site_B && mkdir -p /tmp/ab_B && tar -xf ${AB_REF:-bench/ab_ref.tar} -C /tmp/ab_B || exit 1
(cd /tmp/ab_B && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site_B .) || exit 1
export PYTHONUNBUFFERED=1
for round in $(seq 1 ${ROUNDS:-2}); do
  for v in A B; do
    dir=$PWD; args=${AB_ARGS:-}; [ $v = B ] && [ -z "${AB_SAME_BENCH:-}" ] && dir=/tmp/ab_B && args=${AB_ARGS_B:-${AB_ARGS:-}}
    echo "=== $v round $round"
    (cd $dir && PYTHONPATH=/tmp/site_$v:/tmp/site_whl timeout ${RUN_S:-150} python3 -P ${AB_SCRIPT:-bench/decode.py} $args \
        --out $OUT/ab_${v}_${round}.json) 2>&1 | tee $OUT/ab_${v}_${round}.log | grep -E "GB/s|ratio|compile"
  done
done
if [ -n "${AB_PROFILE:-}" ]; then
  for v in A B; do
    echo "=== $v kernel duration (ncu): $AB_PROFILE"
    PYTHONPATH=/tmp/site_$v:/tmp/site_whl timeout ${PROFILE_S:-150} ncu --clock-control none --section SpeedOfLight \
        -k regex:rans -c 1 python3 -P bench/decode.py --profile $AB_PROFILE 2>&1 | grep -E "exact|Duration|SM Frequency|rans_"
  done
fi
