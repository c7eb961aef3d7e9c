#!/usr/bin/env bash
# Named GPU steps, so that one device call runs several with a time limit each and leaves every
# step's log and JSON under $OUT even when a later step runs out of time.
#
#   bash benchmarks/gpu_steps.sh <commit> STEP[:seconds] [STEP[:seconds] ...]
#
# The tp steps need a 2-GPU kind (the device tool's `kind: nvidia-h100-x2`); the others use one GPU.
# Steps (rough seconds on an H100 when the machine is warm):
#   tests      every GPU test: tests/test_gpu*.py and tests/kernels -m gpu            (~560: 9 model
#              tests took 330 s and the 224 kernel tests ~200 s on 2026-12-06; a call of its own)
#   tests_prefill  the kernel GPU tests and the model GPU tests of prefill (the fold's among them): the part of
#              `tests` that changed since its last run, for a call too short for all of it (~310)
#   tests_stack  the stack's and the fold's kernels on CUDA (tests/kernels/test_lora_stacked.py and
#              test_fold_mask.py, unmarked: they run on the GPU where there is one) and their CUDA-graph model
#              tests (decode stacked, prefill folded) (~150 guessed)
#   load       benchmarks/adapter_load.py --device cuda: load vs read, activation (#22) (~60)
#   scale      benchmarks/adapters_at_scale.py: 1,000 adapters, Zipf mixes (#22)      (~550: writing and
#              loading the adapters took 72 s, and 295 s did not reach the first timed step)
#   scale_turnover  the same with --turnover 128 --lookahead 4: continuous batching, requests of
#              128 decode steps on average (#22) (~200: 2026-12-06, commit 6a01199)
#   decode64   decode_overhead.py --batches 64: 1, 8, 32 adapters, 32 slots (#15; 332 s on 2026-12-07 18:13,
#              three runs in every cell)
#   moe        decode_overhead.py --model moe, three runs side by side (#17; 6 layers, 18.4 GiB a run) (~215)
#   audio      audio_prefill.py, two compilations sharing the GPU (three of ~30 GB do not fit an
#              H100's 80 GB: two of three ran out of memory on 2026-12-06), then a third (#20) (~540)
#   tp         tp_decode.py --batches 1,16: decode on a 2-GPU tensor-parallel 7B-shaped LM, CUDA graphs
#              (#23; NEEDS A 2-GPU KIND: nvidia-h100-x2; unrun so far, the limit is a guess: ~560)
#   tp64       tp_decode.py --batches 64, the same (#23, 2 GPUs)                             (~560)
#   tpsplit    tp_decode.py --batches 1,16 --tp-lora-a sharded: A of column targets split along the rank,
#              the shrinks all-gathered (#23's fully sharded variant, 2 GPUs)                  (~560)
#   tpnocg     tp_decode.py --batches 1,16 --mode default: without CUDA graphs, for when reduce-overhead
#              cannot capture the collectives (#23, 2 GPUs)                                   (~560)
#   prefill_a  prefill_overhead.py --cases a: 8 requests, one 448x448 image each (#16); 3 compilations,
#              two at once sharing the GPU, then the third (~400, estimated from the audio step's
#              compile times: not run yet)
#   prefill_b  the same, case b: 32 requests, blocks of 6 forwards (~530 estimated; where the first
#              two runs take longer, the budget skips the third: run it again with --runs 1, --merge)
#   prefill_c  the same, case c: the mixed prefill/decode step (~400 estimated)
#   kvariants  kernel_bench.py at decode rows with launch variants: one split (no atomics, no memset),
#              four splits, the row path up to 16 rows (#15's memset and in-step kernel time; ~120, unrun)
#   kprefill   kernel_bench.py at prefill rows: the tower block's shapes at 8,192 rows and the LM layer's at
#              2,584 and 8,192 (#16 case a's), 8 adapters, 8 slots as case a's: the defaults against the
#              defaults before 2026-12-06 19:00 ("before": 64-wide steps, splits up to the program target),
#              each kernel's device time, the base GEMMs and the base GEMMs with LoRA folded in (--fold)
#              (#16; ~40 s on 2026-12-06 with four variants)
#   prefill_a_fold, prefill_b_fold, prefill_c_fold  prefill_X_graphs with mmlora_fx.compile(fold_min_rows=512):
#              LoRA folded into the base GEMMs of q, o, gate, up and the tower's qkv, proj, fc1 at prefill (#16; a ran on
#              2026-12-07 one run after another, ~200 s each, two of three in the budget: now every case runs two at
#              once sharing an H100 (28-30 GiB a run), b three at once on an H200 (add runs and merge)).
#              Case b's 32 slots of rank 16 (512 columns) are past folding.FOLD_MAX_WIDTH: nothing folds there
#              (compile warns), so prefill_b_fold and prefill_b_flex run the kernels; `kfold` checks that rule
#   prefill_a_flex, prefill_b_flex, prefill_c_flex  prefill_X_fold with --tower-attention flex for both models: the
#              tower's attention as flex_attention over a same-image block mask (mmlora_fx/tower_attention.py), one
#              graph for the tower instead of ~5 compiled regions a block (#16; on 2026-12-07 a ran in 391 s:
#              +12.2%; c two runs in 220 s and a third alone in 200 s: +12.2%; b one run alone in 261 s (the
#              step; the run itself 245 s): +13.7%;
#              compare the base with prefill_X_fold's base run in the same session: both are reported)
#   tower_check  tower_attention_check.py: the flex tower attention alone at the 7B tower's shape, 8 and 32 images:
#              compiles on CUDA (head dim 80), equals per-image SDPA, its time against the SDPA loop (#16; ~90)
#   prefill_profile_flex  prefill_profile_graphs with the fold and the flex tower, for both models (#16; unrun, ~200)
#   kfold      kernel_bench.py --fold --per-op at case a's shapes (tower 8,192 rows, LM 2,584; 8 slots) and case b's
#              (32,768 and 10,336; 32 slots): LoRA folded into the base GEMMs, x written in by its producer or
#              copied in, per op, against the base GEMMs and the Triton kernels (#16's lead; unrun, ~120 guessed)
#   kepilogue  kernel_bench.py --epilogue at case b's shapes (tower 32,768 rows, LM 10,336; 32 slots) and case a's tower
#              (8,192; 8): kernels/gemm_lora.py, our Triton GEMM without and with each row's expand in its epilogue, per
#              op and config, against cuBLAS and cuBLAS plus the LoRA kernels (--profile: the shrink's and expand's
#              time). It pays where its GEMM + epilogue - cuBLAS < the expand kernel's time (#16 case b; unrun, ~300
#              guessed: a third of the limit a shape, each writing its JSON when done). Run tests_epilogue first
#   tests_epilogue  kernels/gemm_lora.py's tests on CUDA: bf16 at the four configs kepilogue times (~60 guessed)
#   kstack     kernel_bench.py --stack at decode rows: the base GEMMs with every slot's A stacked under each
#              weight plus one expand launch per op (stack_max_rows' path), against the base GEMMs and the
#              Triton kernels; 8 slots (adapters 1, 8) and 32 slots (1, 8, 32) (#15; unrun, ~150 guessed)
#   decode_stack  decode_overhead.py --batches 1,16 --mixes 1,8 --stack-max-rows 16: the decode table with the
#              shrink in the base GEMMs (8 slots; the base shares the stacked weights' views) (#15; unrun, ~560)
#   decode_slots8  the same without the stack: its reference at 8 slots (the table before used 32) (#15; ~560)
#   decode_stack_graph  decode_stack with --stack-expand inductor: the language model's expand as graph ops that
#              Inductor fuses into the kernels reading the outputs, no LoRA launch but one row-slot op a step
#              (#15; unrun, ~560)
#   decode_prepare  decode_slots8 with --served-call: ours' steps through mm(..., adapter_names=...), what a server
#              calling it every step pays on the host (prepare: no table writes for an unchanged batch since
#              2026-12-07) (#15; ~560)
#   decode_stack_shrink  decode_stack_graph with --stack-shrink inductor: the shrink as graph ops too (one [rows, rank]
#              reduction a call), the base GEMMs as they are (#15; unrun in this form. The per-column form before it
#              ran out of the 570 s on 2026-12-07: ours' b1 first call took 360-368 s in each of the 3 runs compiling
#              at once, against 49-54 s for the kernels and 55-60 s for the stack: no timing reached)
#   decode_stack_columns  the same with --stack-shrink inductor_columns (the per-column form; one run, --runs 1, as
#              its compile is long: ~560)
#   prefill_a_graphs  prefill_overhead.py --cases a --mode reduce-overhead: both models' graphs in CUDA
#              graphs (fixed shapes: one capture each), what graphs buy the base and ours (#16; 283 s on an
#              H100 on 2026-12-06: +19.4%, then 289 s and +16.8% after the prefill-tile change)
#   prefill_b_graphs, prefill_c_graphs  the same for cases b and c (CUDA graphs are the base's better
#              compile, so these are the figures that count; c: 257 s on an H100 on 2026-12-06, +18.4%;
#              b unrun: its memory under graphs is untested, its limit a guess)
#   profile_stack  e2e.py --parts profile --profile-paths defaults,stack16,stack16_graph,stack16_shrink: the decode
#              step's kernels, LoRA time and idle at batch 1 and 16 (8 slots, dynamic=False), the kernels against the
#              stack with its expand kernel, with the graph expand, and with the graph shrink and expand, one
#              compilation each (#15; on 2026-12-07 it ran out of its 420 s after the base, the kernels and the stack:
#              run profile_graph for the other two)
#   profile_graph  profile_stack's graph paths only (stack16_graph, stack16_shrink) against the base (#15; ~400 guessed)
#   profile_shrink  the graph shrink alone (stack16_shrink) against the base, for a short call (#15; ~250 guessed)
#   profile_columns  the per-column graph shrink (stack16_columns) against the base (#15; ~450 guessed: its compile)
#   tests_graph  the CUDA-graph decode tests of the graph expand and the graph shrinks (tests/test_gpu.py -k
#              "stacked and inductor": 5 tests, tiny model; on 2026-12-07 one passed in the 130 s given: ~450)
#   profile_rows16  e2e.py --parts profile --profile-paths defaults,rows16: the decode step's kernels, LoRA
#              time and idle at batch 1 and 16, ours as it is and with the row path up to 16 rows (no
#              memset, no tile search), against one base (#15; one compilation each, ~210)
#   host_profile  host_cost.py --device cuda --profile: host µs a LoRA op call with real launches, and how
#              much of it is our launcher and how much Triton's launch path (#16; ~60)
#   prefill_profile  prefill_host_profile.py --case a: where the host's time goes in one prefill forward,
#              base against ours (#16's diagnosis; one compilation each, ~110)
#   prefill_profile_graphs  the same with both models in CUDA graphs (--mode reduce-overhead): where ours'
#              14 ms more host time a forward goes under graphs (#16; unrun, ~200 guessed)
#   profile_stack_host  the base, the kernels and the stack (stack_max_rows=16) profiled, each step's host calls
#              too (top_host_ms_and_count, host_calls_per_step: graph launches, any mmlora:: op run from the
#              host): why the stack's replays took ~1.2 ms more host time than the base's at batch 1 on
#              2026-12-07 while the graph expand's took 0.2 ms more (#15; ~330)
#   kgemv      gemv_lora_bench.py: one decode row's linear with its LoRA in one launch (kernels/gemv_lora.py), per op
#              of the 7B layer, against cuBLAS alone and cuBLAS plus the LoRA kernels (#15's batch-1 lead: no LoRA
#              launch at all). Ran on 2026-12-07 in 22 s with five configs; now eight (more programs, wider K
#              steps, 8 warps) and small ops with at least ~100 MB of copies (k and v's 8 fit in L2) (~60)
#   tests_gemv  the fused GEMV's kernel tests on CUDA and its CUDA-graph decode test at one row (#15; 104 s on
#              2026-12-07, both passed)
#   decode_b1  decode_overhead.py --batches 1 --mixes 1: batch 1 on the LoRA kernels, 3 compilations: decode_gemv's
#              reference, to run beside it in one session (#15; ~140)
#   decode_gemv  decode_overhead.py --batches 1 --mixes 1 --fused-gemv: batch 1 with the fused GEMV, 3 compilations (#15;
#              113 s on 2026-12-07 15:10: +3.0%, beside decode_b1's +6.9% in 111 s)
#   decode_b1_slots8, decode_gemv_slots8  the same two with 8 slots (`--mixes 1,8`: the script's max_loras is its
#              largest mix; batch 1 runs mix 1 only): whether the slots a server keeps change either (#15; ~150 each)
#   profile_gemv  e2e profile of the base, the kernels and the fused GEMV at batch 1 and 16 (16 is the kernels') (#15; ~330)
#   profile64  e2e profile at batch 64 (8 slots, 8 adapters): the base, the kernels and the stack up to 64 rows
#              (`stack_max_rows=64`): kernels a step, LoRA time, idle; what bounds batch 64 (#15; unrun, ~300 guessed)
#   decode64_stack  decode64 with --stack-max-rows 64: the batch-64 table with every slot's shrink in the base GEMMs
#              (32 slots: every slot's A read a step) (#15; unrun, ~450 guessed)
#   tests_sums  the split sums reduced in the shrink (launch_config.SUMS_IN_KERNEL) on CUDA: the op at the 7B layer's
#              decode shapes, bound and replayed, and in a CUDA graph with new batches; the counters back at 0
#              after each; tiny-qwen2-vl's CUDA-graph decode forced onto it, equal to eager (#15; on 2026-12-07 the
#              43 kernel tests passed in ~100 s, the model test ran out of the 110 s: give it ~200)
#   ksums      kernel_bench.py at 16 and 64 rows (8 and 32 slots), the default (memset + atomics) against the sums
#              reduced in the shrink, each kernel's device time (#15; 32 s on 2026-12-07: the first form 3-11 µs a
#              layer slower)
#   profile_sums  e2e profile at batches 16 and 64 (8 slots): the base, the kernels, the kernels with the sums in
#              the shrink: kernels a step (112 memsets fewer), idle (#15; unrun, ~330 guessed)
#   decode16, decode16_sums  decode_overhead.py --batches 16 --mixes 1,8 (8 slots), without and with
#              --sums-in-kernel: run both in one session (#15; unrun, ~300 each guessed)
#   decode64_sums  decode64 with --sums-in-kernel (32 slots; compare with decode64 of the same session) (#15; ~450)
#   The profile_* steps run with TORCH_LOGS=perf_hints: Inductor says there why it leaves a graph out of CUDA
#   graphs (the profiles record the count, cudagraph_skips_so_far).
# A step's default limit is the figure above plus a margin; `STEP:seconds` sets it. Steps run in
# the order given; one that fails or times out is logged and the next one runs. At the end every step's
# output, logs included, is packed into $OUT/results.tar.gz (gpu.txt stays beside it).
set -uo pipefail
commit=${1:?usage: gpu_steps.sh <commit> STEP[:seconds] ...}
shift
out=${OUT:-/tmp/mmlora-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/gpu.txt"

declare -A limit=([tests]=580 [tests_prefill]=340 [tests_stack]=240 [load]=120 [scale]=580 [scale_turnover]=580 [decode64]=480 [decode64_stack]=540 [profile64]=360 [moe]=580 [audio]=540 [tp]=580 [tp64]=580 [tpnocg]=580 [tpsplit]=580 [prefill_a]=580 [prefill_b]=580 [prefill_c]=580 [prefill_a_graphs]=580 [prefill_b_graphs]=580 [prefill_c_graphs]=580 [prefill_a_fold]=580 [prefill_c_fold]=580 [prefill_b_fold]=580 [prefill_a_flex]=580 [prefill_c_flex]=580 [prefill_b_flex]=580 [prefill_profile_flex]=400 [tower_check]=150 [kvariants]=200 [kprefill]=300 [kfold]=200 [kstack]=200 [kepilogue]=580 [tests_epilogue]=120 [decode_stack]=580 [decode_slots8]=580 [decode_stack_graph]=580 [decode_stack_shrink]=580 [decode_stack_columns]=580 [decode_prepare]=580 [tests_graph]=450 [prefill_profile]=400 [prefill_profile_graphs]=400 [profile_rows16]=330 [profile_stack]=400 [profile_graph]=420 [profile_stack_host]=360 [kgemv]=240 [tests_gemv]=200 [decode_gemv]=580 [decode_b1]=300 [decode_gemv_slots8]=300 [decode_b1_slots8]=300 [profile_gemv]=360 [profile_shrink]=330 [profile_columns]=480 [host_profile]=120 [tests_sums]=150 [ksums]=240 [profile_sums]=400 [decode16]=400 [decode16_sums]=400 [decode64_sums]=540)
run_step() {
    local step=$1 seconds=$2
    case $step in
        tests) timeout "$seconds" python3 -m pytest -o addopts="" -q -p no:cacheprovider -m gpu \
                   tests/test_gpu.py tests/test_gpu_targets.py tests/kernels
               # Kernel files without the gpu mark run on CUDA where there is one.
               timeout 120 python3 -m pytest -o addopts="" -q -p no:cacheprovider \
                   tests/kernels/test_lora_stacked.py tests/kernels/test_fold_mask.py tests/kernels/test_gemv_lora.py \
                   tests/kernels/test_gemm_lora.py ;;
        tests_prefill) timeout "$seconds" python3 -m pytest -o addopts="" -q -p no:cacheprovider -m gpu \
                           tests/kernels "tests/test_gpu.py" -k "kernels or prefill" ;;
        tests_graph) timeout "$seconds" python3 -m pytest -o addopts="" -q -p no:cacheprovider -m gpu \
                         tests/test_gpu.py -k "stacked and inductor" ;;
        tests_stack) timeout "$seconds" python3 -m pytest -o addopts="" -q -p no:cacheprovider \
                         tests/kernels/test_lora_stacked.py tests/kernels/test_fold_mask.py \
                     && timeout "$seconds" python3 -m pytest -o addopts="" -q -p no:cacheprovider -m gpu \
                         tests/test_gpu.py -k "stacked or folded" ;;
        load) timeout "$seconds" python3 benchmarks/adapter_load.py --device cuda --repeats 9 \
                  --json "$out/adapter_load.json" --commit "$commit" ;;
        scale) timeout "$seconds" python3 benchmarks/adapters_at_scale.py --out "$out/at_scale" --commit "$commit" ;;
        scale_turnover) timeout "$seconds" python3 benchmarks/adapters_at_scale.py --out "$out/at_scale_turnover" \
                            --turnover 128 --lookahead 4 --commit "$commit" ;;
        decode64) timeout "$seconds" python3 benchmarks/decode_overhead.py --out "$out/decode64" --batches 64 \
                      --budget-s $((seconds - 20)) --commit "$commit" ;;
        moe) timeout "$seconds" python3 benchmarks/decode_overhead.py --model moe --out "$out/moe" --batches 1,16,64 \
                 --runs 3 --steps 50 --rounds 4 --budget-s $((seconds - 20)) --commit "$commit" ;;
        audio) timeout "$seconds" python3 benchmarks/audio_prefill.py --out "$out/audio" --gpus 2 --share-gpu \
                   --budget-s $((seconds - 20)) --commit "$commit" ;;
        tp) timeout "$seconds" python3 benchmarks/tp_decode.py --gpus 2 --out "$out/tp" --batches 1,16 \
                --budget-s $((seconds - 20)) --commit "$commit" ;;
        tp64) timeout "$seconds" python3 benchmarks/tp_decode.py --gpus 2 --out "$out/tp64" --batches 64 \
                  --budget-s $((seconds - 20)) --commit "$commit" ;;
        tpsplit) timeout "$seconds" python3 benchmarks/tp_decode.py --gpus 2 --out "$out/tpsplit" --batches 1,16 \
                     --tp-lora-a sharded --budget-s $((seconds - 20)) --commit "$commit" ;;
        tpnocg) timeout "$seconds" python3 benchmarks/tp_decode.py --gpus 2 --out "$out/tpnocg" --batches 1,16 \
                    --mode default --budget-s $((seconds - 20)) --commit "$commit" ;;
        prefill_a|prefill_b|prefill_c)
            # One case a call: a run compiles both models per case (60-80 s each at two runs at once).
            local block=(); [[ $step == prefill_b ]] && block=(--block 6)
            timeout "$seconds" python3 benchmarks/prefill_overhead.py --out "$out/$step" --cases "${step#prefill_}" \
                --gpus 2 --share-gpu "${block[@]}" --budget-s $((seconds - 20)) --commit "$commit" ;;
        kvariants) timeout "$seconds" python3 benchmarks/kernel_bench.py --rows 1,4,16,64 --adapters 1,8 --skip-torch \
                       --repeat-ms 40 --variants '{"one_split": {"max_splits": 1}, "four_splits": {"max_splits": 4}, "row16": {"per_row_max_rows": 16}}' \
                       --json "$out/kvariants.json" --markdown "$out/kvariants.md" --commit "$commit" ;;
        kprefill) for shape_rows in tower:8192 layer:2584,8192; do
                      timeout $((seconds / 2)) python3 benchmarks/kernel_bench.py --shape "${shape_rows%%:*}" \
                          --rows "${shape_rows##*:}" --adapters 8 --slots 8 --fold --skip-torch --repeat-ms 40 --profile \
                          --variants '{"before": {"block_k": 64, "max_splits": 64}, "k64": {"block_k": 64}, "two_splits": {"max_splits": 2}}' \
                          --json "$out/kprefill-${shape_rows%%:*}.json" --markdown "$out/kprefill-${shape_rows%%:*}.md" \
                          --commit "$commit"
                  done ;;
        kfold) for shape_rows_adapters in tower:8192:8 layer:2584:8 tower:32768:32 layer:10336:32; do
                   IFS=: read -r shape rows adapters <<< "$shape_rows_adapters"
                   timeout $((seconds / 4)) python3 benchmarks/kernel_bench.py --shape "$shape" --rows "$rows" \
                       --adapters "$adapters" --slots "$adapters" --fold --per-op --skip-torch --repeat-ms 40 \
                       --json "$out/kfold-$shape-$rows.json" --markdown "$out/kfold-$shape-$rows.md" --commit "$commit"
               done ;;
        tests_epilogue) timeout "$seconds" python3 -m pytest -o addopts="" -q -p no:cacheprovider \
                            tests/kernels/test_gemm_lora.py ;;
        kepilogue) for shape_rows_adapters in tower:32768:32 layer:10336:32 tower:8192:8; do
                       IFS=: read -r shape rows adapters <<< "$shape_rows_adapters"
                       timeout $((seconds / 3)) python3 benchmarks/kernel_bench.py --shape "$shape" --rows "$rows" \
                           --adapters "$adapters" --slots "$adapters" --per-op --profile --skip-torch --repeat-ms 40 \
                           --epilogue 128x128x64x8x3,128x256x64x8x3,128x128x64x4x4,64x128x64x4x4 \
                           --json "$out/kepilogue-$shape-$rows.json" --markdown "$out/kepilogue-$shape-$rows.md" \
                           --commit "$commit"
                   done ;;
        kstack) for slots_adapters in 8:1,8 32:1,8,32; do
                    timeout $((seconds / 2)) python3 benchmarks/kernel_bench.py --rows 1,16,64 --slots "${slots_adapters%%:*}" \
                        --adapters "${slots_adapters##*:}" --stack --skip-torch --profile --repeat-ms 40 \
                        --json "$out/kstack-${slots_adapters%%:*}.json" --markdown "$out/kstack-${slots_adapters%%:*}.md" \
                        --commit "$commit"
                done ;;
        decode_stack|decode_slots8|decode_stack_graph|decode_stack_shrink|decode_stack_columns|decode_prepare)
            local stack=(); [[ $step == decode_stack* ]] && stack=(--stack-max-rows 16)
            [[ $step == decode_prepare ]] && stack=(--served-call)
            [[ $step == decode_stack_graph || $step == decode_stack_shrink || $step == decode_stack_columns ]] &&
                stack+=(--stack-expand inductor)
            [[ $step == decode_stack_shrink ]] && stack+=(--stack-shrink inductor)
            [[ $step == decode_stack_columns ]] && stack+=(--stack-shrink inductor_columns --runs 1)
            timeout "$seconds" python3 benchmarks/decode_overhead.py --out "$out/$step" --batches 1,16 --mixes 1,8 \
                "${stack[@]}" --budget-s $((seconds - 20)) --commit "$commit" ;;
        prefill_a_fold|prefill_b_fold|prefill_c_fold|prefill_a_flex|prefill_b_flex|prefill_c_flex)
            # Ours' folded weights are copies (the base keeps its own). Case a peaked at 29.1 GiB a run on
            # 2026-12-07, case c 29.5, case b (flex tower; nothing folds at its 32 slots) 28.3: two runs at once
            # share an H100's 79 GiB, three an H200's 139. Case b runs in blocks of 6 forwards; its step took 261 s
            # with one run alone on an H100 (2026-12-07), so a call gets two at once: add runs and merge
            # (prefill_overhead.py --merge).
            local case=${step#prefill_}; case=${case%_*}
            local share=(--gpus 2 --share-gpu); [[ $case == b ]] && share+=(--block 6)
            [[ $case == b ]] && (( $(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1) > 120000 )) &&
                share[1]=3
            local tower=(); [[ $step == *_flex ]] && tower=(--tower-attention flex)
            timeout "$seconds" python3 benchmarks/prefill_overhead.py --out "$out/$step" --cases "$case" \
                --mode reduce-overhead --fold-min-rows 512 "${share[@]}" "${tower[@]}" --budget-s $((seconds - 20)) \
                --commit "$commit" ;;
        prefill_a_graphs|prefill_b_graphs|prefill_c_graphs)
            local case=${step#prefill_}; case=${case%_graphs}
            local block=(); [[ $case == b ]] && block=(--block 6)
            timeout "$seconds" python3 benchmarks/prefill_overhead.py --out "$out/$step" --cases "$case" \
                --mode reduce-overhead --gpus 2 --share-gpu "${block[@]}" --budget-s $((seconds - 20)) --commit "$commit" ;;
        tests_sums) timeout "$seconds" python3 -m pytest -o addopts="" -q -p no:cacheprovider -m gpu \
                        tests/kernels/test_lora_add.py tests/test_gpu.py -k "split_sums" ;;
        ksums) for slots_adapters in 8:1,8 32:1,8,32; do
                   timeout $((seconds / 2)) python3 benchmarks/kernel_bench.py --rows 16,64 --slots "${slots_adapters%%:*}" \
                       --adapters "${slots_adapters##*:}" --skip-torch --profile --repeat-ms 40 \
                       --variants '{"sums": {"sums_in_kernel": true}}' \
                       --json "$out/ksums-${slots_adapters%%:*}.json" --markdown "$out/ksums-${slots_adapters%%:*}.md" \
                       --commit "$commit"
               done ;;
        profile_sums) TORCH_LOGS=perf_hints timeout "$seconds" python3 benchmarks/e2e.py --out "$out/profile_sums" \
                          --parts profile --profile-batches 16,64 --profile-paths defaults,sums --commit "$commit" ;;
        decode16|decode16_sums|decode64_sums)
            local batch=16 mixes=(--mixes 1,8) sums=(); [[ $step == decode64* ]] && batch=64 mixes=()
            [[ $step == *_sums ]] && sums=(--sums-in-kernel)
            timeout "$seconds" python3 benchmarks/decode_overhead.py --out "$out/$step" --batches $batch "${mixes[@]}" \
                "${sums[@]}" --budget-s $((seconds - 20)) --commit "$commit" ;;
        profile64) TORCH_LOGS=perf_hints timeout "$seconds" python3 benchmarks/e2e.py --out "$out/profile64" --parts profile \
                       --profile-batches 64 --profile-paths defaults,stack64 --commit "$commit" ;;
        decode64_stack) timeout "$seconds" python3 benchmarks/decode_overhead.py --out "$out/decode64_stack" --batches 64 \
                            --stack-max-rows 64 --budget-s $((seconds - 20)) --commit "$commit" ;;
        profile_stack) TORCH_LOGS=perf_hints timeout "$seconds" python3 benchmarks/e2e.py --out "$out/profile_stack" --parts profile \
                           --profile-paths defaults,stack16,stack16_graph,stack16_shrink --commit "$commit" ;;
        tests_gemv) timeout "$seconds" python3 -m pytest -o addopts="" -q -p no:cacheprovider tests/kernels/test_gemv_lora.py \
                    && timeout 150 python3 -m pytest -o addopts="" -q -p no:cacheprovider -m gpu tests/test_gpu.py \
                       -k "fused_gemv" ;;
        decode_b1|decode_b1_slots8|decode_gemv|decode_gemv_slots8)
            local mixes=1 fused=(); [[ $step == *_slots8 ]] && mixes=1,8  # max_loras: the largest mix
            [[ $step == decode_gemv* ]] && fused=(--fused-gemv)
            timeout "$seconds" python3 benchmarks/decode_overhead.py --out "$out/$step" --batches 1 --mixes "$mixes" \
                "${fused[@]}" --budget-s $((seconds - 20)) --commit "$commit" ;;
        profile_gemv) TORCH_LOGS=perf_hints timeout "$seconds" python3 benchmarks/e2e.py --out "$out/profile_gemv" --parts profile \
                          --profile-paths defaults,gemv --commit "$commit" ;;
        kgemv) timeout "$seconds" python3 benchmarks/gemv_lora_bench.py --json "$out/kgemv.json" --commit "$commit" ;;
        profile_stack_host) TORCH_LOGS=perf_hints timeout "$seconds" python3 benchmarks/e2e.py --out "$out/profile_stack_host" \
                                --parts profile --profile-paths defaults,stack16 --commit "$commit" ;;
        profile_graph) TORCH_LOGS=perf_hints timeout "$seconds" python3 benchmarks/e2e.py --out "$out/profile_graph" --parts profile \
                           --profile-paths stack16_graph,stack16_shrink --commit "$commit" ;;
        profile_shrink) TORCH_LOGS=perf_hints timeout "$seconds" python3 benchmarks/e2e.py --out "$out/profile_shrink" --parts profile \
                            --profile-paths stack16_shrink --commit "$commit" ;;
        profile_columns) TORCH_LOGS=perf_hints timeout "$seconds" python3 benchmarks/e2e.py --out "$out/profile_columns" --parts profile \
                             --profile-paths stack16_columns --commit "$commit" ;;
        profile_rows16) TORCH_LOGS=perf_hints timeout "$seconds" python3 benchmarks/e2e.py --out "$out/profile_rows16" --parts profile \
                            --profile-paths defaults,rows16 --commit "$commit" ;;
        host_profile) timeout "$seconds" python3 benchmarks/host_cost.py --device cuda --calls 500 --repeats 5 --launch-parts \
                          --profile --json "$out/host_profile.json" --commit "$commit" ;;
        prefill_profile) timeout "$seconds" python3 benchmarks/prefill_host_profile.py --out "$out/prefill_profile" \
                             --case a --commit "$commit" ;;
        prefill_profile_graphs) timeout "$seconds" python3 benchmarks/prefill_host_profile.py \
                                    --out "$out/prefill_profile_graphs" --case a --mode reduce-overhead --commit "$commit" ;;
        tower_check) timeout "$seconds" python3 benchmarks/tower_attention_check.py --out "$out/tower_check" \
                         --commit "$commit" ;;
        prefill_profile_flex) timeout "$seconds" python3 benchmarks/prefill_host_profile.py --out "$out/prefill_profile_flex" \
                                  --case a --mode reduce-overhead --fold-min-rows 512 --tower-attention flex --commit "$commit" ;;
        *) echo "unknown step $step"; return 2 ;;
    esac
}
for item in "$@"; do
    step=${item%%:*}
    seconds=${limit[$step]:-300}
    [[ $item == *:* ]] && seconds=${item##*:}
    start=$(date +%s)
    echo "== $step (limit ${seconds}s)"
    run_step "$step" "$seconds" > "$out/$step.log" 2>&1
    rc=$?
    echo "== $step rc=$rc in $(( $(date +%s) - start ))s"
    grep -v -i "warn" "$out/$step.log" | tail -15
done
# The device tool brings back only a few files a call (8; on 2026-12-07 a decode step's four JSON files were
# left out past the count): what the steps wrote, logs included, goes into one archive beside gpu.txt (each
# step's last lines are in the call's output already).
results=()
for entry in "$out"/*; do
    name=${entry##*/}
    [[ $name == gpu.txt || $name == results.tar.gz ]] || results+=("$name")
done
if (( ${#results[@]} )); then
    tar czf "$out/results.tar.gz" -C "$out" "${results[@]}" && (cd "$out" && rm -rf "${results[@]}")
    echo "== in results.tar.gz: ${results[*]}"
fi
