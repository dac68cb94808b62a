#!/usr/bin/env bash
# The paper's architecture x environment x seed grid, on this machine or as one SLURM job array.
#
# Every cell is one run of one script: `python ppo_<arch>.py --env-id ENV --seed S --total-timesteps N`.
# Runs land in ./runs (as when a script is run by hand); logs in runs/benchmark/logs. A cell whose newest
# summary.json says complete with the same budget is skipped, an interrupted one resumes with --resume, a
# failed one starts again. `python report.py runs/` turns the summaries into tables and plots.
set -euo pipefail
{  # bash reads the whole block before running it, so pulling or editing this file mid-grid is safe

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
BENCH_DIR=runs/benchmark
LOG_DIR=$BENCH_DIR/logs

# The paper's grid: environment -> training budget in steps (RLBenchNet, section 4).
PAPER_ENVS="HalfCheetah-v4=5000000,Hopper-v4=5000000,Walker2d-v4=5000000,ALE/Breakout-v5=10000000"
PAPER_ENVS+=",ALE/Pong-v5=10000000,CartPoleNoVel-v1=5000000,LunarLanderNoVel-v3=5000000"
PAPER_ENVS+=",MiniGrid-DoorKey-8x8-v0=5000000,MiniGrid-MemoryS11-v0=15000000"
ALL_ARCHS="mlp,lstm,gru,trxl,gtrxl,mamba,mamba2"

usage() {
    cat <<'HELP'
Usage: ./benchmark.sh [options] [-- flags for every script]

Runs the paper's grid (7 scripts x 9 environments x 3 seeds, the paper's budgets) or the part you name.

Grid:
  --archs LIST        comma-separated of mlp,lstm,gru,trxl,gtrxl,mamba,mamba2
                      (default: every ppo_<arch>.py beside this file)
  --envs LIST         comma-separated env ids, each ID or ID=STEPS; an id outside the paper's grid needs =STEPS
                      (default: the paper's nine environments and budgets)
  --seeds LIST        comma-separated seeds (default: 1,2,3)
  --steps-scale F     multiply every budget by F, e.g. 0.01 for a quick pass (default: 1)
  --ablation leak     also run every memory trunk with --no-state-reset (the paper's leak), as its own rows
  -- FLAGS...         everything after -- goes to every script (e.g. -- --minigrid-obs symbolic); a cell is
                      its script, env, seed and budget, not these flags: run a grid with other flags from
                      another directory (runs/ is relative to it), or it will count the first grid's runs

Where:
  --workers N         run N cells at once on this machine (default: 1); with GPUs, worker k gets GPU k mod #GPUs
                      and, without GPUs, each worker gets an equal share of the CPU threads
  --slurm             submit ONE job array to SLURM, one task per cell that is not complete, then exit
  --partition P       SLURM partition (default: the cluster's default)
  --time T            SLURM time limit per task (default: 24:00:00); the task gets SIGTERM --signal-lead
                      seconds before it, checkpoints, and is requeued to resume
  --signal-lead S     seconds between the SIGTERM and the time limit (default: 300)
  --cpus-per-task N   (default: 4; vector and symbolic cells train on one torch thread, the scripts'
                      default: give them 1, or pass -- --torch-threads N)
  --gpus-per-task N   (default: 1; 0 on a CPU-only cluster)
  --mem M             memory per task, e.g. 16G (default: the cluster's default)
  --max-running N     at most N tasks of the array at once (default: as many as the cluster allows)
  --sbatch-option OPT one more sbatch option, e.g. --sbatch-option=--account=rl (repeatable)

Other:
  --dry-run           print every cell's command (or, with --slurm, the job script) and run nothing
  -h, --help          this text

Exit status: 0 when every cell is complete, 1 when any failed (each listed with its reason), 2 on bad input.
HELP
}

fail() {
    echo "benchmark.sh: $*" >&2
    exit 2
}

archs="" envs=$PAPER_ENVS seeds="1,2,3" steps_scale=1 ablation="" workers=1 dry_run=0
slurm=0 partition="" time_limit="24:00:00" signal_lead=300 cpus_per_task=4 gpus_per_task=1 mem=""
max_running="" sbatch_options=() extra=() cell_index="" stop_requested=0
need_value() { [[ $# -ge 2 && -n "$2" ]] || fail "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --archs) need_value "$@"; archs=$2; shift 2 ;;
        --envs) need_value "$@"; envs=$2; shift 2 ;;
        --seeds) need_value "$@"; seeds=$2; shift 2 ;;
        --steps-scale) need_value "$@"; steps_scale=$2; shift 2 ;;
        --ablation) need_value "$@"; ablation=$2; shift 2 ;;
        --workers) need_value "$@"; workers=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --slurm) slurm=1; shift ;;
        --partition) need_value "$@"; partition=$2; shift 2 ;;
        --time) need_value "$@"; time_limit=$2; shift 2 ;;
        --signal-lead) need_value "$@"; signal_lead=$2; shift 2 ;;
        --cpus-per-task) need_value "$@"; cpus_per_task=$2; shift 2 ;;
        --gpus-per-task) need_value "$@"; gpus_per_task=$2; shift 2 ;;
        --mem) need_value "$@"; mem=$2; shift 2 ;;
        --max-running) need_value "$@"; max_running=$2; shift 2 ;;
        --sbatch-option=*) sbatch_options+=("${1#--sbatch-option=}"); shift ;;
        --sbatch-option) need_value "$@"; sbatch_options+=("$2"); shift 2 ;;
        --cell) need_value "$@"; cell_index=$2; shift 2 ;;  # internal: one SLURM array task runs one cell
        --) shift; extra=("$@"); break ;;
        *) fail "unknown option $1 (see --help; flags for the scripts go after --)" ;;
    esac
done

for flag in ${extra[@]+"${extra[@]}"}; do
    case "${flag%%=*}" in
        --env-id | --seed | --total-timesteps | --exp-name | --resume | --no-state-reset)
            fail "$flag after --: the grid sets it per cell (--envs, --seeds, --steps-scale, --ablation leak)" ;;
    esac
done
is_count() { [[ $1 =~ ^[0-9]+$ ]]; }
positive() { [[ $1 =~ ^[0-9]+$ ]] && (($1 >= 1)); }
positive "$workers" || fail "--workers must be a positive integer, got $workers"
[[ -z $max_running ]] || positive "$max_running" || fail "--max-running must be a positive integer, got $max_running"
if ! [[ $steps_scale =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)(e-?[0-9]+)?$ ]] || ! awk -v f="$steps_scale" 'BEGIN {exit !(f > 0)}'; then
    fail "--steps-scale must be a positive number, got $steps_scale"
fi
[[ -z $ablation || $ablation == leak ]] || fail "--ablation: the only ablation is leak, got $ablation"
[[ $seeds =~ ^[0-9]+(,[0-9]+)*$ ]] || fail "--seeds must be comma-separated integers, got $seeds"
for count in "$signal_lead" "$cpus_per_task" "$gpus_per_task"; do
    is_count "$count" || fail "--signal-lead, --cpus-per-task and --gpus-per-task take integers, got $count"
done
if [[ -z $archs ]]; then
    for arch in ${ALL_ARCHS//,/ }; do
        [[ -f $HERE/ppo_$arch.py ]] && archs+=${archs:+,}$arch
    done
fi

declare -A paper_budget
for entry in ${PAPER_ENVS//,/ }; do paper_budget[${entry%=*}]=${entry#*=}; done

# ---- The grid: one line per cell, "arch variant env steps seed" (variant: plain or leak) ----
cells=()
for arch in ${archs//,/ }; do
    [[ -f $HERE/ppo_$arch.py ]] || fail "--archs: no ppo_$arch.py beside benchmark.sh"
    variants=plain
    [[ $ablation == leak && $arch != mlp ]] && variants="plain leak"
    for variant in $variants; do
        for entry in ${envs//,/ }; do
            env_id=${entry%%=*} budget=${paper_budget[${entry%%=*}]:-}
            [[ $entry == *=* ]] && budget=${entry#*=}
            [[ -n $budget ]] || fail "--envs: $env_id is not in the paper's grid; give its budget as $env_id=STEPS"
            positive "$budget" || fail "--envs: budget of $env_id must be a positive integer"
            steps=$(awk -v b="$budget" -v f="$steps_scale" 'BEGIN {s = int(b * f + 0.5); print (s < 1 ? 1 : s)}')
            for seed in ${seeds//,/ }; do cells+=("$arch $variant $env_id $steps $seed"); done
        done
    done
done

cell_name() {  # "arch variant env steps seed" -> a file name for the cell's log
    local arch variant env_id steps seed
    read -r arch variant env_id steps seed <<<"$1"
    [[ $variant == leak ]] && arch+=-leak
    echo "${arch}__${env_id//\//_}__$seed"
}

exp_name() {  # the run name's middle part: the script's own default, or <stem>_leak for the ablation
    if [[ $2 == leak ]]; then echo "ppo_${1}_leak"; else echo "ppo_$1"; fi
}

run_prefix() {  # "arch variant env steps seed" -> "runs/<env>__<exp_name>__<seed>__ steps": where its runs are
    local arch variant env_id steps seed
    read -r arch variant env_id steps seed <<<"$1"
    echo "runs/${env_id//\//_}__$(exp_name "$arch" "$variant")__${seed}__ $steps"
}

# For each line "run_prefix steps" on stdin, prints "complete DIR", "resume DIR", "failed DIR" or "new":
# the newest run of that script, env, seed and budget decides. `running` counts as resumable: a node lost mid-run
# leaves that status and a checkpoint. A failed cell starts again in a new directory. One Python for the grid.
cell_states() {
    "$PYTHON" -c '
import glob, json, sys
from pathlib import Path
for line in sys.stdin:
    run_prefix, steps = line.split()
    found = []
    for path in glob.glob(f"{run_prefix}*/summary.json"):
        try:
            summary = json.loads(Path(path).read_text())
            if summary["args"]["total_timesteps"] == int(steps):
                found.append((int(Path(path).parent.name.rsplit("__", 1)[-1]), summary["status"], Path(path).parent))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a corrupt or foreign summary: report.py lists it
    _, status, run_dir = max(found, default=(0, "new", None))
    if status == "complete":
        print("complete", run_dir)
    elif status in ("interrupted", "running") and (run_dir / "checkpoint.pt").exists():
        print("resume", run_dir)
    elif run_dir is not None:
        print("failed", run_dir)
    else:
        print("new")
'
}

cell_command() {  # the command that advances a cell "arch variant env steps seed", given its state and run
    local state=$1 run_dir=$2 arch variant env_id steps seed
    read -r arch variant env_id steps seed <<<"$3"
    cmd=("$PYTHON" "$HERE/ppo_$arch.py")
    if [[ $state == resume ]]; then
        cmd+=(--resume "$run_dir")
    else
        cmd+=(--env-id "$env_id" --seed "$seed" --total-timesteps "$steps")
        [[ $variant == leak ]] && cmd+=(--no-state-reset --exp-name "$(exp_name "$arch" leak)")
        cmd+=(${extra[@]+"${extra[@]}"})
    fi
}

# Runs one cell to its end; forwards SIGTERM (SLURM's warning before the time limit, scancel, requeue) to the
# script, which checkpoints. Writes "ok" or the failure reason to $BENCH_DIR/status/<cell>.
run_cell() {
    local cell=$1 name state run_dir code=0 terminated=0 pid reason
    name=$(cell_name "$cell")
    read -r state run_dir <<<"$(run_prefix "$cell" | cell_states)"
    if [[ $state == complete ]]; then
        echo "ok" >"$BENCH_DIR/status/$name"
        echo "skip $name: complete in $run_dir"
        return 0
    fi
    cell_command "$state" "$run_dir" "$cell"
    echo "start $name${CUDA_VISIBLE_DEVICES:+ on GPU $CUDA_VISIBLE_DEVICES}: ${cmd[*]}"
    echo "== $(date -Is) ${cmd[*]}" >>"$LOG_DIR/$name.log"
    "${cmd[@]}" </dev/null >>"$LOG_DIR/$name.log" 2>&1 &
    pid=$!
    trap 'terminated=1 stop_requested=1; kill -TERM $pid 2>/dev/null || true' TERM
    wait "$pid" || code=$?
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || code=$?; done
    trap - TERM
    read -r state run_dir <<<"$(run_prefix "$cell" | cell_states)"
    if [[ $state == complete ]]; then
        echo "ok" >"$BENCH_DIR/status/$name"
        echo "done $name: $run_dir"
        return 0
    fi
    reason=""
    [[ -n $run_dir ]] && reason=$("$PYTHON" - "$run_dir" <<'PY'
import json, sys
from pathlib import Path
try:
    summary = json.loads((Path(sys.argv[1]) / "summary.json").read_text())
    print(f"{summary['status']}: {summary['reason']}")
except (OSError, ValueError, KeyError):
    pass
PY
)
    # The log's last line of output (none when the script died before printing: grep then finds nothing)
    [[ -n $reason ]] || reason="exit status $code: $({ grep -v '^== ' "$LOG_DIR/$name.log" || true; } | tail -n 1)"
    echo "$reason (log: $LOG_DIR/$name.log)" >"$BENCH_DIR/status/$name"
    if ((terminated)) && [[ -n ${SLURM_JOB_ID:-} ]] && near_time_limit; then
        echo "requeue $name at the time limit ($reason); the next attempt resumes"
        scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "FAILED $name: $reason"
    fi
    return 1
}

near_time_limit() {  # the SIGTERM came from --signal (time limit ahead), not from scancel or a requeue
    local left seconds
    left=$(squeue --noheader --jobs "$SLURM_JOB_ID" --format %L 2>/dev/null) || return 1
    [[ $left =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 1  # [D-][HH:]MM:SS
    seconds=$(((10#${BASH_REMATCH[2]:-0} * 24 + 10#${BASH_REMATCH[4]:-0}) * 3600 + 10#${BASH_REMATCH[5]} * 60))
    ((seconds + 10#${BASH_REMATCH[6]} <= signal_lead + 60))
}

# ---- One SLURM array task ----
if [[ -n $cell_index ]]; then
    mkdir -p "$LOG_DIR" "$BENCH_DIR/status"
    if ! is_count "$cell_index" || ((cell_index >= ${#cells[@]})); then
        fail "--cell $cell_index: the grid has ${#cells[@]} cells"
    fi
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}
    run_cell "${cells[$cell_index]}"
    exit $?
fi

# ---- What each cell needs now ----
pending=() commands=()
complete=0 resume=0 failed_before=0
mapfile -t states < <(for cell in "${cells[@]}"; do run_prefix "$cell"; done | cell_states)
((${#states[@]} == ${#cells[@]})) || fail "could not read the summaries under runs/"
for index in "${!cells[@]}"; do
    read -r state run_dir <<<"${states[$index]}"
    if [[ $state == complete ]]; then
        complete=$((complete + 1))
        commands+=("# complete: $run_dir")
        continue
    fi
    [[ $state == resume ]] && resume=$((resume + 1))
    [[ $state == failed ]] && failed_before=$((failed_before + 1))
    pending+=("$index")
    cell_command "$state" "$run_dir" "${cells[$index]}"
    line=$(printf '%q ' "${cmd[@]}")
    commands+=("${line% }")
done
counts="${#cells[@]} cells: $complete complete, $resume to resume, $((${#pending[@]} - resume)) to start"
((failed_before == 0)) || counts+=" ($failed_before of them failed before)"
echo "$counts" >&2

# ---- SLURM: one job array over the cells that are not complete ----
if ((slurm)); then
    if ((${#pending[@]} == 0)); then exit 0; fi
    grid=(--archs "$archs" --envs "$envs" --seeds "$seeds" --steps-scale "$steps_scale")
    [[ -n $ablation ]] && grid+=(--ablation "$ablation")
    grid+=(--signal-lead "$signal_lead" --)
    grid+=(${extra[@]+"${extra[@]}"})
    indices=$(IFS=,; echo "${pending[*]}")
    job_script() {
        echo "#!/usr/bin/env bash"
        echo "#SBATCH --job-name=rlbenchnet"
        echo "#SBATCH --array=$indices${max_running:+%$max_running}"
        echo "#SBATCH --requeue"
        echo "#SBATCH --signal=B:TERM@$signal_lead"
        echo "#SBATCH --time=$time_limit"
        echo "#SBATCH --ntasks=1"  # one run per array task; SLURM 23.11+ refuses --gpus-per-task without it
        echo "#SBATCH --cpus-per-task=$cpus_per_task"
        ((gpus_per_task > 0)) && echo "#SBATCH --gpus-per-task=$gpus_per_task"
        [[ -n $partition ]] && echo "#SBATCH --partition=$partition"
        [[ -n $mem ]] && echo "#SBATCH --mem=$mem"
        for option in ${sbatch_options[@]+"${sbatch_options[@]}"}; do echo "#SBATCH $option"; done
        echo "#SBATCH --output=$(printf '%q' "$PWD/$LOG_DIR")/slurm-%A_%a.out"
        echo "#SBATCH --open-mode=append"
        echo "cd $(printf '%q' "$PWD")"
        line=$(printf '%q ' "${grid[@]}")
        echo "exec $(printf '%q' "$HERE/benchmark.sh") --cell \"\$SLURM_ARRAY_TASK_ID\" ${line% }"
    }
    if ((dry_run)); then
        job_script
        exit 0
    fi
    command -v sbatch >/dev/null || fail "--slurm: sbatch not found (scripts/slurm_local.sh sets up a one-node cluster)"
    mkdir -p "$LOG_DIR"
    job_file="$BENCH_DIR/slurm_$(date +%Y%m%d_%H%M%S).sbatch"
    job_script >"$job_file"
    sbatch --parsable "$job_file"
    echo "submitted $job_file (${#pending[@]} tasks); logs in $LOG_DIR; once the array has finished, rerun the" \
        "same command to resubmit what did not complete (not before: it would resume running cells a second" \
        "time), then: python report.py runs/ --out results/" >&2
    exit 0
fi

if ((dry_run)); then
    printf '%s\n' "${commands[@]}"
    exit 0
fi

# ---- Locally: N workers take the next unclaimed cell until none is left ----
gpus=()
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null; then
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
fi
if ((${#gpus[@]} == 0)) && [[ -z ${OMP_NUM_THREADS:-} ]]; then
    export OMP_NUM_THREADS=$(($(nproc) / workers > 0 ? $(nproc) / workers : 1))  # no oversubscription
fi
mkdir -p "$LOG_DIR" "$BENCH_DIR/status"
claims=$(mktemp -d)
trap 'rm -rf "$claims"' EXIT
rm -f "$BENCH_DIR/status/"*

worker() {
    local index
    if ((${#gpus[@]} > 0)); then export CUDA_VISIBLE_DEVICES=${gpus[$(($1 % ${#gpus[@]}))]}; fi
    for index in "${!cells[@]}"; do
        mkdir "$claims/$index" 2>/dev/null || continue  # mkdir is atomic: one worker per cell
        run_cell "${cells[$index]}" || true
        ((stop_requested)) && break  # SIGTERM or Ctrl-C: the script has checkpointed; take no new cell
    done
}

worker_pids=()
for ((k = 0; k < workers; k++)); do
    worker "$k" &
    worker_pids+=($!)
done
trap 'kill -TERM "${worker_pids[@]}" 2>/dev/null' TERM INT  # each worker passes it on to its script
for pid in "${worker_pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done  # a trapped signal interrupts `wait`
done

failed=0
for cell in "${cells[@]}"; do
    name=$(cell_name "$cell")
    result=$(cat "$BENCH_DIR/status/$name" 2>/dev/null || echo "not started: the grid was stopped")
    if [[ $result != ok ]]; then
        ((failed == 0)) && echo "failed cells:" >&2
        echo "  $name: $result" >&2
        failed=$((failed + 1))
    fi
done
echo "${#cells[@]} cells: $((${#cells[@]} - failed)) complete, $failed failed; python report.py runs/ --out results/" >&2
exit $((failed > 0))
}
