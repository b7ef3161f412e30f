"""Shared fixtures: a small shapes data set, the project's scripts run as a user runs them, and
the released model's checkpoints in the official layouts, generated from the key lists in
tests/reference/ (see its README: the parity target there was computed by the released code
from these very weights). Nothing outside the repository is read."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def raises_naming(error, call, *names):
    """call() raises `error` with a one-line message that names each of `names` (a path, a key, a
    size, a kind): what the user needs to find the problem, in whatever words. Returns it."""
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for name in names:
        assert re.search(rf"(?<!\w){re.escape(str(name))}(?!\w)", message), (name, message)
    return message


def square_batch(B=4, size=64):
    """Each image holds a red and a blue square, and each comes twice: once with the text that
    names the red one, once with the blue one's. A model that ignores the text cannot fit both."""
    images = torch.full((B, 3, size, size), -1.0)
    masks = torch.zeros(B, size, size)
    ids = torch.zeros(B, 6, dtype=torch.long)
    for b in range(B):
        red, blue = (8 + 4 * (b // 2), 8), (36 - 2 * (b // 2), 34)
        images[b, 0, red[0]:red[0] + 20, red[1]:red[1] + 20] = 2.0
        images[b, 2, blue[0]:blue[0] + 20, blue[1]:blue[1] + 20] = 2.0
        r, c = red if b % 2 == 0 else blue
        masks[b, r:r + 20, c:c + 20] = 1
        ids[b, :3] = torch.tensor([2, 10 if b % 2 == 0 else 11, 3])
    return dict(image=images, mask=masks, input_ids=ids, attention_mask=(ids > 0).long())


def run_convert(src, dst):
    """weights/convert.py SRC DST, in this process; returns DST."""
    from weights import convert
    assert convert.main([str(src), str(dst)]) == 0
    return dst


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
