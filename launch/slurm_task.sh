#!/usr/bin/env bash
# The per-task part of the SLURM templates (launch/slurm_*.sbatch); srun runs it once per task.
#
#   slurm_task.sh python  [overrides...]   one task per GPU/process: runs the entry point directly; megatron_ext reads
#                                          SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (rank, world size, local rank)
#   slurm_task.sh torchrun [overrides...]  one task per node: runs torchrun with NPROC_PER_NODE processes and a c10d
#                                          rendezvous on the job's first host
#
# Environment: SLURM_* as set by srun (SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NTASKS, SLURM_PROCID, SLURM_NODEID,
# SLURM_JOB_ID ...), and optionally
#   MASTER_ADDR   default: the first host of SLURM_JOB_NODELIST (scontrol show hostnames; a simple parser when
#                 scontrol is absent)
#   MASTER_PORT   default: 20000 + SLURM_JOB_ID % 20000 (the same on every node, different for concurrent jobs)
#   NPROC_PER_NODE  torchrun mode: processes per node (SLURM_GPUS_ON_NODE, else 1)
#   SCRIPT, PYTHON, OMP_NUM_THREADS   as in launch/torchrun.sh
#   MAX_RESTARTS, SHUTDOWN_TIMEOUT    torchrun mode: torchrun --max-restarts (0) and --shutdown-timeout (120), as in
#                 launch/torchrun.sh (SIGUSR1 is forwarded to the workers too)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
SCRIPT="${SCRIPT:-pretrain_gpt.py}"
[[ "$SCRIPT" = /* ]] || SCRIPT="$REPO/$SCRIPT"
MODE="${1:-}"
shift || true

first_host() {  # first host name of a SLURM node list: "a,b", "node[01-04,07],gpu3", "node[3]"
    local nl="$1"
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$nl" | head -n 1
    elif [[ "$nl" =~ ^([^,\[]+)\[([0-9]+) ]]; then
        echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
    else
        echo "${nl%%,*}"
    fi
}

NODELIST="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-localhost}}"
NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
export MASTER_ADDR="${MASTER_ADDR:-$(first_host "$NODELIST")}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

case "$MODE" in
python)
    NTASKS="${SLURM_NTASKS:?SLURM_NTASKS is not set: run this under srun (or set the SLURM_* variables)}"
    if (( NTASKS % NNODES )); then
        echo "error: SLURM_NTASKS=$NTASKS is not a multiple of SLURM_NNODES=$NNODES: use the same --ntasks-per-node on every node" >&2
        exit 2
    fi
    PER_NODE=$(( NTASKS / NNODES ))
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        cpus="${SLURM_CPUS_PER_TASK:-$(( $(nproc) / PER_NODE ))}"
        export OMP_NUM_THREADS=$(( cpus >= 1 ? cpus : 1 ))
    fi
    # RANK/WORLD_SIZE from an enclosing launcher would take precedence over SLURM_PROCID/SLURM_NTASKS
    unset RANK WORLD_SIZE LOCAL_RANK
    echo "[slurm_task] task ${SLURM_PROCID:-?}/$NTASKS on $(hostname) (local ${SLURM_LOCALID:-?}), master $MASTER_ADDR:$MASTER_PORT" >&2
    exec "$PYTHON" "$SCRIPT" trainer.devices="$PER_NODE" trainer.num_nodes="$NNODES" "$@"
    ;;
torchrun)
    NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / NPROC_PER_NODE ))
        export OMP_NUM_THREADS=$(( OMP_NUM_THREADS >= 1 ? OMP_NUM_THREADS : 1 ))
    fi
    # torchrun's workers get RANK/WORLD_SIZE; hide the task-level SLURM variables from them, so nothing reads the
    # node-level SLURM_PROCID/SLURM_NTASKS as a process rank
    unset SLURM_PROCID SLURM_NTASKS SLURM_LOCALID RANK WORLD_SIZE LOCAL_RANK
    echo "[slurm_task] node ${SLURM_NODEID:-?}/$NNODES on $(hostname): torchrun $NPROC_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
    # a restarted worker group must not read the dead group's addresses from torchrun's shared store (gloo then
    # connects to dead ports): every round gets its own store (torch's own switch)
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
    set -x
    exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
        --max-restarts="${MAX_RESTARTS:-0}" --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
        --shutdown-timeout="${SHUTDOWN_TIMEOUT:-120}" \
        --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${SLURM_JOB_ID:-megatron_ext}" \
        "$SCRIPT" trainer.devices="$NPROC_PER_NODE" trainer.num_nodes="$NNODES" "$@"
    ;;
*)
    echo "usage: $0 python|torchrun [overrides...]" >&2
    exit 2
    ;;
esac
