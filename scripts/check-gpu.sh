#!/usr/bin/env bash
# Check Populi's GPU probe against nvidia-smi on a machine with NVIDIA GPUs.
#
#   scripts/check-gpu.sh                     probe NVML and ask nvidia-smi, compare
#   scripts/check-gpu.sh --probe-json FILE --smi-csv FILE
#                                            compare saved outputs (to check this script)
#
# Compares, GPU by GPU (in index order): UUID, name, memory total (the probe's bytes
# // 2**20 must equal nvidia-smi's MiB), ECC mode and MIG mode (current). Prints a table.
# Exit 0: every field agrees. Exit 1: a disagreement (or a GPU only one side sees).
# Exit 2: a side could not be read (no nvidia-smi, the probe failed).
#
# Environment: PYTHON (default: python3) runs `python -m populi_peer.gpu --json`.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
probe_json=""
smi_csv=""
while [ $# -gt 0 ]; do
  case "$1" in
    --probe-json) probe_json=$2; shift 2 ;;
    --smi-csv) smi_csv=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "check-gpu: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -z "$probe_json" ]; then
  probe_json=$work/probe.json
  if ! "$python" -m populi_peer.gpu --json >"$probe_json" 2>"$work/probe.err"; then
    echo "check-gpu: the probe failed: $(tr '\n' ' ' <"$work/probe.err")" >&2
    exit 2
  fi
fi
if [ -z "$smi_csv" ]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "check-gpu: nvidia-smi is not installed: nothing to compare with" >&2
    exit 2
  fi
  smi_csv=$work/smi.csv
  if ! nvidia-smi --query-gpu=uuid,name,memory.total,ecc.mode.current,mig.mode.current \
      --format=csv,noheader,nounits >"$smi_csv" 2>"$work/smi.err"; then
    # No GPU / no driver: nvidia-smi fails; the probe must then be CPU-only.
    echo "check-gpu: nvidia-smi failed: $(tr '\n' ' ' <"$work/smi.err")" >&2
    : >"$smi_csv"
  fi
fi

exec "$python" - "$probe_json" "$smi_csv" <<'PY'
import csv
import json
import sys

probe_path, smi_path = sys.argv[1], sys.argv[2]
try:
    with open(probe_path, encoding="utf-8") as f:
        probe = json.load(f)
except (OSError, ValueError) as exc:
    print(f"check-gpu: cannot read the probe's JSON: {exc}", file=sys.stderr)
    sys.exit(2)
with open(smi_path, encoding="utf-8") as f:
    smi_rows = [[c.strip() for c in row] for row in csv.reader(f) if row]

MIB = 2**20


def mode(value):
    """The probe's bool/None as nvidia-smi writes it."""
    return {True: "Enabled", False: "Disabled", None: "[N/A]"}.get(value, repr(value))


def smi_mode(text):
    return "[N/A]" if text.strip("[] ").upper() == "N/A" else text


devices = sorted(probe.get("devices") or [], key=lambda d: d.get("index", 0))
rows = []
bad = 0
for i in range(max(len(devices), len(smi_rows))):
    dev = devices[i] if i < len(devices) else None
    smi = smi_rows[i] if i < len(smi_rows) else None
    if dev is None or smi is None or len(smi) != 5:
        rows.append((str(i), "gpu", "present" if dev else "absent",
                     ",".join(smi) if smi else "absent", "NO"))
        bad += 1
        continue
    uuid, name, mem_mib, ecc, mig = smi
    total = dev.get("memory_total_bytes")
    probe_mib = total // MIB if isinstance(total, int) else None
    checks = [
        ("uuid", str(dev.get("uuid")), uuid, dev.get("uuid") == uuid),
        ("name", str(dev.get("name")), name, dev.get("name") == name),
        ("memory_total", f"{total} B = {probe_mib} MiB", f"{mem_mib} MiB",
         probe_mib is not None and str(probe_mib) == mem_mib),
        ("ecc_mode", mode(dev.get("ecc_mode_current")), smi_mode(ecc),
         mode(dev.get("ecc_mode_current")) == smi_mode(ecc)),
        ("mig_mode", mode(dev.get("mig_mode_current")), smi_mode(mig),
         mode(dev.get("mig_mode_current")) == smi_mode(mig)),
    ]
    for field, ours, theirs, ok in checks:
        rows.append((str(dev.get("index", i)), field, ours, theirs, "yes" if ok else "NO"))
        bad += not ok

head = ("GPU", "FIELD", "POPULI PROBE", "NVIDIA-SMI", "AGREE")
widths = [max(len(r[c]) for r in [head, *rows]) for c in range(5)]
backend = probe.get("backend")
source = f" ({probe['source']})" if probe.get("source") else ""
print(f"probe backend: {backend}{source}; driver {probe.get('driver_version')}")
if probe.get("cpu_only_reason"):
    print(f"probe: CPU-only ({probe['cpu_only_reason']})")
print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
for row in rows:
    print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
if not rows:
    print("(no GPU on either side)")
if bad:
    print(f"check-gpu: {bad} disagreement(s)")
    sys.exit(1)
print(f"check-gpu: the probe and nvidia-smi agree on {len(devices)} GPU(s)")
PY
