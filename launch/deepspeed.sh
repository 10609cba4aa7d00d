#!/usr/bin/env bash
# Launch pretraining with the DeepSpeed launcher and a hostfile. Config overrides are the trailing arguments.
#
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh +experiment=cpu_smoke        # localhost slots=2: local, no ssh
#   HOSTFILE=my_hosts launch/deepspeed.sh +experiment=gpt_125m                          # multi-node: ssh + pdsh from here
#   # multi-node without ssh: run on every node, each with its own NODE_RANK (hostfile order)
#   NO_SSH=1 NODE_RANK=0 HOSTFILE=my_hosts launch/deepspeed.sh +experiment=gpt_125m
#
# Environment (defaults):
#   HOSTFILE        "<host> slots=<n>" per line (launch/hostfile, else launch/hostfile.example)
#   MASTER_ADDR     address of the first host (the first host of the hostfile; 127.0.0.1 when it is local)
#   MASTER_PORT     29500
#   NO_SSH, NODE_RANK   NO_SSH=1: start only this node's processes (deepspeed --no_ssh --node_rank=NODE_RANK)
#   SCRIPT          entry point, relative to the repository or absolute (pretrain_gpt.py)
#   PYTHON          interpreter (python); DeepSpeed is run as "$PYTHON -m deepspeed.launcher.runner"
#   OMP_NUM_THREADS threads per process (CPU cores / slots)
#   DS_ACCELERATOR  cpu when no GPU is found (nvidia-smi)
# trainer.devices and trainer.num_nodes are set from the hostfile (slots per node, number of hosts), first, so
# an explicit override on the command line wins (and a mismatch is then reported as an error).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
SCRIPT="${SCRIPT:-pretrain_gpt.py}"
[[ "$SCRIPT" = /* ]] || SCRIPT="$REPO/$SCRIPT"
if [[ -z "${HOSTFILE:-}" ]]; then
    HOSTFILE="$REPO/launch/hostfile"
    [[ -f "$HOSTFILE" ]] || HOSTFILE="$REPO/launch/hostfile.example"
fi
if [[ ! -f "$HOSTFILE" ]]; then
    echo "error: HOSTFILE=$HOSTFILE: file not found" >&2
    exit 2
fi

# hosts and slots, skipping comments and blank lines
hosts=()
slots=""
while read -r host rest; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    s=$(sed -n 's/.*slots=\([0-9]\+\).*/\1/p' <<<"$rest")
    if [[ -z "$s" ]]; then
        echo "error: $HOSTFILE: line for $host has no slots=<n>" >&2
        exit 2
    fi
    if [[ -n "$slots" && "$s" != "$slots" ]]; then
        echo "error: $HOSTFILE: every host needs the same slots (trainer.devices): $host has $s, the first host $slots" >&2
        exit 2
    fi
    slots="$s"
    hosts+=("$host")
done < "$HOSTFILE"
if [[ ${#hosts[@]} -eq 0 ]]; then
    echo "error: $HOSTFILE lists no hosts" >&2
    exit 2
fi
NNODES=${#hosts[@]}

is_local() { [[ "$1" == "localhost" || "$1" == "127.0.0.1" || "$1" == "$(hostname)" || "$1" == "$(hostname -s)" ]]; }

if ! nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    OMP_NUM_THREADS=$(( $(nproc) / slots ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
fi

args=(--hostfile="$HOSTFILE" --master_port="${MASTER_PORT:-29500}" --no_local_rank)
if [[ "${NO_SSH:-0}" == "1" ]]; then
    args+=(--no_ssh --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-${hosts[0]}}")
elif [[ $NNODES -eq 1 ]] && is_local "${hosts[0]}"; then
    # one local host: DeepSpeed would still check ssh to it and ask it for its address; neither is needed
    args+=(--no_ssh_check --master_addr="${MASTER_ADDR:-127.0.0.1}")
elif [[ -n "${MASTER_ADDR:-}" ]]; then
    args+=(--master_addr="$MASTER_ADDR")
fi

set -x
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" "$SCRIPT" \
    trainer.devices="$slots" trainer.num_nodes="$NNODES" "$@"
