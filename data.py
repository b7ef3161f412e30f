"""Data for CrossVLT: the RefCOCO family read directly, the tokenizer, the transforms, and the built-in "shapes"
data set; everything between the files on disk and the tensors the model eats:

    Refer(root, dataset, split_by)      refs pickle + instances.json -> Ref objects, target masks
    Tokenizer(vocab_path, max_len=21)   WordPiece (BERT uncased) -> input_ids, attention_mask
    load_image / image_to_tensor / mask_to_tensor    the paper's transforms, with Pillow
    RefDataset(refer, split, tokenizer) a dict per ref: one random expression (train) or all
    make_shapes / ensure_shapes         a small synthetic referring data set in RefCOCO's format
    expression_kind(sentence)           what a shapes expression names its object by

Masks are the pixels the released code trains and evaluates on: refer.py's getMask on pycocotools' polygon
rasteriser (re-derived here in numpy), then only pixels covered by exactly one part of the annotation.
`python data.py --check ROOT` validates a downloaded data root.
"""

import argparse
import itertools
import json
import math
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer


class DataError(Exception):
    """A problem with the user's data files; the message is one line saying what to do."""


# ----------------------------------------------------------------------------------------------
# Layout

SPLIT_BYS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google"), "shapes": ("unc",)}
COCO_IMAGES = Path("images", "mscoco", "images", "train2014")
LAYOUT = ("ROOT/refcoco/{refs(unc).p, refs(google).p, instances.json}, ROOT/refcoco+/{refs(unc).p, instances.json}, "
          "ROOT/refcocog/{refs(umd).p, refs(google).p, instances.json}, "
          "ROOT/images/mscoco/images/train2014/COCO_train2014_*.jpg")


def dataset_files(root, dataset, split_by):
    """Paths (refs pickle, instances.json, image folder) of one dataset under `root`."""
    if dataset not in SPLIT_BYS:
        raise DataError(f"unknown dataset {dataset!r}: expected one of {', '.join(SPLIT_BYS)}")
    if split_by not in SPLIT_BYS[dataset]:
        raise DataError(f"{dataset} has no split_by {split_by!r}: expected one of {', '.join(SPLIT_BYS[dataset])}")
    folder = Path(root) / dataset
    images = folder / "images" if dataset == "shapes" else Path(root) / COCO_IMAGES
    return folder / f"refs({split_by}).p", folder / "instances.json", images


# ----------------------------------------------------------------------------------------------
# Reading the files

class _RefusingUnpickler(pickle.Unpickler):
    """Unpickler for files from the internet: plain containers and scalars only."""

    def find_class(self, module, name):
        raise DataError(f"refused global {module}.{name}")


def load_refs_pickle(path):
    """The refs list of a refs(*).p file, written by Python 2 cPickle (protocol 2).

    Python 2 `str` are read as latin-1 (the released reader accepts only ASCII ones, which read the same);
    nothing in the file can name a class or function, so nothing in it can run.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            refs = _RefusingUnpickler(f, encoding="latin1").load()
    except DataError as e:                                             # from find_class
        raise DataError(f"{path}: refused to load ({e}); a refs file holds only lists, dicts, strings and "
                        f"numbers: re-download it") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, MemoryError) as e:
        raise DataError(f"{path}: not a readable refs pickle ({type(e).__name__}: {e}); re-download it") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DataError(f"{path}: expected a pickled list of ref dicts, found {type(refs).__name__}; re-download it")
    return refs


def load_instances(path):
    """instances.json -> (images {id: (file_name, H, W)}, annotations {id: segmentation})."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
        images = {im["id"]: (im["file_name"], int(im["height"]), int(im["width"])) for im in data["images"]}
        anns = {a["id"]: a.get("segmentation") for a in data["annotations"]}
    except ValueError as e:                                            # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path}: invalid JSON ({e}); re-download it") from None
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not COCO-style instances (missing or malformed {e}); expected images with "
                        f"id/file_name/height/width and annotations with id/segmentation") from None
    return images, anns


# ----------------------------------------------------------------------------------------------
# Masks: pycocotools' polygon rasteriser and RLE, in numpy

def polygon_to_mask(xy, height, width):
    """Rasterise one polygon part exactly as pycocotools' rleFrPoly: uint8 (H, W) of 0/1.

    xy: flat [x0, y0, x1, y1, ...] in pixels. Vertices snap to a 1/5-pixel grid by trunc(5x + 0.5). Each edge
    is walked one grid step at a time along its longer axis, the other coordinate rounded as
    trunc(start + slope*t + 0.5) from the edge's lower end. Where the walk passes a pixel centre column
    (grid x = 5c+2 -> 5c+3) it toggles column c from row ceil((min(y_a, y_b) + 0.5)/5 - 0.5) down, rows clipped
    to [0, H]; columns outside [0, W) are dropped. Toggles act on the column-major pixel order, like the
    run-length code they build.
    """
    xy = np.asarray(xy, dtype=np.float64)
    k = len(xy) // 2
    if k == 0:
        return np.zeros((height, width), np.uint8)
    u, v = _walk_edges(xy[0:2 * k:2], xy[1:2 * k:2])
    return _toggles_to_mask(*_column_crossings(u, v, height, width), height, width)


def _walk_edges(x, y):
    """Dense integer points (u, v) on the 5x grid along every edge, in polygon order."""
    xs = (5.0 * x + 0.5).astype(np.int64)                              # C cast: toward zero
    ys = (5.0 * y + 0.5).astype(np.int64)
    xe, ye = np.roll(xs, -1), np.roll(ys, -1)
    dx, dy = np.abs(xe - xs), np.abs(ye - ys)
    shallow = dx >= dy
    flip = np.where(shallow, xs > xe, ys > ye)                         # walk from the lower end
    x0, y0 = np.where(flip, xe, xs), np.where(flip, ye, ys)
    x1, y1 = np.where(flip, xs, xe), np.where(flip, ys, ye)
    steps = np.where(shallow, dx, dy)
    slope = np.where(shallow, y1 - y0, x1 - x0) / np.maximum(steps, 1)
    edge = np.repeat(np.arange(len(xs)), steps + 1)                    # (m,)
    first = np.repeat(np.cumsum(steps + 1) - (steps + 1), steps + 1)
    d = np.arange(len(edge)) - first
    t = np.where(flip[edge], steps[edge] - d, d)                       # points keep edge order
    along = (np.where(shallow[edge], y0[edge], x0[edge]) + slope[edge] * t + 0.5).astype(np.int64)
    u = np.where(shallow[edge], x0[edge] + t, along)
    v = np.where(shallow[edge], along, y0[edge] + t)
    return u, v


def _column_crossings(u, v, height, width):
    """(columns, start rows) where the walk (u, v) crosses a pixel-centre column."""
    change = np.flatnonzero(u[1:] != u[:-1]) + 1
    ua, ub, va, vb = u[change - 1], u[change], v[change - 1], v[change]
    xd = (np.where(ub < ua, ub, ub - 1) + 0.5) / 5 - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
    yd = (np.minimum(va, vb)[keep] + 0.5) / 5 - 0.5
    rows = np.ceil(np.clip(yd, 0, height))
    return xd[keep].astype(np.int64), rows.astype(np.int64)


def _toggles_to_mask(cols, rows, height, width):
    """Even-odd fill of toggles at column-major positions col*H + row -> uint8 (H, W)."""
    flat = np.zeros(height * width, np.uint8)
    pos = cols * height + rows
    if len(pos):
        lo, hi = pos.min(), min(pos.max(), height * width)
        counts = np.bincount(pos - lo, minlength=hi - lo + 1)[:hi - lo]
        flat[lo:hi] = np.cumsum(counts, dtype=np.uint8) & 1
        flat[hi:] = len(pos) & 1
    return flat.reshape(width, height).T


def bbox_to_mask(box, height, width):
    """pycocotools' rleFrBbox: box [x, y, w, h] as the polygon (x,y) (x,y+h) (x+w,y+h) (x+w,y)."""
    x, y, w, h = (float(b) for b in box)
    return polygon_to_mask([x, y, x, y + h, x + w, y + h, x + w, y], height, width)


def rle_counts_from_string(s):
    """COCO-compressed RLE string -> run lengths (uint32), decoded in numpy.

    Each character minus 48 is a 5-bit chunk, least significant first; 0x20 says more chunks follow; 0x10 in
    the last chunk makes the value negative. From the fourth count on, a value is a delta on the count two
    places before it.
    """
    c = np.frombuffer(s.encode("ascii"), np.uint8).astype(np.int64) - 48
    if len(c) == 0 or c.min() < 0 or c.max() > 63 or c[-1] & 0x20:
        raise ValueError(f"not a COCO RLE string: {s[:40]!r}")
    ends = np.flatnonzero((c & 0x20) == 0)
    starts = np.concatenate([[0], ends[:-1] + 1])
    shift = 5 * (np.arange(len(c)) - np.repeat(starts, ends - starts + 1))
    x = np.add.reduceat((c & 0x1F) << shift, starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] |= -1 << (shift[ends][negative] + 5)
    counts = x.copy()
    counts[1::2] = np.cumsum(x[1::2])                                  # deltas, odd chain
    counts[2::2] = np.cumsum(x[2::2])                                  # deltas, even chain
    return (counts & 0xFFFFFFFF).astype(np.uint32)


def rle_to_mask(counts, height, width):
    """Run lengths (column-major, zeros first) -> uint8 (H, W) of 0/1."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != height * width:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected H*W = {height * width}")
    values = (np.arange(len(counts)) & 1).astype(np.uint8)
    return np.repeat(values, counts).reshape(width, height).T


def segmentation_to_mask(segmentation, height, width, union=False):
    """A COCO segmentation -> the released code's target mask, uint8 (H, W) of 0/1.

    Polygons: each part is rasterised on its own and the parts are summed; the target keeps the pixels covered
    exactly once (refer.getMask then `== 1`), or every covered pixel if `union`. A first part of exactly 4
    numbers is a box [x, y, w, h] (pycocotools' frBbox). RLE: a dict with 'counts' (list or compressed string)
    and 'size' [H, W].
    """
    if isinstance(segmentation, dict):
        counts = segmentation["counts"]
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} != image size {[height, width]}")
        if isinstance(counts, str):
            counts = rle_counts_from_string(counts)
        return rle_to_mask(counts, height, width)
    parts = [bbox_to_mask(p, height, width) if i == 0 and len(p) == 4
             else polygon_to_mask(p, height, width) for i, p in enumerate(segmentation)]
    if not parts:
        return np.zeros((height, width), np.uint8)
    total = np.sum(parts, axis=0, dtype=np.int64).astype(np.uint8)
    return (total > 0 if union else total == 1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Refer: the RefCOCO / RefCOCO+ / G-Ref reader

@dataclass(frozen=True)
class Ref:
    """One referred object and its expressions."""
    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    split: str
    image_path: str
    sentences: list          # raw expressions, str
    sent_ids: list


class Refer:
    """Index of one dataset/split_by: refs in file order, masks rasterised lazily per ref.

    Holds compact arrays (ids, sentences, the referenced annotations' polygons as one float64 array), not the
    parsed JSON, so it pickles quickly to DataLoader workers.
    """

    def __init__(self, root, dataset="refcoco", split_by="unc"):
        refs_path, instances_path, self.image_dir = dataset_files(root, dataset, split_by)
        hint = ("build it with `python data.py --make-shapes ROOT`" if dataset == "shapes"
                else f"expected layout {LAYOUT}; see README 'Data'")
        for path in (refs_path, instances_path):
            if not path.is_file():
                raise DataError(f"missing {path}: {hint}")
        self.dataset, self.split_by = dataset, split_by
        self.refs_path, self.instances_path = refs_path, instances_path
        refs = load_refs_pickle(refs_path)
        images, anns = load_instances(instances_path)
        try:
            self._index_refs(refs, images)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{refs_path}: malformed ref ({type(e).__name__}: {e}); expected dicts with ref_id, "
                            f"ann_id, image_id, split, sentences, sent_ids") from None
        self._index_segmentations(anns)

    def _index_refs(self, refs, images):
        """Ids, splits and sentences of the refs in file order; their images in order of first use."""
        self.ref_ids = np.array([r["ref_id"] for r in refs], np.int64)
        self.ann_ids = np.array([r["ann_id"] for r in refs], np.int64)
        self.image_ids = np.array([r["image_id"] for r in refs], np.int64)
        self.category_ids = np.array([r.get("category_id", -1) for r in refs], np.int64)
        self.split_names = sorted({r["split"] for r in refs})
        self.splits = np.array([self.split_names.index(r["split"]) for r in refs], np.int16)
        self.sentences = [s["raw"] for r in refs for s in r["sentences"]]
        sent_ids = []
        for r in refs:                                          # no sent_ids: the sentences' sent_id
            sent_ids += r["sent_ids"] if r.get("sent_ids") is not None else [s["sent_id"] for s in r["sentences"]]
        self.sent_ids = np.array(sent_ids, np.int64)
        if len(self.sent_ids) != len(self.sentences):
            raise ValueError("sent_ids and sentences differ in length")
        self.sent_start = np.cumsum([0] + [len(r["sentences"]) for r in refs])
        self._by_ref_id = np.argsort(self.ref_ids, kind="stable")
        row = {}                                                # image_id -> row of image_files, image_hw
        for image_id in self.image_ids.tolist():
            if image_id not in images:
                raise self._mismatch(f"a ref points at image {image_id}")
            row.setdefault(image_id, len(row))
        self.image_files = [images[i][0] for i in row]
        self.image_hw = np.array([images[i][1:] for i in row], np.int64).reshape(-1, 2)
        self.image_row = np.array([row[i] for i in self.image_ids.tolist()], np.int64)

    def _index_segmentations(self, anns):
        """Flatten the referenced annotations' polygons; RLE ones are kept as they are."""
        parts, part_count, self.rles = [], [], {}
        for i, ann_id in enumerate(self.ann_ids.tolist()):
            if ann_id not in anns:
                raise self._mismatch(f"ref {self.ref_ids[i]} points at annotation {ann_id}")
            seg = anns[ann_id]
            if isinstance(seg, dict) and "counts" in seg and "size" in seg:
                self.rles[i] = seg
                part_count.append(0)
            elif isinstance(seg, list) and all(isinstance(p, list) for p in seg):
                parts.extend(seg)
                part_count.append(len(seg))
            else:
                raise DataError(f"{self.instances_path}: annotation {ann_id} has segmentation "
                                f"{str(seg)[:40]}; expected a list of polygons or an RLE dict")
        lengths = [len(p) for p in parts]
        try:
            self.coords = np.fromiter(itertools.chain.from_iterable(parts), np.float64, count=sum(lengths))
        except (TypeError, ValueError):
            raise DataError(f"{self.instances_path}: a polygon holds something other than "
                            f"numbers; re-download it") from None
        self.part_start = np.cumsum([0] + lengths)
        self.ref_part_start = np.cumsum([0] + part_count)

    def _mismatch(self, what):
        return DataError(f"{self.refs_path}: {what}, which {self.instances_path} does not have; "
                         f"the two files come from different downloads")

    def __len__(self):
        return len(self.ref_ids)

    def valid_splits(self):
        """Split names refs(split) accepts for this file."""
        names = set(self.split_names) | {"test", "testA", "testB", "testC"}
        return sorted(name for name in names if self._split_codes(name))

    def _split_codes(self, split):
        """Which of the file's split names `split` selects, by the refer API's rule: "testA" every name holding
        an A, "test" every name holding "test", any other split itself."""
        contains = {"testA": "A", "testB": "B", "testC": "C", "test": "test"}.get(split)
        return [i for i, s in enumerate(self.split_names) if (contains in s if contains else s == split)]

    def indices(self, split=None):
        """Positions of the refs of `split` (None: all) in file order."""
        if split is None:
            return np.arange(len(self))
        codes = self._split_codes(split)
        if not codes:
            raise DataError(f"{self.dataset}({self.split_by}) has no split {split!r}: "
                            f"expected one of {', '.join(self.valid_splits())}")
        return np.flatnonzero(np.isin(self.splits, codes))

    def refs(self, split=None):
        """Ref objects of `split` (None: all) in the refer API's order."""
        return [self.ref_at(i) for i in self.indices(split)]

    def ref_at(self, i):
        """The Ref at file position i."""
        a, b = self.sent_start[i], self.sent_start[i + 1]
        return Ref(ref_id=int(self.ref_ids[i]), ann_id=int(self.ann_ids[i]), image_id=int(self.image_ids[i]),
                   category_id=int(self.category_ids[i]), split=self.split_names[self.splits[i]],
                   image_path=self.image_path_at(i), sentences=self.sentences[a:b],
                   sent_ids=self.sent_ids[a:b].tolist())

    def image_path_at(self, i):
        return str(self.image_dir / self.image_files[self.image_row[i]])

    def position(self, ref):
        """File position of a Ref (or ref_id)."""
        ref_id = ref.ref_id if isinstance(ref, Ref) else int(ref)
        j = np.searchsorted(self.ref_ids, ref_id, sorter=self._by_ref_id)
        if j == len(self) or self.ref_ids[self._by_ref_id[j]] != ref_id:
            raise DataError(f"ref_id {ref_id} is not in {self.dataset}({self.split_by})")
        return int(self._by_ref_id[j])

    def image_size(self, ref):
        """(H, W) of the ref's image, from instances.json."""
        return tuple(int(n) for n in self.image_hw[self.image_row[self.position(ref)]])

    def mask(self, ref, union=False):
        """Target mask uint8 (H, W) of 0/1: pixels covered by exactly one part (or any part)."""
        return self.mask_at(self.position(ref), union)

    def mask_at(self, i, union=False):
        h, w = (int(n) for n in self.image_hw[self.image_row[i]])
        if i in self.rles:
            seg = self.rles[i]
        else:
            parts = range(self.ref_part_start[i], self.ref_part_start[i + 1])
            seg = [self.coords[self.part_start[p]:self.part_start[p + 1]] for p in parts]
        try:
            return segmentation_to_mask(seg, h, w, union)
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{self.instances_path}: annotation {self.ann_ids[i]}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """BERT uncased WordPiece on a vocab.txt: text -> ([CLS] pieces [SEP], cut, padded with 0)."""

    def __init__(self, vocab_path, max_len=21):
        vocab_path = Path(vocab_path)
        if not vocab_path.is_file():
            raise DataError(f"missing vocabulary {vocab_path}: expected a BERT vocab.txt "
                            f"(one token per line, [PAD] on line 0)")
        try:
            tok = _HFTokenizer(WordPiece.from_file(str(vocab_path), unk_token="[UNK]", max_input_chars_per_word=100))
        except Exception as e:                                   # the tokenizers library's own error type
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise DataError(f"{vocab_path}: not a vocab.txt of UTF-8 lines ({first})") from None
        tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                        strip_accents=True, lowercase=True)
        tok.pre_tokenizer = BertPreTokenizer()
        ids = {t: tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")}
        if None in ids.values() or ids["[PAD]"] != 0:
            raise DataError(f"{vocab_path}: expected [PAD] as id 0 and [UNK], [CLS], [SEP] present, found {ids}")
        self.tokenizer, self.max_len, self.path = tok, max_len, vocab_path
        self.cls_id, self.sep_id, self.unk_id = ids["[CLS]"], ids["[SEP]"], ids["[UNK]"]
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text, allow_empty=True):
        """text -> (input_ids LongTensor[T], attention_mask LongTensor[T]), T = max_len.

        An expression with no pieces gives [CLS] [SEP], or DataError if not `allow_empty` (evaluate.segment's
        check: a photo's expression must name something).
        """
        pieces = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not pieces and not allow_empty:
            raise DataError(f"empty expression {text!r}: give a phrase naming the object")
        ids = ([self.cls_id] + pieces + [self.sep_id])[:self.max_len]
        padding = [0] * (self.max_len - len(ids))
        return (torch.tensor(ids + padding, dtype=torch.long),
                torch.tensor([1] * len(ids) + padding, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Transforms (train and eval alike, no augmentation)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_image(path, exif=False):
    """Open an image as RGB (as_rgb). Data set images keep their stored pixels (exif=False), as the annotations
    use them; user photos are turned upright by their EXIF orientation."""
    try:
        with Image.open(path) as image:
            return as_rgb(ImageOps.exif_transpose(image) if exif else image)
    except FileNotFoundError:
        raise DataError(f"missing image {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path} ({e}); replace the file") from None


def as_rgb(image):
    """A PIL image of any mode as RGB. 16- or 32-bit grey is scaled so that its brightest pixel becomes 255 (or 1.0
    does, for floats within [0, 1]): convert("RGB") would clip it at 255, a near-white picture."""
    if image.mode.startswith(("I", "F")):
        grey = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and grey.max() <= 1 else max(grey.max(), 255)
        image = Image.fromarray(np.clip(grey * (255 / top), 0, 255).round().astype(np.uint8))
    return image.convert("RGB")


_NORMALISED = ((np.arange(256, dtype=np.float32)[None] / np.float32(255)       # (3, 256)
                - np.array(MEAN, np.float32)[:, None]) / np.array(STD, np.float32)[:, None])


def image_to_tensor(image, size):
    """PIL RGB image -> float32 (3, S, S): Pillow bilinear resize, /255, ImageNet mean/std.

    Float32 arithmetic in torchvision's order (ToTensor, then Normalize), so the values are bit for bit theirs;
    done once for the 256 values of each channel and looked up per pixel, which is 4x faster than computing
    every pixel (and leaves the DataLoader workers less to do).
    """
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR))        # (S, S, 3) uint8
    x = np.stack([_NORMALISED[c][pixels[..., c]] for c in range(3)])       # (3, S, S) float32
    return torch.from_numpy(x)


def mask_to_tensor(mask, size):
    """uint8 (H, W) 0/1 mask -> uint8 (S, S) with Pillow's nearest resize."""
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    return torch.from_numpy(np.asarray(image.resize((size, size), Image.NEAREST)).copy())


# ----------------------------------------------------------------------------------------------
# Dataset

class RefDataset(torch.utils.data.Dataset):
    """Refs of one split as model inputs: one dict per ref, S = image_size, T = tokenizer.max_len.

    train=True, one of the ref's expressions, drawn uniformly and reproducibly from (seed, epoch, index); call
    set_epoch(epoch) before each epoch:
        image (3, S, S) float32, mask (S, S) uint8 0/1, input_ids (T,), attention_mask (T,)
    train=False, all k expressions of the ref (batch them with `collate_eval`):
        image, mask as above, original_mask (H, W) uint8 at the image's own size,
        input_ids (k, T), attention_mask (k, T), ref_id, sent_ids (k), sentences (k), image_path
    """

    def __init__(self, refer, split, tokenizer, image_size=480, train=True, seed=0):
        self.refer, self.split, self.tokenizer = refer, split, tokenizer
        self.positions = refer.indices(split)
        silent = self.positions[refer.sent_start[self.positions + 1] == refer.sent_start[self.positions]]
        if len(silent):
            raise DataError(f"{refer.refs_path}: ref {refer.ref_ids[silent[0]]} has no "
                            f"sentences; every ref needs at least one expression")
        self.image_size, self.train, self.seed, self.epoch = image_size, train, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, index):
        i = int(self.positions[index])
        path = self.refer.image_path_at(i)
        image, mask = load_image(path), self.refer.mask_at(i)
        if image.size != (mask.shape[1], mask.shape[0]):
            raise DataError(f"image {path} is {image.size[0]}x{image.size[1]} but instances.json "
                            f"says {mask.shape[1]}x{mask.shape[0]}; wrong image file")
        image = image_to_tensor(image, self.image_size)
        resized = mask_to_tensor(mask, self.image_size)                # (S, S) uint8
        first, last = self.refer.sent_start[i], self.refer.sent_start[i + 1]
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            ids, att = self.tokenizer.encode(self.refer.sentences[rng.integers(first, last)])
            return {"image": image, "mask": resized, "input_ids": ids, "attention_mask": att}
        sentences = self.refer.sentences[first:last]
        ids, att = map(torch.stack, zip(*[self.tokenizer.encode(s) for s in sentences]))     # (k, T) each
        return {"image": image, "mask": resized, "original_mask": torch.from_numpy(mask), "input_ids": ids,
                "attention_mask": att, "ref_id": int(self.refer.ref_ids[i]),
                "sent_ids": self.refer.sent_ids[first:last].tolist(), "sentences": sentences, "image_path": path}


def collate_eval(items):
    """Eval items of B refs -> one batch. Expressions of all refs are concatenated (N = Σk);
    `expr_ref` (N,) says which ref (row of image/mask) each expression belongs to."""
    counts = [len(it["input_ids"]) for it in items]
    return {"image": torch.stack([it["image"] for it in items]),           # (B, 3, S, S)
            "mask": torch.stack([it["mask"] for it in items]),             # (B, S, S) uint8
            "input_ids": torch.cat([it["input_ids"] for it in items]),     # (N, T)
            "attention_mask": torch.cat([it["attention_mask"] for it in items]),
            "expr_ref": torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts)),
            **{key: [it[key] for it in items]
               for key in ("original_mask", "ref_id", "sent_ids", "sentences", "image_path")}}


# ----------------------------------------------------------------------------------------------
# The built-in "shapes" data set
#
# Scenes of 2-4 coloured shapes on a noisy background, each object a ref, most named by their colour. The mix of
# expression kinds is chosen so that the tiny model learns the set in a few CPU minutes: colour words are learned
# first, the other words need longer (README "Data" and "Results"). Written in RefCOCO's on-disk format under
# ROOT/shapes/ (refs(unc).p, instances.json, images/, vocab.txt), so training and evaluation on it run the
# real-data code path. Objects are drawn with the same rasteriser that reads the annotations back. An object
# partly covered by a convex object drawn over it gets the extra part "its polygon ∩ the cover's polygon": parts
# covered twice are background in the target, so the target is the visible part (to within a pixel at the cut).

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 80, 215),
           "yellow": (235, 205, 40), "purple": (145, 60, 185), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle", "star")


def _shape_polygon(shape, cx, cy, r, angle):
    """Vertices (n, 2) of a shape of circumradius r, counter-clockwise on screen."""
    n, radii, turn = {"circle": (36, [1.0], 0), "square": (4, [1.0], math.pi / 4),
                      "triangle": (3, [1.0], -math.pi / 2), "star": (10, [1.0, 0.45], -math.pi / 2)}[shape]
    a = turn + angle + 2 * math.pi * np.arange(n) / n
    rr = r * np.resize(radii, n)
    return np.stack([cx + rr * np.cos(a), cy - rr * np.sin(a)], axis=1)


def _clip_convex(subject, clip):
    """Sutherland–Hodgman: subject polygon (n, 2) ∩ convex clip polygon (CCW on screen)."""
    out = list(subject)
    for a, b in zip(clip, np.roll(clip, -1, axis=0)):
        points, out = out, []
        for p, q in zip(points, points[1:] + points[:1]):
            q_inside = _inside(q, a, b)
            if q_inside != _inside(p, a, b):                           # p-q crosses the line a-b: add where
                d, e = q - p, b - a
                t = ((a[0] - p[0]) * e[1] - (a[1] - p[1]) * e[0]) / (d[0] * e[1] - d[1] * e[0])
                out.append(p + t * d)
            if q_inside:
                out.append(q)
        if not out:
            break
    return np.array(out).reshape(-1, 2)


def _inside(p, a, b):
    """Is p on the inner side of the clip edge a -> b?"""
    return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) <= 0


def _place_objects(rng, n, width, height, shared_colour=0.1):
    """Shapes, colours, sizes and positions of up to n objects with limited overlap (fewer where 200n tries find
    no room). Each object takes a colour not yet in the scene, or with probability `shared_colour` the colour of
    an object already there."""
    palette = [str(c) for c in rng.permutation(list(COLOURS))]
    objects = []
    for _ in range(200 * n):
        if len(objects) == n:
            break
        fresh = palette[len({p["colour"] for p in objects})]
        shared = objects and rng.random() < shared_colour
        o = {"shape": str(rng.choice(SHAPES)),
             "colour": objects[rng.integers(len(objects))]["colour"] if shared else fresh,
             "r": float(rng.uniform(18, 24) if rng.random() < 0.5 else rng.uniform(28, 36))}
        o["x"], o["y"] = (float(rng.uniform(o["r"], side - o["r"])) for side in (width, height))
        if all(_compatible(o, p) for p in objects):
            o["angle"] = float(rng.uniform(-0.3, 0.3)) if o["shape"] != "circle" else 0.0
            objects.append(o)
    return sorted(objects, key=lambda o: -o["r"])                      # small ones on top


def _compatible(o, p):
    """Objects may overlap a little, a star never (it is not convex, see _clip_convex)."""
    gap = math.hypot(o["x"] - p["x"], o["y"] - p["y"]) / (o["r"] + p["r"])
    return gap > (1.05 if "star" in (o["shape"], p["shape"]) else 0.85)


def _draw_scene(rng, objects, width, height):
    """Noisy image uint8 (H, W, 3) and each object's segmentation (list of polygon parts)."""
    base = rng.uniform(70, 170) + rng.uniform(-20, 20, size=3)
    image = base + rng.normal(0, 14, size=(height, width, 3))
    image += rng.normal(0, 18) * np.linspace(-1, 1, width)[None, :, None]
    polygons = [np.round(_shape_polygon(o["shape"], o["x"], o["y"], o["r"], o["angle"]), 2) for o in objects]
    parts = []
    for j, (o, poly) in enumerate(zip(objects, polygons)):
        m = polygon_to_mask(poly.ravel(), height, width).astype(bool)
        image[m] = np.array(COLOURS[o["colour"]]) + rng.normal(0, 10, size=(m.sum(), 3))
        covers = [_clip_convex(poly, q) for q in polygons[j + 1:]]
        parts.append([np.round(p, 2).ravel().tolist() for p in [poly] + [c for c in covers if len(c) >= 3]])
    return np.clip(image, 0, 255).astype(np.uint8), parts


def make_shapes(root, seed=0, num_images=2400):
    """Write the shapes data set to ROOT/shapes (deterministic for a seed); returns its path.

    Splits by image: every 10th image val, every 20th testA (2-3 objects) and testB (4 objects, rarely 3 where
    no room is found), the rest train (2-4 objects).
    """
    target = Path(root) / "shapes"
    if target.exists():
        raise DataError(f"{target} already exists: delete it to build the shapes set again")
    tmp = Path(root) / f".shapes-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "images").mkdir(parents=True)
        images, anns, refs = [], [], []
        for i in range(num_images):
            _make_scene(np.random.default_rng((seed, i)), i, tmp, images, anns, refs)
        categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)]
        _write_refer_files(tmp, refs, images, anns, categories)
        (tmp / "vocab.txt").write_text("\n".join(_shapes_vocab()) + "\n")
        tmp.rename(target)
    except OSError:
        if not target.exists():                         # else another process finished first
            raise
    finally:                                            # nothing half-built is left, Ctrl-C included
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_shapes(root, seed=0, num_images=2400):
    """ROOT/shapes, built on first use only."""
    target = Path(root) / "shapes"
    if not (target / "refs(unc).p").is_file():
        if target.exists():
            raise DataError(f"{target} is incomplete (no refs(unc).p): delete it and run again")
        make_shapes(root, seed, num_images)
    return target


def _make_scene(rng, i, folder, images, anns, refs):
    split = "val" if i % 10 == 1 else "testA" if i % 20 == 3 else "testB" if i % 20 == 13 else "train"
    n = {"testA": (2, 4), "testB": (4, 5)}.get(split, (2, 5))
    width, height = (int(s) for s in rng.choice([128, 144, 160], size=2))
    objects = _place_objects(rng, int(rng.integers(*n)), width, height)
    pixels, parts = _draw_scene(rng, objects, width, height)
    image_id, file_name = i + 1, f"shapes_{i + 1:06d}.jpg"
    Image.fromarray(pixels).save(folder / "images" / file_name, quality=90)
    images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    expressions = describe_scene(rng, objects, width, height)
    for j, (o, seg) in enumerate(zip(objects, parts)):
        ann_id = image_id * 10 + j
        target = segmentation_to_mask(seg, height, width)
        ys, xs = np.nonzero(target)
        bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
        category = SHAPES.index(o["shape"]) + 1
        anns.append({"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": seg,
                     "area": int(target.sum()), "bbox": bbox, "iscrowd": 0})
        if expressions[j]:
            refs.append(_ref_record(len(refs), ann_id, image_id, category, split, j, expressions[j]))


def _ref_record(ref_id, ann_id, image_id, category, split, j, expressions):
    sentences = [{"raw": e, "sent": e.lower().rstrip("."), "tokens": e.lower().rstrip(".").split(),
                  "sent_id": ref_id * 4 + k} for k, e in enumerate(expressions)]
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": category,
            "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
            "file_name": f"shapes_{image_id:06d}_{j}.jpg"}


def _write_refer_files(folder, refs, images, anns, categories):
    """refs(unc).p as the released files are (pickle protocol 2) and a COCO instances.json."""
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with open(folder / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)


def make_refcoco_like(root, num_images=64, seed=0):
    """ROOT/refcoco/refs(unc).p + instances.json and ROOT/images/mscoco/images/train2014/*.jpg: RefCOCO's layout
    and sizes (640x480 JPEGs, 3 objects an image, 32-vertex polygons, two expressions a ref), all refs in train.
    For measuring the data pipeline (evaluate.py --benchmark), not for training."""
    folder, photos = Path(root) / "refcoco", Path(root) / COCO_IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    photos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns, refs = [], [], []
    for i in range(1, num_images + 1):
        name = f"COCO_train2014_{i:012d}.jpg"
        coarse = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((640, 480), Image.BILINEAR), np.int16)   # photo-like:
        pixels = pixels + rng.integers(-8, 9, pixels.shape)                       # smooth + grain
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(photos / name, quality=90)
        images.append({"id": i, "file_name": name, "height": 480, "width": 640})
        for j in range(3):
            cx, cy, r = rng.uniform(100, 540), rng.uniform(100, 380), rng.uniform(40, 95)
            angles = np.sort(rng.uniform(0, 2 * math.pi, 32))
            radii = r * rng.uniform(0.6, 1.0, 32)
            polygon = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
            anns.append({"id": i * 10 + j, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "segmentation": [polygon.round(2).flatten().tolist()]})
            refs.append(_ref_record(len(refs), i * 10 + j, i, 1, "train", j,
                                    [f"the object number {j}", f"thing {j} in picture {i}"]))
    _write_refer_files(folder, refs, images, anns, [{"id": 1, "name": "thing"}])
    return folder


# Expressions. An expression is a noun in a phrase; it must fit the target and no other object. The tables below
# hold every word an expression can use (save the typos of _style): the set's vocabulary and expression_kind are
# read from them, so the three never disagree.

NAME = "the {}"
NOUNS = (("{colour} {shape}", ("colour", "shape")), ("{shape}", ("shape",)),    # (text, what it names),
         ("{colour} one", ("colour",)), ("{colour} object", ("colour",)),        # most specific first
         ("object", ()), ("shape", ()))
SIZES = {  # (holds(object, other), texts); the two never both hold
    "big": (lambda o, p: o["r"] > 1.35 * p["r"], ["the big {}", "the large {}"]),
    "small": (lambda o, p: o["r"] * 1.35 < p["r"], ["the small {}", "the little {}"])}
POSITIONS = {  # where: (score, texts); the target must outscore the others its noun fits
    "leftmost": (lambda p: -p["x"], ["the leftmost {}", "the {} on the left"]),
    "rightmost": (lambda p: p["x"], ["the rightmost {}", "the {} on the right"]),
    "top": (lambda p: -p["y"], ["the top {}", "the {} at the top", "the highest {}"]),
    "bottom": (lambda p: p["y"], ["the bottom {}", "the {} at the bottom", "the lowest {}"]),
    "top left": (lambda p: -p["x"] - p["y"], ["the top left {}", "the {} in the top left corner"]),
    "top right": (lambda p: p["x"] - p["y"], ["the top right {}", "the {} in the upper right corner"]),
    "bottom left": (lambda p: p["y"] - p["x"], ["the bottom left {}", "the {} in the lower left corner"]),
    "bottom right": (lambda p: p["x"] + p["y"], ["the bottom right {}", "the {} in the bottom right corner"])}
RELATIONS = {  # (past(object, landmark): how far the object's centre lies past the landmark's that way, texts)
    "left of": (lambda o, l: l["x"] - o["x"], ["the {} left of the {}", "the {} to the left of the {}"]),
    "right of": (lambda o, l: o["x"] - l["x"], ["the {} right of the {}", "the {} to the right of the {}"]),
    "above": (lambda o, l: l["y"] - o["y"], ["the {} above the {}"]),
    "below": (lambda o, l: o["y"] - l["y"], ["the {} below the {}", "the {} under the {}"])}


def _nouns(o):
    """Ways to name `o`, most specific first: (text, what it names, fits), fits(p) whether the text names p too."""
    return [(text.format(**o), names, lambda p, names=names: all(p[a] == o[a] for a in names))
            for text, names in NOUNS]


def _candidates(o, objects, width, height):
    """Every expression that fits `o` and no other object of the scene, by kind. A noun that fits others too
    needs a size ("the big star": `o` clearly bigger than each) or a position; "object" and "shape" name nothing,
    so only a position picks `o` out with them. A corner word needs `o` in that quarter of the image."""
    others = [p for p in objects if p is not o]
    found = {"attribute": [], "size": [], "position": [], "relation": []}
    for noun, names, fits in _nouns(o):
        group = [p for p in others if fits(p)]
        if names and not group:
            found["attribute"].append(NAME.format(noun))
        for holds, texts in SIZES.values():
            if names and group and all(holds(o, p) for p in group):
                found["size"] += [t.format(noun) for t in texts]
        for where, (score, texts) in POSITIONS.items():
            corner = " " in where                 # a corner word needs `o` in that quarter of the image
            in_quarter = ((o["y"] < height / 2) == where.startswith("top")
                          and (o["x"] < width / 2) == where.endswith("left"))
            if group and all(score(o) > score(p) + 12 for p in group) and (not corner or in_quarter):
                found["position"] += [t.format(noun) for t in texts]
    found["relation"] = _relation_phrases(o, objects)
    return found


def _relation_phrases(o, objects):
    """"the star left of the blue one": `o` named by colour and shape or by shape where that name fits other
    objects too, the landmark by its most specific name that fits it alone; `o` lies more than 10 px past the
    landmark that way, and no other object the name fits lies past it at all."""
    out = []
    for land in objects:
        if land is o:
            continue
        land_noun = next((n for n, _, f in _nouns(land)[:3] if [p for p in objects if f(p)] == [land]), None)
        for noun, _, fits in _nouns(o)[:2]:
            rivals = [p for p in objects if p is not o and p is not land and fits(p)]
            for past, texts in RELATIONS.values():
                if land_noun and past(o, land) > 10 and all(past(p, land) <= 0 for p in rivals) \
                        and any(fits(p) for p in objects if p is not o):
                    out += [t.format(noun, land_noun) for t in texts]
    return out


def describe_scene(rng, objects, width, height, other_kind=0.2):
    """Up to 3 expressions per object, each fitting only that object, all distinct in the scene. Where the
    object's colour is named by a fitting expression ("the red one", or "the red star" where another object is
    red too), two such expressions come first and, with probability `other_kind`, one by shape, size, position
    or relation; where none names the colour, up to three of those. A few carry a typo or a capital letter."""
    used, result = set(), []
    for o in objects:
        found = _candidates(o, objects, width, height)
        by_colour = [t for t in found["attribute"] if o["colour"] in t]
        other = {"shape": [t for t in found["attribute"] if o["colour"] not in t], "size": found["size"],
                 "position": found["position"], "relation": found["relation"]}
        kinds = [k for k, texts in other.items() if texts]
        order = [str(t) for t in rng.permutation(by_colour)][:2]
        if kinds and (not order or rng.random() < other_kind):
            order.append(str(rng.choice(other[str(rng.choice(kinds))])))
        if not by_colour:
            order += [str(t) for t in rng.permutation(sum(other.values(), []))]
        chosen = []
        for text in order:
            text = _style(rng, text)
            if len(chosen) < 3 and text.lower() not in used:
                used.add(text.lower())
                chosen.append(text)
        result.append(chosen)
    return result


def _style(rng, text):
    """Now and then two letters swapped (the expression kind "other") or a capital first."""
    if rng.random() < 0.04:
        words = text.split()
        k = int(rng.integers(len(words)))
        w = words[k]
        if len(w) >= 4:
            a = int(rng.integers(1, len(w) - 1))
            words[k] = w[:a] + w[a + 1] + w[a] + w[a + 2:]
            text = " ".join(words)
    return text[0].upper() + text[1:] if rng.random() < 0.2 else text


# The vocabulary and the kinds of expression, read from the phrase tables

def _words(texts):
    """The words of phrase templates, placeholders left out."""
    return {w for t in texts for w in t.split() if not w.startswith("{")}


def _texts(table):
    return [t for _, texts in table.values() for t in texts]


# The words a size, a position or a relation adds to a name mark an expression's kind.
SIZE_WORDS = _words(_texts(SIZES)) - _words([NAME])
SPATIAL_WORDS = _words(_texts(POSITIONS) + _texts(RELATIONS)) - _words([NAME])
SHAPE_WORDS = frozenset(_words([NAME] + [text for text, _ in NOUNS]) | SIZE_WORDS
                        | SPATIAL_WORDS | set(COLOURS) | set(SHAPES))


def _shapes_vocab():
    """vocab.txt of the shapes set: special tokens, punctuation, the words of the phrase tables, and letters,
    so that a misspelt word reads as its letters rather than as [UNK]."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + sorted(SHAPE_WORDS)
            + list(letters) + [f"##{c}" for c in letters])


def expression_kind(sentence):
    """What a shapes expression picks its object out by: "position/relation", "size", "colour+shape", "colour",
    "shape", or "other" where a word is misspelt (a few are)."""
    words = set(sentence.lower().rstrip(".").split())
    if not words <= SHAPE_WORDS:
        return "other"
    if words & SPATIAL_WORDS:
        return "position/relation"
    if words & SIZE_WORDS:
        return "size"
    colour, shape = not words.isdisjoint(COLOURS), not words.isdisjoint(SHAPES)
    return "colour+shape" if colour and shape else "colour" if colour else "shape" if shape else "other"


# ----------------------------------------------------------------------------------------------
# python data.py --check ROOT

PUBLISHED = {  # (refs, expressions, images) per split
    ("refcoco", "unc"): {"train": (42404, 120624, 16994), "val": (3811, 10834, 1500),
                         "testA": (1975, 5657, 750), "testB": (1810, 5095, 750)},
    ("refcoco+", "unc"): {"train": (42278, 120191, 16992), "val": (3805, 10758, 1500),
                          "testA": (1975, 5726, 750), "testB": (1798, 4889, 750)},
    ("refcocog", "umd"): {"train": (42226, 80512, 21899), "val": (2573, 4896, 1300),
                          "test": (5023, 9602, 2600)}}


def check(root):
    """Print what ROOT holds beside the published counts; returns the number of problems."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: expected layout {LAYOUT}")
    problems, found, verdicts = 0, 0, {}             # verdicts: each image judged once, the data sets share them
    for dataset, split_bys in SPLIT_BYS.items():
        for split_by in split_bys:
            refs_path, instances_path, _ = dataset_files(root, dataset, split_by)
            if not refs_path.is_file():
                if dataset != "shapes":
                    print(f"{dataset}({split_by}): not present (expected {refs_path})")
                continue
            found += 1
            try:
                problems += _check_one(Refer(root, dataset, split_by), verdicts)
            except DataError as e:
                print(f"{dataset}({split_by}): ERROR {e}")
                problems += 1
    if not found:
        raise DataError(f"no refs file under {root}: expected layout {LAYOUT}")
    print("OK" if not problems else f"{problems} problem(s) found, see above")
    return problems


def _check_one(refer, verdicts):
    """Print the counts of each split beside the published ones (a published split the file lacks is a problem),
    then check that every image is present, of the size instances.json gives, and decodes to its end; returns the
    number of problems."""
    print(f"{refer.dataset}({refer.split_by}): images in {refer.image_dir}")
    print(f"  {'split':8}" + "".join(f"{name:>13}{'published':>11}" for name in ("refs", "expressions", "images")))
    published, problems = PUBLISHED.get((refer.dataset, refer.split_by), {}), 0
    missing = [split for split in published if split not in refer.split_names]
    for split in refer.split_names + missing:
        at = np.zeros(0, np.int64) if split in missing else refer.indices(split)
        ours = (len(at), int(sum(refer.sent_start[at + 1] - refer.sent_start[at])),
                len(np.unique(refer.image_ids[at])))
        expected = published.get(split)
        cells = "".join(f"{n:>13,}" + (f"{e:>11,}" if expected else f"{'-':>11}")
                        for n, e in zip(ours, expected or ours))
        differs = expected is not None and ours != expected
        problems += differs
        print(f"  {split:8}{cells}" + ("   <- missing" if split in missing else "   <- differs" if differs else ""))
    images = [(refer.image_dir / name, h, w) for name, (h, w) in zip(refer.image_files, refer.image_hw.tolist())]
    if todo := [image for image in images if image not in verdicts]:
        print(f"  reading {len(todo):,} images (~1 ms each)", flush=True)
    verdicts |= {image: _image_problem(*image) for image in todo}
    bad = [verdicts[image] for image in images if verdicts[image]]
    total = len(images)
    print(f"  image files: {total - len(bad):,} of {total:,} present, readable and of the stated size")
    for line in bad[:5]:
        print(f"  {line}")
    if len(bad) > 5:
        print(f"  ... and {len(bad) - 5:,} more")
    return problems + bool(bad)


def _image_problem(path, h, w):
    """Why a data set image is unusable (missing, unreadable, another size, truncated), or None."""
    try:
        with Image.open(path) as image:
            if image.size != (w, h):
                return f"{path} is {image.size[0]}x{image.size[1]}, instances.json says {w}x{h}"
            image.draft("RGB", (w // 8, h // 8))     # a JPEG decodes at 1/8 size (~1 ms) yet reads every byte:
            image.load()                             # a truncated download fails here
    except FileNotFoundError:
        return f"missing {path}"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"{path} is not a readable image ({e})"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check a RefCOCO data root or build the shapes data set.")
    parser.add_argument("root", help="data root (see README 'Data')")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="validate layout and counts")
    action.add_argument("--make-shapes", action="store_true", help="build ROOT/shapes")
    parser.add_argument("--seed", type=int, default=0, help="shapes: random seed")
    parser.add_argument("--num-images", type=int, default=2400, help="shapes: images")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.seed < 0:
        parser.error(f"--num-images must be >= 1 and --seed >= 0, got {args.num_images} and {args.seed}")
    try:
        if args.make_shapes:
            print(f"wrote {make_shapes(args.root, args.seed, args.num_images)}")
            return 0
        return 1 if check(args.root) else 0
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
