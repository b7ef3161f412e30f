"""Seed-determined weights in the released layouts, built from the key lists beside this file.

The parity target (parity_small.safetensors) was computed by the released code from weights made
by these rules, so they must come out bit for bit; `digest` checks that. The rules, in short:
entry i of a key list draws from its own generator seeded with seed * 1000003 + salt * 100000 + i
(salt 0: CrossVLT file, 1: Microsoft Swin file, 2: HF BERT file), and its leaf name picks the
distribution; the Swin and BERT files reuse the CrossVLT tensors that the released loaders copy.

    python tests/reference/official_weights.py OUT_DIR     # writes the three files, prints digests
"""
import hashlib
import json
import math
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
HUB_LN = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}  # hub file


def key_list(name):
    """[(name, shape, dtype)] in state_dict order."""
    entries = json.loads((HERE / name).read_text())["keys"]
    return [(e["name"], tuple(e["shape"]), getattr(torch, e["dtype"])) for e in entries]


def relative_position_index(w):
    """Swin: index into the (2w-1)^2 bias table for each token pair of a w x w window."""
    y, x = (c.flatten() for c in torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij"))
    return (y[:, None] - y[None] + w - 1) * (2 * w - 1) + (x[:, None] - x[None] + w - 1)


def shifted_window_mask(n_windows, n_tokens):
    """Swin: 0 between tokens of one pre-shift region, -100 across, for a square map cut into
    n_windows windows of n_tokens (square) and shifted by half a window."""
    w, per_side = math.isqrt(n_tokens), math.isqrt(n_windows)
    side = w * per_side
    band = torch.bucketize(torch.arange(side), torch.tensor([side - w, side - w // 2]), right=True)
    region = (3 * band[:, None] + band[None]).view(per_side, w, per_side, w).transpose(1, 2)
    region = region.reshape(n_windows, n_tokens)
    return torch.where(region[:, :, None] == region[:, None], 0.0, -100.0)


def make_tensor(name, shape, dtype, g):
    leaf = name.rsplit(".", 1)[-1]
    randn = lambda: torch.randn(shape, generator=g)
    if not dtype.is_floating_point:
        if leaf == "relative_position_index":
            t = relative_position_index(math.isqrt(shape[0]))
        elif leaf == "position_ids":
            t = torch.arange(shape[-1]).expand(shape)
        else:                                                   # num_batches_tracked and the rest
            t = torch.zeros(shape)
    elif leaf == "attn_mask" and len(shape) == 3:
        t = shifted_window_mask(shape[0], shape[1])
    elif leaf == "running_var":
        t = torch.rand(shape, generator=g) + 0.5
    elif leaf == "running_mean":
        t = 0.1 * randn()
    elif leaf == "temp":
        t = torch.ones(shape)
    elif leaf == "relative_position_bias_table":
        t = 0.02 * randn()
    elif len(shape) == 1 and leaf in ("weight", "gamma"):
        t = 1.0 + 0.1 * randn()
    elif len(shape) == 1 and leaf in ("bias", "beta"):
        t = 0.02 * randn()
    elif len(shape) >= 2:
        t = randn() / math.sqrt(math.prod(shape[1:]))
    else:
        t = 0.02 * randn()
    return t.to(dtype).contiguous()


def generate(keys, seed, salt, reuse=None, source=lambda name: None):
    """A state dict for `keys`; an entry whose `source(name)` is in `reuse` with the same shape is
    that very tensor (not a copy)."""
    sd = {}
    for i, (name, shape, dtype) in enumerate(keys):
        src = (reuse or {}).get(source(name))
        if src is not None and tuple(src.shape) == shape:
            sd[name] = src
        else:
            g = torch.Generator().manual_seed(seed * 1000003 + salt * 100000 + i)
            sd[name] = make_tensor(name, shape, dtype, g)
    return sd


def swin_source(name):
    """Microsoft Swin key -> the CrossVLT key the released loader copies it into."""
    if name.startswith("patch_embed."):
        return "backbone.0." + name
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", name):
        return f"backbone.{m[1]}.layers.{m[2]}"
    return None


def swap_suffix(name, table):
    for old, new in table.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def bert_source(name):
    """HF BERT key -> the CrossVLT key (its stage-1 BERT) the released loader copies it into."""
    name = swap_suffix(name, {new: old for old, new in HUB_LN.items()})
    return "lang_stage1." + name.removeprefix("bert.") if name.startswith("bert.") else None


def hub_names(sd):
    """LayerNorm weight/bias -> gamma/beta, as bert-base-uncased's pytorch_model.bin names them."""
    return {swap_suffix(k, HUB_LN): v for k, v in sd.items()}


def digest(sd):
    """sha256 over name|dtype|shape and the raw bytes of each tensor, in order."""
    h = hashlib.sha256()
    for name, t in sd.items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def official_small(seed=0):
    """The CrossVLT (depths [2,2,2,2]), Microsoft Swin and HF BERT (weight/bias names) dicts."""
    sd = generate(key_list("official_crossvlt_keys_small.json"), seed, 0)
    swin = generate(key_list("swin_ms_keys_small.json"), seed, 1, sd, swin_source)
    bert = generate(key_list("bert_hf_keys.json"), seed, 2, sd, bert_source)
    return sd, swin, bert


def write_official_small(out, seed=0):
    """OUT/crossvlt_small.pth (bare, as test.py reads it), OUT/swin_small.pth ({'model': ...}) and
    OUT/bert/pytorch_model.bin (gamma/beta names, as the hub file); returns the three dicts."""
    sd, swin, bert = official_small(seed)
    out = Path(out)
    (out / "bert").mkdir(parents=True, exist_ok=True)
    torch.save(sd, out / "crossvlt_small.pth")
    torch.save({"model": swin}, out / "swin_small.pth")
    torch.save(hub_names(bert), out / "bert" / "pytorch_model.bin")
    return sd, swin, bert


if __name__ == "__main__":
    for name, sd in zip(("crossvlt", "swin", "bert"), write_official_small(sys.argv[1])):
        print(f"{name}: {len(sd)} tensors, digest {digest(sd)}")
