#!/usr/bin/env bash
# The compose mesh end to end, as `.ci/run` runs it. deploy/compose/up.sh builds the runtime
# base image if missing, the release binaries and the four images, brings docker-compose.yml up
# and waits until every service is healthy; then, from the host, the runmesh CLI calls the
# gateway on localhost with all four call types, and every reply must carry the hop trail
# gateway (caller: the user) → relay (caller: gateway's SA) → ping (caller: relay's SA). From
# inside the network, relay must refuse a user. Each image's size is printed and must be under
# 40 MB. The mesh is always torn down (`down -v`), on failure too, and the four images removed;
# the base image stays cached.
#
# Skipped, with the reason printed and exit status 0, where no Docker engine answers.
# RUNMESH_GATEWAY_PORT moves the gateway off 8080; COMPOSE_PROJECT_NAME defaults to runmesh-e2e.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
started=$SECONDS

say() { printf '==> [%3ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() {
	printf 'compose e2e FAILED: %s\n' "$*" >&2
	exit 1
}
skip() {
	printf 'compose e2e skipped: %s\n' "$*"
	exit 0
}

command -v docker >/dev/null || skip "no docker command on this machine"
docker info >/dev/null 2>&1 || skip "no Docker engine answers ('docker info' failed)"
bash deploy/compose/compose.sh version >/dev/null 2>&1 ||
	skip "a Docker engine answers, but neither 'docker compose' nor 'docker-compose' is installed"
if ! command -v jq >/dev/null; then
	say "installing jq"
	(apt-get update -qq && apt-get install -y -qq jq >/dev/null) || fail "jq is missing and could not be installed"
fi

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-runmesh-e2e}
gateway=http://localhost:${RUNMESH_GATEWAY_PORT:-8080}
user=user@example.com
gateway_sa=gateway@runmesh-local.iam.gserviceaccount.com
relay_sa=relay@runmesh-local.iam.gserviceaccount.com
images=(runmesh-cli:local runmesh-ping:local runmesh-relay:local runmesh-gateway:local)
runmesh=$root/target/release/runmesh
# The calls must carry only the tokens given here.
unset RUNMESH_TOKEN RUNMESH_TARGET
dc() { bash deploy/compose/compose.sh "$@"; }

teardown() {
	local status=$?
	if ((status != 0)); then
		dc ps || true
		dc logs --no-color --tail 40 || true
	fi
	say "tearing down"
	dc down -v --remove-orphans || true
	docker image rm "${images[@]}" >/dev/null 2>&1 || true
	say "done, exit status $status, $((SECONDS - started)) s in all"
}
trap teardown EXIT

bash deploy/compose/up.sh
for image in "${images[@]}"; do
	bytes=$(docker image inspect --format '{{.Size}}' "$image")
	((bytes < 40000000)) || fail "$image is $bytes bytes, over the 40 MB budget"
	runs_as=$(docker image inspect --format '{{.Config.User}}' "$image")
	[[ $runs_as =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || fail "$image runs as '$runs_as', not a numeric non-root user"
done

# Not only what the images declare: each main process's real, effective, saved and filesystem
# uids, as the host's kernel sees them.
say "every service process runs as a non-root user"
for service in idp ping relay gateway; do
	pid=$(docker inspect --format '{{.State.Pid}}' "$(dc ps -q "$service")")
	uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
	[[ $uids =~ ^[1-9][0-9]*\ [1-9][0-9]*\ [1-9][0-9]*\ [1-9][0-9]*$ ]] ||
		fail "$service (pid $pid) runs with uids '$uids'"
	printf '    %-8s uids %s\n' "$service" "$uids"
done

# The observability profile is not started here (its images are pulled), but compose must
# accept it as written.
dc --profile observability config -q || fail "the observability profile is not valid compose"

# The identity server is not published: the CLI inside the network fetches the user's tokens.
token() { dc run --rm -T cli token --audience "$1" --email "$user" | tr -d '\r'; }
user_token=$(token "$gateway")
[[ $user_token == *.*.* ]] || fail "no user token from the identity server: $user_token"

# One call type from the host: N JSON objects, each with the trail gateway ← the user,
# relay ← gateway's SA, ping ← relay's SA.
call() {
	local kind=$1 want=$2 out
	out=$("$runmesh" "$kind" --target "$gateway" --token "$user_token" --count 3 --deadline 10s --json) ||
		fail "$kind through the gateway failed: $out"
	jq -se --argjson n "$want" --arg user "$user" --arg g "$gateway_sa" --arg r "$relay_sa" '
		length == $n and all(.[]; [.hops[] | [.service, .caller]]
			== [["gateway", $user], ["relay", $g], ["ping", $r]])' <<<"$out" >/dev/null ||
		fail "$kind: wrong hop trail or count (want $want objects):"$'\n'"$out"
	[[ $kind != collect ]] || [[ $(jq .count <<<"$out") == 3 ]] || fail "collect did not count 3: $out"
	printf '    %-7s ok: %s\n' "$kind" "$(jq -sr '.[0].hops | map("\(.service) ← \(.caller)") | join(", ")' <<<"$out")"
}
say "the four call types, from the host through $gateway"
call send 1
call stream 3
call collect 1
call chat 3

# A call that must be refused, and the status it must be refused with.
refused() {
	local what=$1 want=$2 out
	shift 2
	if out=$("$@" 2>&1); then
		fail "$what was not refused: $out"
	fi
	[[ $out == *"$want"* ]] || fail "$what: want $want, got: $out"
	printf '    %-58s %s\n' "$what" "$want"
}
say "refusals"
refused "no token, to the gateway" UNAUTHENTICATED \
	"$runmesh" send --target "$gateway" --deadline 10s
refused "a user's token for relay, straight to relay" PERMISSION_DENIED \
	dc run --rm -T cli send --target http://relay:8080 --token "$(token http://relay:8080)" --deadline 10s
refused "a user's gateway token, straight to relay" UNAUTHENTICATED \
	dc run --rm -T cli send --target http://relay:8080 --token "$user_token" --deadline 10s

say "compose e2e passed"
