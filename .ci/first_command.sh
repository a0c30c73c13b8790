#!/usr/bin/env bash
# CI: the README's *first* command on a fresh virtual environment with only the `engine`
# extra: install, start `dsml-proxy serve --demo` (a fresh demo checkpoint: it is written
# on first start, which is what a new user's machine does), wait for /health, send one chat
# completion with tools through the openai SDK, stop it. Any failing step fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DSML_PROXY_PORT=$port DSML_PROXY_DEMO_DIR="$work/demo"
# README, line 1, its two halves: the install, then the server in the background (its log
# is shown if anything fails).
pip install --quiet torch==2.13.0 -e '.[engine]' || { echo "README line 1: the install failed"; exit 1; }
dsml-proxy serve --demo >"$work/server.log" 2>&1 &
server_pid=$!
deactivate
show_log() { echo "--- dsml-proxy serve --demo log:"; cat "$work/server.log"; }
for _ in $(seq 300); do  # at most ~300 s for the demo checkpoint and the model load
    if ! kill -0 "$server_pid" 2>/dev/null; then echo "dsml-proxy serve --demo exited"; show_log; exit 1; fi
    if python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$port/health" 2>/dev/null; then break; fi
    sleep 1
done
python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$port/health" || { echo "no /health within 300 s"; show_log; exit 1; }
# The openai SDK is not in the engine extra: a separate small venv holds only it, so the
# server's venv stays exactly what the README's first command installs.
python3 -m venv "$work/client"
"$work/client/bin/python" -m pip install --quiet 'openai>=1.40'
"$work/client/bin/python" .ci/first_command_check.py "http://127.0.0.1:$port/v1" || { show_log; exit 1; }
kill "$server_pid"
wait "$server_pid" 2>/dev/null || true  # SIGTERM: aiohttp exits on it
server_pid=
echo "first command: OK"
