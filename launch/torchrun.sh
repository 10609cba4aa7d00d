#!/usr/bin/env bash
# Launch pretraining with torchrun (torch.distributed.run). Config overrides are the trailing arguments.
#
#   launch/torchrun.sh +experiment=gpt_125m trainer.max_steps=1000                 # one node, one process per GPU
#   NPROC_PER_NODE=2 launch/torchrun.sh +experiment=cpu_smoke                      # one node, 2 processes
#   # two nodes, static ranks: run on each node (NODE_RANK=0 on the node called node0)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh trainer.max_steps=1000
#   # two nodes, elastic c10d rendezvous (node ranks assigned by the rendezvous; NODE_RANK not needed)
#   NNODES=2 RDZV_BACKEND=c10d MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh trainer.max_steps=1000
#
# Environment (defaults):
#   NPROC_PER_NODE  processes per node (number of GPUs from nvidia-smi, else 1)
#   NNODES          nodes (1)
#   NODE_RANK       this node's rank, 0..NNODES-1, for RDZV_BACKEND=static (0)
#   MASTER_ADDR     address of node rank 0 / the rendezvous host (127.0.0.1)
#   MASTER_PORT     its port (29500; with one node and no MASTER_PORT, a free port is picked: --standalone)
#   RDZV_BACKEND    static (torchrun --node_rank) or c10d (torchrun --rdzv_backend=c10d)
#   RDZV_ID         rendezvous id for c10d, the same on every node (megatron_ext)
#   SCRIPT          entry point, relative to the repository or absolute (pretrain_gpt.py)
#   PYTHON          interpreter (python)
#   OMP_NUM_THREADS threads per process (CPU cores / NPROC_PER_NODE)
#   MAX_RESTARTS    torchrun --max-restarts (0): after a worker fails, torchrun restarts all of them this many times;
#                   a restarted worker resumes from the latest checkpoint of the same run directory
#   SHUTDOWN_TIMEOUT  torchrun --shutdown-timeout (120): seconds the workers get, after torchrun forwards SIGTERM /
#                   SIGUSR1 to them, to finish their step and write the checkpoint before SIGKILL
# SIGUSR1 to torchrun is forwarded to the workers (--signals-to-handle adds it to torchrun's SIGTERM,SIGINT,SIGHUP,
# SIGQUIT; by default SIGUSR1 would kill torchrun); the workers then checkpoint and exit 75 (README "Fault tolerance").
# trainer.devices and trainer.num_nodes are set to NPROC_PER_NODE and NNODES (given first, so an explicit
# override on the command line wins; a mismatch with the launched world size is then reported as an error).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
SCRIPT="${SCRIPT:-pretrain_gpt.py}"
[[ "$SCRIPT" = /* ]] || SCRIPT="$REPO/$SCRIPT"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
RDZV_BACKEND="${RDZV_BACKEND:-static}"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    OMP_NUM_THREADS=$(( $(nproc) / NPROC_PER_NODE ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
fi

# a restarted worker group must not read the dead group's addresses from torchrun's shared store (gloo then
# connects to dead ports): every round gets its own store (torch's own switch)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
args=(--nproc_per_node="$NPROC_PER_NODE" --nnodes="$NNODES" --max-restarts="${MAX_RESTARTS:-0}"
      --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-120}")
if [[ "$NNODES" -eq 1 && -z "${MASTER_PORT:-}" ]]; then
    args+=(--standalone)
elif [[ "$RDZV_BACKEND" == "c10d" ]]; then
    args+=(--rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
           --rdzv_id="${RDZV_ID:-megatron_ext}")
elif [[ "$RDZV_BACKEND" == "static" ]]; then
    args+=(--node_rank="$NODE_RANK" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}")
else
    echo "error: RDZV_BACKEND=$RDZV_BACKEND: expected static or c10d" >&2
    exit 2
fi

set -x
exec "$PYTHON" -m torch.distributed.run "${args[@]}" "$SCRIPT" \
    trainer.devices="$NPROC_PER_NODE" trainer.num_nodes="$NNODES" "$@"
