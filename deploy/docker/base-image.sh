#!/usr/bin/env bash
# Makes sure the runtime base image that both Dockerfiles name is on this Docker engine.
#
# Present already: nothing to do. Pullable: pulled, so a normal machine runs the real distroless
# image. Neither (no registry reachable, as on the development machine and in CI): a stand-in is
# built from Debian bookworm packages and `docker import`ed under that exact tag. It holds the
# part of distroless/cc the binaries use: glibc and its loader (libc6), libgcc_s, the CA bundle
# of ca-certificates, /etc/passwd and /etc/group with `nonroot` (uid 65532), /etc/nsswitch.conf
# and /tmp, with distroless's image settings (user 65532, PATH, SSL_CERT_FILE); no shell, no
# package manager, no tzdata or libssl (the binaries need neither).
#
# Usage: deploy/docker/base-image.sh [--force]   (--force rebuilds the stand-in even if present)
# Building the stand-in needs root (the script re-runs itself with sudo otherwise) and installs
# debootstrap with apt-get if it is missing.
# DEBIAN_MIRROR overrides http://deb.debian.org/debian.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

die() {
	printf 'base-image.sh: %s\n' "$*" >&2
	exit 1
}

say() { printf '==> %s\n' "$*" >&2; }

# The tag is read from the Dockerfiles' last FROM, so it is written down once per Dockerfile
# and the two cannot drift apart unnoticed.
runtime_base() { awk 'toupper($1) == "FROM" { base = $2 } END { print base }' "$1"; }
tag=$(runtime_base "$root/deploy/docker/Dockerfile.prebuilt")
[[ -n $tag ]] || die "no FROM in deploy/docker/Dockerfile.prebuilt"
[[ $(runtime_base "$root/Dockerfile") == "$tag" ]] ||
	die "Dockerfile and deploy/docker/Dockerfile.prebuilt name different runtime bases"

# --build (internal) skips straight to building: how the script re-runs itself under sudo.
force=0 build=0
case ${1:-} in
--force) force=1 ;;
--build) build=1 ;;
"") ;;
*) die "unknown argument: $1 (usage: base-image.sh [--force])" ;;
esac

size() { docker image inspect --format '{{.Size}}' "$1" | awk '{ printf "%.1f MB", $1 / 1e6 }'; }

if ((!force && !build)) && docker image inspect "$tag" >/dev/null 2>&1; then
	say "$tag is present ($(size "$tag")); nothing to do"
	exit 0
fi
if ((!force && !build)) && timeout 120 docker pull --quiet "$tag" >/dev/null 2>&1; then
	say "pulled $tag ($(size "$tag"))"
	exit 0
fi
if ((EUID != 0)); then
	command -v sudo >/dev/null || die "building the stand-in needs root (debootstrap, chroot)"
	exec sudo DEBIAN_MIRROR="$mirror" bash "${BASH_SOURCE[0]}" --build
fi
say "$tag cannot be pulled; building a local stand-in from Debian bookworm ($mirror)"

if ! command -v debootstrap >/dev/null && [[ ! -x /usr/sbin/debootstrap ]]; then
	say "installing debootstrap"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
debian=$work/debian rootfs=$work/rootfs

# A minimal Debian to take the files from; ca-certificates' postinst writes the CA bundle.
PATH="/usr/sbin:/sbin:$PATH" debootstrap --variant=minbase \
	--include=ca-certificates bookworm "$debian" "$mirror" >"$work/debootstrap.log" 2>&1 ||
	{
		tail -n 20 "$work/debootstrap.log" >&2
		die "debootstrap failed (log above)"
	}

# Every file libc6 and libgcc-s1 ship, minus docs, locales and iconv modules (the binaries use
# none). bookworm is merged-/usr, so /lib paths are spelled /usr/lib to copy real directories.
chroot "$debian" dpkg-query -L libc6 libgcc-s1 |
	sed -E 's#^/(lib|lib64|bin|sbin)/#/usr/\1/#' |
	grep -Ev '^/usr/share/(doc|lintian|locale)/|/gconv/|^/usr/(bin|sbin)/|^/etc/ld\.so' |
	sort -u >"$work/files"
{
	while read -r f; do
		if [[ -L $debian$f || -f $debian$f ]]; then printf '%s\n' "${f#/}"; fi
	done <"$work/files"
	# The CA bundle, licences of what is shipped, and what tells scanners this is Debian 12.
	printf '%s\n' etc/ssl/certs/ca-certificates.crt usr/lib/os-release etc/os-release \
		usr/share/doc/libc6/copyright usr/share/doc/libgcc-s1/copyright \
		usr/share/doc/ca-certificates/copyright
} >"$work/keep"

mkdir -p "$rootfs"
tar -C "$debian" --no-recursion -cf - -T "$work/keep" |
	tar -C "$rootfs" --keep-directory-symlink -xf -
# The layout of a merged-/usr Debian, the users distroless has, and writable temp folders.
(
	cd "$rootfs"
	for d in lib lib64 bin sbin; do
		mkdir -p "usr/$d"
		ln -sfn "usr/$d" "$d"
	done
	mkdir -p etc home/nonroot root tmp var/tmp
	chmod 1777 tmp var/tmp
	chmod 700 root
	chown 65532:65532 home/nonroot
	printf '%s\n' root:x:0:0:root:/root:/sbin/nologin \
		nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin \
		nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin >etc/passwd
	printf '%s\n' root:x:0: nobody:x:65534: nonroot:x:65532: >etc/group
	printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >etc/nsswitch.conf
)

# The image config distroless :nonroot carries, so a Dockerfile behaves the same on either.
tar -C "$rootfs" --numeric-owner -cf - . |
	docker import \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
		--change 'USER 65532:65532' \
		--change 'WORKDIR /home/nonroot' \
		--change 'LABEL dev.runmesh.stand-in="built by deploy/docker/base-image.sh, not pulled"' \
		--message "local stand-in for $tag (deploy/docker/base-image.sh)" \
		- "$tag" >/dev/null
say "imported $tag ($(size "$tag"))"
