"""Valid AUC (overall / cold) per validation step of the two 128-step rows, as a Markdown table."""
import json
from pathlib import Path

rows = {"SeLLa-Rec": "runs/collm-ml-1m-sella", "without `<Warm_ID>`": "runs/collm-ml-1m-nowarm"}
curves = {n: {c["step"]: c for c in json.loads(Path(f"{d}/sella/summary.json").read_text())["curve"]} for n, d in rows.items()}
steps = sorted(next(iter(curves.values())))
print("| step (prompts) | " + " | ".join(f"{s} ({s * 16:,})" for s in steps) + " |")
print("|---" * (len(steps) + 1) + "|")
for n, c in curves.items():
    print(f"| {n} | " + " | ".join(f"{c[s]['overall_auc']:.3f} / {c[s]['cold_auc']:.3f}" for s in steps) + " |")
