# One image per service, the same for Cloud Run (deploy/cloudrun/cloudbuild.yaml) and for
# `docker compose up --build` (docker-compose.yml):
#
#   docker build --build-arg SERVICE=ping -t ping .     # SERVICE: ping, relay, gateway, runmesh
#
# The workspace compiles before SERVICE is read, so the builds of the three services share every
# layer up to the last one. The runtime image holds the binary, glibc, libgcc_s and CA
# certificates, and runs as the distroless `nonroot` user (uid 65532); no shell, no compiler.
# Where no registry can be reached, deploy/docker/base-image.sh puts a stand-in for the runtime
# base on the engine, and deploy/docker/Dockerfile.prebuilt packs binaries built on the host
# (Docker's legacy builder runs every stage, so this file needs the rust image too).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Only what the build reads, so an edit elsewhere (docs, deploy files) keeps the cached build.
# rust-toolchain.toml stays out: the image tag pins the same toolchain, with nothing to download.
COPY Cargo.toml Cargo.lock ./
COPY protos protos
COPY crates crates
RUN cargo build --release --locked \
    -p runmesh-ping -p runmesh-relay -p runmesh-gateway -p runmesh-cli
ARG SERVICE
RUN case "$SERVICE" in \
      ping|relay|gateway|runmesh) install -D "target/release/$SERVICE" /out/service ;; \
      *) echo "--build-arg SERVICE= must be ping, relay, gateway or runmesh, not \"$SERVICE\"" >&2; exit 64 ;; \
    esac

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/service /app/service
# distroless's nonroot user; numeric, so "run as non-root" checks can verify it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/app/service"]
