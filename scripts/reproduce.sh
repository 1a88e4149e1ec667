#!/usr/bin/env bash
# The paper's pipeline end to end, resumable:
#
#   bash scripts/reproduce.sh experiment=paper [hydra overrides...]    # make reproduce ARGS="..."
#   bash scripts/reproduce.sh experiment=paper_full [overrides...]     # the paper's protocol at full cost
#   bash scripts/reproduce.sh experiment=smoke [hydra overrides...]    # make smoke ARGS="..."
#
# stats -> base models -> per model family (MODELS=iddpm,ddpm): evaluate base -> IT fine-tune -> evaluate
# tuned -> ensemble of the two [-> evaluate ITD's published tuned weights] -> ensemble of every model (with
# two families) -> masked diffusion model -> evaluate it (I-MDCE) -> report.
#
# - paper: CIFAR-10 (downloaded through torchvision if missing), the official IDDPM L_vlb checkpoint and
#   DDPM's google/ddpm-cifar10-32 (Hugging Face hub cache), and ITD's published fine-tuned weights
#   (PUBLISHED=0 leaves them out); all downloaded if missing. GPU stages run under torchrun on every
#   visible GPU (NPROC=<n> to choose). Default MODELS=iddpm,ddpm.
# - smoke: offline, on the CPU, in minutes: the tiny U-Net (model=iddpm_tiny) trained briefly on
#   its own IDDPM loss is the base model, on 32x32 crops of scikit-image's photos (data=patches);
#   the masked-diffusion steps train model=masked_pixels_tiny for a few steps (finetune=smoke_masked).
#   Default MODELS=iddpm; MODELS=ddpm (make smoke-ddpm) trains a tiny diffusers UNet2DModel
#   (model=ddpm_tiny) from scratch on the IT loss for its base model.
# - The masked-diffusion model on CIFAR-10 (model=masked_pixels_cifar10, trained from scratch,
#   finetune=masked) is hours of GPU time: experiment=paper runs it only with MASKED=1 (MASKED=0 leaves
#   the smoke run's out).
#
# Every stage runs as its own process with run id <REPRO_ID>-<step>, so its outputs land in
# <paths.output_dir>/<stage>/<REPRO_ID>-<step> (fine-tuned weights in
# <paths.checkpoint_dir>/finetune/<REPRO_ID>-<base|tune>/). A stage whose outputs exist is skipped:
# rerunning the same command resumes where it stopped (fine-tuning resumes from its last checkpoint).
# REPRO_ID defaults to <experiment>-<hash of the overrides> (<experiment>-<REPRO_TAG>-<hash> with REPRO_TAG,
# e.g. slurm under scripts/slurm.sbatch); all its runs share that wandb group.
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
# Model families (MODELS=iddpm,ddpm), the masked-diffusion steps (MASKED=1) and ITD's published fine-tuned
# weights (PUBLISHED=1; paper only: downloaded): defaults per experiment. Settings other than the defaults
# join the overrides in REPRO_ID's hash, so each combination has its own runs and results group.
if [[ "$experiment" == paper ]]; then
  DEFAULTS="MODELS=iddpm,ddpm MASKED=0 PUBLISHED=1" MASKED_COST=", hours of GPU"
else
  DEFAULTS="MODELS=iddpm MASKED=1 PUBLISHED=0" MASKED_COST=""
fi
for setting in $DEFAULTS; do
  name="${setting%%=*}"
  if [[ -z "${!name:-}" ]]; then declare "$setting"; fi
done
IFS=, read -r -a FAMILIES <<<"$MODELS"
for fam in "${FAMILIES[@]}" ""; do
  if [[ "$fam" != iddpm && "$fam" != ddpm && ( -n "$fam" || ${#FAMILIES[@]} == 0 ) ]]; then
    echo "MODELS=$MODELS: name the model families iddpm, ddpm or both (MODELS=iddpm,ddpm)" >&2
    exit 2
  fi
done
if [[ "$experiment" == smoke && "$PUBLISHED" == 1 ]]; then
  echo "PUBLISHED=1: ITD's published weights are CIFAR-10 models, evaluated by experiment=paper only" >&2
  exit 2
fi
settings_id=()
for setting in MODELS MASKED PUBLISHED; do
  if [[ " $DEFAULTS " != *" $setting=${!setting} "* ]]; then settings_id+=("$setting=${!setting}"); fi
done
REPRO_ID="${REPRO_ID:-$experiment-${REPRO_TAG:+$REPRO_TAG-}$(printf '%s\n' "$@" "${settings_id[@]}" | sha1sum | cut -c1-8)}"

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

step "dataset statistics (Gaussian reference)"
if [[ "$experiment" == paper ]]; then
  single stats "${COMMON[@]}" "run_id=$REPRO_ID-stats" data.download=true
else
  single stats "${COMMON[@]}" "run_id=$REPRO_ID-stats"
fi

# One family's chain (FAMILIES: iddpm, ddpm). Run ids: <REPRO_ID>-<prefix><step>, prefix "" for IDDPM (the
# ids of earlier versions, so their outputs are reused) and "ddpm-" for DDPM.
family_settings() {  # family_settings <family>: the variables of its chain
  FAM="$1"
  case "$FAM" in
    iddpm) P="" ROW=IDDPM MODEL_ARGS=() MODEL_NAME=iddpm_tiny TUNE_CFG=smoke BASE_CFG=(finetune.objective=iddpm)
           if [[ "$experiment" == paper ]]; then MODEL_NAME=iddpm_cifar10_vlb TUNE_CFG=default; fi ;;
    # ddpm_tiny's VLB chain: DDPM's betas rescaled to 20 steps (smoke's diffusion_steps) would exceed 1
    ddpm)  P="ddpm-" ROW=DDPM MODEL_ARGS=(model=ddpm_tiny model.diffusion_steps=100) MODEL_NAME=ddpm_tiny
           TUNE_CFG=smoke BASE_CFG=(finetune.objective=it)
           if [[ "$experiment" == paper ]]; then MODEL_NAME=ddpm_cifar10 MODEL_ARGS=(model=ddpm_cifar10) TUNE_CFG=ddpm; fi ;;
    *) echo "MODELS=$MODELS: unknown family $FAM (iddpm, ddpm)" >&2; exit 2 ;;
  esac
  if [[ "$experiment" == paper ]]; then LABEL=$ROW; else LABEL=$MODEL_NAME; fi
  TUNED="$CKPT/finetune/$REPRO_ID-${P}tune/model.pt"
}

base_model() {  # base_model <family>: sets BASE (downloaded for the paper, trained briefly for the smoke run)
  family_settings "$1"
  step "$ROW: base model"
  if [[ "$experiment" == paper && "$FAM" == iddpm ]]; then
    BASE="$CKPT/iddpm/cifar10_uncond_vlb_50M_500K.pt"
    if [[ -f "$BASE" ]]; then
      done_already "$BASE"
    elif ! "$PY" scripts/download_checkpoints.py iddpm_cifar10_vlb --checkpoint-dir "$CKPT"; then
      echo "Could not download the IDDPM checkpoint. Fetch" >&2
      echo "  https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_vlb_50M_500K.pt" >&2
      echo "by hand and place it at $BASE, then rerun this command." >&2
      exit 1
    fi
  elif [[ "$experiment" == paper ]]; then  # google/ddpm-cifar10-32: its folder in the Hugging Face hub's cache
    local found
    found="$("$PY" scripts/download_checkpoints.py ddpm_cifar10)" || exit 1  # the script says how to fix it
    BASE="$(sed -n 's/^ddpm_cifar10: \(.*\) sha256=.*$/\1/p' <<<"$found")"
    echo "   $BASE"
  else
    BASE="$CKPT/finetune/$REPRO_ID-${P}base/model.pt"
    if [[ -f "$BASE" ]]; then
      done_already "$BASE"
    else
      single finetune "${COMMON[@]}" "${MODEL_ARGS[@]}" "run_id=$REPRO_ID-${P}base" finetune=smoke_base \
        "finetune.run_name=$REPRO_ID-${P}base" finetune.init=scratch "${BASE_CFG[@]}"
    fi
  fi
  if [[ "$experiment" == paper && "$PUBLISHED" == 1 ]]; then
    step "$ROW(tune): ITD's published fine-tuned weights (${FAM}_cifar10_itd_tuned)"
    if ! "$PY" scripts/download_checkpoints.py "${FAM}_cifar10_itd_tuned" --checkpoint-dir "$CKPT"; then
      echo "Could not download ITD's published $ROW(tune) weights: see src/itdiffusion/conf/model/" >&2
      echo "${FAM}_cifar10_itd_tuned.yaml (checkpoint_url, checkpoint_file) for the URL and the file to place in" >&2
      echo "$CKPT/$FAM/, or rerun with PUBLISHED=0 to leave these rows out." >&2
      exit 1
    fi
  fi
  BASES[$FAM]="$BASE"
}

evaluated() {  # evaluated <run id>: true (and says so) when that evaluate run is complete
  if [[ -f "$OUT/evaluate/$1/metrics.json" ]]; then done_already "$OUT/evaluate/$1/metrics.json"; else return 1; fi
}

family_chain() {  # family_chain <family>: evaluate base -> IT fine-tune -> evaluate tuned -> ensemble -> published
  family_settings "$1"
  BASE="${BASES[$FAM]}"
  # every evaluation takes the log-SNR proposal of the first one (its pilot's range) and, with a dataset
  # budget, its points per image, so that the ensembles can combine any runs' stored curves
  local proposal=()
  shared_points() { proposal=("estimator.logsnr_proposal_from=$OUT/evaluate/$PROPOSAL_RUN")
                    if [[ "$BUDGET" == dataset ]]; then proposal+=("estimator.budget_from=$OUT/evaluate/$PROPOSAL_RUN"); fi; }
  if [[ -n "$PROPOSAL_RUN" ]]; then shared_points; fi

  step "$ROW: evaluate the base model (VLB and IT)"
  evaluated "$REPRO_ID-${P}base" || stage evaluate "${COMMON[@]}" "${MODEL_ARGS[@]}" "run_id=$REPRO_ID-${P}base" \
    "model.checkpoint=$BASE" "label=$LABEL" "paper_row=$ROW" "${proposal[@]}"
  if [[ -z "$PROPOSAL_RUN" ]]; then
    PROPOSAL_RUN="$REPRO_ID-${P}base"
    shared_points
  fi

  step "$ROW: IT fine-tuning"
  if [[ -f "$TUNED" ]]; then
    done_already "$TUNED"
  else
    stage finetune "${COMMON[@]}" "${MODEL_ARGS[@]}" "run_id=$REPRO_ID-${P}tune" "finetune=$TUNE_CFG" \
      "finetune.run_name=$REPRO_ID-${P}tune" "finetune.init=$BASE" finetune.objective=it
  fi

  step "$ROW: evaluate the fine-tuned model"
  evaluated "$REPRO_ID-${P}tuned" || stage evaluate "${COMMON[@]}" "${MODEL_ARGS[@]}" "run_id=$REPRO_ID-${P}tuned" \
    "model.checkpoint=$TUNED" "label='$LABEL(tune)'" "paper_row='$ROW(tune)'" \
    "${proposal[@]}"

  # The paper's ensemble is that of all four models (ITD's plot_results.py): with one family, its base and
  # tuned models stand for it; with several, each family's pair is a plain row and the ensemble of all
  # models (below) is compared with the paper.
  local label=Ensemble row=Ensemble
  if (( ${#FAMILIES[@]} > 1 )); then label="'$LABEL + $LABEL(tune) ensemble'" row=null; fi
  step "$ROW: ensemble of the base and fine-tuned models (from their stored curves: no network runs)"
  # every image's log-SNR points and noise come from its own seeds, so the members' runs hold exactly the
  # ensemble's curves; the stage checks that (checkpoints, settings, points) and refuses otherwise
  evaluated "$REPRO_ID-${P}ensemble" || stage evaluate "${COMMON[@]}" "${MODEL_ARGS[@]}" \
    "run_id=$REPRO_ID-${P}ensemble" "ensemble=[$BASE,$TUNED]" \
    "ensemble_curves=[$OUT/evaluate/$REPRO_ID-${P}base,$OUT/evaluate/$REPRO_ID-${P}tuned]" estimator.vlb=false \
    "label=$label" "paper_row=$row" "model.training_objective='—'"
  MEMBERS+=("$BASE" "$TUNED") MEMBER_MODELS+=("$MODEL_NAME" "$MODEL_NAME")
  MEMBER_RUNS+=("$OUT/evaluate/$REPRO_ID-${P}base" "$OUT/evaluate/$REPRO_ID-${P}tuned")

  if [[ "$experiment" == paper && "$PUBLISHED" == 1 ]]; then
    step "$ROW(tune), ITD's published weights: evaluate ${FAM}_cifar10_itd_tuned"
    evaluated "$REPRO_ID-${P}published" || stage evaluate "${COMMON[@]}" "model=${FAM}_cifar10_itd_tuned" \
      "run_id=$REPRO_ID-${P}published" "label='$ROW(tune), ITD published weights'" "paper_row='$ROW(tune)'" \
      "${proposal[@]}"
  fi
}

# the evaluations' estimator.budget (experiment and overrides): budget_from applies to a dataset budget only
BUDGET="$("$PY" -m itdiffusion.stages.evaluate "$@" --cfg job --package estimator.budget)"
declare -A BASES=()
PROPOSAL_RUN="" MEMBERS=() MEMBER_MODELS=() MEMBER_RUNS=()
for fam in "${FAMILIES[@]}"; do base_model "$fam"; done

if [[ "${PREPARE:-0}" == 1 ]]; then
  echo "== [$REPRO_ID] PREPARE=1: data, statistics and base models ready"
  exit 0
fi

for fam in "${FAMILIES[@]}"; do family_chain "$fam"; done

if (( ${#FAMILIES[@]} > 1 )); then
  step "ensemble of every model (${MEMBER_MODELS[*]}; from their stored curves: no network runs)"
  join() { local IFS=,; echo "$*"; }
  evaluated "$REPRO_ID-ensemble-all" || stage evaluate "${COMMON[@]}" "run_id=$REPRO_ID-ensemble-all" \
    "ensemble=[$(join "${MEMBERS[@]}")]" "ensemble_models=[$(join "${MEMBER_MODELS[@]}")]" \
    "ensemble_curves=[$(join "${MEMBER_RUNS[@]}")]" estimator.vlb=false label=Ensemble paper_row=Ensemble \
    "model.training_objective='—'"
fi

MASKED_RUN="$REPRO_ID-masked"
if [[ "$experiment" == paper ]]; then
  MASKED_MODEL=masked_pixels_cifar10 MASKED_TRAIN=masked MASKED_WEIGHTS=ema.pt MASKED_EVAL=()
else
  MASKED_MODEL=masked_pixels_tiny MASKED_TRAIN=smoke_masked MASKED_WEIGHTS=model.pt
  MASKED_EVAL=(data.num_images=4 estimator.num_masks=4 estimator.batch_size=16)
fi
MASKED_CKPT="$CKPT/finetune/$MASKED_RUN/$MASKED_WEIGHTS"
if [[ "$MASKED" != 1 ]]; then
  step "masked diffusion model: not run (MASKED=1 trains $MASKED_MODEL from scratch${MASKED_COST})"
else
  step "masked diffusion model ($MASKED_MODEL, any-order loss)"
  if [[ -f "$MASKED_CKPT" ]]; then
    done_already "$MASKED_CKPT"
  else
    stage finetune "${COMMON[@]}" "run_id=$MASKED_RUN" "model=$MASKED_MODEL" "finetune=$MASKED_TRAIN" \
      "finetune.run_name=$MASKED_RUN"
  fi

  step "evaluate the masked diffusion model (I-MDCE)"
  if [[ -f "$OUT/evaluate/$MASKED_RUN/metrics.json" ]]; then
    done_already "$OUT/evaluate/$MASKED_RUN/metrics.json"
  else
    stage evaluate "${COMMON[@]}" "run_id=$MASKED_RUN" "model=$MASKED_MODEL" "model.checkpoint=$MASKED_CKPT" \
      "label='masked diffusion (I-MDCE)'" "${MASKED_EVAL[@]}"
  fi
fi

step "report"
single report "${COMMON[@]}" "run_id=$REPRO_ID-report"

echo
echo "== [$REPRO_ID] done in $((SECONDS - started)) s: $OUT/results/results.md"
if [[ "$experiment" == smoke ]]; then
  echo "   wandb (offline): wandb sync $OUT/wandb/offline-run-*   to upload the runs later"
fi
