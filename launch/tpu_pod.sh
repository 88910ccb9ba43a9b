#!/usr/bin/env bash
# Runs one bridle_jax command on every host of a Cloud TPU VM slice (v4-32, v5p-64, ...).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh --setup
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/run1 \
#       launch/tpu_pod.sh --config=configs/audio.py --config.data.manifest=/mnt/shared/as2m.json \
#       --config.data.label_csv=/mnt/shared/class_labels_indices.csv
#
# --setup copies this checkout (less .git, .venv, venv) to ~/bridle_jax on every host and
# installs it with jax[tpu].
# The run holds the ssh session: start it from tmux (or screen) so that a dropped
# connection does not end the job.
# Every host then runs `python -m bridle_jax.main --distributed` with the same arguments;
# jax finds the slice's coordinator itself. WORKDIR and the data must be paths every host
# sees (a Filestore/NFS mount, or a gcsfuse mount of a bucket): all hosts write their
# checkpoint shards there and read their share of the clips. After a preemption, rerun
# the same command: each phase resumes from its last checkpoint, data position included.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REMOTE_DIR="${REMOTE_DIR:-bridle_jax}"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

if [[ "${1:-}" == "--setup" ]]; then
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  # The checkout without its virtual environments and git history (gigabytes per host).
  archive="$(mktemp -d)/checkout.tar.gz"
  tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./venv \
    --exclude=__pycache__ -czf "$archive" .
  on_all_hosts "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR"
  gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all "$archive" \
    "$TPU_NAME:~/$REMOTE_DIR/checkout.tar.gz"
  rm -r "$(dirname "$archive")"
  on_all_hosts "cd ~/$REMOTE_DIR && tar -xzf checkout.tar.gz && rm checkout.tar.gz && \
python3 -m pip install -q -e . 'jax[tpu]'"
  exit 0
fi

: "${WORKDIR:?set WORKDIR to a directory every host shares}"
args="$(printf ' %q' "--workdir=$WORKDIR" "$@")"
on_all_hosts "cd ~/$REMOTE_DIR && python3 -m bridle_jax.main --distributed$args"
