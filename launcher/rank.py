"""Rank candidate items for one user with a trained SeLLa-Rec model, new items included.

    python launcher/rank.py --config configs/ml-100k.yaml --user 12 --candidates candidates.csv \\
        --out runs/ml-100k/rank-12.parquet

Candidates: a CSV or Parquet file with an `item_id` column, a `title` column, or both. A known item id
brings its title, collab row and semantic row from the run's tables. A row with a title and no item id
(or one the data does not know) is a new item without interactions: its collab vector is the padding
row 0 and its semantic vector is distilled from the title with the stage-2a prompt through the stage-1
model, so <Warm_ID> carries what the LLM knows of it (cold start), as the distilled vector that items absent
from the train split start from in the semantic table (stage 2b and stage 3's fused optimizers update only
looked-up rows; stage 3's default `adamw` also decays every row). The user's
history is their last positively rated items in the prep output. One process, no launcher needed.
Writes Parquet: rank, item_id (0 for new items), title, new_item, score (P(Yes)), best first.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import torch

from embeddings.collab import ITEM, SEMANTIC, USER
from embeddings.tables import TableFile
from launcher import provenance
from launcher.artifacts import SELLA_ADAPTER, SELLA_PROJECTOR, SELLA_TABLES, adapter_dir, find, lookup
from launcher.config import Config
from launcher.data import read_items
from launcher.recipes.distillation import semantic_vectors
from llm.model import SPECIAL_TOKENS, load_tuned
from llm.prompts import encode
from llm.scorer import collate
from llm.sella import SellaLM
from pipeline.config import ConfigError, data_path, load_config, run_path
from pipeline.schema import Sample


def candidate_records(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """The candidates file's columns and records, each with where it is ("<file>, line N": the physical line the
    record starts on, blank lines and quoted line breaks counted; "<file>, row N" in Parquet, from 1). CSV fields are
    read as written, UTF-8 (a byte-order mark dropped): no type guessing, so a title "1984" stays one and "None" is a
    title."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: candidates file not found")
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
        return list(table.columns), [(f"{path}, row {i}", rec) for i, rec in enumerate(table.to_dict("records"), start=1)]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 ({err.reason} at byte {err.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is an error, not a long title
    header: list[str] = []
    records: list[tuple[str, dict]] = []
    line = 1
    try:
        for fields in reader:
            blank = not any(f.strip() for f in fields)  # a blank line holds no candidate
            if not blank and not header:
                header = fields  # the first line that is not blank
            elif not blank:
                if len(fields) != len(header):
                    raise ValueError(f"{path}, line {line}: {len(fields)} fields, the header has {len(header)} "
                                     f"({', '.join(header)})")
                records.append((f"{path}, line {line}", dict(zip(header, fields, strict=True))))
            line = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"{path}, line {line}: {err}") from None
    return header, records


def read_candidates(path: Path, items: pd.DataFrame) -> pd.DataFrame:
    """item_id (0 = new), title, new_item and `where` (file and line) per candidate; errors name the file and line."""
    columns, records = candidate_records(path)
    if not {"item_id", "title"} & set(columns):
        raise ValueError(f"{path}: needs an item_id or a title column, found {columns}")
    if not records:
        raise ValueError(f"{path}: no candidates (the file has no rows)")
    titles = dict(zip(items.item_id, items.title, strict=True))
    rows = []
    for where, rec in records:
        item = rec.get("item_id")
        item = None if pd.isna(item) or not str(item).strip() else item
        try:  # "50.0", as pandas writes an id column with gaps, is 50; "5.7" is no id
            number = float(item) if item is not None else 0.0
            if not number.is_integer():
                raise ValueError
            item = int(number)
        except ValueError:
            raise ValueError(f"{where}: item_id {item!r} is not an integer (item ids are the prep output's "
                             "remapped ids: tables/items maps raw_id to item_id)") from None
        title = rec.get("title")
        title = str(title) if not pd.isna(title) and str(title).strip() else None
        known = item in titles
        if not known and title is None:
            raise ValueError(f"{where}: item_id {item or '(empty)'} is not in the data and there "
                             "is no title to score it as a new item")
        if not known and any(token in title for token in SPECIAL_TOKENS):
            raise ValueError(f"{where}: the title {title!r} holds one of the prompt's special tokens "
                             f"({', '.join(SPECIAL_TOKENS)})")
        rows.append({"item_id": item if known else 0, "title": titles[item] if known else title, "new_item": not known,
                     "where": where})
    return pd.DataFrame(rows)


def user_history(data_dir: Path, user: int, length: int) -> list[str]:
    """Titles of the user's last `length` positively rated items, oldest first, in the protocol's history order.

    Prep orders a user's rows by timestamp, then by where the item first appears in the log (ML-1M has many ratings
    in one second); a row's `history` holds the positives before it, so among one second's positives the one with
    the longer history comes later. Exact while histories are kept whole (`protocol.history_keep: null`, every
    bundled config but the Amazon and synthetic ones, which keep 50); past that length, ties fall back to the row id."""
    rows = pd.read_parquet(data_dir / "tables" / "interactions",
                           columns=["row_id", "user_id", "label", "timestamp", "title", "history"],
                           filters=[("user_id", "==", user)])
    if rows.empty:
        raise ValueError(f"user {user} has no interactions in {data_dir}")
    liked = rows[rows.label == 1].assign(earlier=lambda r: r.history.map(len))
    liked = liked.sort_values(["timestamp", "earlier", "row_id"])
    return liked.title.tolist()[-length:] if length else []


def warm_inputs(cfg: Config, run_dir: Path, candidates: pd.DataFrame, tables: TableFile,
                stage1: torch.nn.Module | None, tokenizer) -> torch.Tensor:
    """Each candidate's `<Warm_ID>` input, in the candidates' order: a known item's row of the stage-3 semantic
    table; a new item's title distilled as stage 2a distilled the trained items (its collab row is the padding
    row 0), in float32 on the CPU (stage 2a on a GPU runs in bf16: there the two differ by its rounding).
    `stage1` is the stage-1 model when it is already loaded."""
    semantic = tables.rows(SEMANTIC, torch.tensor(candidates.item_id.to_numpy(), dtype=torch.long))
    new = np.flatnonzero(candidates.new_item.to_numpy())
    if len(new):
        adapter = adapter_dir(cfg, run_dir) if cfg.distill.use_lora else None
        distiller = stage1 if stage1 is not None and adapter else load_tuned(cfg.llm, adapter)[0]
        titles = candidates.title.to_numpy()[new].tolist()
        semantic[torch.from_numpy(new)] = semantic_vectors(distiller, tokenizer, cfg, titles, torch.device("cpu"))
    return semantic


@torch.no_grad()
def rank(cfg: Config, data_dir: Path, run_dir: Path, user: int, candidates: pd.DataFrame) -> pd.DataFrame:
    """Scores of the candidates for `user` with the run's stage-3 model, best first."""
    llm_cfg = cfg.llm
    sella_adapter = lookup(cfg, run_dir, SELLA_ADAPTER)
    llm, tokenizer = load_tuned(llm_cfg, sella_adapter or adapter_dir(cfg, run_dir))
    model = SellaLM.from_export(llm, tokenizer, find(cfg, run_dir, SELLA_PROJECTOR)).eval()
    tables = TableFile(find(cfg, run_dir, SELLA_TABLES))
    if user <= 0 or user >= tables.shape(USER)[0]:
        raise ValueError(f"user {user} is outside the trained user table (1..{tables.shape(USER)[0] - 1})")
    items = torch.tensor(candidates.item_id.to_numpy(), dtype=torch.long)
    semantic = warm_inputs(cfg, run_dir, candidates, tables, llm if sella_adapter is None else None, tokenizer) \
        if model.warm else None
    history = user_history(data_dir, user, llm_cfg.history_titles)
    if not history and llm_cfg.history_titles and llm_cfg.drop_no_history:
        print(f"note: user {user} has no positively rated item in {data_dir}: the prompts show no history, which stage "
              "3 never trained on (llm.drop_no_history)", file=sys.stderr)
    scores = []
    for lo in range(0, len(candidates), cfg.eval.batch):
        idx = list(range(lo, min(lo + cfg.eval.batch, len(candidates))))
        samples = [Sample(row_id=i, user_id=user, item_id=int(items[i]), label=0, timestamp=0, split="rank", warm=0,
                          history_ids=[], history_titles=history, title=candidates.title.iat[i]) for i in idx]
        encoded = []
        for i, s in zip(idx, samples, strict=True):
            try:
                encoded.append(encode(tokenizer, s, "sella", cfg.domain, llm_cfg.max_length, llm_cfg.history_titles,
                                      with_answer=False, warm=model.warm))
            except ValueError as err:  # a new item's title too long for llm.max_length
                raise ValueError(f"{candidates['where'].iat[i]}: {str(err).removeprefix(f'row {i}: ')}") from None
        rows = [tables.rows(USER, torch.full((len(idx),), user)), tables.rows(ITEM, items[idx])]
        if model.warm:
            rows.append(semantic[idx])
        scores.append(model(collate(encoded, tokenizer.pad_token_id), *rows, score=True).float())
    out = candidates.assign(score=torch.cat(scores).numpy()).sort_values("score", ascending=False, kind="stable")
    return out.assign(rank=range(1, len(out) + 1))[["rank", "item_id", "title", "new_item", "score"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launcher/rank.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the YAML config the run was trained with")
    p.add_argument("--user", required=True, type=int, help="user id (remapped id of the prep output)")
    p.add_argument("--candidates", required=True, type=Path, help="CSV or Parquet with item_id and/or title")
    p.add_argument("--out", required=True, type=Path, help="Parquet file for the ranked scores")
    p.add_argument("--data", help="prep output directory (default: data_dir of the config, else out/<name>)")
    p.add_argument("--run-dir", help="trained run (default: run_dir of the config, else runs/<name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--allow-config-change", action="store_true",
                   help="score even when the prompt or model settings differ from those stage 3 trained with, or the "
                        "distill settings from stage 2a's")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set, schema=Config)
        data_dir = data_path(cfg, args.data)
        run_dir = run_path(cfg, args.run_dir)
        provenance.check_scored(cfg, run_dir, args.allow_config_change, model="sella")  # prompts as stage 3's
        provenance.check_trained_on(run_dir, "sella", data_dir)  # its ids are that prep output's
        candidates = read_candidates(args.candidates, read_items(data_dir))
        if candidates.new_item.any() and cfg.sella.warm_token:  # distilled as stage 2a distilled the trained items'
            provenance.check_distilled(cfg, run_dir, args.allow_config_change)
        ranked = rank(cfg, data_dir, run_dir, args.user, candidates)
    except (ConfigError, FileNotFoundError, ValueError, provenance.ConfigChanged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ranked.to_parquet(args.out, index=False)
    print(ranked.to_string(index=False, max_colwidth=48))
    return 0


if __name__ == "__main__":
    sys.exit(main())
