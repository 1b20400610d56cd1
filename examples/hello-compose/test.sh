#!/bin/sh
# The example's test: the page served on port 8080 inside the VM is this worktree's
# www/index.html. Runs inside the VM (`vmoat test`); `--expect TEXT` checks for other text.
set -eu
expect="hello from hello-compose"
if [ "${1:-}" = "--expect" ]; then
    expect=$2
fi
page=$(curl -fsS http://127.0.0.1:8080/)
case "$page" in
*"$expect"*) echo "ok: the page contains '$expect'" ;;
*)
    echo "FAIL: the page does not contain '$expect'" >&2
    exit 3
    ;;
esac
