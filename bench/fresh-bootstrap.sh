#!/usr/bin/env bash
# Reproducibility of the bootstrap itself: the tsidp recipe's base tree bootstrapped twice
# from scratch (different folders, different times) and compared file by file. Figures and
# the list of files that differ go to bench/results/fresh-bootstrap.txt. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/omni-image
results=bench/results/fresh-bootstrap.txt
work=$(mktemp -d /var/tmp/omni-image-fresh.XXXXXX)
trap 'rm -rf "$work"' EXIT
epoch=$(date -d "$(curl -s http://deb.debian.org/debian/dists/trixie/InRelease | sed -n 's/^Date: //p')" +%s)
for run in a b; do
  cmd=$(SOURCE_DATE_EPOCH=$epoch "$bin" build recipes/tsidp.toml --print-bootstrap "$work/$run")
  eval "$cmd" >"$work/$run.log" 2>&1 || { tail -20 "$work/$run.log"; exit 1; }
  sleep 2
done
# The whole pipeline from two fresh bootstraps: are the images the same bytes?
for run in a b; do
  "$bin" build recipes/tsidp.toml --no-cache -o "$work/img-$run" >/dev/null 2>"$work/img-$run.log" \
    || { tail -20 "$work/img-$run.log"; exit 1; }
  sleep 2
done
list() { (cd "$1" && find . -printf '%p %y %m %U:%G %s %T@ %l\n' | sort); }
sums() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
{
  echo "# fresh bootstrap twice, $(date -u '+%Y-%m-%d %H:%M') UTC, SOURCE_DATE_EPOCH=$epoch"
  echo "tree a: $(du -sm "$work/a" | cut -f1) MiB, tree b: $(du -sm "$work/b" | cut -f1) MiB"
  ta=$(cd "$work/a" && tar --sort=name --numeric-owner --mtime="@$epoch" --clamp-mtime -cf - . | sha256sum | cut -c1-16)
  tb=$(cd "$work/b" && tar --sort=name --numeric-owner --mtime="@$epoch" --clamp-mtime -cf - . | sha256sum | cut -c1-16)
  echo "tar of tree (sorted, numeric owners): a $ta, b $tb"
  echo "images built from two fresh bootstraps (--no-cache): $(sha256sum "$work/img-a/tsidp.qcow2" | cut -c1-16) and $(sha256sum "$work/img-b/tsidp.qcow2" | cut -c1-16)"
  echo "(the build removes SSH host keys and clamps every time to SOURCE_DATE_EPOCH before the disk is made)"
  echo
  echo "files whose content differs:"
  diff <(sums "$work/a") <(sums "$work/b") | sed -n 's/^< [0-9a-f]*  /  /p' || true
  echo
  echo "entries whose metadata differs (path type mode owner size mtime link):"
  diff <(list "$work/a") <(list "$work/b") | grep '^[<>]' | head -40 || true
} >"$results"
cat "$results"
