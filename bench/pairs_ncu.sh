#!/usr/bin/env bash
# ncu on the production bf16-lossless kernel and the pair-symbol prototype, one launch each (bench/pairs_proto.py
# --profile). Run from the repository root on the GPU machine after bench/gpu_session.sh installed the package
# (PYTHONPATH=/tmp/site). Writes $OUT/pairs_ncu_{details.txt,raw.csv}; prints the lines that locate the limit.
set -u
OUT=${OUT:-/tmp/out}
timeout ${NCU_S:-240} ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
    --metrics l1tex__data_pipe_lsu_wavefronts_mem_lg_cmd_read.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__data_pipe_lsu_wavefronts.sum,l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed,l1tex__lsu_writeback_active.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_elapsed,lts__t_sectors_srcunit_tex_op_read.sum,dram__bytes_read.sum,dram__bytes_write.sum,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_drain_per_issue_active.ratio,smsp__average_warps_issue_stalled_tex_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio \
    -k regex:rans -c ${NCU_COUNT:-4} -f -o $OUT/pairs_ncu \
    python3 -P bench/pairs_proto.py --profile ${NCU_SHAPE:-layer} ${PAIRS_ARGS:-} > $OUT/pairs_ncu.log 2>&1
echo "[ncu: exit $?]"
ncu -i $OUT/pairs_ncu.ncu-rep --page details > $OUT/pairs_ncu_details.txt 2>&1
grep -E "^  rans|Duration|DRAM Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|Issued Ipc|Achieved Occupancy|Warp Cycles Per Issued|No Eligible|Registers Per|wavefronts|lsu|dram__bytes|lts__t_sectors|Mem Busy|Max Bandwidth|Mem Pipes Busy|L1/TEX Hit|L2 Hit|stalled" $OUT/pairs_ncu_details.txt | head -150
