"""Shared fixtures: the released model's reference files and checkpoints in the official layouts,
generated with ../shared/reference/gen_weights.py (never checked in)."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference"


def reference_file(name):
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the parity checks need ../shared/reference beside the repo")
    return path


def load_gen_weights():
    spec = importlib.util.spec_from_file_location("gen_weights", reference_file("gen_weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def official_small(tmp_path_factory):
    """Seed-0 checkpoints at depths [2,2,2,2] in the released layouts, as the reference README
    makes them: the CrossVLT .pth (bare), the Microsoft Swin .pth and an HF BERT folder whose
    pytorch_model.bin names LayerNorms gamma/beta (as the hub file does)."""
    gen = load_gen_weights()
    out = tmp_path_factory.mktemp("official")
    keys = gen.load_keylist(reference_file("official_crossvlt_keys_small.json"))
    sd = gen.build_state_dict(keys, 0)
    torch.save(sd, out / "crossvlt_small.pth")
    swin_sd, _ = gen.derive(sd, gen.load_keylist(reference_file("swin_ms_keys_small.json")), 0,
                            gen.SALT_SWIN, gen.swin_source_name)
    torch.save({"model": swin_sd}, out / "swin_small.pth")
    bert_sd, _ = gen.derive(sd, gen.load_keylist(reference_file("bert_hf_keys.json")), 0,
                            gen.SALT_BERT, gen.bert_source_name)
    (out / "bert").mkdir()
    torch.save(gen.rename_ln_gamma_beta(bert_sd), out / "bert" / "pytorch_model.bin")
    return dict(dir=out, crossvlt=out / "crossvlt_small.pth", swin=out / "swin_small.pth",
                bert=out / "bert", crossvlt_sd=sd, swin_sd=swin_sd, bert_sd=bert_sd)
