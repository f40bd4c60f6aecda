#!/usr/bin/env bash
# Runs `docker compose` (the Compose v2 plugin) or, where only that is installed,
# `docker-compose` (v1, Debian's package) with the arguments given, on docker-compose.yml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if docker compose version >/dev/null 2>&1; then
	exec docker compose "$@"
fi
if ! command -v docker-compose >/dev/null; then
	echo "compose.sh: neither 'docker compose' nor 'docker-compose' is installed" >&2
	exit 127
fi
exec docker-compose "$@"
