"""Shared fixtures: a small shapes data set, the project's scripts run as a user runs them, and
the released model's checkpoints in the official layouts, generated from the key lists in
tests/reference/ (see its README: the parity target there was computed by the released code
from these very weights). Nothing outside the repository is read."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "reference"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(REFERENCE))

import data  # noqa: E402
import official_weights  # noqa: E402  (tests/reference/official_weights.py)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A 16-image shapes set in RefCOCO's layout (data.make_shapes, seed 0), shared by every test
    file: read it, never write into it."""
    root = tmp_path_factory.mktemp("shapes")
    data.make_shapes(root, seed=0, num_images=16)
    return root


def run_script(script, *args, timeout=300):
    """`python SCRIPT ARGS` from the repository root, as a user runs it: a CompletedProcess with
    returncode, stdout and stderr as text."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def reference_file(name):
    return REFERENCE / name


@pytest.fixture(scope="session")
def official_small(tmp_path_factory):
    """Seed-0 checkpoints at depths [2,2,2,2] in the released layouts: the CrossVLT .pth (bare),
    the Microsoft Swin .pth ({'model': ...}) and an HF BERT folder whose pytorch_model.bin names
    LayerNorms gamma/beta (as the hub file does). `bert_sd` has the weight/bias names."""
    out = tmp_path_factory.mktemp("official")
    sd, swin_sd, bert_sd = official_weights.write_official_small(out)
    return dict(dir=out, crossvlt=out / "crossvlt_small.pth", swin=out / "swin_small.pth",
                bert=out / "bert", crossvlt_sd=sd, swin_sd=swin_sd, bert_sd=bert_sd)
