"""evaluate.py: the metrics against hand-computed cases, both protocols, the --shuffle-text
control, and the command line (a split, one photo, and every error a user can make)."""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crossvlt
import data
import evaluate

EVALUATE = Path(evaluate.__file__)


# ----------------------------------------------------------------------------------------------
# Fixtures: one thread, a 12-image shapes set, a random tiny model

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's forward takes ~15 ms on one thread but can take 100x longer on two when
    other jobs load the CPU (the threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data.make_shapes(root, num_images=12)
    torch.manual_seed(0)
    crossvlt.CrossVLT(crossvlt.CrossVLTConfig.tiny(image_size=64)).save(root / "tiny.safetensors")
    return argparse.Namespace(root=root, ckpt=root / "tiny.safetensors",
                              vocab=root / "shapes" / "vocab.txt",
                              refer=data.Refer(root, "shapes", "unc"))


def photo(path, stored=(48, 32)):
    """A JPEG stored landscape (W, H) = `stored` with EXIF orientation 6: upright it is portrait."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (stored[1], stored[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def cli(*args):
    """evaluate.py run as a user runs it: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(EVALUATE), *map(str, args)], capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


# ----------------------------------------------------------------------------------------------
# Metrics, hand-computed

def test_intersection_union_counts_pixels():
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    gt = torch.tensor([[[0, 1, 1], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    inter, union = evaluate.intersection_union(pred, gt)
    assert inter.tolist() == [1, 0] and union.tolist() == [4, 0]


@pytest.mark.parametrize("inter, union, expected", [
    ([10], [10], dict(oIoU=100, mIoU=100, **{"P@0.5": 100, "P@0.9": 100})),     # perfect
    ([0], [5], dict(oIoU=0, mIoU=0, **{"P@0.5": 0})),                            # empty prediction
    ([0], [0], dict(oIoU=0, mIoU=0, **{"P@0.5": 0})),                            # empty union: IoU 0
    ([1, 3], [2, 4], dict(oIoU=66.67, mIoU=62.5, **{"P@0.5": 100, "P@0.6": 50, "P@0.8": 0})),
    ([1, 90], [10, 100], dict(oIoU=82.73, mIoU=50, **{"P@0.5": 50, "P@0.9": 50})),   # oIoU != mIoU
    ([3, 9, 0], [5, 10, 0], dict(oIoU=80, mIoU=50, **{"P@0.6": 66.67, "P@0.9": 33.33})),  # >= t
])
def test_summarise_hand_computed(inter, union, expected):
    metrics = evaluate.summarise(inter, union)
    assert list(metrics) == ["oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9"]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=0.005), name


def test_summarise_refuses_nothing():
    with pytest.raises(ValueError):
        evaluate.summarise([], [])


class FixedLogits(torch.nn.Module):
    """Stands in for CrossVLT: expression n gets the logits table[input_ids[n, 0]]."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, images, input_ids, attention_mask):
        return crossvlt.CrossVLTOutput(self.table[input_ids[:, 0]], [None] * 4)


def two_refs_batch():
    """Ref 7: target columns 0-1 at 4x4, columns 0-2 at its own 3x5 size; expressions 70 (logit
    +1 on columns 0-1, -1 on 2-3) and 71 (all -1). Ref 8: empty target, expression 80 (all -1)."""
    mask = torch.zeros(2, 4, 4, dtype=torch.uint8)
    mask[0, :, :2] = 1
    original = torch.zeros(3, 5, dtype=torch.uint8)
    original[:, :3] = 1
    input_ids = torch.zeros(3, 5, dtype=torch.long)
    input_ids[1:, 0] = 1
    return {"image": torch.zeros(2, 3, 4, 4), "mask": mask, "input_ids": input_ids,
            "attention_mask": torch.ones(3, 5, dtype=torch.long), "expr_ref": torch.tensor([0, 0, 1]),
            "original_mask": [original, torch.zeros(2, 2, dtype=torch.uint8)], "ref_id": [7, 8],
            "sent_ids": [[70, 71], [80]], "sentences": [["left", "nothing"], ["nothing"]],
            "image_path": ["a.jpg", "b.jpg"]}


def test_run_evaluation_both_protocols_by_hand():
    left = torch.tensor([1.0, 1.0, -1.0, -1.0]).expand(1, 4, 4)
    model = FixedLogits(torch.stack([left, -torch.ones(1, 4, 4)]))               # (2, 1, 4, 4)
    metrics, original, records = evaluate.run_evaluation(model, [two_refs_batch()])
    # 480: I/U = 8/8, 0/8, 0/0 (IoU 0)
    assert metrics == {"oIoU": 50.0, "mIoU": 33.33, "P@0.5": 33.33, "P@0.6": 33.33,
                       "P@0.7": 33.33, "P@0.8": 33.33, "P@0.9": 33.33}
    # original: columns 0..4 of width 5 sit at 0, .75, 1.5, 2.25, 3 of the logits' 4, so the
    # logits are 1, 1, 0, -1, -1; 0 is background (logit > 0), so I/U = 6/9, 0/9, 0/0
    assert original == {"oIoU": 33.33, "mIoU": 22.22, "P@0.5": 33.33, "P@0.6": 33.33,
                        "P@0.7": 0.0, "P@0.8": 0.0, "P@0.9": 0.0}
    assert [(r["ref_id"], r["sent_id"], r["iou"], r["iou_original"]) for r in records] == \
        [(7, 70, 1.0, 0.6667), (7, 71, 0.0, 0.0), (8, 80, 0.0, 0.0)]
    assert [(r["intersection"], r["union"]) for r in records] == [(8, 8), (0, 8), (0, 0)]
    _, none, records = evaluate.run_evaluation(model, [two_refs_batch()], original=False)
    assert none is None and "iou_original" not in records[0]


# ----------------------------------------------------------------------------------------------
# The --shuffle-text control and the pictures

def test_shuffled_text_gives_each_ref_another_ref_of_its_image(shapes):
    tokenizer = data.Tokenizer(shapes.vocab)
    refs = shapes.refer.refs("train")
    dataset = data.RefDataset(shapes.refer, "train", tokenizer, 32, train=False)
    shuffled = evaluate.ShuffledText(dataset, refs)
    again = evaluate.ShuffledText(dataset, refs)
    assert (shuffled.donor == again.donor).all()                                   # fixed seed
    for index, ref in enumerate(refs):
        donor = refs[shuffled.donor[index]]
        same_image = [r for r in refs if r.image_id == ref.image_id]
        assert donor.image_id == ref.image_id
        assert (donor.ref_id != ref.ref_id) == (len(same_image) > 1)
    assert sorted(shuffled.donor.tolist()) == list(range(len(refs)))                # a permutation
    item, own = shuffled[0], dataset[0]
    donor = refs[shuffled.donor[0]]
    assert item["sentences"] == donor.sentences and item["sent_ids"] == donor.sent_ids
    assert item["ref_id"] == own["ref_id"] and torch.equal(item["mask"], own["mask"])
    assert torch.equal(item["input_ids"][0], tokenizer.encode(donor.sentences[0])[0])


def test_outline_and_heat_colours():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    assert evaluate.outline(mask, 1).sum() == 16 and evaluate.outline(mask, 2).sum() == 24
    colours = evaluate.heat_colours(np.array([0.0, 1.0]))
    assert colours.tolist() == [list(evaluate.MAGMA[0]), list(evaluate.MAGMA[-1])]


def test_vocabulary_lookup(shapes, tmp_path):
    args = argparse.Namespace(ckpt=tmp_path / "m.safetensors", vocab=None, dataset="shapes",
                              data_root=tmp_path / "nowhere")
    shutil.copy(shapes.ckpt, args.ckpt)
    with pytest.raises(data.DataError, match="--vocab"):
        evaluate.load_model_and_tokenizer(args, "cpu")
    args.data_root = shapes.root                                                   # the data set's
    shapes_vocab_size = data.Tokenizer(shapes.vocab).vocab_size
    assert evaluate.load_model_and_tokenizer(args, "cpu")[1].vocab_size == shapes_vocab_size
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nbeside\n")    # beside the ckpt
    assert evaluate.load_model_and_tokenizer(args, "cpu")[1].vocab_size == 5


# ----------------------------------------------------------------------------------------------
# Command line: main() in this process, and one mistake in a real process

def run_main(capsys, *args):
    code = evaluate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_help(capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    assert "--shuffle-text" in out and "--save-overlays" in out and "480" in out and "--vocab" in out


def test_a_mistake_in_a_real_process(shapes, tmp_path):
    released = tmp_path / "released.pth"
    torch.save({"backbone.0.patch_embed.proj.weight": torch.zeros(2, 3, 4, 4)}, released)
    code, out, err = cli("--ckpt", released, "--dataset", "shapes", "--data-root", shapes.root)
    assert code != 0 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {released} is a released CrossVLT checkpoint; convert "
                                        f"it first: python weights/convert.py {released} "
                                        f"{tmp_path / 'released.safetensors'}"]


def test_split_end_to_end(shapes, capsys):
    code, out, err = run_main(capsys, "--ckpt", shapes.ckpt, "--dataset", "shapes", "--split", "testA",
                              "--data-root", shapes.root, "--workers", 0, "--batch-size", 2,
                              "--device", "cpu", "--save-overlays", 2)
    assert code == 0, err
    results = json.loads((shapes.root / "tiny_shapes_testA.json").read_text())     # beside the ckpt
    refs = shapes.refer.refs("testA")
    expressions = [(r.ref_id, s) for r in refs for s in r.sent_ids]
    assert {"dataset", "split", "num_expressions", "metrics", "metrics_original", "checkpoint",
            "image_size", "seconds"} <= set(results)
    assert (results["dataset"], results["split"], results["image_size"]) == ("shapes", "testA", 64)
    assert results["num_expressions"] == len(expressions)
    for name in ("metrics", "metrics_original"):
        assert set(results[name]) == {"oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9"}
    lines = (shapes.root / "tiny_shapes_testA.per_expression.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["ref_id"], r["sent_id"]) for r in records] == expressions
    mean = 100 * np.mean([r["iou"] for r in records])
    assert results["metrics"]["mIoU"] == pytest.approx(mean, abs=0.01)
    by_kind = results["metrics_by_kind"]                     # shapes: each kind scored apart
    assert sum(m["num_expressions"] for m in by_kind.values()) == len(records)
    for kind, m in by_kind.items():
        rs = [r for r in records if data.expression_kind(r["sentence"]) == kind]
        inter, union = sum(r["intersection"] for r in rs), sum(r["union"] for r in rs)
        assert m["num_expressions"] == len(rs) and m["oIoU"] == round(100 * inter / max(union, 1), 2)
        assert m["mIoU"] == pytest.approx(100 * np.mean([r["iou"] for r in rs]), abs=0.01)
    overlays = sorted((shapes.root / "tiny_shapes_testA_overlays").glob("*.png"))
    assert len(overlays) == 2 and Image.open(overlays[0]).width > 300
    assert "oIoU" in out and "original" in out and "ETA" in out and "by kind" in out


def test_split_with_shuffled_text_in_bf16(shapes, tmp_path, capsys):
    out = tmp_path / "shuffled.json"
    code, _, err = run_main(capsys, "--ckpt", shapes.ckpt, "--dataset", "shapes", "--split", "testA",
                            "--data-root", shapes.root, "--workers", 0, "--device", "cpu",
                            "--shuffle-text", "--out", out, "--precision", "bf16")
    assert code == 0, err
    results = json.loads(out.read_text())
    assert results["shuffle_text"] is True and results["precision"] == "bf16"
    own = {s: r.ref_id for r in shapes.refer.refs("testA") for s in r.sent_ids}
    records = [json.loads(line) for line in (tmp_path / "shuffled.per_expression.jsonl").open()]
    assert len(records) == len(own) and all(own[r["sent_id"]] != r["ref_id"] for r in records)


def test_single_photo_writes_pictures_at_the_photos_upright_size(shapes, tmp_path, capsys):
    path = photo(tmp_path / "photo.jpg")
    code, out, err = run_main(capsys, "--ckpt", shapes.ckpt, "--image", path, "--text", "the red circle",
                              "--vocab", shapes.vocab, "--out", tmp_path / "pred.png", "--device", "cpu")
    assert code == 0, err
    overlay, mask = Image.open(tmp_path / "pred.png"), Image.open(tmp_path / "pred_mask.png")
    assert overlay.size == mask.size == (32, 48)                                   # EXIF 6: upright
    assert (tmp_path / "pred_panel.png").is_file()
    model = crossvlt.CrossVLT.load(shapes.ckpt).eval()
    ids, att = data.Tokenizer(shapes.vocab).encode("the red circle")
    upright = data.load_image(path, exif=True)
    with torch.no_grad():
        logits = model(data.image_to_tensor(upright, 64)[None], ids[None], att[None]).mask_logits
    expected = evaluate.to_size(logits, (48, 32))[0, 0] > 0
    assert np.array_equal(np.asarray(mask) == 255, expected.numpy())
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}


@pytest.fixture(scope="module")
def mistakes(shapes, tmp_path_factory):
    """Every mistake a user can make: name -> (arguments, what the one line must say)."""
    tmp = tmp_path_factory.mktemp("mistakes")
    model = crossvlt.CrossVLT.load(shapes.ckpt)
    torch.save({"model": model.swin.state_dict()}, tmp / "swin.pth")               # Microsoft layout
    (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    shutil.copytree(shapes.root / "shapes", tmp / "root" / "shapes")
    bad = data.Refer(tmp / "root", "shapes", "unc").refs("testA")[0].image_path
    Path(bad).write_bytes(b"truncated")
    split = ["--dataset", "shapes", "--split", "testA", "--device", "cpu"]
    one = ["--vocab", shapes.vocab, "--device", "cpu"]
    return {
        "missing data root": ([shapes.ckpt, *split, "--data-root", tmp / "nowhere"], "data root"),
        "missing checkpoint": ([tmp / "none.safetensors", *split, "--data-root", shapes.root],
                               "no such file"),
        "wrong checkpoint kind": ([tmp / "swin.pth", *split, "--data-root", shapes.root],
                                  "swin checkpoint, not crossvlt"),
        "corrupt photo": ([shapes.ckpt, *one, "--image", tmp / "corrupt.jpg", "--text", "red"],
                          "cannot read image"),
        "corrupt data set image": ([shapes.ckpt, *split, "--data-root", tmp / "root", "--workers", 1],
                                   f"cannot read image {bad}"),          # raised in a worker
        "empty text": ([shapes.ckpt, *one, "--image", photo(tmp / "p.jpg"), "--text", ""],
                       "empty expression"),
        "blank text": ([shapes.ckpt, *one, "--image", tmp / "p.jpg", "--text", "  \t "],
                       "empty expression"),
    }


@pytest.mark.parametrize("case", ["missing data root", "missing checkpoint", "wrong checkpoint kind",
                                  "corrupt photo", "corrupt data set image", "empty text", "blank text"])
def test_mistakes_exit_with_one_clear_line(mistakes, case, capsys):
    args, expected = mistakes[case]
    code, out, err = run_main(capsys, "--ckpt", *args)
    assert code != 0 and "Traceback" not in err and "DataError" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def test_benchmark_writes_one_row_per_setting(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, printed, err = run_main(capsys, "--benchmark", "--modes", "eval", "train", "--batch-sizes", 2,
                                  "--image-sizes", 64, "--steps", 1, "--threads", 1, "--out", out,
                                  "--data-workers", 0)
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["batch"], r["image_size"]) for r in rows] == [("eval", 2, 64), ("train", 2, 64)]
    for row in rows:
        config = crossvlt.CrossVLTConfig.tiny(image_size=64)
        flops = evaluate.model_flops(config, 2, 64, train=row["mode"] == "train")
        assert row["gflop_per_batch"] == pytest.approx(flops / 1e9, abs=0.01)
        assert 0 < row["gflop_per_s"] <= row["ceiling_gflop_per_s"] * 1.5
        assert row["threads"] == 1 and row["device"] == "cpu"
    assert "images/s" in printed and "peak RSS" in printed and "of ceiling" in printed
    assert "data: RefCOCO-like 640x480 JPEGs -> 64, 0 worker(s):" in printed


@pytest.mark.parametrize("train", [False, True], ids=["forward", "training step"])
def test_analytic_flops_match_pytorchs_count(train):
    """model_flops (the benchmark's floor) against torch.utils.flop_counter on the real model;
    attention through PyTorch's math kernel, whose products the counter sees (the fused CPU
    kernel counts as 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    config = crossvlt.CrossVLTConfig.tiny(image_size=64, lang_split=(1, 2, 1, 1))
    model = crossvlt.CrossVLT(config).train()
    images, ids = torch.randn(2, 3, 64, 72), torch.randint(5, 900, (2, 21))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        output = model(images, ids, torch.ones_like(ids))
        if train:
            model.loss(output, torch.rand(2, 64, 72).round())[0].backward()
    counted = counter.get_total_flops()
    assert evaluate.model_flops(config, 2, 64, 72, train=train) == pytest.approx(counted, rel=0.005)


def test_benchmark_refuses_a_checkpoint(capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--benchmark", "--ckpt", "model.safetensors"])
    assert exit.value.code == 2 and "random model" in capsys.readouterr().err
