"""evaluate.py: the metrics against hand-computed cases, both protocols, the --shuffle-text
control, segment() against the model run by hand, the benchmark's rows, and the command line (a
split, one photo, and every error a user can make)."""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import crossvlt
import data
import evaluate
from conftest import run_script


# ----------------------------------------------------------------------------------------------
# Fixtures: one thread, a random tiny model beside the shared shapes set

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's forward takes ~15 ms on one thread but can take 100x longer on two when
    other jobs load the CPU (the threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(shapes_root, tmp_path_factory):
    """conftest's shapes set (read only) and a random tiny model at 64 px in a folder of its own,
    where a split's results land by default."""
    models = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    crossvlt.CrossVLT(crossvlt.CrossVLTConfig.tiny(image_size=64)).save(models / "tiny.safetensors")
    return argparse.Namespace(root=shapes_root, models=models, ckpt=models / "tiny.safetensors",
                              vocab=shapes_root / "shapes" / "vocab.txt",
                              refer=data.Refer(shapes_root, "shapes", "unc"))


def photo(path, stored=(48, 32)):
    """A JPEG stored landscape (W, H) = `stored` with EXIF orientation 6: upright it is portrait."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (stored[1], stored[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def by_hand(model, tokenizer, upright, text):
    """The model run by hand on an upright photo: (1, H, W) logits, bilinear to the photo's size."""
    ids, attention = tokenizer.encode(text)
    with torch.no_grad():
        logits = model(data.image_to_tensor(upright, model.config.image_size)[None], ids[None],
                       attention[None]).mask_logits
    return F.interpolate(logits, (upright.height, upright.width), mode="bilinear", align_corners=True)[:, 0]


def files_under(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


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
    # at the model's size: I/U = 8/8, 0/8, 0/0 (IoU 0)
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


def test_metrics_table_labels_the_first_protocol_by_the_models_size():
    metrics = evaluate.summarise([1], [2])
    rows = evaluate.metrics_table(metrics, metrics, 96).splitlines()
    assert [row.split()[0] for row in rows] == ["protocol", "96x96", "original"]


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
    args = argparse.Namespace(ckpt=tmp_path / "m.safetensors", vocab=None, dataset="shapes", compile=False,
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
# segment(): one photo, any number of expressions

def test_segment_is_the_model_run_by_hand_for_one_expression_or_several(shapes):
    model = crossvlt.CrossVLT.load(shapes.ckpt).eval()
    tokenizer = data.Tokenizer(shapes.vocab, max_len=model.config.max_len)
    image = data.load_image(shapes.refer.refs("testA")[0].image_path)
    texts = ["the red circle", "the small square on the left"]
    one = evaluate.segment(model, tokenizer, image, texts[0])
    both = evaluate.segment(model, tokenizer, image, texts)
    assert one.masks.shape == one.logits.shape == (1, image.height, image.width)
    assert both.masks.shape == (2, image.height, image.width) and both.masks.dtype == torch.bool
    assert torch.equal(both.masks, both.logits > 0)
    for k, text in enumerate(texts):
        expected = by_hand(model, tokenizer, image, text)[0]
        assert torch.allclose(both.logits[k], expected, atol=1e-4)
        sure = expected.abs() > 1e-3                         # a batch of two may round differently
        assert torch.equal(both.masks[k][sure], (expected > 0)[sure])
    assert torch.allclose(one.logits[0], both.logits[0], atol=1e-4)
    assert [a.shape[0] for a in both.alignment if a is not None] == [2] * 4     # a map per expression


def test_segment_fits_an_exif_rotated_photo_upright(shapes, tmp_path):
    model = crossvlt.CrossVLT.load(shapes.ckpt).eval()
    tokenizer = data.Tokenizer(shapes.vocab, max_len=model.config.max_len)
    stored = Image.open(photo(tmp_path / "photo.jpg"))                # 48 wide, 32 high as stored
    result = evaluate.segment(model, tokenizer, stored, ["the red circle", "the blue one"])
    assert result.masks.shape == (2, 48, 32)                                        # upright: 32 x 48
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg"))
    assert torch.allclose(result.logits[1], by_hand(model, tokenizer, upright, "the blue one")[0], atol=1e-4)


def test_segment_reads_a_16_bit_photo_as_load_image_does(shapes, tmp_path):
    model = crossvlt.CrossVLT.load(shapes.ckpt).eval()
    tokenizer = data.Tokenizer(shapes.vocab, max_len=model.config.max_len)
    Image.fromarray((np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)).save(tmp_path / "deep.png")
    opened = evaluate.segment(model, tokenizer, Image.open(tmp_path / "deep.png"), "the red circle")
    loaded = evaluate.segment(model, tokenizer, data.load_image(tmp_path / "deep.png"), "the red circle")
    assert torch.equal(opened.logits, loaded.logits)


def test_segment_restores_the_models_mode_even_when_it_fails(shapes):
    model = crossvlt.CrossVLT.load(shapes.ckpt).train()
    ids, attention = torch.full((1, 8), 10 ** 6), torch.ones(1, 8, dtype=torch.long)     # ids past the vocabulary
    with pytest.raises(IndexError):
        evaluate.segment_tokens(model, torch.zeros(3, 64, 64), ids, attention, (64, 64))
    assert model.training


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
    assert "--shuffle-text" in out and "--save-overlays" in out and "input size" in out and "--vocab" in out


def test_a_mistake_in_a_real_process(shapes, tmp_path):
    released = tmp_path / "released.pth"
    torch.save({"backbone.0.patch_embed.proj.weight": torch.zeros(2, 3, 4, 4)}, released)
    done = run_script("evaluate.py", "--ckpt", released, "--dataset", "shapes", "--data-root", shapes.root)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for name in (str(released), "weights/convert.py", str(tmp_path / "released.safetensors")):
        assert name in lines[0]                                 # the file, and the command that fixes it


def test_compile_scores_a_split_as_the_uncompiled_model(shapes, tmp_path, capsys, monkeypatch):
    """--compile goes through torch.compile (its "eager" backend here: the graph capture, with the
    last batch's other size, without minutes of code generation) and changes no score."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, real=torch.compile, **kw: compiled.append(kw)
                        or real(fn, backend="eager", **kw))
    scores = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for flags in ([], ["--compile"]):
        out = tmp_path / f"split{len(flags)}.json"
        code, _, err = run_main(capsys, "--ckpt", shapes.ckpt, "--dataset", "shapes", "--split", "train",
                                "--data-root", shapes.root, "--workers", 0, "--batch-size", 2, "--out", out, *flags)
        assert code == 0, err
        lines = out.with_suffix(".per_expression.jsonl").read_text().splitlines()
        scores.append([json.loads(line)["iou"] for line in lines])
    assert compiled == [{"dynamic": False}] and scores[0] == scores[1]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2   # batches of 2-6 expressions: not one each


def test_split_end_to_end(shapes, capsys):
    before = files_under(shapes.root)
    code, out, err = run_main(capsys, "--ckpt", shapes.ckpt, "--dataset", "shapes", "--split", "testA",
                              "--data-root", shapes.root, "--workers", 0, "--batch-size", 2,
                              "--device", "cpu", "--save-overlays", 2)
    assert code == 0, err
    assert files_under(shapes.root) == before                                # nothing into the data
    results = json.loads((shapes.models / "tiny_shapes_testA.json").read_text())   # beside the ckpt
    refs = shapes.refer.refs("testA")
    expressions = [(r.ref_id, s) for r in refs for s in r.sent_ids]
    assert {"dataset", "split", "num_expressions", "metrics", "metrics_original", "checkpoint",
            "image_size", "seconds"} <= set(results)
    assert (results["dataset"], results["split"], results["image_size"]) == ("shapes", "testA", 64)
    assert results["num_expressions"] == len(expressions)
    for name in ("metrics", "metrics_original"):
        assert set(results[name]) == {"oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9"}
    lines = (shapes.models / "tiny_shapes_testA.per_expression.jsonl").read_text().splitlines()
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
    overlays = sorted((shapes.models / "tiny_shapes_testA_overlays").glob("*.png"))
    assert len(overlays) == 2 and Image.open(overlays[0]).width > 300
    labels = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert "64x64" in labels and "original" in labels and "480" not in labels      # the model's size
    by_kind_header = next(line for line in out.splitlines() if line.startswith("by kind"))
    assert "480" not in by_kind_header and "oIoU" in out and "ETA" in out


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
    written = [tmp_path / name for name in ("pred.png", "pred_mask.png", "pred_panel.png")]
    assert out.splitlines() == [f"wrote {p}" for p in written]
    overlay, mask = Image.open(written[0]), Image.open(written[1])
    assert overlay.size == mask.size == (32, 48)                                   # EXIF 6: upright
    assert Image.open(written[2]).width > 300
    model = crossvlt.CrossVLT.load(shapes.ckpt).eval()
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    expected = by_hand(model, data.Tokenizer(shapes.vocab), upright, "the red circle")[0] > 0
    assert np.array_equal(np.asarray(mask) == 255, expected.numpy())
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert err == ""
    code, out, err = run_main(capsys, "--ckpt", shapes.ckpt, "--image", path, "--text", "红色的圆",
                              "--vocab", shapes.vocab, "--out", tmp_path / "unknown.png", "--device", "cpu")
    assert code == 0 and "红色的圆" in err and str(shapes.vocab) in err       # said, and still drawn


@pytest.fixture(scope="module")
def mistakes(shapes, tmp_path_factory):
    """Every mistake a user can make: name -> (arguments, what the one line must name)."""
    tmp = tmp_path_factory.mktemp("mistakes")
    model = crossvlt.CrossVLT.load(shapes.ckpt)
    torch.save({"model": model.swin.state_dict()}, tmp / "swin.pth")               # Microsoft layout
    (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    shutil.copytree(shapes.root / "shapes", tmp / "root" / "shapes")
    bad = data.Refer(tmp / "root", "shapes", "unc").refs("testA")[0].image_path
    Path(bad).write_bytes(b"truncated")
    big = tmp / "big_vocab.txt"
    big.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(1200)]) + "\n")
    split = ["--dataset", "shapes", "--split", "testA", "--device", "cpu"]
    one = ["--vocab", shapes.vocab, "--device", "cpu"]
    shutil.copy(shapes.ckpt, tmp / "own.safetensors")
    (tmp / "binary_vocab.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    return {
        "missing data root": ([shapes.ckpt, *split, "--data-root", tmp / "nowhere"], [tmp / "nowhere"]),
        "missing checkpoint": ([tmp / "none.safetensors", *split, "--data-root", shapes.root],
                               [tmp / "none.safetensors"]),
        "wrong checkpoint kind": ([tmp / "swin.pth", *split, "--data-root", shapes.root],
                                  [tmp / "swin.pth", "swin", "crossvlt"]),
        "vocabulary too large": ([shapes.ckpt, *split, "--data-root", shapes.root, "--vocab", big],
                                 [big, shapes.ckpt, "--vocab"]),
        "corrupt photo": ([shapes.ckpt, *one, "--image", tmp / "corrupt.jpg", "--text", "red"],
                          [tmp / "corrupt.jpg"]),
        "corrupt data set image": ([shapes.ckpt, *split, "--data-root", tmp / "root", "--workers", 1],
                                   [bad]),                                  # raised in a worker
        "empty text": ([shapes.ckpt, *one, "--image", photo(tmp / "p.jpg"), "--text", ""], ["expression"]),
        "results over the checkpoint": ([tmp / "own.safetensors", *split, "--data-root", shapes.root, "--vocab",
                                         shapes.vocab, "--out", tmp / "own.safetensors"], [tmp / "own.safetensors"]),
        "results into a folder": ([shapes.ckpt, *split, "--data-root", shapes.root, "--out", tmp], [tmp]),
        "vocabulary not text": ([shapes.ckpt, *split, "--data-root", shapes.root, "--vocab", tmp / "binary_vocab.txt"],
                                [tmp / "binary_vocab.txt"]),
        "blank text": ([shapes.ckpt, *one, "--image", tmp / "p.jpg", "--text", "  \t "], ["expression"]),
    }


def test_an_overlays_folder_in_the_way_is_refused_before_any_work(shapes, tmp_path, capsys):
    (tmp_path / "r_overlays").write_text("a file where the pictures' folder goes")
    code, out, err = run_main(capsys, "--ckpt", shapes.ckpt, "--dataset", "shapes", "--split", "testA", "--data-root",
                              shapes.root, "--out", tmp_path / "r.json", "--save-overlays", 2, "--device", "cpu")
    assert code == 1 and str(tmp_path / "r_overlays") in err and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("case", ["missing data root", "missing checkpoint", "wrong checkpoint kind",
                                  "vocabulary too large", "corrupt photo", "corrupt data set image",
                                  "empty text", "blank text", "results over the checkpoint",
                                  "results into a folder", "vocabulary not text"])
def test_mistakes_exit_with_one_line_naming_the_culprit(mistakes, case, capsys):
    args, names = mistakes[case]
    code, out, err = run_main(capsys, "--ckpt", *args)
    assert code != 0 and "Traceback" not in err and "DataError" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, err)


# ----------------------------------------------------------------------------------------------
# Benchmark

def test_benchmark_writes_a_row_for_every_setting_with_its_flops(tmp_path, capsys):
    """The rows' FLOPs against PyTorch's own count of the forward at that batch and size (a row
    for the wrong size or batch differs) and a training step about three forwards (the wrong mode)."""
    out = tmp_path / "bench.json"
    code, printed, err = run_main(capsys, "--benchmark", "--modes", "eval", "train", "--batch-sizes", 2,
                                  "--image-sizes", 96, "--steps", 1, "--threads", 1, "--out", out,
                                  "--data-workers", 0)
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["batch"], r["image_size"]) for r in rows] == [("eval", 2, 96), ("train", 2, 96)]
    eval_gflop, train_gflop = (r["gflop_per_batch"] for r in rows)
    assert eval_gflop == pytest.approx(counted_flops(96, 2) / 1e9, abs=0.01)
    assert train_gflop == pytest.approx(3 * eval_gflop, abs=0.03)
    for row in rows:
        assert 0 < row["gflop_per_s"] <= row["ceiling_gflop_per_s"] * 1.5
        assert row["threads"] == 1 and row["device"] == "cpu"
    assert "images/s" in printed and "peak RSS" in printed and "of ceiling" in printed
    assert "-> 96, 0 worker(s)" in printed and "training items/s" in printed


def test_benchmark_times_train_py_own_step(monkeypatch):
    """A train row times train.train_step (warm-up + the timed steps) on a model in training
    mode; an eval row takes none."""
    import train
    calls, step = [], train.train_step
    monkeypatch.setattr(train, "train_step",
                        lambda model, *a, **kw: calls.append(model.training) or step(model, *a, **kw))
    evaluate.benchmark_one("tiny", "eval", 1, 64, "cpu", steps=2, threads=1)
    assert calls == []
    row = evaluate.benchmark_one("tiny", "train", 1, 64, "cpu", steps=2, threads=1, checkpointing=True)
    assert calls == [True] * 3 and row["mode"] == "train" and row["seconds_per_batch"] > 0
    assert row["checkpointing"] is True and row["compile"] is False               # the row says how it ran


def counted_flops(size, batch, train=False, width=None, config=None):
    """torch.utils.flop_counter's count of a forward (and the loss's backward, if `train`) of a
    random tiny model; attention through PyTorch's math kernel, whose products the counter sees
    (the fused CPU kernel counts as 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    config = config or crossvlt.CrossVLTConfig.tiny(image_size=size)
    model = crossvlt.CrossVLT(config).train()
    width = width or size
    images, ids = torch.randn(batch, 3, size, width), torch.randint(5, 900, (batch, config.max_len))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        output = model(images, ids, torch.ones_like(ids))
        if train:
            model.loss(output, torch.rand(batch, size, width).round())[0].backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("train", [False, True], ids=["forward", "training step"])
def test_flops_match_pytorchs_count_on_the_real_model(train):
    """model_flops (the benchmark's floor, counted on the meta device) against the count on the real model."""
    config = crossvlt.CrossVLTConfig.tiny(image_size=64, lang_split=(1, 2, 1, 1))
    counted = counted_flops(64, 2, train, width=72, config=config)
    assert evaluate.model_flops(config, 2, 64, 72, train=train) == pytest.approx(counted, rel=0.005)


def test_flops_follow_the_ablations():
    """An ablation's row counts its own model: fusion at stages 1-2 only, vision-only, alignment at stage 4."""
    full = crossvlt.CrossVLTConfig.tiny(image_size=64)
    ablated = crossvlt.CrossVLTConfig.tiny(image_size=64, fusion_stages=(1, 2), fusion_direction="uni",
                                           align_stages=(4,))
    flops = evaluate.model_flops(ablated, 2, 64, train=True)
    assert flops == pytest.approx(counted_flops(64, 2, True, config=ablated), rel=0.005)
    assert flops < 0.95 * evaluate.model_flops(full, 2, 64, train=True)


CUDA_BEYOND = f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("args, named", [
    (["--ckpt", "model.safetensors"], "--ckpt"), (["--threads", "-1"], "--threads"), (["--threads", "0"], "--threads"),
    (["--image-sizes", "31"], "--image-sizes"), (["--depths", "2", "2", "0", "2"], "--depths"),
    (["--data-workers", "-1"], "--data-workers"), (["--device", "tpu"], "tpu"), (["--device", "cpu:1"], "cpu:1"),
    (["--device", CUDA_BEYOND], CUDA_BEYOND)])
def test_benchmark_refuses_what_it_cannot_use(args, named, capsys):
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--benchmark", *args])
    assert exit.value.code == 2 and named in capsys.readouterr().err.strip().splitlines()[-1]
