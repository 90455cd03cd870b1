# ruff: noqa: B023, E501  (closures are called within their loop iteration; wide tables)
"""Re-measures single cells of speed.py's loss grid with more repeats (noisy cells on a shared CPU).

    python benchmarks/speed_recheck.py --cells 90,512,11318 180,512,11318 --reps 21
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.speed import RESULTS, Timer, interleaved, make_losses, zero_grads  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cells", nargs="+", default=["90,512,11318", "180,512,11318"])
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--out", default=str(RESULTS / "speed_recheck.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    timer, rows = Timer(torch.device("cpu")), []
    for cell in a.cells:
        B, D, C = (int(v) for v in cell.split(","))
        pa, nir, freia_loss, x0, labels, mods = make_losses(B, D, C, torch.device("cpu"))

        def run(loss_fn):
            def f():
                zero_grads(mods, x0)
                loss_fn(F.normalize(x0, dim=1), labels).backward()
            return f
        t = interleaved({"pa": run(pa), "nir": run(nir), "freia": run(freia_loss)}, a.reps, timer)
        r = {"B": B, "D": D, "C": C, **{f"{k}_s": v["median_s"] for k, v in t.items()}}
        r["nir_over_freia"] = r["nir_s"] / r["freia_s"]
        rows.append(r)
        print(f"B={B} D={D} C={C}: PA {r['pa_s']*1e3:.1f} ms, PA+NIR {r['nir_s']*1e3:.1f} ms, "
              f"PA+FrEIA {r['freia_s']*1e3:.1f} ms, NIR/FrEIA {r['nir_over_freia']:.3f}  (thread CPU time, "
              f"median of {a.reps}, 1 thread)", flush=True)
    Path(a.out).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
