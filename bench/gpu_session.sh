#!/usr/bin/env bash
# One device call: GPU tests (compiled kernels, model on compressed weights), the bitwise check, `jcodec bench`
# (CLI_S), the decode bench, ncu profiles, the generation bench, the forward's planned memory and the load bench,
# each under its own time limit (0 skips a part). Figures and their commands: bench/README.md.
# Run from the repository root on the GPU machine, with `.whl` (zstandard for Python 3.12) carried:
#   TEST_S=240 BITWISE_S=0 DECODE_S=300 PROFILE_S=0 GEN_S=0 LOAD_S=0 bash bench/gpu_session.sh
# PROFILE_VARIANT picks the kernel variant ncu profiles, PROFILE_ARGS adds decode.py flags (--steps N, --profile-layer, --profile-codec
# int8) (bench/decode.py --profile), PROFILE_SECTIONS replaces ncu's section flags
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . || exit 1  # --upgrade: a warm machine keeps the last call's copy otherwise
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
nvidia-smi -L
python3 -P -c "import jax, jcodec; print('jax', jax.__version__, jax.devices())"
# (pytest: pyproject's addopts already has -q; a second -q would hide the summary line)
# -P: import jcodec from the installed package, not from the source folder (whose layout maps subpackages)
if [ "${TEST_S:-240}" != 0 ]; then
  timeout ${TEST_S:-240} python3 -P -m pytest ${TESTS:-tests/test_kernels.py tests/test_llama.py tests/test_generate.py} \
      -p no:cacheprovider -rf --durations=5 2>&1 | tee $OUT/gpu_tests.log | tail -25; echo "[tests: exit ${PIPESTATUS[0]} (124: cut by its time limit)]"
fi
if [ "${BITWISE_S:-0}" != 0 ]; then
  timeout ${BITWISE_S} python3 -P bench/bitwise.py --out $OUT/bitwise.json 2>&1 | tee $OUT/bitwise.log | tail -12; echo "[bitwise: exit ${PIPESTATUS[0]} (124: cut by its time limit)]"
fi
if [ "${CLI_S:-0}" != 0 ]; then  # `jcodec bench` on random-weight checkpoints (bench/random_checkpoint.py), ';'-separated
  IFS=';' read -ra models <<< "${CLI_MODELS:-smollm2-135m}"
  for i in "${!models[@]}"; do
    timeout ${CLI_S} bash -c "python3 -P bench/random_checkpoint.py ${models[$i]} /tmp/rc$i && python3 -P -m jcodec.cli bench \
        /tmp/rc$i.jcodec --json $OUT/cli_bench$i.json" 2>&1 | tee $OUT/cli_bench$i.log | tail -8; echo "[jcodec bench $i: exit ${PIPESTATUS[0]}]"
  done
fi
if [ "${DECODE_S:-0}" != 0 ]; then
  timeout ${DECODE_S} python3 -P bench/decode.py --out $OUT/decode.json ${DECODE_ARGS:-} 2>&1 \
      | tee $OUT/decode.log | tail -40; echo "[decode: exit ${PIPESTATUS[0]} (124: cut by its time limit)]"
fi
if [ "${PROFILE_S:-0}" != 0 ]; then  # ncu on one kernel launch: occupancy, memory, warp stalls (its details page)
  # PROFILE_ARGS may hold several profiles separated by '|', each under PROFILE_S; only the summaries come back
  # ($OUT/profileN_details.txt: files back from a call are few), the reports stay in /tmp
  IFS='|' read -ra profiles <<< "${PROFILE_ARGS:-}"; [ ${#profiles[@]} = 0 ] && profiles=("")
  for i in "${!profiles[@]}"; do
    rep=/tmp/profile$i; echo "[profile $i: ${profiles[$i]}]"
    timeout ${PROFILE_S} ncu ${PROFILE_SECTIONS:---section SourceCounters --section WarpStateStats --section SchedulerStats \
        --section Occupancy --section LaunchStats --section SpeedOfLight --section MemoryWorkloadAnalysis} -k regex:rans -c 1 \
        --import-source no -f -o $rep python3 -P bench/decode.py --profile ${profiles[$i]} > $rep.log 2>&1; echo "[profile $i: exit $?]"
    grep -E "exact|Error|error" $rep.log | tail -3
    ncu -i $rep.ncu-rep --page details > $OUT/profile${i}_details.txt 2>&1
    grep -E "Warp Cycles Per Issued|Achieved Occupancy|Issued Ipc|Duration|Registers Per|L1/TEX Cache Throughput|L1/TEX Hit|Mem Pipes Busy|Compute \(SM\) Throughput|DRAM Throughput|Memory Throughput" $OUT/profile${i}_details.txt
  done
fi
if [ "${GEN_S:-0}" != 0 ]; then
  XLA_FLAGS="${GEN_XLA_FLAGS:-${XLA_FLAGS:-}}" timeout ${GEN_S} python3 -P bench/generate.py --models "${MODELS:-smollm2-135m,llama-3.2-1b,llama-3-8b}" \
      --modes "${MODES:-bf16,bf16-lossless compressed,bf16-lossless decoded,bf16-lossless offload,int8 compressed;llama-3.2-1b=bf16|bf16-lossless compressed|int8 compressed;llama-3-8b=bf16|bf16-lossless compressed}" \
      --new-tokens 64 --repeats 2 ${GEN_ARGS:-} --out $OUT/generate.json 2>&1 | tee $OUT/generate.log | tail -30; echo "[generate: exit ${PIPESTATUS[0]} (124: cut by its time limit)]"
fi
if [ "${MEMORY_S:-0}" != 0 ]; then
  timeout ${MEMORY_S} python3 -P bench/memory.py --out $OUT/memory.json ${MEMORY_ARGS:-} 2>&1 | tee $OUT/memory.log | tail -20; echo "[memory: exit ${PIPESTATUS[0]} (124: cut by its time limit)]"
fi
if [ "${LOAD_S:-0}" != 0 ]; then
  timeout ${LOAD_S} python3 -P bench/load.py --out $OUT/load.json ${LOAD_ARGS:-} 2>&1 | tee $OUT/load.log | tail -20; echo "[load: exit ${PIPESTATUS[0]} (124: cut by its time limit)]"
fi
if [ "${STEP_S:-0}" != 0 ]; then  # one generation step on the device timeline, beside the copy roofline
  timeout ${STEP_S} python3 -P bench/step_profile.py ${STEP_ARGS:---models llama-3-8b --modes bf16 --batches 1,16 --prefill 1024} \
      --out $OUT/step.json 2>&1 | tee $OUT/step.log | tail -40; echo "[step: exit ${PIPESTATUS[0]} (124: cut by its time limit)]"
fi
if [ "${MATMUL_S:-0}" != 0 ]; then  # the forward's skinny matmuls: in place from the stack against XLA
  timeout ${MATMUL_S} python3 -P bench/matmul.py ${MATMUL_ARGS:-} --out $OUT/matmul.json 2>&1 | tee $OUT/matmul.log | tail -60; echo "[matmul: exit ${PIPESTATUS[0]} (124: cut by its time limit)]"
fi
