#!/usr/bin/env bash
# `just up`: the mesh of docker-compose.yml, up and healthy, with no registry needed. Makes sure
# the runtime base image exists (deploy/docker/base-image.sh), builds the release binaries on
# the host, packs them with deploy/docker/Dockerfile.prebuilt into the images compose names,
# prints their sizes, starts the mesh and waits until every service is healthy. Then it prints
# how to call the gateway on http://localhost:${RUNMESH_GATEWAY_PORT:-8080}.
#
# With a registry at hand, `docker compose up --build` does the same from ./Dockerfile, compiling
# in Docker. `just down` (compose down -v) stops and removes the mesh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
export RUNMESH_DOCKERFILE=deploy/docker/Dockerfile.prebuilt
port=${RUNMESH_GATEWAY_PORT:-8080}
compose=(bash deploy/compose/compose.sh)
started=$SECONDS

say() { printf '==> [%3ds] %s\n' "$((SECONDS - started))" "$*" >&2; }
die() {
	printf 'up.sh: %s\n' "$*" >&2
	exit 1
}

say "runtime base image"
bash deploy/docker/base-image.sh

say "release binaries"
nice cargo build --release --locked -q \
	-p runmesh-ping -p runmesh-relay -p runmesh-gateway -p runmesh-cli
# The image build context holds target/release/ (.dockerignore); bring the binaries there when
# CARGO_TARGET_DIR put them elsewhere.
built=${CARGO_TARGET_DIR:-target}/release
if [[ ! $built -ef target/release ]]; then
	mkdir -p target/release
	for bin in ping relay gateway runmesh; do cp -f "$built/$bin" target/release/; done
fi

say "images, from $RUNMESH_DOCKERFILE"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Only the four built services; the profiles' images are pulled, never built.
if ! "${compose[@]}" build idp ping relay gateway >"$log" 2>&1; then
	cat "$log" >&2
	die "building the images failed (log above)"
fi
for image in runmesh-cli:local runmesh-ping:local runmesh-relay:local runmesh-gateway:local; do
	docker image inspect --format '{{.Size}}' "$image" |
		awk -v i="$image" '{ printf "    %-22s %5.1f MB\n", i, $1 / 1e6 }' >&2
done

say "up"
"${compose[@]}" up -d
for service in idp ping relay gateway; do
	id=$("${compose[@]}" ps -q "$service")
	[[ -n $id ]] || die "$service has no container"
	for ((i = 0; ; i++)); do
		state=$(docker inspect --format '{{.State.Status}} {{.State.Health.Status}}' "$id")
		[[ $state == "running healthy" ]] && break
		[[ $state == running* ]] || die "$service is $state: see '${compose[*]} logs $service'"
		((i < 120)) || die "$service is not healthy after 60 s ($state)"
		sleep 0.5
	done
done
say "idp, ping, relay and gateway are healthy; the gateway is http://localhost:$port"
cat >&2 <<MSG
    export RUNMESH_TOKEN=\$(${compose[*]} run --rm -T cli token --audience http://localhost:$port)
    target/release/runmesh send --target http://localhost:$port
    target/release/runmesh chat --target http://localhost:$port --count 5 --json
MSG
