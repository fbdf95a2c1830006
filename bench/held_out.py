"""What the held-out benches (observers.py, transforms.py) share: their data flags, the model and the
calibration samples, and the evaluation sets (WikiText-2 test and the held-out C4 file, evaluation only)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from kvq.data import Document, Samples, load_documents, select_samples
from kvq.model.loading import load_model
from kvq.model.model_spec import LoadedModel

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every held-out bench takes; a bench adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--cal-data", default=str(SHARED / "c4-en-train-sample.jsonl"))
    p.add_argument("--eval-data", nargs="+", default=[str(SHARED / "wikitext-2-raw-test.txt"),
                                                      str(SHARED / "c4-en-validation-heldout.jsonl")])
    p.add_argument("--cal-samples", type=int, default=32)
    p.add_argument("--cal-seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--device", default="cpu")
    return p


@dataclass
class Setup:
    loaded: LoadedModel
    pad_id: int
    cal_documents: list[Document]
    picked: Samples


def setup(args: argparse.Namespace, script: str) -> Setup:
    """Check the data files, load the model, pick the calibration samples (seed 0)."""
    for path in (args.cal_data, *args.eval_data):
        if not Path(path).is_file():
            sys.exit(f"{script}: {path} not found (the shared data folder sits beside the repository)")
    loaded = load_model(args.model, device=args.device)
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    cal = load_documents("c4", [args.cal_data], purpose="calibration")
    return Setup(loaded, pad_id, cal.documents, select_samples(cal.documents, tok, args.cal_samples,
                                                               args.cal_seqlen, 0))


def eval_documents(path: str) -> list[Document]:
    """An evaluation set: WikiText-2 for a .txt file, C4 otherwise."""
    return load_documents("wikitext2" if path.endswith(".txt") else "c4", [path], purpose="evaluation").documents
