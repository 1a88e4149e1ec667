#!/usr/bin/env bash
# The paper's pipeline end to end, resumable:
#
#   bash scripts/reproduce.sh experiment=paper [hydra overrides...]    # make reproduce ARGS="..."
#   bash scripts/reproduce.sh experiment=paper_full [overrides...]     # the paper's protocol at full cost
#   bash scripts/reproduce.sh experiment=smoke [hydra overrides...]    # make smoke ARGS="..."
#
# stats -> base model -> evaluate base -> IT fine-tune -> evaluate tuned -> ensemble -> masked
# diffusion model -> evaluate it (I-MDCE) -> report.
#
# - paper: CIFAR-10 (downloaded through torchvision if missing) and the official IDDPM L_vlb
#   checkpoint (downloaded if missing); GPU stages run under torchrun on every visible GPU
#   (NPROC=<n> to choose).
# - smoke: offline, on the CPU, in minutes: the tiny U-Net (model=iddpm_tiny) trained briefly on
#   its own IDDPM loss is the base model, on 32x32 crops of scikit-image's photos (data=patches);
#   the masked-diffusion steps train model=masked_pixels_tiny for a few steps (finetune=smoke_masked).
# - The masked-diffusion model on CIFAR-10 (model=masked_pixels_cifar10, trained from scratch,
#   finetune=masked) is hours of GPU time: experiment=paper runs it only with MASKED=1.
#
# Every stage runs as its own process with run id <REPRO_ID>-<step>, so its outputs land in
# <paths.output_dir>/<stage>/<REPRO_ID>-<step> (fine-tuned weights in
# <paths.checkpoint_dir>/finetune/<REPRO_ID>-<base|tune>/). A stage whose outputs exist is skipped:
# rerunning the same command resumes where it stopped (fine-tuning resumes from its last checkpoint).
# REPRO_ID defaults to <experiment>-<hash of the overrides>; all its runs share that wandb group.
#
# Sweeps: `-m a=1,2 b=x,y` runs the whole chain once per combination (each its own REPRO_ID), goes on
# after a failed one, and exits 1 unless all succeeded.
#
# GPUs and nodes (GPU stages run under torchrun; stats and report are one process on every node):
#   NPROC=<GPUs per node>     default: every visible GPU
#   NNODES=<nodes>            default 1 (torchrun --standalone); with more, every node runs this script and
#   RDZV_ENDPOINT=host:port   torchrun's c10d rendezvous on one of the nodes (RDZV_ID: the job's id), or
#   MASTER_ADDR, MASTER_PORT, NODE_RANK   a static rendezvous instead
#   PREPARE=1                 only the downloads and the dataset statistics (steps 1-2), e.g. once before
#                             the nodes start (scripts/slurm.sbatch)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

sweep=0 rest=()
for arg in "$@"; do
  if [[ "$arg" == -m || "$arg" == --multirun ]]; then sweep=1; else rest+=("$arg"); fi
done
if (( sweep )); then
  mapfile -t jobs < <("$PY" -m itdiffusion.sweeps "${rest[@]}")
  failed=()
  for i in "${!jobs[@]}"; do
    eval "job=(${jobs[$i]})"
    echo "== sweep job #$i/${#jobs[@]}: ${job[*]}"
    if ! REPRO_ID="${REPRO_ID:+$REPRO_ID-$i}" bash "$0" "${job[@]}"; then failed+=("#$i (${job[*]})"); fi
  done
  if (( ${#failed[@]} )); then
    printf '== sweep: %d of %d job(s) failed:\n' "${#failed[@]}" "${#jobs[@]}" >&2
    printf '   %s\n' "${failed[@]}" >&2
    exit 1
  fi
  echo "== sweep: all ${#jobs[@]} job(s) succeeded"
  exit 0
fi

experiment="" OUT=outputs CKPT=checkpoints
for arg in "$@"; do
  case "$arg" in
    experiment=*) experiment="${arg#*=}" ;;
    paths.output_dir=*) OUT="${arg#*=}" ;;
    paths.checkpoint_dir=*) CKPT="${arg#*=}" ;;
  esac
done
if [[ "$experiment" != paper && "$experiment" != paper_full && "$experiment" != smoke ]]; then
  echo "usage: $0 experiment=paper|paper_full|smoke [hydra overrides...]" >&2
  exit 2
fi
# paper_full: the paper's steps at full cost (its config sets estimator.budget=per_image; stages get it in $@)
if [[ "$experiment" == paper_full ]]; then experiment=paper; fi
REPRO_ID="${REPRO_ID:-$experiment-$(printf '%s\n' "$@" | sha1sum | cut -c1-8)}"

if [[ "$experiment" == smoke ]]; then
  NPROC=1
else
  NPROC="${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}"
fi

NNODES="${NNODES:-1}"
if (( NNODES > 1 )); then
  if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    TORCHRUN=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-$REPRO_ID}")
  elif [[ -n "${MASTER_ADDR:-}" && -n "${NODE_RANK:-}" ]]; then
    TORCHRUN=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
  else
    echo "NNODES=$NNODES needs RDZV_ENDPOINT=<host:port> (and RDZV_ID), or MASTER_ADDR and NODE_RANK" >&2
    exit 2
  fi
else
  TORCHRUN=(--standalone)
fi

stage() {  # stage <module> <overrides...>: one process, or torchrun over NPROC GPUs (x NNODES nodes)
  local module="$1"; shift
  if (( NPROC > 1 || NNODES > 1 )); then
    "$PY" -m torch.distributed.run "${TORCHRUN[@]}" --nproc_per_node="$NPROC" -m "itdiffusion.stages.$module" "$@"
  else
    "$PY" -m "itdiffusion.stages.$module" "$@"
  fi
}
single() {  # single <module> <overrides...>: always one process
  local module="$1"; shift
  "$PY" -m "itdiffusion.stages.$module" "$@"
}
step() { echo; echo "== [$REPRO_ID] $*"; }
done_already() { echo "   exists: $1 (skipped; delete it to redo this step)"; }

COMMON=("logger.group=$REPRO_ID" "skip_done=true" "$@")
started=$SECONDS

step "1/9 dataset statistics (Gaussian reference)"
if [[ "$experiment" == paper ]]; then
  single stats "${COMMON[@]}" "run_id=$REPRO_ID-stats" data.download=true
else
  single stats "${COMMON[@]}" "run_id=$REPRO_ID-stats"
fi

step "2/9 base model"
if [[ "$experiment" == paper ]]; then
  BASE="$CKPT/iddpm/cifar10_uncond_vlb_50M_500K.pt"
  BASE_LABEL=IDDPM
  if [[ -f "$BASE" ]]; then
    done_already "$BASE"
  elif ! "$PY" scripts/download_checkpoints.py iddpm_cifar10_vlb --checkpoint-dir "$CKPT"; then
    echo "Could not download the IDDPM checkpoint. Fetch" >&2
    echo "  https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_vlb_50M_500K.pt" >&2
    echo "by hand and place it at $BASE, then rerun this command." >&2
    exit 1
  fi
else
  BASE="$CKPT/finetune/$REPRO_ID-base/model.pt"
  BASE_LABEL=iddpm_tiny
  if [[ -f "$BASE" ]]; then
    done_already "$BASE"
  else
    single finetune "${COMMON[@]}" "run_id=$REPRO_ID-base" finetune=smoke_base "finetune.run_name=$REPRO_ID-base" \
      finetune.init=scratch
  fi
fi

if [[ "${PREPARE:-0}" == 1 ]]; then
  echo "== [$REPRO_ID] PREPARE=1: data, statistics and base model ready"
  exit 0
fi

step "3/9 evaluate the base model (VLB and IT)"
if [[ -f "$OUT/evaluate/$REPRO_ID-base/metrics.json" ]]; then
  done_already "$OUT/evaluate/$REPRO_ID-base/metrics.json"
else
  stage evaluate "${COMMON[@]}" "run_id=$REPRO_ID-base" "model.checkpoint=$BASE" "label=$BASE_LABEL" paper_row=IDDPM
fi

step "4/9 IT fine-tuning"
TUNED="$CKPT/finetune/$REPRO_ID-tune/model.pt"
if [[ -f "$TUNED" ]]; then
  done_already "$TUNED"
else
  if [[ "$experiment" == paper ]]; then TUNE_CFG=default; else TUNE_CFG=smoke; fi
  stage finetune "${COMMON[@]}" "run_id=$REPRO_ID-tune" "finetune=$TUNE_CFG" "finetune.run_name=$REPRO_ID-tune" \
    "finetune.init=$BASE" finetune.objective=it
fi

step "5/9 evaluate the fine-tuned model"
if [[ -f "$OUT/evaluate/$REPRO_ID-tuned/metrics.json" ]]; then
  done_already "$OUT/evaluate/$REPRO_ID-tuned/metrics.json"
else
  # the base run's log-SNR proposal (its pilot's range) and, with a dataset budget, its points per image, so
  # that step 6 can combine both runs' curves
  stage evaluate "${COMMON[@]}" "run_id=$REPRO_ID-tuned" "model.checkpoint=$TUNED" "label='$BASE_LABEL(tune)'" \
    "paper_row='IDDPM(tune)'" model.training_objective=IT \
    "estimator.logsnr_proposal_from=$OUT/evaluate/$REPRO_ID-base" "estimator.budget_from=$OUT/evaluate/$REPRO_ID-base"
fi

step "6/9 ensemble of the base and fine-tuned models (from the curves of steps 3 and 5: no network runs)"
if [[ -f "$OUT/evaluate/$REPRO_ID-ensemble/metrics.json" ]]; then
  done_already "$OUT/evaluate/$REPRO_ID-ensemble/metrics.json"
else
  # every image's log-SNR points and noise come from its own seeds, so the members' runs hold exactly the
  # ensemble's curves; the stage checks that (checkpoints, settings, points) and refuses otherwise
  stage evaluate "${COMMON[@]}" "run_id=$REPRO_ID-ensemble" "ensemble=[$BASE,$TUNED]" \
    "ensemble_curves=[$OUT/evaluate/$REPRO_ID-base,$OUT/evaluate/$REPRO_ID-tuned]" estimator.vlb=false \
    label=Ensemble paper_row=Ensemble "model.training_objective='—'"
fi

MASKED_RUN="$REPRO_ID-masked"
if [[ "$experiment" == paper ]]; then
  MASKED_MODEL=masked_pixels_cifar10 MASKED_TRAIN=masked MASKED_WEIGHTS=ema.pt MASKED_EVAL=()
else
  MASKED_MODEL=masked_pixels_tiny MASKED_TRAIN=smoke_masked MASKED_WEIGHTS=model.pt
  MASKED_EVAL=(data.num_images=4 estimator.num_masks=4 estimator.batch_size=16)
fi
MASKED_CKPT="$CKPT/finetune/$MASKED_RUN/$MASKED_WEIGHTS"
if [[ "$experiment" == paper && "${MASKED:-0}" != 1 ]]; then
  step "7/9, 8/9 masked diffusion model: not run (MASKED=1 trains $MASKED_MODEL from scratch, hours of GPU)"
else
  step "7/9 masked diffusion model ($MASKED_MODEL, any-order loss)"
  if [[ -f "$MASKED_CKPT" ]]; then
    done_already "$MASKED_CKPT"
  else
    stage finetune "${COMMON[@]}" "run_id=$MASKED_RUN" "model=$MASKED_MODEL" "finetune=$MASKED_TRAIN" \
      "finetune.run_name=$MASKED_RUN"
  fi

  step "8/9 evaluate the masked diffusion model (I-MDCE)"
  if [[ -f "$OUT/evaluate/$MASKED_RUN/metrics.json" ]]; then
    done_already "$OUT/evaluate/$MASKED_RUN/metrics.json"
  else
    stage evaluate "${COMMON[@]}" "run_id=$MASKED_RUN" "model=$MASKED_MODEL" "model.checkpoint=$MASKED_CKPT" \
      "label='masked diffusion (I-MDCE)'" "${MASKED_EVAL[@]}"
  fi
fi

step "9/9 report"
single report "${COMMON[@]}" "run_id=$REPRO_ID-report"

echo
echo "== [$REPRO_ID] done in $((SECONDS - started)) s: $OUT/results/results.md"
if [[ "$experiment" == smoke ]]; then
  echo "   wandb (offline): wandb sync $OUT/wandb/offline-run-*   to upload the runs later"
fi
