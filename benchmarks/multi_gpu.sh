#!/usr/bin/env bash
# Training on two GPUs of one host (device kind nvidia-h200-x2), in parts that each fit one
# 10-minute device command. Tables go to stdout and $OUT/<part>.md, the runs' errors to
# $OUT/<part>.err ($OUT defaults to runs/multi_gpu).
#
#   bash benchmarks/multi_gpu.sh links     # how the GPUs are linked, and one block's collectives over them
#   bash benchmarks/multi_gpu.sh scaling   # Llama-3.2-1B shape, seq 4096 x 4 per GPU, on 1 and on 2 GPUs
#   bash benchmarks/multi_gpu.sh 8b        # Llama-3.1-8B, seq 8192 x 1 per GPU, on 2 GPUs
#   bash benchmarks/multi_gpu.sh 8b-fp32   # the same with float32 master weights (as torchtitan trains)
#   bash benchmarks/multi_gpu.sh profile   # 2 steps of the 1B shape on 2 GPUs, kernel by kernel, exposed NCCL time
#
# Arguments after the part go to benchmarks/train.py, e.g. FSDP2's settings to compare:
#   bash benchmarks/multi_gpu.sh scaling --fsdp-prefetch 2 --fsdp-keep-gathered
#
# transformers + liger-kernel needs liger-kernel: installed, or its wheel carried in .whl/
# (benchmarks/README.md says how to fetch it).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/multi_gpu}
mkdir -p "$out"
# NVLink multicast off in every process (ligerzoo's init_distributed sets them too; transformers'
# runs start NCCL through the same function, and this covers anything that starts it earlier).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ! python3 -c "import liger_kernel" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/liger-site .whl/*.whl
    export PYTHONPATH=/tmp/liger-site${PYTHONPATH:+:$PYTHONPATH}
fi

part=${1:-}
case "$part" in
    links)
        nvidia-smi topo -m 2>&1 | tee "$out/links.md"
        python3 -m torch.distributed.run --standalone --nproc_per_node "$(nvidia-smi -L | wc -l)" \
            benchmarks/collectives.py 2> "$out/links.err" | tee -a "$out/links.md"
        exit ;;
    scaling) args=(--gpus 1 2 --checkpointing full --peers ligerzoo-bf16-master hf-liger) ;;
    8b) args=(--shape llama-8b --seq 8192 --batch 1 --steps 8 --gpus 2 --checkpointing full selective
              --peers ligerzoo-bf16-master hf-liger) ;;
    8b-fp32) args=(--shape llama-8b --seq 8192 --batch 1 --steps 8 --gpus 2 --checkpointing full selective
                   --peers ligerzoo) ;;
    profile) args=(--gpus 2 --steps 6 --checkpointing full --peers ligerzoo-bf16-master hf-liger
                   --profile "$out/profile") ;;
    *) echo "usage: bash benchmarks/multi_gpu.sh links|scaling|8b|8b-fp32|profile" >&2; exit 2 ;;
esac
python3 benchmarks/train.py "${args[@]}" "${@:2}" 2> "$out/$part.err" | tee "$out/$part.md"
