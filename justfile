# runmesh recipes. Nothing here is required: every recipe is a plain command you can run yourself.

# List recipes.
default:
    @just --list

# The whole mesh on this machine: identity server, ping, relay, gateway; four chained calls.
up-local:
    cargo run --release -p runmesh-cli -- up

# The README's test command.
test:
    cargo test --workspace

# Format, lint, test: what CI runs.
ci:
    bash .ci/run

# Format the code.
fmt:
    cargo fmt --all

# Lint as CI does.
lint:
    cargo clippy --workspace --all-targets -- -D warnings
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

# Deploy the three services to Cloud Run (see docs/deploy.md); pass --dry-run to only print.
deploy *ARGS:
    bash deploy/cloudrun/deploy.sh {{ARGS}}

# Mixed calls through the chain for 10 minutes: no error, flat RSS, no fd leak.
soak SECS="600":
    cargo build --workspace --bins
    SOAK_SECS={{SECS}} cargo test -p runmesh-testkit --test soak -- --ignored --nocapture

# Side by side: direct, one relay hop, one nginx grpc_pass hop, the full chain (release builds;
# installs Debian's nginx if missing). Prints the table; writes target/bench/results.json and
# target/bench/latency.svg. Pass harness flags, e.g. `just bench --duration 20s`.
bench *ARGS:
    nice cargo build --release -p runmesh-cli -p runmesh-ping -p runmesh-relay -p runmesh-gateway -p runmesh-bench
    target/release/runmesh-bench {{ARGS}}

# The benchmark harness end to end in seconds, on the debug binaries; figures mean nothing (CI).
bench-smoke:
    cargo build -p runmesh-cli -p runmesh-ping -p runmesh-relay -p runmesh-gateway -p runmesh-bench
    target/debug/runmesh-bench --smoke --bin-dir target/debug

# Fuzz the bearer-token/JWT path, then config parsing, SECS seconds each (nightly toolchain and
# `cargo install cargo-fuzz --locked`). Crashes land in fuzz/artifacts/<target>/.
fuzz SECS="600":
    cargo +nightly fuzz run bearer_jwt -- -max_total_time={{SECS}} -dict={{justfile_directory()}}/fuzz/dict/bearer_jwt.dict
    cargo +nightly fuzz run config -- -max_total_time={{SECS}} -dict={{justfile_directory()}}/fuzz/dict/config.dict

# Both fuzz targets for 20 s each: they build and find nothing quickly (CI).
fuzz-smoke: (fuzz "20")

# The mesh in Docker (docker-compose.yml), healthy, on http://localhost:8080; needs no registry.
up:
    bash deploy/compose/up.sh

# Stop and remove the Docker mesh: containers, network, volumes.
down:
    bash deploy/compose/compose.sh down -v --remove-orphans

# Put the images' runtime base on this Docker engine: pulled, or built from Debian packages.
base-image:
    bash deploy/docker/base-image.sh

# The Docker mesh end to end: images, up, four calls from the host, refusals, teardown (CI).
compose-e2e:
    bash deploy/compose/e2e.sh
