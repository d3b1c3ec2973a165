#!/usr/bin/env bash
# Train a Uni-X model with the HF Trainer (uni_arch/train/hf_trainer.py).
#
#   bash train.sh                                   # the default: tiny Uni-X on the shapes world, CPU, ~16 min on 2 quiet cores with native bf16, ~19 without (README)
#   bash train.sh configs/train/stage2.yaml         # a preset (YAML keys are hf_trainer.py argument names)
#   LEARNING_RATE=3e-4 MAX_STEPS=200 bash train.sh  # any parameter below, from the environment
#   LAUNCHER=accelerate NUM_PROCESSES=8 bash train.sh configs/train/stage3.yaml
#
# Precedence: the defaults below < the YAML preset (first argument) < environment variables < extra arguments
# after the preset (passed to hf_trainer.py verbatim, e.g. `bash train.sh cfg.yaml --max_steps 5`).
# With the default data (the shapes world) a fresh machine is set up first: .venv, the shapes world, its text
# tokenizer and VQ tokenizer, and the code-ID records; each step is skipped when its output exists. The VQ tokenizer
# (new or left by an earlier run) must pass its quality gate (VQ_GATE_*) or train.sh stops before encoding/training.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
ENV_VARS=" $(compgen -e | tr '\n' ' ') "   # what the caller set (it beats the preset)

# =====================================================================================================
# 1. Parameters (each one overridable from the environment)
# =====================================================================================================
# -- Task & logging --
: "${IMAGE_TOKENIZER=shapes}"                   # shapes | chameleon | hqvae | rqvae (modeling/vq IMAGE_TOKENIZERS); on the shapes world the set-up trains shapes, hqvae and rqvae
TOKENIZER_SUFFIX="$([[ "$IMAGE_TOKENIZER" == shapes ]] || echo "-$IMAGE_TOKENIZER")"  # keeps each tokenizer's set-up and run apart
: "${RUN_NAME=shapes-tiny-uni-x${TOKENIZER_SUFFIX}}"
: "${OUTPUT_DIR=outputs/${RUN_NAME}}"
: "${REPORT_TO=none}"                          # none | wandb | tensorboard

# -- Launcher & distributed --
: "${LAUNCHER=python}"                          # python | torchrun | accelerate | deepspeed
: "${NUM_PROCESSES=1}"                          # processes per node (GPUs, or CPU ranks)
: "${NUM_MACHINES=1}"
: "${MACHINE_RANK=0}"
: "${MAIN_IP=127.0.0.1}"                        # address of node 0
: "${MAIN_PORT=16374}"
: "${HOSTFILE=}"                                # DeepSpeed hostfile (multi-node)
: "${ACCELERATE_CONFIG=configs/accelerate/single_node.yaml}"
: "${DEEPSPEED_CONFIG=}"                        # e.g. configs/deepspeed/zero2.json ('' = none; deepspeed launcher: zero2)
: "${USE_CPU=auto}"                             # auto: true when no CUDA device is visible
: "${NUM_THREADS=2}"                            # torch CPU threads per process

# -- Model & data paths --
: "${SHAPES_DIR=data/shapes}"                   # the shapes world, its text tokenizer and its VQ (set-up output)
: "${SHAPES_CODES_DIR=data/shapes_codes${TOKENIZER_SUFFIX}}"  # the shapes world's code-ID records (set-up output)
: "${MODEL_PATH=}"                              # checkpoint to start from ('' = fresh init from MODEL_CONFIG)
: "${MODEL_CONFIG=configs/model/tiny_uni_x.json}"
: "${TOKENIZER_PATH=${SHAPES_DIR}/tokenizer}"   # a directory, or qwen2.5
: "${IMAGE_TOKENIZER_PATH=${SHAPES_DIR}/$([[ "$IMAGE_TOKENIZER" == shapes ]] && echo vq || echo "$IMAGE_TOKENIZER")}"
: "${DATA_PATH=${SHAPES_CODES_DIR}/shapes_captions:0.8,${SHAPES_CODES_DIR}/shapes_vqa:0.1,${SHAPES_CODES_DIR}/shapes_text:0.1}"
: "${STREAMING_DATA=0}"
: "${DATA_PERCENTAGE=1.0}"
: "${T2I_RATIO=0.9}"                            # image_text records: P(text-to-image), else image-to-text
: "${SHUFFLE_SEED=218}"

# -- Model architecture --
: "${CUSTOM_CLS=uni_qwen}"                      # uni_qwen | none (plain dense)
: "${MODEL_SPEC_MODULE=x}"                      # x (Uni-X) | mot | moe | dense
: "${VISION_ENCODE_LAYERS=}"                    # "" = the model config's (tiny_uni_x: 1)
: "${VISION_DECODE_LAYERS=}"                    # "" = the model config's (tiny_uni_x: 1)
: "${ALL_MODAL_VISIBLE=}"                       # "" = the model config's (tiny_uni_x: 1)
: "${UNFREEZE_KEYS=train-all}"                  # or e.g. vision,image_embeddings (stage 1)
: "${FFN_VISION_SIZE=}"                         # '' = the config's
: "${FFN_SHARE_SIZE=}"                          # the reference's: width of the shared FFN of ADD_SHARE_FFN=1
: "${ADD_SHARE_FFN=}"                           # 1: Uni-X middle layers add a shared FFN to each modality's own
: "${DECODER_SPARSE_STEP=}"                     # MoE: every k-th layer is modality-routed (= moe_every_k)
: "${MOT_STYLE=}"                               # MoT: ours | reference (the reference's MoT baseline)
: "${INIT_VISION_WITH_TEXT=}"                   # 1: copy text weights into the vision branches before training

# -- Training hyper-parameters --
: "${BF16=false}"
: "${LEARNING_RATE=5e-4}"                       # shapes Uni-X: 1e-3 and 2e-3 learn to ignore the caption (README)
: "${MAX_STEPS=1600}"                          # 1,600 steps of 1 row drew far better than 800 of 2 rows, same tokens and time (README)
: "${TRAIN_BATCH_SIZE=1}"                       # packed ROWS per device per micro-step (the reference: raw samples in one row)
: "${MODEL_MAX_LENGTH=2048}"                    # 1 row x 2,048 tokens per step: twice the updates of 2 x 2,048 at the same cost per token
: "${USE_DATA_PACKING=2}"                       # 0: no packing, 1: pretrain packing, 2: SFT packing
: "${GRAD_ACCUM_STEPS=1}"
: "${WEIGHT_DECAY=0.0}"
: "${WARMUP_RATIO=0.05}"
: "${LR_SCHEDULER=cosine}"
: "${IGNORE_INSTRUCTION=1}"
: "${CFG_DROPOUT=0.1}"
: "${SEED=42}"

# -- Saving & logging --
: "${SAVE_STEPS=0.25}"                          # < 1: a fraction of the total steps
: "${SAVE_TOTAL_LIMIT=1}"
: "${LOGGING_STEPS=10}"

# -- Performance & others --
: "${GRADIENT_CHECKPOINTING=0}"
: "${DATALOADER_WORKERS=0}"
: "${RESUME_FROM_CHECKPOINT=0}"                 # 1: the newest checkpoint in OUTPUT_DIR, or a path

# -- Shapes-world set-up (only for the default data) --
: "${SETUP_SHAPES=auto}"                        # auto: when DATA_PATH reads SHAPES_CODES_DIR
: "${SHAPES_NUM_IMAGES=16000}"                  # 4,000 images (4 passes per run) drew the asked shape in 41% of images, 16,000 (one pass) in 56%
: "${SHAPES_HELDOUT_PAIRS=4}"                   # (colour, shape) pairs never shown in training: the unseen-pair GenEval split
: "${VQ_TIME_LIMIT_S=3600}"                     # a guard only: the VQ schedule is in steps (~4 min with bf16, ~7 in fp32, on 2 cores)
: "${VQ_EXTRA_ARGS=}"                           # more flags for data_process/train_vq.py train (shapes) or train_tokenizer.py (hqvae, rqvae), e.g. "--max_steps 4000"
# The tokenizer's quality gate: nothing is encoded or trained on a VQ below it (see data_process/train_vq.py).
: "${VQ_GATE_DETECTOR_PCT=90}"                  # shapes detector's exact-match rate on VQ reconstructions, %
: "${VQ_GATE_PSNR_DB=30}"                       # held-out reconstruction PSNR, dB
: "${VQ_GATE_MIN_SCENES=1000}"                  # held-out scenes the figures must come from
: "${VQ_GATE_BACKGROUND_PCT=90}"                # empty background encoded with its position's usual code, %
# The checkpoint's quality gate (shapes world only): does it read its caption (tools/conditioning_probe.py), and
# does it draw what it is asked (evaluation/shapes_t2i.py over the 40 single-object prompts)?
: "${CKPT_GATE_CAPTION_GAP=0.25}"                # nats per image a wrong caption must cost (default run: ~9; blind: ~0.01)
: "${CKPT_GATE_SEEDS=8}"                         # images per prompt (0 = no drawing gate)
# floor of the seen-pair mean exact rate over the 40 (colour, shape) prompts, % (default runs: 72-83); for hqvae and
# rqvae 0, a report: 1,600 steps do not teach this model to draw their 4-5x longer images (rqvae runs: 0-1%, README)
: "${CKPT_GATE_PAIR_EXACT_PCT=$([[ "$IMAGE_TOKENIZER" == shapes ]] && echo 35 || echo 0)}"
# at most this share of unconditional images may be one red circle, %: it stops a model that draws one whatever it
# is asked. At 8 seeds one image is 12.5 points, so 30 lets 2 of 8 pass: the default runs' 0-5% (64 seeds) would have
# failed 15 (2 of 8) in ~5% of runs; 3 of 8 happens at that rate < 1% of the time
: "${CKPT_GATE_UNCOND_PCT=30}"

# =====================================================================================================
# 2. Execution (usually no changes needed below)
# =====================================================================================================
PRESET=""
if [[ $# -gt 0 && "$1" != --* ]]; then PRESET="$1"; shift; fi
[[ -z "$PRESET" || -f "$PRESET" ]] || { echo "train.sh: preset $PRESET not found" >&2; exit 2; }
# Reference knobs with nothing to set here: refused, never silently ignored.
[[ -z "${MODEL_VERSION:-}" ]] || { echo "train.sh: MODEL_VERSION is not used: in the reference it picked a LLaVA conversation template that its packing collator never reads (its prompts are --chat_template reference here); the decoder is the checkpoint's backbone (qwen2 | qwen3); unset it" >&2; exit 2; }
[[ -z "${VQ_RESOLUTION:-}" ]] || { echo "train.sh: VQ_RESOLUTION is not used: the image resolution is the image tokenizer's own (IMAGE_TOKENIZER_PATH); unset it" >&2; exit 2; }

bash tools/setup_env.sh
VENV="${UNI_X_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="$NUM_THREADS"

PRESET_KEYS=" "
if [[ -n "$PRESET" ]]; then
  PRESET_KEYS=" $("$PY" -c 'import sys, yaml; print(" ".join(yaml.safe_load(open(sys.argv[1])) or {}))' "$PRESET") "
fi

value_of() {  # the value hf_trainer.py gets for one argument, or nothing (then the preset/default decides)
  local var="$1" key="$2"
  if [[ "$ENV_VARS" != *" $var "* && "$PRESET_KEYS" == *" $key "* ]]; then return; fi
  printf '%s' "${!var}"
}

if [[ "$USE_CPU" == auto ]]; then
  USE_CPU=$("$PY" -c 'import torch; print(str(not torch.cuda.is_available()).lower())')
fi

# -- arguments: variable -> hf_trainer.py argument --
KNOBS=(
  RUN_NAME:run_name OUTPUT_DIR:output_dir REPORT_TO:report_to USE_CPU:use_cpu
  MODEL_PATH:model_name_or_path MODEL_CONFIG:model_config TOKENIZER_PATH:tokenizer_path
  IMAGE_TOKENIZER:image_tokenizer IMAGE_TOKENIZER_PATH:image_tokenizer_path DATA_PATH:data_path
  STREAMING_DATA:streaming_data DATA_PERCENTAGE:data_percentage T2I_RATIO:t2i_ratio SHUFFLE_SEED:shuffle_seed
  CUSTOM_CLS:custom_cls MODEL_SPEC_MODULE:model_spec_module
  VISION_ENCODE_LAYERS:vision_encode_layers VISION_DECODE_LAYERS:vision_decode_layers
  ALL_MODAL_VISIBLE:all_modal_visible UNFREEZE_KEYS:unfreeze_keys FFN_VISION_SIZE:ffn_vision_size
  FFN_SHARE_SIZE:ffn_share_size ADD_SHARE_FFN:add_share_ffn DECODER_SPARSE_STEP:decoder_sparse_step
  MOT_STYLE:mot_style INIT_VISION_WITH_TEXT:init_vision_with_text BF16:bf16 LEARNING_RATE:learning_rate MAX_STEPS:max_steps
  TRAIN_BATCH_SIZE:per_device_train_batch_size MODEL_MAX_LENGTH:model_max_length USE_DATA_PACKING:use_data_packing
  GRAD_ACCUM_STEPS:gradient_accumulation_steps WEIGHT_DECAY:weight_decay WARMUP_RATIO:warmup_ratio
  LR_SCHEDULER:lr_scheduler_type IGNORE_INSTRUCTION:ignore_instruction CFG_DROPOUT:cfg_dropout SEED:seed
  SAVE_STEPS:save_steps SAVE_TOTAL_LIMIT:save_total_limit LOGGING_STEPS:logging_steps
  GRADIENT_CHECKPOINTING:activation_checkpointing DATALOADER_WORKERS:dataloader_num_workers
  RESUME_FROM_CHECKPOINT:resume_from_checkpoint DEEPSPEED_CONFIG:deepspeed
)
ARGS=()
[[ -n "$PRESET" ]] && ARGS+=(--config "$PRESET")
for knob in "${KNOBS[@]}"; do
  var="${knob%%:*}"; key="${knob#*:}"
  value="$(value_of "$var" "$key")"
  [[ -z "$value" ]] && continue
  if [[ "$key" == activation_checkpointing ]]; then [[ "$value" == 1 || "$value" == true ]] || continue; value=true; fi
  ARGS+=("--$key" "$value")
done
ARGS+=("$@")
# What the trainer will really use (a preset may set it); this also validates every argument before any work.
EFFECTIVE="$("$PY" -c 'import sys; from uni_arch.train.args import parse_args; m, d, t = parse_args(sys.argv[1:])
print(t.output_dir); print(d.data_path)' "${ARGS[@]}")"
OUT="$(sed -n 1p <<< "$EFFECTIVE")"
DATA_EFFECTIVE="$(sed -n 2p <<< "$EFFECTIVE")"
mkdir -p "$OUT"

# -- the shapes world, its tokenizers and its code-ID records (each step skipped when done) --
if [[ "$SETUP_SHAPES" == auto ]]; then
  [[ "$DATA_EFFECTIVE" == *"$SHAPES_CODES_DIR"* ]] && SETUP_SHAPES=1 || SETUP_SHAPES=0
fi
if [[ "$SETUP_SHAPES" == 1 ]]; then
  VQ_DIR="$IMAGE_TOKENIZER_PATH"
  if [[ -f "$SHAPES_DIR/world.json" ]]; then  # a world from an earlier run (or an older default) is reused as is
    "$PY" -c 'import json, sys; w = json.load(open(sys.argv[1] + "/world.json"))
have = (w.get("num_images"), len(w.get("heldout_pairs") or []))
want = (int(sys.argv[2]), int(sys.argv[4]))
sys.exit(0 if have == want else f"train.sh: {sys.argv[1]} was built with {have[0]} images and {have[1]} held-out pairs, but "
         f"SHAPES_NUM_IMAGES={want[0]} SHAPES_HELDOUT_PAIRS={want[1]}: set SHAPES_NUM_IMAGES={have[0]} SHAPES_HELDOUT_PAIRS={have[1]} "
         f"to train on it, or delete {sys.argv[1]}/images, its jsonl files, world.json, geneval, data_config.yaml and "
         f"{sys.argv[3]} (keep {sys.argv[1]}/vq and tokenizer) and rerun")' \
      "$SHAPES_DIR" "$SHAPES_NUM_IMAGES" "$SHAPES_CODES_DIR" "$SHAPES_HELDOUT_PAIRS" || exit 1
  fi
  if [[ ! -f "$SHAPES_DIR/data_config.yaml" ]]; then
    echo "--- building the shapes world ($SHAPES_DIR) ---"
    "$PY" data_process/shapes_world.py build --out_dir "$SHAPES_DIR" --num_images "$SHAPES_NUM_IMAGES" \
      --heldout_pairs "$SHAPES_HELDOUT_PAIRS"
  fi
  if [[ ! -f "$SHAPES_DIR/tokenizer/tokenizer.json" ]]; then
    echo "--- training the shapes text tokenizer ($SHAPES_DIR/tokenizer) ---"
    "$PY" data_process/text_tokenizer.py train --out_dir "$SHAPES_DIR/tokenizer"
  fi
  if [[ ! -f "$VQ_DIR/metrics.json" ]]; then
    read -r -a VQ_EXTRA <<< "$VQ_EXTRA_ARGS"
    case "$IMAGE_TOKENIZER" in
      shapes)
        echo "--- training the shapes VQ tokenizer ($VQ_DIR, ~4 min on 2 idle cores with native bf16, ~8 without) ---"
        "$PY" data_process/train_vq.py train --out_dir "$VQ_DIR" --time_limit_s "$VQ_TIME_LIMIT_S" \
          --min_detector_pct "$VQ_GATE_DETECTOR_PCT" --min_psnr_db "$VQ_GATE_PSNR_DB" \
          --min_gate_scenes "$VQ_GATE_MIN_SCENES" --min_background_pct "$VQ_GATE_BACKGROUND_PCT" ${VQ_EXTRA[@]+"${VQ_EXTRA[@]}"} ;;
      hqvae|rqvae)
        echo "--- training the shapes world's $IMAGE_TOKENIZER tokenizer ($VQ_DIR, 5-12 min on 2 idle cores) ---"
        "$PY" data_process/train_tokenizer.py --kind "$IMAGE_TOKENIZER" --out_dir "$VQ_DIR" \
          --min_gate_scenes "$VQ_GATE_MIN_SCENES" ${VQ_EXTRA[@]+"${VQ_EXTRA[@]}"} ;;
      *) echo "train.sh: the shapes set-up trains IMAGE_TOKENIZER=shapes, hqvae or rqvae; for $IMAGE_TOKENIZER encode your" \
              "images with data_process/encode_images.py and set DATA_PATH to the records" >&2; exit 2 ;;
    esac
  fi
  # The gate, also for a tokenizer left by an earlier run: stop here rather than encode or train on a bad one.
  echo "--- checking the VQ tokenizer's quality gate ($VQ_DIR) ---"
  "$PY" data_process/train_vq.py check_gate --out_dir "$VQ_DIR" --min_detector_pct "$VQ_GATE_DETECTOR_PCT" \
    --min_psnr_db "$VQ_GATE_PSNR_DB" --min_scenes "$VQ_GATE_MIN_SCENES" --min_background_pct "$VQ_GATE_BACKGROUND_PCT" \
    || { echo "train.sh: stopped at the VQ quality gate (message above); nothing was encoded or trained" >&2; exit 1; }
  if [[ -f "$SHAPES_CODES_DIR/manifest.json" ]]; then  # records of another VQ would train on meaningless codes
    "$PY" -c 'import json, sys; from modeling.vq import load_image_tokenizer
have = json.load(open(sys.argv[1] + "/manifest.json"))["tokenizer"]["id"]; want = load_image_tokenizer(sys.argv[3], sys.argv[2]).tokenizer_id
sys.exit(0 if have == want else f"train.sh: {sys.argv[1]} was encoded with {have}, but {sys.argv[2]} is {want}: delete {sys.argv[1]} and rerun")' \
      "$SHAPES_CODES_DIR" "$VQ_DIR" "$IMAGE_TOKENIZER" || exit 1
  fi
  if [[ ! -f "$SHAPES_CODES_DIR/manifest.json" ]]; then
    echo "--- encoding the shapes world into code-ID records ($SHAPES_CODES_DIR) ---"
    "$PY" data_process/encode_images.py --data_config "$SHAPES_DIR/data_config.yaml" --out_dir "$SHAPES_CODES_DIR" \
      --tokenizer "$IMAGE_TOKENIZER" --checkpoint "$VQ_DIR" --num_workers 2
  fi
fi


ENTRY=uni_arch/train/hf_trainer.py
case "$LAUNCHER" in
  python)
    CMD=("$PY" "$ENTRY") ;;
  torchrun)
    CMD=("$PY" -m torch.distributed.run --nproc_per_node "$NUM_PROCESSES" --nnodes "$NUM_MACHINES"
         --node_rank "$MACHINE_RANK" --master_addr "$MAIN_IP" --master_port "$MAIN_PORT" "$ENTRY")
    [[ "$USE_CPU" == true ]] && ARGS+=(--ddp_backend gloo) ;;
  accelerate)
    CMD=("$VENV/bin/accelerate" launch --config_file "$ACCELERATE_CONFIG" --num_processes "$((NUM_PROCESSES * NUM_MACHINES))"
         --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_IP"
         --main_process_port "$MAIN_PORT")
    [[ -n "$HOSTFILE" ]] && CMD+=(--deepspeed_hostfile "$HOSTFILE")
    CMD+=("$ENTRY") ;;
  deepspeed)
    CMD=("$VENV/bin/deepspeed" --master_addr "$MAIN_IP" --master_port "$MAIN_PORT")
    if [[ -n "$HOSTFILE" ]]; then CMD+=(--hostfile "$HOSTFILE"); else CMD+=(--num_gpus "$NUM_PROCESSES"); fi
    CMD+=("$ENTRY")
    [[ -z "$(value_of DEEPSPEED_CONFIG deepspeed)" && "$PRESET_KEYS" != *" deepspeed "* ]] \
      && ARGS+=(--deepspeed configs/deepspeed/zero2.json) ;;
  *) echo "train.sh: LAUNCHER=$LAUNCHER must be python, torchrun, accelerate or deepspeed" >&2; exit 2 ;;
esac

echo "--- Starting training: ${RUN_NAME} (launcher: ${LAUNCHER}) -> ${OUT} ---"
START=$(date +%s)
"${CMD[@]}" "${ARGS[@]}" 2>&1 | tee "$OUT/train.log"
echo "--- finished in $(( $(date +%s) - START ))s ---"

# -- report: the unigram baseline the losses must beat (written by the trainer itself for a map-style run; a
#    streaming run has no materialised rows, so the module renders them once more), and where everything is --
if [[ ! -f "$OUT/unigram_baseline.json" || "$(stat -c %Y "$OUT/unigram_baseline.json")" -lt "$START" ]]; then
  "$PY" -m uni_arch.train.unigram "${ARGS[@]}" 2>&1 | tail -n 4 || true
fi
# -- the checkpoint's quality gate: on the shapes world, does it draw what it is asked? --
if [[ "$SETUP_SHAPES" == 1 ]]; then
  echo "--- checking that the checkpoint reads its caption ($OUT/conditioning_probe.json) ---"
  "$PY" tools/conditioning_probe.py --checkpoint "$OUT" --out "$OUT/conditioning_probe.json" \
    --min_gap "$CKPT_GATE_CAPTION_GAP" || { echo "train.sh: the checkpoint is below its quality gate (message above)" >&2; exit 1; }
fi
if [[ "$SETUP_SHAPES" == 1 && "$CKPT_GATE_SEEDS" != 0 ]]; then
  echo "--- checking the checkpoint's drawing ($CKPT_GATE_SEEDS seeds x 40 prompts; $OUT/shapes_t2i) ---"
  "$PY" evaluation/shapes_t2i.py --checkpoint "$OUT" --num_seeds "$CKPT_GATE_SEEDS" --world "$SHAPES_DIR" \
    --min_pair_exact_pct "$CKPT_GATE_PAIR_EXACT_PCT" --max_uncond_pct "$CKPT_GATE_UNCOND_PCT" || { echo "train.sh: the checkpoint is below its drawing gate (message above)" >&2; exit 1; }
fi
echo "checkpoint:   $OUT"
echo "loss curves:  $OUT/loss_curves.csv  $OUT/loss_curves.png"
echo "log:          $OUT/train.log"
