#!/usr/bin/env bash
# How the 0.1 test data here was made, with diffproc 0.1.0 (commit 09b299b) on CPU:
# for each tiny config, a 3-step fit (-> <name>_step3.ckpt, the checkpoint to convert, and the run's saved
# config.yaml -> <name>_run_config.yaml) and its resumption to step 6 (-> <name>_step6.ckpt, what 0.1 trains
# next; an explicit --ckpt_path logs to a new version, version_1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
work=$(mktemp -d)
cd "$work"
for name in ddpm gddm; do
  OMP_NUM_THREADS=1 PYTHONPATH="$repo" python "$repo/cli.py" fit --config "$here/${name}_tiny.yaml"
  cp "runs/v0_1_$name/version_0/checkpoints/last.ckpt" "$here/${name}_step3.ckpt"
  cp "runs/v0_1_$name/version_0/config.yaml" "$here/${name}_run_config.yaml"
  OMP_NUM_THREADS=1 PYTHONPATH="$repo" python "$repo/cli.py" fit --config "$here/${name}_tiny.yaml" \
    --trainer.max_steps 6 --ckpt_path "runs/v0_1_$name/version_0/checkpoints/last.ckpt"
  cp "runs/v0_1_$name/version_1/checkpoints/last.ckpt" "$here/${name}_step6.ckpt"
done
rm -rf "$work"
