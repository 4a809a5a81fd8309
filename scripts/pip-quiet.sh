#!/usr/bin/env bash
# pip for the Makefile: quiet, and without the "WARNING: Location 'file:///...' is ignored" lines that a machine's
# pip config may print for local package folders it lacks (nothing a user of this repo can act on).
# Usage: scripts/pip-quiet.sh PIP ARGS...   (exit status: pip's)
set -o pipefail
pip=$1; shift
"$pip" -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
