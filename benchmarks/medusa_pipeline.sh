#!/usr/bin/env bash
# Medusa end to end on the built-in corpus, one GPU: train a small Llama from scratch, train 4
# Medusa heads on it (trunk frozen), then decode at batch 1 with and without the heads
# (benchmarks/medusa_decode.py: tokens/s, mean accepted length, equality with plain greedy).
#   bash benchmarks/medusa_pipeline.sh [OUTPUT_DIR]      (default runs/medusa-pipeline)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/medusa-pipeline}
SHAPE="--model.hidden_size 768 --model.intermediate_size 2048 --model.num_hidden_layers 12
       --model.num_attention_heads 12 --model.num_key_value_heads 4 --model.max_position_embeddings 4096"
DATA="--data.seq_len 1024 --data.batch_size 16 --data.num_documents 60000"
python train.py --output_dir "$OUT_DIR/base" $SHAPE $DATA --max_steps 600 --checkpoint_every 0 \
    --train.lr 1e-3 --train.warmup_steps 50 --train.compile true --train.master_dtype bfloat16
python train.py --output_dir "$OUT_DIR/heads" --model.name "$OUT_DIR/base/hf" --data.tokenizer bytes $DATA \
    --max_steps 400 --checkpoint_every 0 --train.lr 2e-3 --train.warmup_steps 20 --train.master_dtype bfloat16 \
    --medusa.num_heads 4
python benchmarks/medusa_decode.py --model "$OUT_DIR/base/hf" --heads "$OUT_DIR/heads/medusa" --tokenizer bytes \
    --prompt-text "Ada found the red box by the river. Ada painted the old kite on the hill." \
    --new-tokens 256 --trees chain,small,mc_sim_7b_63
