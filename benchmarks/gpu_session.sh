#!/usr/bin/env bash
# One GPU lease for the real-data study (issue 27): everything under one folder, in under 9 minutes on one H100.
#
#   1. the Fashion-MNIST study at GPU scale: the six *_fmnist configs trained side by side on the one GPU
#      (STEPS steps, batch BATCH, seed 0), then benchmarks/compare.py: SAMPLES samples per row, NFE 10/20/50 with
#      each method's config solver, FID/KID/precision/recall against the 10k test images, the floor row, grids;
#   2. benchmarks/throughput.py at batch 64 and 256 (eager / channels-last / compile / all; bf16; img/s, MFU);
#   3. the GPU resume check: 2*R steps in one go vs R steps + resume for R more; weights compared.
#
# What has to travel (the device reaches no registry, and at most 64 MiB travel per call): prepare it here with
#   bash benchmarks/gpu_session.sh prepare        # -> .gl/ (data .gz 30 MB, weights in two halves of 46 MB), .whl/
# then three calls, back to back (the machine stays warm 30 s between calls; what a call stages stays there):
#   run(command="bash benchmarks/gpu_session.sh stage", carry=[".gl/w1"])
#   run(command="bash benchmarks/gpu_session.sh stage", carry=[".gl/w2", ".whl"])
#   run(command="bash benchmarks/gpu_session.sh", carry=[".gl/fmnist"], timeout_s=560)
# One call carries at most 64 MiB, and weights + data + wheels are 133 MB; the last call joins the weight halves
# and checks their sha256 before anything runs. On the CPU: TINY=1 DEVICE=cpu bash benchmarks/gpu_session.sh (a few minutes, tiny
# sizes) checks the whole script, prepare included.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
OUT=${OUT:-/tmp/gpu_session_out}
RES=${RES:-/tmp/gpu_session}  # work folder; what comes back is packed into $OUT at the end (8 files at most)
TINY=${TINY:-0}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
WEIGHTS_NAME=weights-inception-2015-12-05-nologits-1cfcff72.pth
if [ "$TINY" = 1 ]; then
  STEPS=${STEPS:-4}; BATCH=${BATCH:-8}; SAMPLES=${SAMPLES:-16}; NFE=${NFE:-"2 4"}; R=${R:-2}; TP_BATCHES=${TP_BATCHES:-8}
  REF=(--reference-num 32)
else
  STEPS=${STEPS:-3000}; BATCH=${BATCH:-128}; SAMPLES=${SAMPLES:-10000}; NFE=${NFE:-"10 20 50"}; R=${R:-200}
  TP_BATCHES=${TP_BATCHES:-"64 256"}
  REF=()
fi
METHODS="ddpm gddm lddm epdm blur sie"

if [ "$MODE" = prepare ]; then  # here, on the CPU machine with the registries
  mkdir -p .gl/w1 .gl/w2 .gl/fmnist .whl
  w=$(ls ~/.cache/torch/hub/checkpoints/weights-inception-2015-12-05-nologits-*.pth 2>/dev/null | head -n1 || true)
  [ -n "$w" ] || { $PY -m diffproc.metrics.get_inception; w=$(ls ~/.cache/torch/hub/checkpoints/weights-inception-2015-12-05-nologits-*.pth | head -n1); }
  half=$(( ($(stat -c %s "$w") + 1) / 2 ))
  head -c "$half" "$w" > .gl/w1/part1 && tail -c +"$((half + 1))" "$w" > .gl/w2/part2
  sha256sum "$w" | awk '{print $1}' > .gl/w2/sha256
  basename "$w" > .gl/w2/name
  root=$($PY -c "from diffproc.data.mnist import FashionMNISTDataModule as F; print(F(image_size=28).folder)")
  for f in "$root"/*; do case "$f" in *.gz) cp "$f" .gl/fmnist/ ;; *) gzip -c "$f" > ".gl/fmnist/$(basename "$f").gz" ;; esac; done
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform any -d .whl \
      diffusers jsonargparse docstring-parser typeshed-client torchdata torch-fidelity
  du -sh .gl/w1 .gl/w2 .gl/fmnist .whl
  exit 0
fi

hub=${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints
STAGE=${STAGE:-$HOME/.diffproc_gpu_stage}  # outside the tree: stays while the machine is warm
if [ "$MODE" = stage ]; then  # keep what this call carried for the next one
  mkdir -p "$STAGE"
  for d in .gl/w1 .gl/w2 .gl/fmnist .whl; do [ -d "$d" ] && cp -r "$d" "$STAGE/"; done
  du -sh "$STAGE"/* && exit 0
fi
for d in w1 w2 fmnist; do [ -d ".gl/$d" ] || { [ -d "$STAGE/$d" ] && mkdir -p .gl && cp -r "$STAGE/$d" .gl/; }; done
[ -d .whl ] || { [ -d "$STAGE/.whl" ] && cp -r "$STAGE/.whl" .; }

mkdir -p "$RES"
exec > >(tee -a "$RES/session.log") 2>&1
t0=$(date +%s)
stamp() { echo "[gpu_session +$(( $(date +%s) - t0 ))s] $*"; }
stamp "start: TINY=$TINY DEVICE=$DEVICE STEPS=$STEPS BATCH=$BATCH SAMPLES=$SAMPLES NFE=$NFE"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$RES/device.txt"
if ls .whl/*.whl >/dev/null 2>&1 && [ "$DEVICE" != cpu ]; then $PY -m pip install -q --no-deps .whl/*.whl; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -f .gl/w2/part2 ]; then  # join the halves, check the hash
  mkdir -p "$hub"
  cat .gl/w1/part1 .gl/w2/part2 > "$hub/$(cat .gl/w2/name)"
  echo "$(cat .gl/w2/sha256)  $hub/$(cat .gl/w2/name)" | sha256sum -c -
fi
data=$PWD/data
if [ -d .gl/fmnist ]; then data=$PWD/.gl; mkdir -p .gl/FashionMNIST && ln -sfn ../fmnist .gl/FashionMNIST/raw; fi
export DIFFPROC_DATA=$data DIFFPROC_CACHE=$RES/cache

# 1. the study: six fits side by side on the one GPU, then the evaluation
acc=$([ "$DEVICE" = cpu ] && echo cpu || echo gpu)
fit_args=(--trainer.accelerator "$acc" --data.init_args.batch_size "$BATCH" --trainer.max_steps "$STEPS"
          --trainer.val_check_interval "$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))" --checkpoint.every_n_train_steps "$STEPS"
          --sample_grid.every_n_steps "$STEPS" --sample_grid.cpu_budget_seconds 0 --trainer.enable_progress_bar false
          --trainer.logger.init_args.save_dir "$RES/study/runs" --trainer.logger.init_args.version 0)
[ "$DEVICE" = cpu ] || fit_args+=(--trainer.precision bf16-mixed)
pids=()
for m in $METHODS; do
  OMP_NUM_THREADS=1 $PY cli.py fit --config "configs/${m}_fmnist.yaml" "${fit_args[@]}" > "$RES/fit_${m}.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { stamp "a fit failed:"; tail -n 5 "$RES"/fit_*.log; exit 1; }; done
stamp "six fits done"
configs=(); for m in $METHODS; do configs+=("configs/${m}_fmnist.yaml"); done
# shellcheck disable=SC2086
$PY benchmarks/compare.py --configs "${configs[@]}" --steps "$STEPS" --out "$RES/study" --nfe $NFE \
    --solvers ddim ancestral heun --num-samples "$SAMPLES" --eval-batch-size 500 --device "$DEVICE" \
    --extractor inception --reference-split test --floor --batch-size "$BATCH" --grid-images 64 "${REF[@]}" \
    > "$RES/compare.log" 2>&1 || { tail -n 30 "$RES/compare.log"; exit 1; }
stamp "study evaluated: $RES/study/results.md"

# 2. throughput at batch 64 and 256
for b in $TP_BATCHES; do
  tp=(--device "$DEVICE" --image-size 32 --batch-size "$b" --repeats "$([ "$TINY" = 1 ] && echo 1 || echo 5)")
  [ "$DEVICE" = cpu ] && tp+=(--variants eager channels_last) || tp+=(--precision bf16)
  $PY benchmarks/throughput.py "${tp[@]}" --out "$RES/throughput_b${b}.md" --json "$RES/throughput_b${b}.json" \
      > "$RES/throughput_b${b}.log" 2>&1 || stamp "throughput at batch $b failed (see its log)"
done
stamp "throughput done"

# 3. resume on the GPU: 2R steps in one go vs R + R resumed
rc=(--config configs/ddpm_fmnist.yaml --trainer.accelerator "$acc" --data.init_args.batch_size "$BATCH"
    --sample_grid.every_n_steps 0 --trainer.enable_progress_bar false --trainer.limit_val_batches 0
    --trainer.logger.init_args.save_dir "$RES/resume" --trainer.logger.init_args.version 0)
$PY cli.py fit "${rc[@]}" --trainer.logger.init_args.name straight --trainer.max_steps $((2 * R)) > "$RES/resume.log" 2>&1
$PY cli.py fit "${rc[@]}" --trainer.logger.init_args.name split --trainer.max_steps "$R" >> "$RES/resume.log" 2>&1
$PY cli.py fit "${rc[@]}" --trainer.logger.init_args.name split --trainer.max_steps $((2 * R)) \
    --ckpt_path "$RES/resume/split/version_0/checkpoints/last.ckpt" >> "$RES/resume.log" 2>&1
$PY - "$RES" <<'EOF' | tee "$RES/resume.txt"
import sys, torch
res = sys.argv[1]
a, b = (torch.load(f"{res}/resume/{n}/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        for n in ("straight", "split"))
diff = max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in a["state_dict"])
print(f"global_step {a['global_step']} vs {b['global_step']}; max |weight difference| {diff:.3e} "
      f"({'bitwise equal' if diff == 0 else 'not bitwise (on a GPU: non-deterministic kernels)'})")
EOF
stamp "done; packing into $OUT"
mkdir -p "$OUT"
cp "$RES/study/results.md" "$OUT/results.md" 2>/dev/null || true
cp "$RES/resume.txt" "$OUT/resume.txt" 2>/dev/null || true
tar czf "$OUT/gpu_session.tgz" --exclude='*.ckpt' --exclude='samples/*.pt' -C "$(dirname "$RES")" "$(basename "$RES")"
cp "$RES/session.log" "$OUT/session.log"
ls -la "$OUT"
