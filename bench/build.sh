#!/usr/bin/env bash
# Build benchmark: a recipe (tsidp by default) built cold (empty caches), then warm (the same
# cache, one overlay file changed), and, in the same run, a bare mmdebstrap of the same
# package set from the same mirror. Figures go to bench/results/build-NAME.txt. Run as root
# after `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/omni-image
recipe=${1:-recipes/tsidp.toml}
name=$(basename "$recipe" .toml)
results=bench/results/build-$(basename "$recipe" .toml).txt
work=$(mktemp -d /var/tmp/omni-image-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

peak() { awk -F': ' '/Maximum resident set size/ {print $2}' "$1"; }
secs() { python3 -c 'import sys,time; print(f"{time.time()-float(sys.argv[1]):.1f}")' "$1"; }

echo "cold build..." >&2
t=$(date +%s.%N)
/usr/bin/time -v "$bin" build "$recipe" -o "$work/cold" --cache-dir "$work/cache" 2>"$work/cold.err" >/dev/null \
  || { tail -20 "$work/cold.err"; exit 1; }
cold_wall=$(secs "$t")

echo "warm build, one overlay file changed..." >&2
mkdir -p "$work/changed/extra/etc"
echo "changed $(date)" >"$work/changed/extra/etc/motd"
printf 'extends = "%s"\noverlays = ["extra"]\n' "$(realpath "$recipe")" >"$work/changed/$name.toml"
t=$(date +%s.%N)
/usr/bin/time -v "$bin" build "$work/changed/$name.toml" -o "$work/warm" --cache-dir "$work/cache" 2>"$work/warm.err" >/dev/null \
  || { tail -20 "$work/warm.err"; exit 1; }
warm_wall=$(secs "$t")

echo "bare mmdebstrap..." >&2
cmd=$("$bin" build "$recipe" --print-bootstrap "$work/bare-root")
t=$(date +%s.%N)
eval "$cmd" >"$work/bare.log" 2>&1 || { tail -20 "$work/bare.log"; exit 1; }
bare_wall=$(secs "$t")

python3 - "$work" "$name" "$cold_wall" "$warm_wall" "$bare_wall" "$(peak "$work/cold.err")" "$(peak "$work/warm.err")" >"$results" <<'PY'
import json, sys, datetime, os
work, name, cold, warm, bare, cold_rss, warm_rss = sys.argv[1:]
cold, warm, bare = float(cold), float(warm), float(bare)
def manifest(kind):
    return json.load(open(f"{work}/{kind}/{name}.manifest.json"))
c, w = manifest("cold"), manifest("warm")
mib = lambda b: f"{b / 1048576:.1f} MiB"
print(f"# omni-image build benchmark, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores")
print(f"recipe: {name}  packages: {len(c['packages'])}")
print()
print("warm: the base tree from the cache, one overlay file changed")
print()
print(f"{'step':<12}{'cold s':>10}{'warm s':>10}")
for a, b in zip(c["timings"], w["timings"]):
    print(f"{a['step']:<12}{a['seconds']:>10.1f}{b['seconds']:>10.1f}")
print(f"{'total':<12}{c['total_seconds']:>10.1f}{w['total_seconds']:>10.1f}")
print(f"{'wall':<12}{cold:>10.1f}{warm:>10.1f}")
print()
print(f"bare mmdebstrap (same packages, same mirror, no cache): {bare:.1f} s")
print(f"ratio cold build / bare mmdebstrap: {cold / bare:.2f}")
print(f"ratio warm build / bare mmdebstrap: {warm / bare:.2f}")
print(f"downloaded packages: cold {c['downloaded_packages']}, warm {w['downloaded_packages']}")
print()
print(f"base tree from the cache: cold {c['base_tree']['cache_hit']}, warm {w['base_tree']['cache_hit']}")
print(f"outputs differ: {c['outputs'][0]['sha256'] != w['outputs'][0]['sha256']}")
print()
s = c["sizes"]
print(f"qcow2: {mib(s['qcow2_bytes'])}  raw: {mib(s['disk_bytes'])} ({mib(s['raw_allocated_bytes'])} allocated)  tree: {mib(s['tree_bytes'])}")
print(f"peak memory (max RSS of omni-image): cold {int(cold_rss) / 1024:.0f} MiB, warm {int(warm_rss) / 1024:.0f} MiB")
PY
cat "$results"
