#!/usr/bin/env bash
# Build docker/Dockerfile on this machine, daemon-less, with buildah, on a base image made here, and run a
# 20-step fit inside the result (issue 29 item 3). No Docker engine and no pull from Docker Hub:
#
#   1. a Debian bookworm root filesystem from the Debian mirror (mmdebstrap: python3 3.11, python3-venv,
#      ca-certificates)                                                           -> rootfs.tar
#   2. torch/torchvision wheel files collected by this machine's pip (local wheel dirs first, then PyPI),
#      with their dependencies (nvidia-* CUDA libraries included, as in pytorch/pytorch) -> wheels/
#   3. the base image localhost/diffproc-base:local: docker/local-base/Containerfile (FROM scratch, ADD
#      rootfs.tar, a venv at /opt/venv first on PATH, pip install of the wheels, bind-mounted at /wheels)
#   4. the image localhost/diffproc:local: docker/Dockerfile with --build-arg BASE=localhost/diffproc-base:local
#      (its RUN pip install gets Lightning, diffusers, ... from PyPI and keeps the base's torch)
#   5. checks inside the image: configs/, the installed package's shapes classifier weights, then
#        python /opt/diffproc/cli.py fit --config configs/quickstart.yaml --trainer.max_steps 20
#      (the image's ENTRYPOINT, in its WORKDIR) with runs/ bind-mounted from the host; it must exit 0 and
#      leave a last.ckpt at global step 20.
#
# Usage (as root; apt-get installs buildah and mmdebstrap when missing):
#   docker/build-local.sh            # keeps the images (and the rootfs/wheel caches) in $WORK
#   docker/build-local.sh --clean    # removes $WORK at the end, images included (CI)
# Environment:
#   DIFFPROC_IMAGE_WORK  work dir: buildah storage, rootfs.tar, wheels, runs (default /var/tmp/diffproc-image)
#   STORAGE_DRIVER       overlay or vfs (default: overlay if this kernel mounts it here, else vfs)
#   PYTHON               the Python whose pip collects the wheels (default python3)
#   TORCH, TORCHVISION   versions for the base (default 2.14.1 / 0.29.1)
#   CA_BUNDLE            CA bundle mounted into the image build for pip (default /etc/ssl/certs/ca-certificates.crt)
# Any failure exits non-zero with the failing step named; nothing is skipped.
# The images stay in buildah's storage under $WORK; use them with the same options, e.g.
#   buildah --root $WORK/storage --runroot $WORK/run --storage-driver overlay images
#   buildah ... push localhost/diffproc:local docker-archive:/tmp/diffproc.tar   (then: docker load -i)
# Measured times and sizes: docker/README.md ("The image, built here").
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

clean=0
for a in "$@"; do
  case "$a" in
    --clean) clean=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-local.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

WORK=${DIFFPROC_IMAGE_WORK:-/var/tmp/diffproc-image}
case "$WORK" in /*/*) ;; *) echo "build-local.sh: DIFFPROC_IMAGE_WORK must be an absolute path below a top-level directory, not '$WORK'" >&2; exit 2 ;; esac
TORCH=${TORCH:-2.14.1}
TORCHVISION=${TORCHVISION:-0.29.1}
PYTHON=${PYTHON:-python3}
BASE_TAG=localhost/diffproc-base:local
IMAGE_TAG=localhost/diffproc:local
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

step=""
t_start=$SECONDS
t_step=$SECONDS
begin() { step=$1; t_step=$SECONDS; echo; echo "=== build-local: $step"; }
done_() { echo "=== build-local: $step done in $((SECONDS - t_step)) s"; }
B=()
ctr=""
finish() {
  local rc=$?
  if [ -n "$ctr" ]; then "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true; fi
  [ "$rc" = 0 ] || echo "build-local.sh: FAILED (exit $rc) in step: $step" >&2
  if [ "$clean" = 1 ] && [ -d "$WORK" ]; then   # also after a failure: CI must not keep the ~10 GB of images and caches
    if [ "${#B[@]}" -gt 0 ]; then "${B[@]}" rmi -a -f >/dev/null 2>&1 || true; fi
    rm -rf "$WORK" && echo "build-local.sh: removed $WORK"
  fi
  exit "$rc"
}
trap finish EXIT

[ "$(id -u)" = 0 ] || { echo "build-local.sh: run as root (buildah with chroot isolation, mmdebstrap)" >&2; exit 2; }

begin "tools (buildah, mmdebstrap)"
if ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah mmdebstrap >/dev/null
fi
buildah --version
mkdir -p "$WORK"
free_gb=$(df -P -BG "$WORK" | awk 'NR == 2 {sub("G", "", $4); print $4}')
if [ "$free_gb" -lt "${MIN_FREE_GB:-30}" ]; then
  echo "build-local.sh: only ${free_gb} GB free under $WORK; the build needs about 25 GB at its peak (MIN_FREE_GB, default 30)" >&2
  exit 1
fi
if [ -z "${STORAGE_DRIVER:-}" ]; then
  # overlay needs a kernel overlay mount here (root with CAP_SYS_ADMIN, a non-overlay /var/tmp); else vfs,
  # which works anywhere but copies the whole base for every container (slower, several times the disk)
  p=$(mktemp -d "$WORK/ovprobe.XXXX"); mkdir -p "$p"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$p/l,upperdir=$p/u,workdir=$p/w" "$p/m" 2>/dev/null; then
    umount "$p/m"; STORAGE_DRIVER=overlay
  else
    STORAGE_DRIVER=vfs
  fi
  rm -rf "$p"
fi
echo "storage driver: $STORAGE_DRIVER, isolation: chroot, work dir: $WORK"
# chroot isolation: the OCI runtime (crun) cannot start containers in this kind of machine (cgroups v1/v2
# hybrid, no CAP_SYS_RESOURCE); RUN steps and `buildah run` then use the host network (PyPI).
B=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver "$STORAGE_DRIVER")
export BUILDAH_ISOLATION=chroot
done_

begin "Debian bookworm root filesystem (mmdebstrap)"
mkdir -p "$WORK/base"
if [ ! -s "$WORK/base/rootfs.tar" ]; then
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/base/rootfs.tar.part" "$MIRROR"
  mv "$WORK/base/rootfs.tar.part" "$WORK/base/rootfs.tar"
else
  echo "reusing $WORK/base/rootfs.tar"
fi
ls -l "$WORK/base/rootfs.tar"
done_

begin "torch $TORCH / torchvision $TORCHVISION wheels (this machine's pip)"
mkdir -p "$WORK/wheels"
"$PYTHON" -m pip download -q --disable-pip-version-check --only-binary :all: \
  "torch==$TORCH" "torchvision==$TORCHVISION" -d "$WORK/wheels" 2> >(grep -v "is ignored: it is neither" >&2)
ls "$WORK/wheels" | grep -E '^torch(vision)?-' || { echo "no torch/torchvision wheel in $WORK/wheels" >&2; exit 1; }
du -sh "$WORK/wheels"
done_

begin "base image $BASE_TAG (docker/local-base/Containerfile)"
"${B[@]}" bud --isolation chroot --layers=false \
  --build-arg "TORCH=$TORCH" --build-arg "TORCHVISION=$TORCHVISION" \
  -v "$WORK/wheels:/wheels:ro" -f "$repo/docker/local-base/Containerfile" -t "$BASE_TAG" "$WORK/base"
done_

begin "image $IMAGE_TAG (docker/Dockerfile, --build-arg BASE=$BASE_TAG)"
# RUN pip install reaches PyPI through the host network; this machine's CA bundle (it holds the CA of the
# TLS-intercepting proxy, if any) is bind-mounted over the base's for the build only (PIP_CERT points there)
ca=()
[ -s "$CA_BUNDLE" ] && ca=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
t_image=$SECONDS
"${B[@]}" bud --isolation chroot --layers=false --pull=never "${ca[@]}" \
  --build-arg "BASE=$BASE_TAG" -f docker/Dockerfile -t "$IMAGE_TAG" .
t_image=$((SECONDS - t_image))
"${B[@]}" rmi --prune >/dev/null 2>&1 || true   # an earlier base or image that lost its tag
"${B[@]}" images
done_

begin "what the image holds"
ctr=$("${B[@]}" from --pull=never "$IMAGE_TAG")
"${B[@]}" run --isolation chroot "$ctr" -- sh -ec '
  cd /opt/diffproc && ls cli.py configs/quickstart.yaml && echo "configs: $(ls configs | tr "\n" " ")"
  cd / && python - <<EOF
import pathlib, diffproc, diffproc.data.shapes, torch, lightning
pkg = pathlib.Path(diffproc.__file__).parent
assert "site-packages" in str(pkg), pkg
w = sorted(p.name for p in (pkg / "metrics" / "weights").iterdir())
print("installed package:", pkg)
print("metrics/weights:", w)
assert "shapes_classifier.pt" in w and "shapes_classifier.json" in w
torch.load(pkg / "metrics" / "weights" / "shapes_classifier.pt", weights_only=True, map_location="cpu")
print("embedded dataset:", diffproc.data.shapes.ShapesDataModule.__name__, "| torch", torch.__version__,
      "| lightning", lightning.__version__)
EOF'
done_

begin "20-step fit inside the image"
rm -rf "$WORK/runs"; mkdir -p "$WORK/runs"
# the image's own ENTRYPOINT and WORKDIR (buildah run uses neither by itself): what `docker run <image> fit ...` runs
"${B[@]}" inspect --type image "$IMAGE_TAG" > "$WORK/image.json"
mapfile -t entry < <("$PYTHON" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["OCIv1"]["config"]["Entrypoint"]))' "$WORK/image.json")
wdir=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["OCIv1"]["config"]["WorkingDir"])' "$WORK/image.json")
[ "${#entry[@]}" -gt 0 ] && [ -n "$wdir" ] || { echo "the image has no ENTRYPOINT/WORKDIR" >&2; exit 1; }
fit=("${entry[@]}" fit --config configs/quickstart.yaml --trainer.max_steps 20)
echo "+ buildah run --isolation chroot --workingdir $wdir -v $WORK/runs:$wdir/runs <container of $IMAGE_TAG> -- ${fit[*]}"
t_fit=$SECONDS
set +e
"${B[@]}" run --isolation chroot --workingdir "$wdir" -v "$WORK/runs:$wdir/runs" "$ctr" -- \
  "${fit[@]}" > "$WORK/fit.log" 2>&1
fit_rc=$?
set -e
t_fit=$((SECONDS - t_fit))
tr '\r' '\n' < "$WORK/fit.log" | grep -v '^\s*$' | tail -n 15
[ "$fit_rc" = 0 ] || { echo "the fit inside the image exited with $fit_rc (log: $WORK/fit.log)" >&2; exit 1; }
ckpt=$(cd "$WORK/runs" && ls quickstart/version_*/checkpoints/last.ckpt 2>/dev/null | tail -n1)
[ -n "$ckpt" ] || { echo "no runs/quickstart/version_*/checkpoints/last.ckpt after the fit" >&2; find "$WORK/runs" >&2; exit 1; }
"${B[@]}" run --isolation chroot --workingdir "$wdir" -v "$WORK/runs:$wdir/runs" "$ctr" -- \
  python -c "import torch; c = torch.load('runs/$ckpt', weights_only=True, map_location='cpu'); \
assert c['global_step'] == 20, c['global_step']; print('runs/$ckpt: global_step', c['global_step'])"
done_

size_base=$("${B[@]}" images --format '{{.Size}}' "$BASE_TAG")
size_image=$("${B[@]}" images --format '{{.Size}}' "$IMAGE_TAG")
echo
echo "build-local: OK in $((SECONDS - t_start)) s (storage $STORAGE_DRIVER): $BASE_TAG $size_base, $IMAGE_TAG $size_image;" \
  "docker/Dockerfile build $t_image s; 20-step fit $t_fit s, exit 0, $ckpt at step 20"
