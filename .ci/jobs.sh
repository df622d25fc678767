# Sourced by the CI scripts: their step headings, and background steps that never outlive the
# script that started them.

# step TITLE: a heading with the seconds since the script sourced this file.
jobs_start=$SECONDS
step() { echo; echo "== $1 (at $((SECONDS - jobs_start)) s)"; }

# stop_tree PID: end a process and all its children.
stop_tree() {
  local child
  for child in $(pgrep -P "$1"); do stop_tree "$child"; done
  kill "$1" 2>/dev/null || true
}

# stop_on_exit PID: stop the background step PID when this script exits, on an error or when it
# is interrupted or killed (bash runs no EXIT trap for a signal it does not trap).
stop_on_exit() {
  trap "stop_tree $1" EXIT
  trap "exit 143" INT TERM
}

# collect PID LOG WHAT: wait for the background step PID, show its LOG, and fail naming WHAT if
# it failed; the exit trap that would stop it is cleared.
collect() {
  local status=0
  wait "$1" || status=$?
  trap - EXIT
  cat "$2"
  [ "$status" = 0 ] || { echo "$3 failed (exit $status)" >&2; exit 1; }
}
