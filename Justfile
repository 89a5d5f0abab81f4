# omni-image tasks. `just` with no argument lists them.

default:
    @just --list

# Build the release binaries.
binaries:
    cargo build --release -p omni-image -p omni-firstboot

# Install every host package omni-image and its tests use (as root).
setup: binaries
    ./target/release/omni-image setup --install

# Build an appliance image into out/ (as root).
build recipe="recipes/tsidp.toml": binaries
    ./target/release/omni-image build {{recipe}}

# Boot a built image in QEMU and wait for it to report ready.
boot image="out/tsidp.qcow2" *args="":
    ./target/release/omni-image boot {{image}} {{args}}

# Every test, including the slow ones that build and boot real images.
test:
    cargo test --release --workspace --no-fail-fast

# Only the fast unit tests.
test-unit:
    cargo test --release --workspace --lib --bins

# Benchmarks; figures go to bench/results/ (run as root).
bench: binaries
    bench/build.sh
    bench/build.sh recipes/omni.toml
    bench/fresh-bootstrap.sh
    bench/firstboot.sh
    cargo run --release -p omni-image-tests --bin bench_upload
