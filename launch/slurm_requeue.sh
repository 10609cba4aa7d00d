#!/usr/bin/env bash
# Sourced by launch/slurm_*.sbatch: run one job step, restart it after a failure (per-task template: MAX_RESTARTS),
# and requeue the job when it was preempted.
#
#   slurm_run_step <per-task command...>
#
# * The run directory is pinned to the job: exp_manager.version=slurm-$SLURM_JOB_ID, with
#   exp_manager.resume_if_exists=true (a requeued job keeps its id, so it finds its own checkpoints and resumes).
#   They come before your overrides, so an explicit exp_manager.version=... of yours wins (and is then the same on
#   every requeue too).
# * Preemption: `#SBATCH --signal=USR1@120` (or a SIGTERM from SLURM) reaches the tasks; megatron_ext stops every
#   rank after the same step, writes a checkpoint and exits 75; rank 0 also writes MEGATRON_EXT_REQUEUE_FILE (srun
#   reports a signal over a task's 75 when it killed the other tasks, and torchrun turns a 75 into 1). On 75 or
#   that file: `scontrol requeue $SLURM_JOB_ID` (the job needs to be requeueable: `#SBATCH --requeue`).
# * MAX_RESTARTS=N (per-task template, where no torchrun restarts the workers): after a failure (any status but 0,
#   2 = bad input, 75, 130) the step runs again, up to N times, with MEGATRON_EXT_RESTART_COUNT=<n> (the workers
#   resume from latest even without resume_if_exists). The torchrun template passes MAX_RESTARTS to torchrun.

SLURM_RESUME_ARGS=(exp_manager.version="slurm-${SLURM_JOB_ID:-0}" exp_manager.resume_if_exists=true
                   exp_manager.resume_ignore_no_checkpoint=true)

slurm_run_step() {
    local restarts="${STEP_RESTARTS:-0}" attempt=0 rc
    export MEGATRON_EXT_REQUEUE_FILE="${MEGATRON_EXT_REQUEUE_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.megatron_ext_requeue.${SLURM_JOB_ID:-0}}"
    while :; do
        rm -f "$MEGATRON_EXT_REQUEUE_FILE"
        set +e
        "$@"
        rc=$?
        set -e
        if [[ $rc -eq 75 || -f "$MEGATRON_EXT_REQUEUE_FILE" ]]; then
            rm -f "$MEGATRON_EXT_REQUEUE_FILE"
            echo "[slurm] preempted (exit status $rc): the checkpoint is written; scontrol requeue ${SLURM_JOB_ID:-?}" >&2
            scontrol requeue "${SLURM_JOB_ID:?SLURM_JOB_ID is not set: cannot requeue}"
            return 0
        fi
        case $rc in 0|2|130) return $rc ;; esac
        if (( attempt >= restarts )); then
            (( restarts == 0 )) || echo "[slurm] giving up after $attempt restart(s) (MAX_RESTARTS=$restarts): exit status $rc" >&2
            return $rc
        fi
        attempt=$((attempt + 1))
        export MEGATRON_EXT_RESTART_COUNT=$attempt
        echo "[slurm] restart $attempt/$restarts (MAX_RESTARTS) after exit status $rc: resuming from the latest checkpoint" >&2
    done
}
