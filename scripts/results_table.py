"""The comparison table: test AUC / UAUC (overall, warm, cold) of each row's stage-eval metrics, with the
published reference numbers beside them (method.md: CoLLM paper, Vicuna-7B, same ML-1M splits).

    python scripts/results_table.py configs/comparison/*.yaml [--write docs/results.md]

With --write, the table replaces the block between the comparison markers of that file (appended when the
file has none); it is printed either way.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.artifacts import DONE
from pipeline.config import load_config

BEGIN, END = "<!-- comparison:begin -->", "<!-- comparison:end -->"
ROWS = {  # config stem -> (row label, published ML-1M AUC / UAUC of the closest published method)
    "popularity": ("item popularity (train positive rate)", "0.703 / 0.675 (method.md, measured on all test rows)"),
    "mf": ("MF (stage 2b, no alignment)", "MF: 0.6482 / 0.6361"),
    "text-only": ("text-only, stage 1 (TALLRec-like)", "TALLRec: 0.7097 / 0.6818"),
    "collm-like": ("CoLLM-like (MF tokens, random projector, no `<Warm_ID>`)", "CoLLM-MF: 0.7295 / 0.6875"),
    "sella-no-warm": ("SeLLa-Rec without `<Warm_ID>`", "-"),
    "sella": ("SeLLa-Rec", "about +4% over CoLLM (paper)"),
}


def cell(metrics: dict, group: str) -> str:
    m = metrics[group]
    return " / ".join(f"{m[k]:.4f}" if m[k] is not None else "-" for k in ("auc", "uauc"))


def table(configs: list[Path]) -> str:
    lines = ["| row | config | test rows | overall | warm | cold | reference: CoLLM paper, Vicuna-7B |",
             "|---|---|---|---|---|---|---|"]
    for path in configs:
        cfg = load_config(path)
        metrics_file = Path(cfg.run_dir or f"runs/{cfg.name}") / DONE["eval"]
        label, published = ROWS.get(path.stem, (path.stem, "-"))
        if not metrics_file.is_file():
            lines.append(f"| {label} | `{path}` | not run | | | | {published} |")
            continue
        test = json.loads(metrics_file.read_text())["test"]
        lines.append(f"| {label} | `{path}` | {test['overall']['rows']:,} | {cell(test, 'overall')} | "
                     f"{cell(test, 'warm')} | {cell(test, 'cold')} | {published} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", type=Path, help="comparison configs, in row order")
    p.add_argument("--write", type=Path, help="Markdown file whose comparison block is replaced")
    args = p.parse_args()
    text = table(args.configs)
    print(text)
    if args.write:
        doc = args.write.read_text() if args.write.is_file() else ""
        block = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in doc and END in doc:
            doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        args.write.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
