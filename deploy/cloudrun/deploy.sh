#!/usr/bin/env bash
# Deploys runmesh to Cloud Run: ping, then relay, then gateway, each its own service with its own
# service account, wired by URL, and locked down so each hop admits only the one before it.
#
# Idempotent: it creates only what is missing, builds only images not yet pushed for this source
# revision, re-applies the same manifests, and brings each service's invoker list to exactly what
# it should be. --dry-run prints every gcloud/docker command instead of running it.
# Step by step, costs, teardown and troubleshooting: docs/deploy.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

# In deploy order: each one's URL becomes the next one's UPSTREAM_URL.
services=(ping relay gateway)
apis=(run.googleapis.com artifactregistry.googleapis.com cloudbuild.googleapis.com iam.googleapis.com)
invoker=roles/run.invoker
# Every command is spelled out in full, so gcloud never needs to ask.
export CLOUDSDK_CORE_DISABLE_PROMPTS=1

usage() {
	cat <<'EOF'
Usage: deploy/cloudrun/deploy.sh --project PROJECT_ID --region REGION [options]

Deploys ping, relay and gateway to Cloud Run (see docs/deploy.md).

  --project ID            Google Cloud project to deploy into (required)
  --region REGION         Cloud Run and Artifact Registry region, e.g. europe-west1 (required)
  --repo NAME             Artifact Registry Docker repository (default: runmesh)
  --tag TAG               image tag (default: the git commit, plus a hash of uncommitted changes)
  --builder KIND          cloudbuild (default) or docker: build locally and push
  --min-instances N       instances each service keeps warm (default: 0, scale to zero)
  --gateway-members LIST  comma-separated user:EMAIL / serviceAccount:EMAIL allowed to call the
                          gateway, both by IAM and by the gateway's own token check
                          (default: the account gcloud is logged in as)
  --public-gateway        turn Cloud Run's IAM check off for the gateway, so anyone reaches it;
                          the gateway then verifies ID tokens fully itself and still admits
                          only --gateway-members
  --dry-run               print every command instead of running it; nothing is read or changed
  -h, --help              this text
EOF
}

die() {
	printf 'deploy.sh: %s\n' "$*" >&2
	exit 1
}

say() { printf '==> %s\n' "$*" >&2; }

project="" region="" repo=runmesh tag="" builder=cloudbuild min_instances=0
gateway_members="" public_gateway=0 dry_run=0

while (($#)); do
	case $1 in
	--project | --region | --repo | --tag | --builder | --min-instances | --gateway-members)
		(($# >= 2)) || die "$1 needs a value"
		case $1 in
		--project) project=$2 ;;
		--region) region=$2 ;;
		--repo) repo=$2 ;;
		--tag) tag=$2 ;;
		--builder) builder=$2 ;;
		--min-instances) min_instances=$2 ;;
		--gateway-members) gateway_members=$2 ;;
		esac
		shift 2
		;;
	--public-gateway) public_gateway=1 && shift ;;
	--dry-run) dry_run=1 && shift ;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && die "unknown argument: $1" ;;
	esac
done

[[ -n $project ]] || die "--project is required"
[[ -n $region ]] || die "--region is required"
[[ $builder == cloudbuild || $builder == docker ]] || die "--builder must be cloudbuild or docker"
[[ $min_instances =~ ^[0-9]+$ ]] || die "--min-instances must be a whole number"

# Dry-run lines go to the original stdout, even from inside $(...).
exec 3>&1

quote() {
	local out
	printf -v out '%q ' "$@"
	printf '%s' "${out% }"
}

# change CMD...: runs a command that changes something; --dry-run only prints it.
change() {
	if ((dry_run)); then
		printf '[dry-run] %s\n' "$(quote "$@")" >&3
		return 0
	fi
	printf '+ %s\n' "$(quote "$@")" >&2
	"$@"
}

# ask DRY_ANSWER CMD...: runs a read-only command for its output; --dry-run prints the command
# and answers DRY_ANSWER instead, as a project holding nothing yet would.
ask() {
	local dry_answer=$1
	shift
	if ((dry_run)); then
		printf '[dry-run] %s\n' "$(quote "$@")" >&3
		if [[ -n $dry_answer ]]; then printf '%s\n' "$dry_answer"; fi
		return 0
	fi
	"$@"
}

# exists CMD...: whether a describe command finds its resource; --dry-run assumes not.
exists() {
	if ((dry_run)); then
		printf '[dry-run] %s\n' "$(quote "$@")" >&3
		return 1
	fi
	"$@" >/dev/null 2>&1
}

# contains NEEDLE ITEM...: whether NEEDLE is one of the ITEMs.
contains() {
	local needle=$1 item
	shift
	for item in "$@"; do
		if [[ $item == "$needle" ]]; then return 0; fi
	done
	return 1
}

# render TEMPLATE OUT NAME=VALUE...: writes TEMPLATE with each ${NAME} replaced by VALUE, and
# refuses to write it if any ${...} is left without a value.
render() {
	local template=$1 out=$2 text pair
	shift 2
	text=$(<"$template")
	for pair in "$@"; do
		text=${text//"\${${pair%%=*}}"/"${pair#*=}"}
	done
	if [[ $text =~ \$\{[A-Za-z_][A-Za-z0-9_]*\} ]]; then
		die "$template: placeholder ${BASH_REMATCH[0]} has no value"
	fi
	printf '%s\n' "$text" >"$out"
}

if ((!dry_run)); then
	command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
	if [[ $builder == docker ]]; then
		command -v docker >/dev/null || die "--builder docker needs docker"
	fi
fi

if [[ -z $tag ]]; then
	tag=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null) ||
		die "cannot name the source revision (not a git checkout with a commit); pass --tag"
	if [[ -n $(git -C "$root" status --porcelain --untracked-files=no) ]]; then
		tag="$tag-dirty-$(git -C "$root" diff HEAD | git hash-object --stdin | cut -c1-8)"
	fi
fi

sa_email() { printf '%s-sa@%s.iam.gserviceaccount.com' "$1" "$project"; }

# The gateway's callers, as IAM members and as the emails its token check compares.
if [[ -z $gateway_members ]]; then
	account=$(ask you@dry-run.invalid gcloud config get-value account 2>/dev/null)
	[[ -n $account ]] || die "gcloud is logged in as nobody; run gcloud auth login or pass --gateway-members"
	case $account in
	*.gserviceaccount.com) gateway_members="serviceAccount:$account" ;;
	*) gateway_members="user:$account" ;;
	esac
fi
IFS=, read -r -a members <<<"$gateway_members"
gateway_emails=""
for member in "${members[@]}"; do
	[[ $member =~ ^(user|serviceAccount):[^@,[:space:]]+@[^,[:space:]]+$ ]] ||
		die "--gateway-members: $member is not user:EMAIL or serviceAccount:EMAIL (the gateway checks the email in the caller's token, so groups and domains cannot be let in)"
	gateway_emails+="${gateway_emails:+,}${member#*:}"
done
# Behind Cloud Run's IAM check the token reaches the gateway with its signature removed, so it
# trusts that check (cloud-run); without the check it must verify the signature itself.
if ((public_gateway)); then
	gateway_iam_check_off=true gateway_auth_mode=verify
else
	gateway_iam_check_off=false gateway_auth_mode=cloud-run
fi

render_dir=$(mktemp -d)
if ((dry_run)); then
	say "dry run: nothing will be read or changed; rendered manifests are kept in $render_dir"
else
	trap 'rm -rf "$render_dir"' EXIT
fi

say "project $project, region $region, image tag $tag"

say "enabling APIs"
enabled=$(ask "" gcloud services list --enabled --project "$project" --format='value(config.name)')
read -r -d '' -a enabled <<<"$enabled" || true
to_enable=()
for api in "${apis[@]}"; do
	contains "$api" ${enabled[@]+"${enabled[@]}"} || to_enable+=("$api")
done
if ((${#to_enable[@]})); then
	change gcloud services enable "${to_enable[@]}" --project "$project"
fi

say "service accounts (no project roles: each is only an identity its callee admits)"
for service in "${services[@]}"; do
	if ! exists gcloud iam service-accounts describe "$(sa_email "$service")" --project "$project"; then
		change gcloud iam service-accounts create "$service-sa" --project "$project" \
			--display-name "runmesh $service on Cloud Run"
	fi
done

say "Artifact Registry repository $repo"
if ! exists gcloud artifacts repositories describe "$repo" --project "$project" --location "$region"; then
	change gcloud artifacts repositories create "$repo" --project "$project" --location "$region" \
		--repository-format docker --description "runmesh service images"
fi

image_base="$region-docker.pkg.dev/$project/$repo"
say "images $image_base/{ping,relay,gateway}:$tag"
unbuilt=()
for service in "${services[@]}"; do
	if ! exists gcloud artifacts docker images describe "$image_base/$service:$tag" --project "$project"; then
		unbuilt+=("$service")
	fi
done
if ((${#unbuilt[@]})); then
	if [[ $builder == cloudbuild ]]; then
		change gcloud builds submit "$root" --project "$project" --config "$here/cloudbuild.yaml" \
			--substitutions "_IMAGE_BASE=$image_base,_TAG=$tag"
	else
		change gcloud auth configure-docker "$region-docker.pkg.dev" --quiet
		for service in "${unbuilt[@]}"; do
			# Cloud Run runs linux/amd64 images, whatever machine builds them.
			change docker build "$root" --platform linux/amd64 --build-arg "SERVICE=$service" \
				--tag "$image_base/$service:$tag"
			change docker push "$image_base/$service:$tag"
		done
	fi
fi

dry_deployed=" "
# service_url NAME: the service's URL as Cloud Run reports it, empty if it does not exist yet.
service_url() {
	local dry_answer=""
	if [[ $dry_deployed == *" $1 "* ]]; then dry_answer="https://$1.dry-run.invalid"; fi
	ask "$dry_answer" gcloud run services describe "$1" --project "$project" --region "$region" \
		--format='value(status.url)' 2>/dev/null || true
}

project_number=""
# apply NAME SELF_URL NAME=VALUE...: renders NAME's manifest with its own URL and applies it.
apply() {
	local name=$1 self_url=$2 upper
	shift 2
	upper=$(tr '[:lower:]' '[:upper:]' <<<"$name")
	render "$here/$name.yaml" "$render_dir/$name.yaml" "PROJECT_ID=$project" "REGION=$region" \
		"IMAGE=$image_base/$name:$tag" "MIN_INSTANCES=$min_instances" "${upper}_URL=$self_url" "$@"
	change gcloud run services replace "$render_dir/$name.yaml" --project "$project" --region "$region"
}

# deploy NAME NAME=VALUE...: applies NAME's manifest with AUTH_AUDIENCE = its own URL, and sets
# deployed_url. A new service's URL is only known once it exists, so the first apply uses the
# deterministic form https://NAME-PROJECT_NUMBER.REGION.run.app, and applies again if Cloud Run
# reports another URL; until then the service refuses every token, which fails closed.
deploy() {
	local name=$1 url actual
	say "deploying $name"
	url=$(service_url "$name")
	if [[ -n $url ]]; then
		apply "$name" "$url" "${@:2}"
	else
		if [[ -z $project_number ]]; then
			project_number=$(ask PROJECT_NUMBER gcloud projects describe "$project" --format='value(projectNumber)')
		fi
		url="https://$name-$project_number.$region.run.app"
		apply "$name" "$url" "${@:2}"
		dry_deployed+="$name "
		actual=$(service_url "$name")
		[[ -n $actual ]] || die "$name was applied but Cloud Run reports no URL for it"
		if [[ $actual != "$url" ]]; then
			say "$name is at $actual; applying again with that as its audience"
			url=$actual
			apply "$name" "$url" "${@:2}"
		fi
	fi
	deployed_url=$url
}

# allow_only NAME MEMBER...: makes MEMBERs exactly the service's roles/run.invoker holders.
allow_only() {
	local name=$1 listed member
	local -a current
	shift
	listed=$(ask "" gcloud run services get-iam-policy "$name" --project "$project" --region "$region" \
		--flatten='bindings[].members' --filter="bindings.role=$invoker" --format='value(bindings.members)')
	read -r -d '' -a current <<<"$listed" || true
	for member in "$@"; do
		if ! contains "$member" ${current[@]+"${current[@]}"}; then
			change gcloud run services add-iam-policy-binding "$name" --project "$project" \
				--region "$region" --member "$member" --role "$invoker"
		fi
	done
	for member in ${current[@]+"${current[@]}"}; do
		if ! contains "$member" "$@"; then
			say "$name: $member may no longer invoke it"
			change gcloud run services remove-iam-policy-binding "$name" --project "$project" \
				--region "$region" --member "$member" --role "$invoker"
		fi
	done
}

deploy ping
ping_url=$deployed_url
allow_only ping "serviceAccount:$(sa_email relay)"

deploy relay "PING_URL=$ping_url"
relay_url=$deployed_url
allow_only relay "serviceAccount:$(sa_email gateway)"

deploy gateway "RELAY_URL=$relay_url" "GATEWAY_ALLOWED_CALLERS=$gateway_emails" \
	"GATEWAY_IAM_CHECK_OFF=$gateway_iam_check_off" "GATEWAY_AUTH_MODE=$gateway_auth_mode"
gateway_url=$deployed_url
# Also with --public-gateway, so that turning it off again needs no other change.
allow_only gateway "${members[@]}"

cat >&3 <<EOF

ping     $ping_url
relay    $relay_url
gateway  $gateway_url

Call the gateway as $gateway_emails (ID token, not access token; see docs/deploy.md):
  runmesh send --target "$gateway_url" --message hello --token "\$(gcloud auth print-identity-token)"
EOF
