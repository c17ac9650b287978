#!/usr/bin/env bash
# Ablation of configs/cpu.py's levers on the seed split, one short run per variant:
# the full recipe, then the recipe with one lever switched back to the seed's choice.
# Each run is scored on the val split (no post-processing); the table goes to
# OUT/ablation.md and OUT/ablation.json. Finished variants are skipped on a rerun.
#   launch/ablation_cpu.sh WORKROOT OUT [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:?WORKROOT}
out=${2:?OUT}
steps=${3:-400}
mkdir -p "$root" "$out"
common=(--config configs/cpu.py --config.num_train_steps="$steps"
        --config.warmup_steps=$(( steps / 4 )) --config.eval_every_steps=$(( steps / 4 ))
        --config.checkpoint_every_steps="$steps")
declare -A variants=(
  [full]=''
  [no_mri_volume_norm]='--config.data.channels=gray --config.data.normalization=scale'
  [no_dice_loss]='--config.loss=bce'
  [no_tumour_oversampling]='--config.data.tumour_fraction=0.0'
  [no_augmentation]='--config.augment.enabled=False'
  [no_adamw_cosine]='--config.optimizer=adam --config.learning_rate=1e-4 --config.weight_decay=0.0 --config.schedule=constant --config.warmup_steps=0'
)
order=(full no_mri_volume_norm no_dice_loss no_tumour_oversampling no_augmentation
       no_adamw_cosine)
for name in "${order[@]}"; do
  if [[ -f "$out/$name/metrics.json" ]]; then continue; fi
  start=$(date +%s)
  # shellcheck disable=SC2086  # The variant's flags are meant to split.
  python3 -m brainseg.main "${common[@]}" ${variants[$name]} --workdir "$root/$name"
  # A resumed run adds its time to the earlier part's.
  earlier=$(cat "$root/$name/train_seconds" 2>/dev/null || echo 0)
  echo $(( earlier + $(date +%s) - start )) > "$root/$name/train_seconds"
  if [[ ! -d "$root/$name/checkpoints/$steps" ]]; then  # Stopped early (SIGTERM saves, exits 0).
    echo "$name stopped before step $steps; run the same command to resume it." >&2
    exit 1
  fi
  python3 -m brainseg.evaluate --workdir "$root/$name" --split val --postprocess none \
      --output "$root/$name/val"
  mkdir -p "$out/$name"
  cp "$root/$name/val/metrics.json" "$root/$name/train_seconds" "$root/$name/config.json" \
      "$out/$name/"
done
python3 -m brainseg.ablation_table "$out" "${order[@]}"
