#!/usr/bin/env bash
# ReLabel training on SLURM: one torchrun per node, 8 GPUs each, c10d rendezvous on the first
# node. Submit with: sbatch train/slurm.sh  (edit the paths and the resources first)
#SBATCH --job-name=relabel-r50
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --signal=TERM@300          # SIGTERM 5 min before the limit: the trainer checkpoints
#SBATCH --requeue
set -euo pipefail

# torchrun gives its workers 30 s after forwarding SIGTERM: the ranks agree on it at the end of
# the next step (a vote every step) and write last.pt well inside that.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
output=output/relabel-r50
srun torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node=8 \
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:29500" --rdzv-id="$SLURM_JOB_ID" \
    train/run.py \
    --data /data/imagenet/train --labelmaps /data/relabel_imagenet.h5 \
    --val-data /data/imagenet/val --real-labels /data/real.json \
    --model resnet50 --epochs 300 --batch-size 128 --amp --channels-last \
    --output "$output" --resume auto --ckpt-every 2000 || true

# Stopped before the last epoch (time limit, preemption): queue the job again; it resumes.
if ! python -c "import sys, torch; s = torch.load('$output/last.pt', weights_only=False); \
sys.exit(s['epoch'] < s['args']['epochs'])"; then
    scontrol requeue "$SLURM_JOB_ID"
fi
