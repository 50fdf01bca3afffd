#!/usr/bin/env bash
# The 4-GPU experiments, in one or a few device calls (each part fits a 10-minute call):
#   . .device/setup.sh && bash bench/gpu4_all.sh "$OUT" [mg] [pull] [internvl] [llava] [switch] [epd] [resize] [qwen1] [qwen4]
#                                                      [overhead] [epd4] [online4] [online1] [prefill] [e2e] [exact] [hybrid] [tower]
# (no parts: the first five, about 17 minutes on 4 x H200; `epd`: only the EPD deployment of the
# two rate sweeps, engine only, after a transfer change; `resize`: the InternVL sweep with images
# decoded (nvJPEG) and resized on the GPUs, model.image_decode=device model.image_resize=device; `prefill`, `e2e`, `exact`:
# one-GPU checks on GPU 0 — the prefill step's kernels, the offline end-to-end roofline share, exactness against
# transformers). The csrc extension is built first, with no
# time limit: a build killed half-way costs the next one its wait. It is built under build/csrc,
# which a warm device machine keeps between calls. Outputs stay few and small.
set -u
OUT=${1:?output directory}
shift
PARTS=${*:-mg pull internvl llava switch}
export RAY_AUTH_MODE=disabled
export EPD_CSRC_BUILD=${EPD_CSRC_BUILD:-$PWD/build/csrc}
HW=$(python3 -c "import torch; print('h200' if 'H200' in torch.cuda.get_device_name(0) else 'h100')")
echo "hardware=$HW parts=$PARTS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# the host's cores as the process may use them: a CPU quota below nproc caps the encode stage's host work
echo "host cpus: nproc $(nproc), cgroup cpu.max $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo n/a)"
python3 -c "from epd.csrc import block_ops; m = block_ops(); print('csrc cuda:', bool(m and m.has_cuda()))"
mkdir -p "$OUT"

experiment() {  # name, time limit, overrides...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" python3 -m epd.run "$@" hardware="$HW" logger=none hydra.run.dir="/tmp/runs/$name" 2>&1 | grep -E "^\| |rror:" | tail -16
  echo "$name: ${SECONDS}s -> $((SECONDS - t0)) s"
  mkdir -p "$OUT/$name" && cp /tmp/runs/"$name"/compare.* "$OUT/$name/" 2>/dev/null
}

EPD_ONLY=("~compare.deployments.pd_3p1d" "~compare.deployments.aggregated_4" compare.simulate=false)
# The recorded sweeps ran 24 requests per point, once; the experiments' defaults (200 requests x 3 seeds
# per point) take ~30 minutes per sweep on 4 GPUs, beyond one device call: QUICK="" runs them in full.
QUICK=${QUICK-workload.num_requests=24 compare.repeats=1}

for part in $PARTS; do
  case $part in
    mg) timeout 300 python3 bench/multi_gpu.py --out "$OUT/mg" --parts engine_tiny p2p 2>&1 | grep -E "identical|error" | head -20 ;;  # engine_tiny alone: ~140 s
    prefill)  # GPU 0: a loaded prefill step three ways (before / varlen / + Triton kernels), with and without 256 decode rows; attention paths
      CUDA_VISIBLE_DEVICES=0 timeout 90 python3 bench/attention_check.py 2>&1 | tail -3
      for d in 0 256; do
        CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/prefill_step.py --prompts 27 --length 601 --chunk 256 --decodes $d --profile \
          --out "$OUT/prefill_step_d$d.json" 2>&1 | grep -vi warn | grep -E "ms|category|vs before" | head -40
      done
      ;;
    e2e)  # GPU 0: offline end to end against the roofline, both recorded cases (each ~2-3 min with process start and ~33 s to ready)
      for c in ${E2E_CASES:-256:128:on_demand 512:256:on_demand 512:256:reserve}; do  # requests:tokens:kv_allocation
        IFS=: read -r n t kv <<< "$c"
        CUDA_VISIBLE_DEVICES=0 timeout 260 python3 bench/gpu_bench.py --sections ceil,e2e --requests "$n" --out-tokens "$t" \
          --kv-allocation "$kv" --out "$OUT/e2e_${n}x${t}_$kv.json" 2>&1 | grep -E "ceilings|engine e2e|inside|Batch:|preempt|rror" | tail -10
      done
      ;;
    tower)  # GPU 0: the vision tower from CUDA graphs: replay against eager, and a 32-image encode batch apart
      CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_tower_graphs.py 2>&1 | tail -2
      CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/encode_batch.py --images 32 --batches 6 --tower-sizes 1,2,4,8,16,32 --profile \
        --out "$OUT/encode_tower.json" 2>&1 | grep -vi warn | grep -E "spans|tower by size|ms  " | head -40
      ;;
    exact)  # GPU 0: the kernels on CUDA, and the families' greedy tokens against transformers (float32) with them
      CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fused_elementwise.py tests/test_device_fed_decode.py tests/test_decode_kernel.py 2>&1 | tail -2
      CUDA_VISIBLE_DEVICES=0 timeout 300 python3 bench/gpu_families.py --out "$OUT/qwen" --parts exact 2>&1 | grep -E "^\{|rror" | cut -c1-600
      ;;
    internvl) experiment internvl_rates 300 +experiment=paper_e2e_4gpu "compare.rates=[2.0,3.0,4.0]" $QUICK ;;
    pull) timeout 150 python3 bench/ipc_pull.py --out "$OUT/pull" 2>&1 | grep -vE "Warning|warn" | tail -24 ;;
    llava) experiment llava_rates 240 +experiment=paper_e2e_4gpu_llava $QUICK ;;
    epd)
      experiment internvl_epd 150 +experiment=paper_e2e_4gpu "compare.rates=[2.0,3.0,4.0]" "${EPD_ONLY[@]}" $QUICK
      experiment llava_epd 120 +experiment=paper_e2e_4gpu_llava "${EPD_ONLY[@]}" $QUICK
      ;;
    switch) experiment role_switching 300 +experiment=role_switching_gpu4 ;;
    qwen1)  # the Qwen2-VL families on GPU 0: exactness against transformers, the 7B shapes' sizes and speed
      CUDA_VISIBLE_DEVICES=0 timeout 400 python3 bench/gpu_families.py --out "$OUT/qwen" --models qwen2-vl-7b qwen2.5-vl-7b minicpm-v-2.6 2>&1 | grep -E "^\{|rror" | cut -c1-600
      ;;
    qwen4)  # each newer family's 7B-class shape in 2E1P1D on 4 GPUs (QWEN4_MODELS=minicpm-v-4.6: one of them; each ~4 min), the paper workload's photos (Qwen: at max_pixels 1 MP;
      # MiniCPM-V 2.6: 4 photos a request, as its SLO assumes)
      for m in ${QWEN4_MODELS:-qwen2-vl-7b qwen2.5-vl-7b minicpm-v-2.6 minicpm-v-4.6}; do
        t0=$SECONDS
        case $m in
          minicpm*) extra=(workload.images_per_request=4 workload.images_per_request_max=4) ;;  # 4.6: the hybrid LM
          *) extra=(model.max_pixels=1003520) ;;
        esac
        timeout 230 python3 -m epd.run +experiment=gpu4_epd model=$m "${extra[@]}" workload.num_requests=100 \
          workload.rate=1.0 hardware="$HW" logger=none hydra.run.dir="/tmp/runs/gpu4_$m" 2>&1 | grep -E "requests |TTFT|TPOT|SLO|throughput|ready|rror" | tail -8
        echo "gpu4_$m: $((SECONDS - t0)) s"
        mkdir -p "$OUT/qwen/gpu4_$m" && cp /tmp/runs/gpu4_"$m"/{summary,workers}.json "$OUT/qwen/gpu4_$m/" 2>/dev/null
      done
      ;;
    hybrid)  # GPU 0: MiniCPM-V 4.6's hybrid LM: exactness against transformers, the Triton decode update, its steps apart
      CUDA_VISIBLE_DEVICES=0 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_hybrid_lm.py -k "triton or graphs" 2>&1 | tail -1
      CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/hybrid_step.py --batches 1,8,32,64 --prefill 8x600,1x4096 --out "$OUT/hybrid_step.json" 2>&1 | grep -E "decode|prefill" | head -20
      CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/gpu_families.py --out "$OUT/qwen" --parts exact shapes --exact-models tiny-minicpmv4.6 --models minicpm-v-4.6 2>&1 | grep -E "^\{|rror" | cut -c1-900
      ;;
    overhead)  # TPOT of D in 2E1P1D against its bare decode step (requests with one image: E, P and IPC transfers run)
      timeout 240 python3 bench/engine_overhead.py --layout 2E1P1D --batches 1,8 --repeats 2 --modes async --out "$OUT/overhead_2e1p1d.json" 2>&1 \
        | grep -vE "Warning|warn" | tail -12
      ;;
    online1)  # GPU 0: the paper workload through the engine and through the server, aggregated on one GPU: the TTFT split
      for kind in ray online; do
        CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m epd.run +experiment=gpu4_aggregated deployment.aggregated.instances=1 \
          workload.num_requests=50 workload.rate=1 backend=$kind hardware="$HW" logger=none hydra.run.dir="/tmp/runs/online1_$kind" 2>&1 \
          | grep -E "requests |TTFT|TPOT|rror" | tail -4
        mkdir -p "$OUT/online1_$kind" && cp /tmp/runs/online1_"$kind"/{summary.json,batches.jsonl,requests.jsonl} "$OUT/online1_$kind/" 2>/dev/null
      done
      python3 -c "import json; d = json.load(open('$OUT/online1_online/summary.json')); print({k: round(v, 4) for k, v in d.items() if k.startswith('server_')})"
      ;;
    epd4|online4)  # gpu4_epd at 4 req/s, 200 requests: the engine (epd4), and the same workload through the server (online4)
      kind=ray; [ "$part" = online4 ] && kind=online
      t0=$SECONDS
      timeout 280 python3 -m epd.run +experiment=gpu4_epd workload.num_requests=200 workload.rate=4 backend=$kind hardware="$HW" \
        logger=none hydra.run.dir="/tmp/runs/$part" 2>&1 | grep -E "requests |TTFT|TPOT|SLO|throughput|ready|refused|rror" | tail -10
      echo "$part: $((SECONDS - t0)) s"
      mkdir -p "$OUT/$part" && cp /tmp/runs/"$part"/{summary.json,workers.json,config.yaml} "$OUT/$part/" 2>/dev/null
      ;;
    resize) experiment internvl_device_prep 330 +experiment=paper_e2e_4gpu "compare.rates=[2.0,3.0,4.0]" model.image_resize=device model.image_decode=device $QUICK ;;
    *) echo "unknown part $part" ;;
  esac
done
(cd /tmp/runs 2>/dev/null && tar czf "$OUT/records.tgz" */runs/*/summary.json */runs/*/workers.json */runs/*/stage_load.jsonl 2>/dev/null)
