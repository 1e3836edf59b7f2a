#!/usr/bin/env bash
# Starts N processes of one multi-process run on this machine, e.g.
#
#   scripts/launch_local.sh 2 -- nio-jax train --config configs/fmnist_nio.py --workdir runs/x
#
# Each process gets NIO_JAX_COORDINATOR=localhost:<free port>, NIO_JAX_NUM_PROCESSES=N and
# NIO_JAX_PROCESS_ID=i (read by `nio-jax` before JAX starts, nio_jax.distributed.cli_setup;
# a script of your own calls nio_jax.distributed.initialize_from_env() first). With
# NIO_JAX_LOCAL_DEVICES=D each process simulates D CPU devices (XLA_FLAGS), for tests on one
# machine. SIGTERM / SIGINT to this script are passed on to every process (a preemption:
# training checkpoints and exits 143); when one process fails the others are stopped.
# The exit status is the first non-zero status of a process (0 when all succeed).
set -u
if [ $# -lt 3 ] || [ "$2" != "--" ]; then
  echo "usage: $0 N -- command [args...]" >&2
  exit 2
fi
n=$1
shift 2
case $n in '' | *[!0-9]*) echo "$0: N must be a positive integer, got '$n'" >&2; exit 2 ;; esac
port=${NIO_JAX_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
if [ -n "${NIO_JAX_LOCAL_DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$NIO_JAX_LOCAL_DEVICES"
fi
pids=()
for ((i = 0; i < n; i++)); do
  NIO_JAX_COORDINATOR="localhost:$port" NIO_JAX_NUM_PROCESSES=$n NIO_JAX_PROCESS_ID=$i "$@" &
  pids+=($!)
done
forward() {
  for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
remaining=$n
while [ "$remaining" -gt 0 ]; do
  wait -n -p done_pid "${pids[@]}" 2>/dev/null
  rc=$?
  if [ -z "${done_pid:-}" ]; then  # interrupted by a trapped signal: wait again
    continue
  fi
  remaining=$((remaining - 1))
  new=()
  for p in "${pids[@]}"; do [ "$p" != "$done_pid" ] && new+=("$p"); done
  pids=("${new[@]}")
  unset done_pid
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    [ "$rc" -ne 143 ] && forward TERM  # a failure (not a preemption): stop the others
  fi
done
exit "$status"
