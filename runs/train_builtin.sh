#!/usr/bin/env bash
# The recipe of kimi's built-in model (kimi/builtin/model): toolverse data -> 2k BPE in Kimi's token format (words
# kept apart from the space or quote before them, so a value is the same tokens in the question and in the call's
# JSON) -> packed shards with the assistant-only loss mask -> a 2M-parameter Kimi Linear model (KDA x3 + NoPE MLA
# with 4 heads, MoE 8 experts top-2 + 1 shared) trained with MuonClip under bf16 autocast in three WSD stages ->
# export -> held-out evaluation on every split.
#
#   bash runs/train_builtin.sh                 # everything, CPU, 1 thread
#   STEPS1=4 STEPS2=4 STEPS3=4 EPISODES=400 EVAL_N=3 OUT=/tmp/b EXPORT=/tmp/b/export bash runs/train_builtin.sh    # a smoke run
#
# Data, tokenizer and shards are byte-identical for the same toolverse version; training is seeded.
# Cost: 3,800 steps x 4,096 tokens = 15.6M tokens (the 11.4M-token shard set, 1.4 epochs) on one core of the shared
# 2-core dev box at 1,000-3,200 tokens/s: stage 1 72 min (heavily loaded box), stage 2 30 min, stage 3 23 min;
# about 90 min at the ~2,900 tokens/s of a free core, plus ~1 minute of data and tokenizer. Over the "about an
# hour" the issue allows.
# Result of this exact run (2026-11-22; toolverse, 100 episodes per split, greedy, closed loop unless noted):
#   validation loss (assistant tokens) 0.474 after stage 1, 0.170 after stage 2, 0.151 after stage 3;
#   iid: episode success 6% after stage 1 (nothing copied from the context), 24% after stage 2, 25% after stage 3;
#   stage 3, teacher-forced iid: parse 99.6%, JSON 100%, right tool 96.2%, call-vs-no-call 100%, schema-valid
#   48.9%, exact arguments 32.1%; other splits' success: compositional 0%, renamed 6% (held-out names: 0% right
#   tool), longer 4%, ood_values 14%, relevance 46%.
# Far below the issue's 80% success, so this model was NOT shipped to kimi/builtin/model. What fails now is
# mostly choosing parameter names: each parameter has two training spellings and the model picks by prior rather
# than by reading the declaration (schema-valid < 50%); copying values works for digits and only partly for words.

set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/builtin}          # work directory (ignored by git apart from this script)
EXPORT=${EXPORT:-kimi/builtin/model}
EPISODES=${EPISODES:-30000}       # training conversations written
STEPS1=${STEPS1:-1600}            # optimizer steps of 4,096 tokens, per stage
STEPS2=${STEPS2:-1200}
STEPS3=${STEPS3:-1000}
THREADS=${THREADS:-1}
EVAL_N=${EVAL_N:-100}             # episodes per evaluation split
PY=${PY:-python3}

mkdir -p "$OUT"
echo "== 1/6 toolverse data (verified; held-out splits on disjoint, deduplicated prompts)"
$PY -m kimi data synth --out "$OUT/data" --train "$EPISODES" --eval 0 --corpus 5000

echo "== 2/6 BPE tokenizer: 1,792 base ranks + Kimi's 256 special ids = 2,048"
$PY -m kimi tokenizer train --input "$OUT/data/corpus.txt" --vocab-size 2048 --split-word-prefix \
    --out "$OUT/tokenizer"

echo "== 3/6 token shards (assistant tokens are the only targets)"
$PY -m kimi data prepare --input "$OUT/data/train.jsonl" --tokenizer "$OUT/tokenizer" --out "$OUT/tokens" \
    --val-fraction 0.01 --no-progress

echo "== 4/6 model config"
cat > "$OUT/config.json" <<'JSON'
{"model_type": "kimi_linear", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384,
 "moe_intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "kv_lora_rank": 64,
 "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "num_experts": 8, "num_experts_per_token": 2,
 "num_shared_experts": 1, "routed_scaling_factor": 2.446, "first_k_dense_replace": 1, "rms_norm_eps": 1e-5,
 "linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4], "head_dim": 64, "num_heads": 2,
                        "short_conv_kernel_size": 4},
 "model_max_length": 4096, "torch_dtype": "bfloat16", "tie_word_embeddings": false,
 "bos_token_id": 1792, "eos_token_id": 1794, "pad_token_id": 2047}
JSON

echo "== 5/6 MuonClip training in three WSD stages (each: warmup 30 steps, lr 1e-2 held, last 20% decayed to 0)"
# Stage 2 and 3 start from the previous stage's last weights with a fresh optimizer and schedule. The stages are a
# record of how the run went, not a tuned curriculum: stage 1 learned the format but copied nothing from the
# context (a plateau at val loss ~0.6); in-context copying of digits, then of words, appeared early in stage 2.
train() {
    $PY -m kimi train --data "$OUT/tokens" --batch-tokens 4096 --seq-len 1024 --optimizer muonclip --lr 1e-2 \
        --schedule wsd --min-lr-ratio 0.0 --autocast bf16 --threads "$THREADS" --no-progress --resume \
        --val-every 200 --val-tokens 16384 --save-every 100 --keep 3 "$@"
}
warm() { echo $(( $1 < 30 ? 1 : 30 )); }
last() { printf "%s/step-%06d" "$1" "$2"; }
train --model-config "$OUT/config.json" --out "$OUT/stage1" --steps "$STEPS1" --warmup "$(warm "$STEPS1")" --seed 0
train --init-from "$(last "$OUT/stage1" "$STEPS1")" --out "$OUT/stage2" --steps "$STEPS2" --warmup "$(warm "$STEPS2")" \
    --seed 1
train --init-from "$(last "$OUT/stage2" "$STEPS2")" --out "$OUT/stage3" --steps "$STEPS3" --warmup "$(warm "$STEPS3")" \
    --seed 2

echo "== 6/6 export and evaluate"
last="$(last "$OUT/stage3" "$STEPS3")"
rm -rf "$EXPORT" && mkdir -p "$EXPORT"
cp "$last"/config.json "$last"/generation_config.json "$last"/*.safetensors "$last"/tiktoken.model \
   "$last"/tokenizer_config.json "$EXPORT"/
$PY -m kimi eval toolverse --model "$EXPORT" --splits all --n "$EVAL_N" --threads "$THREADS" | tee "$OUT/eval.txt"
tail -1 "$OUT/eval.txt" > "$EXPORT/eval.json"
du -sh "$EXPORT"
