#!/usr/bin/env bash
# First-boot benchmark: the tsidp image configured by omni-firstboot, next to the same image
# with Debian's cloud-init instead, both booted with the same Proxmox-shaped seed.
# Figures go to bench/results/firstboot.txt. Run as root after `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/omni-image
results=bench/results/firstboot.txt
work=$(mktemp -d /var/tmp/omni-image-fbbench.XXXXXX)
trap 'rm -rf "$work"' EXIT

"$bin" seed tests/fixtures/seed/tsidp-user-data --network-config tests/fixtures/seed/network-config-v1 \
  -o "$work/seed.iso" 2>/dev/null
for r in recipes/tsidp.toml bench/recipes/tsidp-cloud-init.toml; do
  echo "building $r..." >&2
  "$bin" build "$r" -o "$work" >/dev/null 2>"$work/build.err" || { tail -20 "$work/build.err"; exit 1; }
done

echo "booting with omni-firstboot..." >&2
"$bin" boot "$work/tsidp.qcow2" --seed "$work/seed.iso" --accel tcg --timeout 600 \
  --exec 'omni-firstboot status --json' \
  --exec 'systemctl is-system-running --wait >/dev/null; systemd-analyze' \
  --exec 'systemd-analyze blame --no-pager | grep -E "omni-firstboot|cloud" || true' \
  >"$work/omni.out" 2>"$work/omni.err" || { tail -20 "$work/omni.err"; exit 1; }

echo "booting with cloud-init..." >&2
"$bin" boot "$work/tsidp-cloud-init.qcow2" --seed "$work/seed.iso" --accel tcg --timeout 900 \
  --ready 'Cloud-init v.' \
  --exec 'cloud-init status --wait >/dev/null; systemctl is-system-running --wait >/dev/null; systemd-analyze' \
  --exec 'systemd-analyze blame --no-pager | grep -E "cloud" || true' \
  --exec 'cloud-init analyze show | tail -3' \
  --exec 'hostname; ip -4 -o addr show scope global' \
  >"$work/ci.out" 2>"$work/ci.err" || { tail -20 "$work/ci.err"; exit 1; }

python3 - "$work" >"$results" <<'PY'
import json, re, sys, datetime
work = sys.argv[1]
def sections(path):
    out, cur = {}, None
    for line in open(path):
        if line.startswith("$ "):
            cur = line[2:].strip(); out[cur] = ""
        elif line.startswith("ready in "):
            out["ready"] = line.strip(); cur = None
        elif cur:
            out[cur] += line
    return out
o, c = sections(f"{work}/omni.out"), sections(f"{work}/ci.out")
status = json.loads(o["omni-firstboot status --json"])
def blame_total(text):
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"\s*(?:(\d+)min )?([\d.]+)(ms|s)\s+(\S+)", line)
        if m:
            v = float(m.group(2)) / (1000 if m.group(3) == "ms" else 1) + 60 * int(m.group(1) or 0)
            total += v
    return total
print(f"# first-boot benchmark, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, QEMU TCG (software emulation)")
print("same tsidp image and the same Proxmox-shaped seed (user, key, static v1 network, secrets)")
print()
print("omni-firstboot:")
print(f"  agent's own wall time (status duration_ms): {status.get('duration_ms')} ms")
print(f"  unit time (systemd-analyze blame): {blame_total(o[next(k for k in o if 'blame' in k)]):.2f} s")
print("  " + o[next(k for k in o if k.endswith("systemd-analyze"))].strip().replace("\n", "\n  "))
print(f"  {o['ready']}")
print()
print("cloud-init:")
print(f"  cloud-init units (systemd-analyze blame, summed): {blame_total(c[next(k for k in c if 'blame' in k)]):.2f} s")
print("  " + c[next(k for k in c if k.startswith('cloud-init status'))].strip().replace("\n", "\n  "))
print("  cloud-init analyze show: " + c["cloud-init analyze show | tail -3"].strip().replace("\n", " | "))
print(f"  configured: " + c["hostname; ip -4 -o addr show scope global"].strip().replace("\n", " | "))
PY
cat "$results"
