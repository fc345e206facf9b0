#!/usr/bin/env bash
# One set-up step, one line: `[setup] TITLE ... ok (41 s)`.
#
#   tools/setup-step.sh NAME TITLE COMMAND
#
# COMMAND (one string, run by bash with -eu -o pipefail) writes its whole output to
# .ctloop/logs/setup-NAME.log (CTLOOP_SETUP_LOGS: another folder) instead of the terminal:
# installers (pip, mvn, go, apt-get, cargo) print pages a newcomer does not need. On failure
# the log's last lines are printed, with its path, and the step's exit status is returned.
# The Makefile's stamps decide whether a step runs at all.
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 NAME TITLE COMMAND" >&2
  exit 2
fi
name=$1 title=$2 cmd=$3
logs=${CTLOOP_SETUP_LOGS:-$(cd "$(dirname "$0")/.." && pwd)/.ctloop/logs}
mkdir -p "$logs"
log=$logs/setup-$name.log

printf '[setup] %s ... ' "$title"
start=$SECONDS
status=0
{
  echo "# $(date -u +%FT%TZ) $title"
  echo "# $cmd"
} >"$log"
bash -eu -o pipefail -c "$cmd" >>"$log" 2>&1 </dev/null || status=$?
took=$((SECONDS - start))

if [ "$status" -eq 0 ]; then
  echo "ok ($took s)"
  exit 0
fi
echo "FAILED ($took s, exit $status)"
echo "---- last lines of $log:"
tail -n 40 "$log"
echo "----"
exit "$status"
