#!/usr/bin/env bash
# kumo start-path benchmarks (issue 2). Run as root from the repo:
#   cargo build --release -p kumo && bash bench/issue2.sh
# Everything (temp dir, kumo server, kumo agent in netns kbench-<pid>, QEMU, dnsmasq) is set up
# and torn down by bench/issue2.py; see BENCHMARKS.md for what each RESULT line means.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "$here/issue2.py" "$@"
