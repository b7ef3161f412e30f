"""Evaluate CrossVLT: oIoU, mIoU and precision@t on a RefCOCO-family split, in two protocols;
or segment one photo; or measure speed and memory.

    python evaluate.py --ckpt runs/shapes/best.safetensors --dataset shapes --split testA
    python evaluate.py --ckpt crossvlt_refcoco.safetensors --dataset refcoco --split val \\
        --data-root data --vocab weights/bert-base-uncased/vocab.txt --save-overlays 20
    python evaluate.py --ckpt runs/shapes/best.safetensors --image photo.jpg --text "red circle"
    python evaluate.py --benchmark --preset base --batch-sizes 1 2 --image-sizes 384 480

SxS, the first protocol (the model's input size: 480x480 for the paper's model), is the released
code's: foreground where the mask logit at that size is > 0, against the target resized to it
(Pillow nearest). `original` upsamples the logits bilinearly to each image's size and compares
with its mask there (as CRIS- and CGFormer-style code does). Every expression of every ref counts
once; P@t counts IoU >= t (the released code; the paper says "higher than").

A split writes OUT.json (dataset, split_by, split, num_expressions, num_refs, metrics at SxS,
metrics_original, checkpoint, image_size, shuffle_text, seconds, device, precision; on shapes
metrics_by_kind by data.expression_kind), OUT.per_expression.jsonl (ref_id,
sent_id, sentence, iou, intersection and union in pixels at SxS, iou_original) and, with
--save-overlays N, N pictures in OUT_overlays/; OUT defaults to <checkpoint stem>_<dataset>_<split>.json
beside the checkpoint. A photo writes OUT.png (the photo with the mask) and OUT_mask.png (0/255),
both at its upright size, and OUT_panel.png (with the four stages' alignment maps); OUT defaults
to <photo stem>_pred.png in the current folder; in Python: evaluate.segment(model, tokenizer,
photo, text). Both read the vocabulary from --vocab, else the vocab.txt beside the checkpoint
(train.py puts one there), else, for a shapes split, the data set's.

--benchmark times a random preset (no checkpoint or data needed): images/s and peak memory (CUDA:
allocated; CPU: the process's peak RSS) per mode x batch x image size, each in a fresh process,
written to benchmark_<preset>_<device>.json (or --out).
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

import crossvlt
import data

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


# ----------------------------------------------------------------------------------------------
# Metrics and the two protocols

def intersection_union(pred, gt):
    """Boolean (N, H, W) prediction and ground truth -> per-expression I and U, int64 (N,)."""
    return (pred & gt).flatten(1).sum(1), (pred | gt).flatten(1).sum(1)


def summarise(inter, union):
    """Per-expression I, U -> {oIoU, mIoU, P@0.5..P@0.9} (x100; IoU = 0 where U = 0)."""
    inter, union = torch.as_tensor(inter, dtype=torch.float64), torch.as_tensor(union, dtype=torch.float64)
    if len(inter) == 0:
        raise ValueError("no expressions to score")
    iou = inter / union.clamp(min=1)                                   # U = 0 means I = 0
    metrics = {"oIoU": 100 * float(inter.sum() / union.sum().clamp(min=1)), "mIoU": 100 * float(iou.mean())}
    metrics |= {f"P@{t}": 100 * float((iou >= t).double().mean()) for t in THRESHOLDS}
    return {k: round(v, 2) for k, v in metrics.items()}


def to_size(logits, size):
    """Mask logits (N, 1, S, S) -> (N, 1, H, W), bilinear (align_corners, like the model's own
    upsampling): the `original` protocol and single photos."""
    return F.interpolate(logits, size, mode="bilinear", align_corners=True)


@torch.no_grad()
def run_evaluation(model, loader, device="cpu", original=True, precision="fp32", log_every=0):
    """Score every expression of the refs in `loader` (RefDataset(train=False) + collate_eval) ->
    (metrics at the model's input size, metrics at the original size or None, per-expression
    records [{ref_id, sent_id, sentence, iou, intersection, union, iou_original}])."""
    model.eval()
    records, originals, start = [], [], time.time()
    for step, batch in enumerate(loader, 1):
        which = batch["expr_ref"].to(device)                               # each expression's ref
        inputs = crossvlt.any_batch(batch["image"].to(device)[which],                # (N, 3, S, S)
                                    batch["input_ids"].to(device), batch["attention_mask"].to(device))
        with crossvlt.autocast(device, precision):
            logits = model(*inputs).mask_logits.float()                    # (N, 1, S, S)
        inter, union = intersection_union(logits[:, 0] > 0, batch["mask"].to(device)[which].bool())
        batch_records = [{"ref_id": ref_id, "sent_id": sent_id, "sentence": sentence}
                         for ref_id, sent_ids, sentences in zip(batch["ref_id"], batch["sent_ids"], batch["sentences"])
                         for sent_id, sentence in zip(sent_ids, sentences)]
        for record, i, u in zip(batch_records, inter.tolist(), union.tolist()):
            record |= {"iou": round(i / max(u, 1), 4), "intersection": i, "union": u}
        if original:                   # each ref's expressions (they come ref by ref) at its image's size
            counts, scores = torch.bincount(batch["expr_ref"], minlength=len(batch["original_mask"])).tolist(), []
            for gt, part in zip(batch["original_mask"], logits.split(counts)):
                gt = gt.to(device).bool()                                  # (H, W)
                i, u = intersection_union(to_size(part, gt.shape)[:, 0] > 0, gt.expand(len(part), -1, -1))
                scores += zip(i.tolist(), u.tolist())
            for record, (i, u) in zip(batch_records, scores):
                record["iou_original"] = round(i / max(u, 1), 4)
            originals += scores
        records += batch_records
        if log_every and (step % log_every == 0 or step == len(loader)):
            elapsed, total = time.time() - start, len(loader)
            print(f"  eval {step}/{total} batches, {len(records)} expressions, {len(records) / elapsed:.1f} "
                  f"expr/s, ETA {elapsed / step * (total - step):.0f}s", flush=True)
    metrics = summarise([r["intersection"] for r in records], [r["union"] for r in records])
    return metrics, summarise(*zip(*originals)) if original else None, records


class ShuffledText(torch.utils.data.Dataset):
    """The --shuffle-text control: each ref keeps its image and mask but takes the expressions of
    another ref of its image (the image's refs in a random cycle, fixed seed), which a model that
    reads the text scores far lower on. A ref alone in its image keeps its own (`alone` counts them)."""

    def __init__(self, dataset, refs, seed=0):
        self.dataset, self.refs = dataset, refs                # RefDataset(train=False), its refs
        groups = {}
        for index, ref in enumerate(refs):
            groups.setdefault(ref.image_id, []).append(index)
        rng = np.random.default_rng(seed)
        self.donor = np.arange(len(refs))
        for group in groups.values():
            cycle = rng.permutation(group)
            self.donor[cycle] = np.roll(cycle, -1)
        self.alone = sum(len(group) == 1 for group in groups.values())

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        donor = self.refs[self.donor[index]]
        ids, attention = map(torch.stack, zip(*[self.dataset.tokenizer.encode(s) for s in donor.sentences]))
        return {**self.dataset[index], "sentences": list(donor.sentences), "sent_ids": list(donor.sent_ids),
                "input_ids": ids, "attention_mask": attention}                                  # (k, T) each


def metrics_by_kind(records):
    """Shapes only: the metrics at the model's size of each kind of expression (data.expression_kind)."""
    groups = {}
    for r in records:
        groups.setdefault(data.expression_kind(r["sentence"]), []).append(r)
    return {kind: {"num_expressions": len(rs)} |
            summarise([r["intersection"] for r in rs], [r["union"] for r in rs])
            for kind, rs in sorted(groups.items(), key=lambda kv: -len(kv[1]))}


def kinds_table(by_kind):
    """metrics_by_kind as a printed table: n, oIoU, mIoU and P@0.5 per kind."""
    rows = [f"{'by kind (model size)':20}{'n':>6}{'oIoU':>8}{'mIoU':>8}{'P@0.5':>8}"]
    rows += [f"{kind:20}{m['num_expressions']:6d}{m['oIoU']:8.2f}{m['mIoU']:8.2f}{m['P@0.5']:8.2f}"
             for kind, m in by_kind.items()]
    return "\n".join(rows)


def metrics_table(metrics, metrics_original, size):
    """One row per protocol, the first labelled by the model's input size `size`."""
    names = list(metrics)
    rows = [f"{'protocol':10}" + "".join(f"{n:>8}" for n in names)]
    for label, m in ((f"{size}x{size}", metrics), ("original", metrics_original)):
        rows.append(f"{label:10}" + "".join(f"{m[n]:8.2f}" for n in names))
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Command: a split

def load_model_and_tokenizer(args, device):
    """The checkpoint and the vocabulary it was trained with (see the module docstring)."""
    model = crossvlt.CrossVLT.load(args.ckpt, map_location=device).eval()
    if args.compile:
        model.compile()
    beside = Path(args.ckpt).with_name("vocab.txt")
    shapes = [Path(args.data_root, "shapes", "vocab.txt")] if args.dataset == "shapes" else []
    vocab = args.vocab or next((p for p in [beside, *shapes] if p.is_file()), None)
    if vocab is None:
        raise data.DataError(f"no vocabulary: pass --vocab PATH (the vocab.txt the model was trained "
                             f"with, e.g. bert-base-uncased's) or put vocab.txt beside {args.ckpt}")
    tokenizer = data.Tokenizer(vocab, max_len=model.config.max_len)
    if tokenizer.vocab_size > model.config.bert.vocab_size:
        raise data.DataError(f"{vocab} has {tokenizer.vocab_size} tokens but {args.ckpt} embeds "
                             f"{model.config.bert.vocab_size}: pass the vocab.txt it was trained with (--vocab)")
    return model, tokenizer


def check_outputs(paths, inputs):
    """Before any work: each output is a file that can be written and none of the inputs."""
    taken = {Path(p).resolve() for p in inputs if p is not None}
    for path in paths:
        if path.resolve() in taken:
            raise data.DataError(f"{path} is an input of this command; give another --out")
        if path.is_dir():
            raise data.DataError(f"{path} is a folder; --out takes a file name")
    folder = paths[0].resolve().parent
    while not folder.exists():                     # made when the results are written
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise data.DataError(f"cannot write in {folder}; give --out a folder you can write")


def evaluate_split(args, device):
    """Score every expression of a split; write the results JSON, the per-expression file and overlays."""
    root = Path(args.data_root)
    if not root.is_dir():
        hint = ("build it with `python data.py --make-shapes DIR` (or `python train.py --dataset shapes`)"
                if args.dataset == "shapes" else "see README 'Data' for the layout")
        raise data.DataError(f"data root {root} is not a folder: pass --data-root DIR; {hint}")
    usual = data.SPLIT_BYS[args.dataset][0]
    split_by = args.split_by or usual
    # default: <ckpt stem>_<dataset>[-<split_by> if not the usual]_<split>[_shuffled].json beside the ckpt
    name = (f"{Path(args.ckpt).stem}_{args.dataset}{'' if split_by == usual else '-' + split_by}_{args.split}"
            f"{'_shuffled' if args.shuffle_text else ''}.json")
    out = Path(args.out or Path(args.ckpt).with_name(name))
    per_expression = out.with_suffix(".per_expression.jsonl")
    check_outputs([out, per_expression], [args.ckpt, args.vocab])
    overlays = out.with_name(f"{out.stem}_overlays")
    if args.save_overlays and overlays.exists() and not overlays.is_dir():
        raise data.DataError(f"{overlays} is a file, where --save-overlays would make its folder: move it or give "
                             "another --out")
    model, tokenizer = load_model_and_tokenizer(args, device)
    size = model.config.image_size
    refer = data.Refer(root, args.dataset, split_by)
    dataset = data.RefDataset(refer, args.split, tokenizer, size, train=False)
    refs = refer.refs(args.split)
    if args.shuffle_text:
        dataset = ShuffledText(dataset, refs)
        print(f"--shuffle-text: expressions moved to another ref of the same image "
              f"({dataset.alone} refs alone in their image keep their own)")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=data.collate_eval, pin_memory=device.startswith("cuda"))
    print(f"{args.dataset}({split_by}) {args.split}: {len(refs)} refs, "
          f"{sum(len(r.sentences) for r in refs)} expressions, model input {size}x{size}, {device}")
    start = time.time()
    metrics, metrics_original, records = run_evaluation(model, loader, device, precision=args.precision,
                                                        log_every=max(1, len(loader) // 20))
    seconds = time.time() - start
    results = {"dataset": args.dataset, "split_by": split_by, "split": args.split, "num_expressions": len(records),
               "num_refs": len(refs), "metrics": metrics, "metrics_original": metrics_original,
               "checkpoint": str(args.ckpt), "image_size": size, "shuffle_text": args.shuffle_text,
               "seconds": round(seconds, 2), "device": device, "precision": args.precision}
    if args.dataset == "shapes":
        results["metrics_by_kind"] = metrics_by_kind(records)
    crossvlt.write_text(out, json.dumps(results, indent=2) + "\n")
    crossvlt.write_text(per_expression, "".join(json.dumps(r) + "\n" for r in records))
    print(metrics_table(metrics, metrics_original, size))
    print(f"{size}x{size} = at the model's input size; original = at each image's own size")
    if "metrics_by_kind" in results:
        print(kinds_table(results["metrics_by_kind"]))
    print(f"{len(records)} expressions in {seconds:.1f}s ({len(records) / seconds:.1f}/s); "
          f"wrote {out} and {per_expression}")
    if args.save_overlays:
        n = save_overlays(model, dataset, args.save_overlays, overlays, args.precision)
        print(f"wrote {n} overlays to {overlays}")


# ----------------------------------------------------------------------------------------------
# Command: one photo (segment() in Python, --image on the command line)

class Segmentation(NamedTuple):
    """The answer for k expressions about one image of H x W pixels, on the CPU."""
    masks: torch.Tensor           # bool (k, H, W): logits > 0
    logits: torch.Tensor          # float (k, H, W): the model's S x S logits, bilinear to H x W
    alignment: list               # 4 x (k, H_i, W_i): sigmoid of each stage's alignment, or None


@torch.no_grad()
def segment_tokens(model, image, input_ids, attention_mask, size, precision="fp32"):
    """One image tensor (3, S, S) and k tokenized expressions (k, T) -> Segmentation at size (H, W),
    all k in one batch on the model's device, in eval mode (the model's own mode restored after)."""
    k, device, training = len(input_ids), next(model.parameters()).device, model.training
    inputs = crossvlt.any_batch(image.to(device)[None].expand(k, -1, -1, -1),      # (k, 3, S, S)
                                input_ids.to(device), attention_mask.to(device))
    try:
        with crossvlt.autocast(device, precision):
            out = model.eval()(*inputs)
    finally:
        model.train(training)
    logits = to_size(out.mask_logits.float(), size)[:, 0].cpu()            # (k, H, W)
    alignment = [None if a is None else torch.sigmoid(a[:, 0].float()).cpu() for a in out.align_logits]
    return Segmentation(logits > 0, logits, alignment)


def segment(model, tokenizer, image, expressions, precision="fp32"):
    """The object each expression names in a photo, at the photo's own size (what --image does).

    model: a loaded CrossVLT; tokenizer: the data.Tokenizer it was trained with; image: PIL, turned
    upright by its EXIF orientation first, so that the masks fit the photo as a viewer shows it;
    expressions: one str or a list, run as one batch (none, or one without words, is a
    data.DataError); precision: "fp32" or "bf16". -> Segmentation."""
    texts = [expressions] if isinstance(expressions, str) else list(expressions)
    if not texts:
        raise data.DataError("segment() needs at least one expression")
    photo = data.as_rgb(ImageOps.exif_transpose(image))
    ids, attention = map(torch.stack, zip(*[tokenizer.encode(text, allow_empty=False) for text in texts]))
    return segment_tokens(model, data.image_to_tensor(photo, model.config.image_size), ids, attention,
                          (photo.height, photo.width), precision)


def predict_image(args, device):
    """--image and --text: the photo with the mask, the mask, and the panel with the alignment maps."""
    target = Path(args.out or f"{Path(args.image).stem}_pred.png")
    paths = [target] + [target.with_name(f"{target.stem}_{part}.png") for part in ("mask", "panel")]
    check_outputs(paths, [args.image, args.ckpt, args.vocab])
    model, tokenizer = load_model_and_tokenizer(args, device)
    ids, mask = tokenizer.encode(args.text)
    words = ids[1:int(mask.sum()) - 1]                                     # between [CLS] and [SEP]
    if len(words) and (words == tokenizer.unk_id).all():
        print(f"note: no word of {args.text!r} is in the model's vocabulary ({tokenizer.path}): the mask "
              f"answers an unknown word", file=sys.stderr)
    photo = data.load_image(args.image, exif=True)            # an unreadable file: a DataError naming it
    result = segment(model, tokenizer, photo, args.text, args.precision)
    pred = result.masks[0].numpy()                                                 # (H, W)
    maps = [None if a is None else a[0].numpy() for a in result.alignment]
    pictures = [draw_on_photo(photo, pred, args.text), Image.fromarray(pred.astype(np.uint8) * 255),
                draw_panel(photo, pred, None, maps, args.text, f"{pred.mean() * 100:.1f}% of the photo")]
    for path, picture in zip(paths, pictures):
        crossvlt.write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# Command: the benchmark (throughput and peak memory against batch and image size)

def model_flops(config, batch, height, width=None, train=False):
    """FLOPs (2 x multiply-adds) of CrossVLT's matrix products and convolutions, what bounds its speed
    (elementwise work is left out), as torch.utils.flop_counter counts them on a copy of the model on the meta
    device (no memory, ~1 s for `base`): right for any config, ablations included. A training step is the
    forward, the loss and its backward. Attention counts as PyTorch's math kernel (the fused CPU kernel's
    products are invisible to the counter), convolutions as direct summation: the CPU's Winograd path
    (crossvlt.conv3x3) multiplies 4x less, so its rows can show a share of the ceiling near or past 100%."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    width = width or height
    with torch.device("meta"):
        model = crossvlt.CrossVLT(config).train(train)
        images, target = torch.zeros(batch, 3, height, width), torch.zeros(batch, height, width)
        ids = torch.zeros(batch, config.max_len, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        output = model(images, ids, torch.ones_like(ids))
        if train:
            model.loss(output, target)[0].backward()
    return counter.get_total_flops()


def benchmark_one(preset, mode, batch, size, device, steps, depths=None, threads=None, precision="fp32",
                  checkpointing=False, compile=False):
    """Images/s and peak memory (MiB) of `steps` eval forwards or training steps (train.py's step) of
    a random `preset` at one batch and image size, after one warm-up (which compiles, with `compile`).
    benchmark runs each setting in a fresh process, so that CPU peak memory is that setting's alone."""
    import train                       # here, not at the top: train.py imports this file
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    config = getattr(crossvlt.CrossVLTConfig, preset)(image_size=size)
    if depths:
        config = dataclasses.replace(config, swin=dataclasses.replace(config.swin, depths=tuple(depths)))
    torch.manual_seed(0)
    with device:                       # initialised where it runs: seconds, not a minute, for base on a GPU
        model = crossvlt.CrossVLT(config).checkpoint_activations(checkpointing)
    if compile:
        model.compile()
    images = torch.randn(batch, 3, size, size, device=device)
    ids = torch.randint(5, config.bert.vocab_size, (batch, config.max_len), device=device)
    ids[:, 0], ids[:, -4], ids[:, -3:] = 101, 102, 0                 # [CLS] ... [SEP] padding
    attention = (ids > 0).long()
    target = (torch.rand(batch, size, size, device=device) > 0.5).to(torch.uint8)
    inputs = dict(image=images, mask=target, input_ids=ids, attention_mask=attention)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)

    def step():
        if mode == "eval":
            with torch.no_grad(), crossvlt.autocast(device, precision):
                model.eval()(images, ids, attention)
        else:
            train.train_step(model.train(), model.loss, optimizer, [inputs], precision)

    warm_up, seconds = time_steps(step, steps, device)
    peak = peak_memory_mib(device)
    flops = model_flops(config, batch, size, train=mode == "train")
    return {"preset": preset, "depths": list(config.swin.depths), "mode": mode, "batch": batch,
            "image_size": size, "device": str(device), "precision": precision, "threads": torch.get_num_threads(),
            "seconds_per_batch": round(seconds, 4), "images_per_s": round(batch / seconds, 2),
            "gflop_per_batch": round(flops / 1e9, 2), "gflop_per_s": round(flops / seconds / 1e9, 1),
            "peak_memory_mib": round(peak, 1), "compile": compile, "checkpointing": checkpointing,
            "first_step_s": round(warm_up, 2)}


def time_steps(step, steps, device):
    """(seconds of a first step(), which fills caches and compiles; mean seconds of `steps` more),
    waiting for a GPU's queue. A GPU's peak memory counts from after the first step."""
    cuda = torch.device(device).type == "cuda"
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    first, start = time.perf_counter() - start, time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    return first, (time.perf_counter() - start) / steps


def peak_memory_mib(device):
    """Peak memory so far: CUDA's allocated bytes on a GPU, the process's peak RSS on a CPU."""
    import resource
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10


def items_per_s(batches, count):
    """Items/s an iterator of batches (dicts with "image") delivers over `count` batches after
    its first, which waits for the DataLoader workers to start."""
    next(batches)
    start, items = time.perf_counter(), 0
    for _, batch in zip(range(count), batches):
        items += len(batch["image"])
    return items / (time.perf_counter() - start)


def matmul_gflops(device, precision, threads=None, repeats=5):
    """The machine's practical ceiling for the benchmark rows' GFLOP/s: that of an n x n matrix product
    in that precision, best of `repeats` (n = 2048 on a CPU, 8192 on a GPU, enough to fill it)."""
    n = 8192 if device.startswith("cuda") else 2048
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        float((a @ b)[0, 0])                     # reading a value waits for a GPU's queued product
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def data_items_per_s(workers, image_size=480, batch_size=8, batches=24):
    """Training items/s that RefDataset + DataLoader deliver with `workers` processes (0: in the
    main process) on RefCOCO-like data (data.make_refcoco_like: 640x480 JPEGs, polygon masks) in a
    temporary folder, resized to `image_size`: whether the data keeps up with a GPU."""
    import tempfile
    with tempfile.TemporaryDirectory() as root:
        data.make_refcoco_like(root, num_images=batch_size * batches // 3 + 3)
        vocab = Path(root, "vocab.txt")
        words = "[PAD] [UNK] [CLS] [SEP] the object number thing in picture 0 1 2 3 4 5 6 7 8 9"
        vocab.write_text("\n".join(words.split()) + "\n")
        dataset = data.RefDataset(data.Refer(root, "refcoco", "unc"), "train", data.Tokenizer(vocab),
                                  image_size, train=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True)
        return items_per_s(iter(loader), len(loader) - 1)


def benchmark(args, device):
    """Every mode x batch x image size in turn, one fresh process each; prints a table as it
    goes and writes the rows to --out (default benchmark_<preset>_<device>.json)."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    settings = [(m, b, s) for m in args.modes for s in args.image_sizes for b in args.batch_sizes]
    out = Path(args.out or f"benchmark_{args.preset}_{device.replace(':', '')}.json")
    check_outputs([out], [])
    memory = "peak GPU memory (allocated)" if device.startswith("cuda") else "peak RSS"
    with context.Pool(1) as pool:
        ceiling = pool.apply(matmul_gflops, (device, args.precision, args.threads))
    options = {f"depths {args.depths}": args.depths, "activation checkpointing": args.checkpoint_activations,
               "compiled": args.compile}
    print(f"{args.preset}{''.join(', ' + o for o, on in options.items() if on)} on {device}, {args.precision}, "
          f"{args.steps} timed steps after 1 warm-up, {len(settings)} settings; matrix products here run at "
          f"{ceiling:.0f} GFLOP/s in {args.precision} (the ceiling)")
    for workers in args.data_workers:
        rate = data_items_per_s(workers, max(args.image_sizes))
        per = f", {rate / workers:.0f} per worker" if workers else ""
        print(f"data: RefCOCO-like 640x480 JPEGs -> {max(args.image_sizes)}, {workers} worker(s): "
              f"{rate:.0f} training items/s{per}", flush=True)
    print(f"{'mode':6}{'batch':>6}{'size':>6}{'s/batch':>10}{'images/s':>10}{'GFLOP/s':>10}{'of ceiling':>12}"
          f"{memory:>30}{'first step (s)':>16}")
    rows = []
    for mode, batch, size in settings:
        with context.Pool(1) as pool:
            try:
                row = pool.apply(benchmark_one, (args.preset, mode, batch, size, device, args.steps,
                                                 args.depths, args.threads, args.precision,
                                                 args.checkpoint_activations, args.compile))
            except RuntimeError as e:                              # out of memory, typically
                print(f"{mode:6}{batch:>6}{size:>6}  failed: {one_line(e)}")
                continue
        rows.append(row | {"ceiling_gflop_per_s": round(ceiling, 1)})
        print(f"{mode:6}{batch:>6}{size:>6}{row['seconds_per_batch']:>10.3f}{row['images_per_s']:>10.1f}"
              f"{row['gflop_per_s']:>10.1f}{row['gflop_per_s'] / ceiling:>12.0%}"
              f"{row['peak_memory_mib']:>26.0f} MiB{row['first_step_s']:>16.1f}", flush=True)
        crossvlt.write_text(out, json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    summary, epilog = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=summary, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="our .safetensors (a released .pth: convert it first with weights/convert.py)")
    p.add_argument("--out", help="results .json (a split) or .png (a photo); default: see below")
    p.add_argument("--vocab", help="the BERT vocab.txt the model was trained with (default: see below)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (minutes of "
                   "compiling first; README 'Benchmarks' says when it pays)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast: faster on GPUs "
                   "and on CPUs with bf16 units, logits within ~1e-2 of fp32; fp32 (default) is the exact protocol")
    s = p.add_argument_group("a split of a data set")
    s.add_argument("--dataset", choices=tuple(data.SPLIT_BYS))
    s.add_argument("--split-by", help="default: unc (umd for refcocog)")
    s.add_argument("--split", default="val", help="val, testA, testB, test, ... (default: val)")
    s.add_argument("--data-root", default="data", help="folder holding the data sets (default: data)")
    s.add_argument("--batch-size", type=int, default=8,
                   help="refs per batch, each with all its expressions (default: 8)")
    s.add_argument("--workers", type=int, default=2, help="data loader processes (default: 2)")
    s.add_argument("--save-overlays", type=int, default=0, metavar="N",
                   help="draw the first N expressions into OUT_overlays/")
    s.add_argument("--shuffle-text", action="store_true", help="control: give each ref the "
                   "expressions of another ref of the same image (fixed seed)")
    o = p.add_argument_group("one photo")
    o.add_argument("--image", help="a photo (turned upright by its EXIF orientation)")
    o.add_argument("--text", help="the expression naming the object")
    b = p.add_argument_group("benchmark: images/s and peak memory of a random model, no data needed")
    b.add_argument("--benchmark", action="store_true")
    b.add_argument("--preset", choices=("tiny", "base"), default="tiny")
    b.add_argument("--depths", type=int, nargs=4, help="Swin depths (default: the preset's)")
    b.add_argument("--modes", nargs="+", choices=("eval", "train"), default=["eval", "train"])
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    b.add_argument("--image-sizes", type=int, nargs="+", help="default: the preset's (tiny 96, base 480)")
    b.add_argument("--steps", type=int, default=5, help="timed steps per setting (default: 5)")
    b.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    b.add_argument("--checkpoint-activations", action="store_true",
                   help="train rows with train.py --checkpoint-activations")
    b.add_argument("--data-workers", type=int, nargs="*", default=[1], help="also measure the "
                   "data pipeline's items/s with these DataLoader worker counts (default: 1; none: skip)")
    args = p.parse_args(argv)
    args.image_sizes = args.image_sizes or [getattr(crossvlt.CrossVLTConfig, args.preset)().image_size]
    if args.benchmark:
        if args.dataset or args.image or args.ckpt:
            p.error("--benchmark times a random model: drop --ckpt, --dataset and --image")
        counts = args.batch_sizes + [args.steps] + (args.depths or []) + [1 if args.threads is None else args.threads]
        if min(counts) < 1 or min(args.data_workers, default=0) < 0 or min(args.image_sizes) < 32:
            p.error("--batch-sizes, --steps, --depths and --threads must be >= 1, --image-sizes >= 32 (the model's "
                    "least), --data-workers >= 0")
    elif args.ckpt is None:
        p.error("--ckpt is required (except with --benchmark)")
    elif (args.dataset is None) == (args.image is None):
        p.error("give either --dataset (evaluate a split) or --image with --text (one photo)")
    if (args.image is None) != (args.text is None):
        p.error("--image and --text go together")
    if args.image is not None and args.out and Path(args.out).suffix.lower() != ".png":
        p.error(f"--out for a photo is a .png, got {args.out}")
    if args.batch_size < 1 or args.workers < 0 or args.save_overlays < 0:
        p.error("--batch-size must be >= 1, --workers and --save-overlays >= 0")
    if args.device is not None and (problem := device_problem(args.device)):
        p.error(problem)
    return args


def device_problem(device):
    """Why --device names no device of this machine (cpu, cuda, cuda:N), or None."""
    try:
        kind, index = torch.device(device).type, torch.device(device).index or 0
    except RuntimeError:
        kind = index = None
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index):         # one CPU device: cpu:1 is none
        return f"--device takes cpu, cuda or cuda:N, got {device}"
    if kind == "cuda" and index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use --device cpu"
    return None


def one_line(e):
    """An error's message on one line. One raised in a DataLoader worker arrives wrapped in the
    worker's traceback, whose last line is 'module.Type: message'."""
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return last.removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    command = benchmark if args.benchmark else predict_image if args.image is not None else evaluate_split
    try:
        command(args, device)
    except (crossvlt.CheckpointError, data.DataError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing written but what was already reported", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------
# Pictures for a person: the prediction, the ground truth and the four alignment maps

PREDICTION = (255, 50, 190)        # magenta tint and outline
TRUTH = (90, 255, 60)              # lime outline
BACKGROUND = (24, 24, 28)
DISPLAY = 384                      # longer side of the image in a panel, pixels
MAGMA = np.array([(0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97), (252, 253, 191)], float)


def heat_colours(x):
    """Values in [0, 1], (H, W) -> uint8 (H, W, 3) on a magma-like ramp (dark low, light high)."""
    t = np.clip(x, 0, 1) * (len(MAGMA) - 1)
    k = np.minimum(t.astype(int), len(MAGMA) - 2)
    f = (t - k)[..., None]
    return ((1 - f) * MAGMA[k] + f * MAGMA[k + 1]).astype(np.uint8)


def outline(mask, width):
    """The pixels of bool mask (H, W) within `width` of its edge (4-neighbours; the image border is no edge)."""
    inner = mask
    for _ in range(width):
        p = np.pad(inner, 1, mode="edge")
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def resize_mask(mask, size):
    """bool (H, W) -> bool at size (W', H'), nearest."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127


def draw_masks(image, pred, gt=None, width=2):
    """The image with the prediction tinted and outlined (magenta) and the ground truth outlined
    (lime); each outline has a dark line outside it, to stand out on any colour."""
    px = np.asarray(image, dtype=np.float64).copy()
    px[pred] = 0.55 * px[pred] + 0.45 * np.array(PREDICTION)
    for mask, colour in ((pred, PREDICTION), (gt, TRUTH)):
        if mask is not None:
            rim = outline(~mask, 1)
            px[rim] = 0.3 * px[rim]
            px[outline(mask, width)] = colour
    return Image.fromarray(px.astype(np.uint8))


def wrap(draw, text, face, width):
    """Words of `text` in lines no wider than `width` pixels."""
    lines = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=face) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def heat_tile(image, amap, stage, size):
    """One stage's alignment map (sigmoid, (H_i, W_i)) over the greyed image, labelled with its
    grid and value range; the colours span the map's own min..max."""
    grey = np.asarray(image.convert("L").resize(size, Image.BILINEAR), dtype=np.float64)[..., None]
    if amap is None:
        tile, label = 0.35 * grey.repeat(3, 2), f"stage {stage}: no alignment"
    else:
        up = np.asarray(Image.fromarray(amap.astype(np.float32)).resize(size, Image.BILINEAR))
        lo, hi = float(amap.min()), float(amap.max())
        tile = 0.3 * grey + 0.7 * heat_colours((up - lo) / max(hi - lo, 1e-6))
        label = f"stage {stage}  {amap.shape[0]}x{amap.shape[1]}  {lo:.2f}-{hi:.2f}"
    tile = Image.fromarray(tile.astype(np.uint8))
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, size[0], 17), fill=BACKGROUND)
    draw.text((5, 2), label, fill=(230, 230, 230), font=ImageFont.load_default(size=12))
    return tile


def draw_panel(image, pred, gt, maps, text, note):
    """On a dark card, the expression (wrapped) and a legend (`note`, the masks' colours) above the
    image with the masks (draw_masks) and the four stages' alignment maps beside it, 2x2 (heat_tile).

    image: PIL RGB at its own size; pred, gt: bool (H, W) at that size (gt may be None);
    maps: 4 x (H_i, W_i) sigmoid of align_logits, or None for a stage without alignment."""
    scale, gap, pad = DISPLAY / max(image.size), 4, 10
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    tw, th = max(1, (w - gap) // 2), max(1, (h - gap) // 2)
    body = Image.new("RGB", (w + 2 * gap + 2 * tw + gap, max(h, 2 * th + gap)), BACKGROUND)
    body.paste(draw_masks(image.resize((w, h), Image.BILINEAR), resize_mask(pred, (w, h)),
                          None if gt is None else resize_mask(gt, (w, h))))
    for n, amap in enumerate(maps):
        body.paste(heat_tile(image, amap, n + 1, (tw, th)),
                   (w + 2 * gap + n % 2 * (tw + gap), n // 2 * (th + gap)))
    big, small = ImageFont.load_default(size=17), ImageFont.load_default(size=13)
    lines = wrap(ImageDraw.Draw(body), f'"{text}"', big, body.width)
    top = pad + 22 * len(lines) + 24                                       # where the body goes
    card = Image.new("RGB", (body.width + 2 * pad, top + body.height + pad), BACKGROUND)
    draw = ImageDraw.Draw(card)
    for n, line in enumerate(lines):
        draw.text((pad, pad + 22 * n), line, fill=(245, 245, 245), font=big)
    x, y = pad, top - 20
    legend = [(note, None), ("prediction", PREDICTION)] + ([] if gt is None else [("ground truth", TRUTH)])
    for label, colour in legend:
        if colour is not None:
            draw.rectangle((x, y + 3, x + 10, y + 13), fill=colour)
            x += 15
        draw.text((x, y), label, fill=(200, 200, 200), font=small)
        x += draw.textlength(label, font=small) + 18
    card.paste(body, (pad, top))
    return card


def draw_on_photo(photo, pred, text):
    """The photo at its own size with the prediction (draw_masks) and the expression in a band on top."""
    picture = draw_masks(photo, pred, width=max(2, max(photo.size) // 300)).convert("RGBA")
    face = ImageFont.load_default(size=max(14, max(photo.size) // 40))
    band = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(band)
    lines = wrap(draw, f'"{text}"', face, photo.width - 2 * face.size)
    step = int(face.size * 1.3)
    draw.rectangle((0, 0, photo.width, step * len(lines) + face.size), fill=(0, 0, 0, 150))
    for n, line in enumerate(lines):
        draw.text((face.size, face.size // 2 + step * n), line, fill=(255, 255, 255, 255), font=face)
    return Image.alpha_composite(picture, band).convert("RGB")


def save_overlays(model, dataset, count, folder, precision="fp32"):
    """draw_panel pictures of the first `count` expressions of `dataset` into `folder`; returns
    how many were written. The prediction is at the image's size (the `original` protocol)."""
    written = 0
    for index in range(len(dataset)):
        if written == count:
            break
        item = dataset[index]
        gt = item["original_mask"].bool()                                  # (H, W)
        result = segment_tokens(model, item["image"], item["input_ids"], item["attention_mask"], gt.shape, precision)
        image = data.load_image(item["image_path"])                # stored pixels, as the masks
        for j in range(min(len(result.masks), count - written)):
            i, u = intersection_union(result.masks[j:j + 1], gt[None])
            maps = [None if a is None else a[j].numpy() for a in result.alignment]
            panel = draw_panel(image, result.masks[j].numpy(), gt.numpy(), maps, item["sentences"][j],
                               f"IoU {int(i) / max(int(u), 1):.2f}")
            name = f"{written:04d}_ref{item['ref_id']}_sent{item['sent_ids'][j]}.png"
            crossvlt.write_atomic(Path(folder) / name, lambda tmp: panel.save(tmp, format="PNG"))
            written += 1
    return written


if __name__ == "__main__":
    sys.exit(main())
