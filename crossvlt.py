"""CrossVLT in plain PyTorch.

Cho, Yu, Kang: "Cross-aware Early Fusion with Stage-divided Vision and Language Transformer
Encoders for Referring Image Segmentation", IEEE Transactions on Multimedia 2023.

Read top to bottom, this file follows the paper's Fig. 2: the two plain encoders (Swin, BERT),
the stage-divided language encoder with its language-query fusion (Sec. III-B), the vision-query
fusion (Eq. 2-4, Fig. 3), the feature-based alignment (Sec. III-C, Eq. 5-6), the decoder
(Sec. III-D), the loss (Eq. 7-9), and last the weight loading that fills all of it from the
official Swin, BERT and released CrossVLT files. Where the released code and the paper differ,
the code's behaviour is the default (see README, "Paper vs. code").

Notation: stage i = 1..4, V_i the Swin block output of stage i, L_i the language features of
stage i, M̂_i the fused vision features, F_V^i the merged output that feeds stage i+1.
"""
import argparse
import dataclasses
import fnmatch
import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass tree shared by train.py, evaluate.py and the checkpoint metadata
# ----------------------------------------------------------------------------------------------
@dataclass
class SwinConfig:
    embed_dim: int = 128
    depths: tuple = (2, 2, 18, 2)
    num_heads: tuple = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 4
    in_chans: int = 3
    drop_path: float = 0.3          # stochastic depth, linspace(0, drop_path, sum(depths))


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1            # hidden and attention-probability dropout
    layer_norm_eps: float = 1e-12


@dataclass
class CrossVLTConfig:
    """The whole model: the released code's defaults, with the paper's choices and the ablations
    of Tables II-IV as overrides (README "Ablations", "Paper vs. released code")."""
    swin: SwinConfig = field(default_factory=SwinConfig)
    bert: BertConfig = field(default_factory=BertConfig)
    lang_split: tuple = (6, 2, 2, 2)        # BERT layers per language stage (Table IV)
    fusion_stages: tuple = (1, 2, 3, 4)     # stages with cross-aware early fusion (Table II)
    fusion_direction: str = "bi"            # "bi" | "uni": vision-only fusion (Table III d)
    align_stages: tuple = (1, 2, 3, 4)      # stages with feature-based alignment (Table III b)
    intermediate_loss: str = "align"        # "align" | "seg": aux. mask loss at stages 1-3 (III e)
    align_dim: int = 256
    learnable_tau: bool = False             # paper: learnable; code: created, never trained
    gate_init: str = "code"                 # "code": trunc-normal | "zero": gates start closed
    bert_init: str = "code"                 # "code": layers 1-6 | "full": also 7-12 into stages 2-4
    freeze_text_embeddings: bool = True     # code: BERT embeddings are left out of the optimizer
    decoder_dim: int = 512
    seg_loss_scale: float = 2.0             # paper: 1
    class_weights: tuple = (0.9, 1.1)       # (background, object); paper: (1, 1)
    align_loss_weight: float = 1.0          # lambda
    image_size: int = 480
    max_len: int = 21

    @classmethod
    def base(cls, **overrides):
        """The paper's model: Swin-B (window 12) + BERT-base, 480x480, 21 tokens."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides):
        """A few-million-parameter model for the built-in shapes data and the tests."""
        small = dict(
            swin=SwinConfig(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                            window_size=8, drop_path=0.0),
            bert=BertConfig(vocab_size=1000, hidden_size=128, num_layers=4, num_heads=2,
                            intermediate_size=512, max_position=64, dropout=0.0),
            lang_split=(1, 1, 1, 1), align_dim=64, decoder_dim=64, image_size=96,  # the demo's
            freeze_text_embeddings=False)   # trained from scratch: its word embeddings learn too
        small.update(overrides)
        return cls(**small)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Inverse of to_dict; unknown fields are an error, lists become tuples."""
        d = dict(d)
        d["swin"] = _dataclass_from_dict(SwinConfig, d.get("swin", {}))
        d["bert"] = _dataclass_from_dict(BertConfig, d.get("bert", {}))
        return _dataclass_from_dict(cls, d)

    def validate(self):
        for name in ("fusion_stages", "align_stages"):
            if not set(getattr(self, name)) <= {1, 2, 3, 4}:
                raise ValueError(f"{name} must be a subset of (1, 2, 3, 4), got {getattr(self, name)}")
        for name, allowed in dict(fusion_direction=("bi", "uni"), intermediate_loss=("align", "seg"),
                                  gate_init=("code", "zero"), bert_init=("code", "full")).items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not len(self.swin.depths) == len(self.swin.num_heads) == 4:
            raise ValueError(f"the model has 4 Swin stages: swin.depths and swin.num_heads need 4 entries each, got "
                             f"{self.swin.depths} and {self.swin.num_heads}")
        if len(self.lang_split) != 4 or min(self.lang_split) < 1:
            raise ValueError(f"lang_split needs 4 positive layer counts, got {self.lang_split}")
        if self.image_size < 32 or self.max_len < 2:
            raise ValueError(f"image_size must be >= 32 and max_len >= 2 ([CLS] [SEP]), got {self.image_size} "
                             f"and {self.max_len}")
        return self


def _dataclass_from_dict(cls, d):
    if isinstance(d, cls):
        return d
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(d) - names:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------------
# Shared by every attention below (Swin windows, BERT, the language- and vision-query fusions),
# the precision the model runs in, and recomputing activations in the backward
# ----------------------------------------------------------------------------------------------
def split_heads(x, heads):
    """(..., N, heads·d) -> (..., heads, N, d): each head a contiguous block of d channels."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def merge_heads(x):
    """(..., heads, N, d) -> (..., N, heads·d), the heads concatenated: split_heads undone."""
    return x.transpose(-3, -2).flatten(-2)


def key_padding_bias(attention_mask):
    """(B, T) of 0/1 -> (B, 1, 1, T): -10000 on padded words, 0 on real ones. The released code
    writes it twice, as (1 - m)·-10000 for BERT and (m - 1)·10000 in the fusion: the same tensor."""
    return (attention_mask[:, None, None, :].float() - 1.0) * 10000.0


def attention(q, k, v, bias=None, dropout=0.0):
    """softmax(q·kᵀ/√d + bias)·v for (B, heads, N, d) queries and (B, heads, M, d) keys/values;
    bias broadcasts to (B, heads, N, M); dropout acts on the probabilities (callers pass 0 outside training).

    PyTorch's fused kernel on CUDA, and on a CPU in fp32 when no gradient reaches the bias.
    Otherwise plain products, measured faster: the CPU kernel takes a slow path for a bias with a
    gradient (Swin's relative position table) and computes in fp32 under bf16 autocast (README
    "Benchmarks")."""
    bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    if q.is_cuda or (q.dtype == torch.float32 and not bias_grad):
        bias = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    probs = scores.softmax(-1)
    return (F.dropout(probs, dropout) if dropout else probs) @ v


def autocast(device, precision):
    """The one way the model runs in lower precision: bf16 autocast for "bf16" (matrix products
    and convolutions in bf16, norms and softmax in fp32 by PyTorch's autocast lists), no-op for "fp32"."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def checkpointed(layer, on, *args):
    """layer(*args); with `on` and gradients enabled, its activations are recomputed in the
    backward (less memory, ~1/3 more compute; the random state is replayed: dropout and drop_path
    draw the same)."""
    if on and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


# ----------------------------------------------------------------------------------------------
# Swin Transformer (Liu et al. 2021), the segmentation variant: padding inside every block
# ----------------------------------------------------------------------------------------------
def round_up(n, multiple):
    """n rounded up to a multiple of `multiple`."""
    return (n + multiple - 1) // multiple * multiple


def window_partition(x, window):
    """(B, H, W, C) -> (B, nW, window*window, C); H and W are multiples of window."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, -1, window * window, C)


def window_reverse(windows, window, H, W):
    """(B, nW, window*window, C) -> (B, H, W, C)."""
    B, C = windows.shape[0], windows.shape[-1]
    x = windows.view(B, H // window, W // window, window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


@functools.lru_cache(maxsize=16)
def relative_position_index(window, device):
    """(N, N) index into the ((2w-1)^2, heads) bias table for token pairs of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)                                   # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).to(device)


@functools.lru_cache(maxsize=32)
def shifted_window_mask(Hp, Wp, window, shift, device):
    """(nW, N, N) additive mask for a cyclically shifted Hp x Wp map: -100 across regions.

    Regions are the 3x3 bands [0, Hp-w) | [Hp-w, Hp-s) | [Hp-s, Hp) on the padded size, so
    padded tokens are not masked as such (the released code's behaviour)."""
    def bands(n):
        b = torch.zeros(n, dtype=torch.long)
        b[n - window:] = 1
        b[n - shift:] = 2
        return b

    region = (bands(Hp)[:, None] * 3 + bands(Wp)[None, :]).view(1, Hp, Wp, 1)
    region = window_partition(region, window).squeeze(-1)[0]     # (nW, N)
    same = region[:, :, None] == region[:, None, :]
    return torch.zeros(same.shape).masked_fill(~same, -100.0).to(device)


def drop_path(x, p, training):
    """Stochastic depth: the residual branch x dropped per sample, survivors scaled by 1/(1-p)."""
    if not training or p == 0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias.

    Input (B, nW, N, C) with N = window^2 tokens; mask (nW, N, N) or None."""

    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))

    def forward(self, x, mask=None):
        B, nW, N, C = x.shape
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, -1))  # (B, nW, heads, N, hd)
        index = relative_position_index(self.window, x.device).view(-1)
        bias = self.relative_position_bias_table.index_select(0, index)   # (N*N, heads)
        bias = bias.view(N, N, -1).permute(2, 0, 1)[None]                 # (1, heads, N, N)
        if mask is None:              # one bias for every window: broadcast, never copied
            q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)   # (B*nW, heads, N, hd)
        else:                         # the region mask differs per window
            q, k, v = q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2)   # (B, nW*heads, N, hd)
            bias = (bias + mask[:, None]).reshape(1, nW * self.heads, N, N)
        out = attention(q, k, v, bias).view(B, nW, self.heads, N, -1)
        return self.proj(merge_heads(out))


class SwinBlock(nn.Module):
    """x = x + drop_path(W-MSA(pad(norm1(x)))); x = x + drop_path(MLP(norm2(x)))."""

    def __init__(self, dim, heads, window, shift, mlp_ratio, drop_rate):
        super().__init__()
        self.window, self.shift, self.drop_rate = window, shift, drop_rate
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        """x (B, H*W, C) -> (B, H*W, C)."""
        B, _, C = x.shape
        w, s = self.window, self.shift
        y = self.norm1(x).view(B, H, W, C)
        Hp, Wp = round_up(H, w), round_up(W, w)
        y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))                 # zeros after the norm
        mask = None
        if s:
            y = torch.roll(y, (-s, -s), dims=(1, 2))
            mask = shifted_window_mask(Hp, Wp, w, s, x.device)
        y = window_reverse(self.attn(window_partition(y, w), mask), w, Hp, Wp)
        if s:
            y = torch.roll(y, (s, s), dims=(1, 2))
        y = y[:, :H, :W].reshape(B, H * W, C)
        x = x + drop_path(y, self.drop_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_rate, self.training)


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C): 2x2 neighbours concatenated, LN, Linear."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, H, W):
        B, _, C = x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, round_up(W, 2) - W, 0, round_up(H, 2) - H))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        H, W = x.shape[1], x.shape[2]
        return self.reduction(self.norm(x.view(B, H * W, 4 * C))), H, W


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/4 * W/4, C): 4x4 stride-4 convolution (input padded), LayerNorm."""

    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        p = self.patch
        H, W = x.shape[-2:]
        x = F.pad(x, (0, round_up(W, p) - W, 0, round_up(H, p) - H))
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class SwinStage(nn.Module):
    """The blocks of one stage (shift 0 / window//2 alternating) and the merging after it, used
    one at a time: stage(x, H, W) -> V_i, then stage.downsample(V_i or a fused M_i, H, W) ->
    (x, H/2, W/2) for the next stage (None at the last stage)."""

    def __init__(self, dim, depth, heads, window, mlp_ratio, drop_rates, merge):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, 0 if j % 2 == 0 else window // 2, mlp_ratio, drop_rates[j])
            for j in range(depth))
        self.downsample = PatchMerging(dim) if merge else None
        self.checkpointing = False                       # CrossVLT.checkpoint_activations

    def forward(self, x, H, W):
        for block in self.blocks:
            x = checkpointed(block, self.checkpointing, x, H, W)
        return x


class SwinTransformer(nn.Module):
    """Fig. 2's vision encoder (Swin, Liu et al. 2021).
    swin(images) -> [V_1..V_4], each (B, C_i, H_i, W_i): the
    block output of every stage before merging, without a norm."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        n = sum(c.depths)
        rates = [c.drop_path * j / max(n - 1, 1) for j in range(n)]    # linspace(0, drop_path, n)
        self.stages = nn.ModuleList()
        for i, depth in enumerate(c.depths):
            first = sum(c.depths[:i])
            self.stages.append(SwinStage(c.embed_dim * 2 ** i, depth, c.num_heads[i], c.window_size,
                                         c.mlp_ratio, rates[first:first + depth],
                                         merge=i < len(c.depths) - 1))
        self.apply(_init_swin)

    def forward(self, images):
        x, H, W = self.patch_embed(images)
        features = []
        for stage in self.stages:
            V = stage(x, H, W)
            features.append(V.transpose(1, 2).reshape(V.shape[0], -1, H, W))
            if stage.downsample is not None:
                x, H, W = stage.downsample(V, H, W)
        return features

    @classmethod
    def from_pretrained(cls, path):
        """Microsoft .pth, timm or HF safetensors, or our converted file; sizes from the keys."""
        sd, config, _ = convert_checkpoint(path, expect="swin")
        return load_weights(cls(config), sd, path)


def _init_swin(m):
    """Linear weights truncated N(0, 0.02) (LayerNorms keep PyTorch's 1 and 0)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, WindowAttention):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


# ----------------------------------------------------------------------------------------------
# BERT (Devlin et al. 2019): post-LayerNorm encoder
# ----------------------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    """word + position (0..T-1) + token type (0) embeddings, LayerNorm, dropout."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        x = (self.word_embeddings(input_ids) + self.position_embeddings.weight[:T]
             + self.token_type_embeddings.weight[0])
        return self.dropout(self.norm(x))


class BertAttention(nn.Module):
    """LN(x + dropout(W_o · MHA(q = x, k = v = context))). With context=None it is BERT's
    self-attention; with the vision features as context it is the language-query fusion's
    cross-attention (key/value Linear(kv_dim -> hidden)), Sec. III-B."""

    def __init__(self, c: BertConfig, kv_dim=None):
        super().__init__()
        h = c.hidden_size
        self.heads, self.p = c.num_heads, c.dropout
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(kv_dim or h, h)
        self.value = nn.Linear(kv_dim or h, h)
        self.output = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, key_bias=None, context=None):
        """x (B, T, hidden); context (B, N, kv_dim) or None; key_bias (B, 1, 1, N) or None."""
        context = x if context is None else context
        q, k, v = (split_heads(t, self.heads) for t in (self.query(x), self.key(context), self.value(context)))
        out = merge_heads(attention(q, k, v, key_bias, self.p if self.training else 0.0))   # (B, T, h)
        return self.norm(self.dropout(self.output(out)) + x)


class BertFFN(nn.Module):
    """LN(x + dropout(fc2(GELU(fc1(x)))))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.norm(self.dropout(self.fc2(F.gelu(self.fc1(x)))) + x)


class BertLayer(nn.Module):
    """One encoder layer: attention then FFN. kv_dim set = the language-query fusion layer."""

    def __init__(self, c: BertConfig, kv_dim=None):
        super().__init__()
        self.attention = BertAttention(c, kv_dim)
        self.ffn = BertFFN(c)

    def forward(self, x, key_bias=None, context=None):
        return self.ffn(self.attention(x, key_bias, context))


class BertModel(nn.Module):
    """Fig. 2's language encoder (BERT, Devlin et al. 2019).
    bert(input_ids, attention_mask) -> (B, T, hidden) last hidden state (no pooler)."""

    def __init__(self, config: BertConfig, num_layers=None):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(num_layers or config.num_layers))
        self.apply(_init_bert)

    def forward(self, input_ids, attention_mask):
        x = self.embeddings(input_ids)
        key_bias = key_padding_bias(attention_mask)
        for layer in self.layers:
            x = layer(x, key_bias)
        return x

    @classmethod
    def from_pretrained(cls, path):
        """HF-style dir (config.json + model.safetensors | pytorch_model.bin), a bare .bin or
        .safetensors, or our converted file; sizes from config.json or from the keys."""
        sd, config, _ = convert_checkpoint(path, expect="bert")
        return load_weights(cls(config), sd, path)


def _init_bert(m):
    """Linear and embedding weights N(0, 0.02) (LayerNorms keep PyTorch's 1 and 0)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Stage-divided language encoder, Sec. III-B: stage 1 = embeddings + BERT layers 1-6 (a plain
# BertModel); stages 2-4 open with the language-query fusion layer
# ----------------------------------------------------------------------------------------------
class LanguageStage(nn.Module):
    """Sec. III-B: L_i = stage i(L_{i-1}, F_V^{i-1}) for i = 2..4: the language-query fusion layer (a BERT
    layer whose self-attention is cross-attention from the words to every token of F_V^{i-1},
    with no mask at all), then plain BERT layers. vision_dim=None (no fusion at this stage, or
    uni-directional fusion) makes the first layer a plain BERT layer too."""

    def __init__(self, c: BertConfig, num_layers, vision_dim=None):
        super().__init__()
        self.cross = vision_dim is not None
        self.layers = nn.ModuleList([BertLayer(c, kv_dim=vision_dim)]
                                    + [BertLayer(c) for _ in range(num_layers - 1)])
        self.checkpointing = False                       # CrossVLT.checkpoint_activations

    def forward(self, L, key_bias, F_V):
        """L (B, T, hidden), key_bias (B, 1, 1, T), F_V (B, N, C) -> (B, T, hidden)."""
        for j, layer in enumerate(self.layers):
            args = (L, None, F_V) if j == 0 and self.cross else (L, key_bias)
            L = checkpointed(layer, self.checkpointing, *args)
        return L


# ----------------------------------------------------------------------------------------------
# Vision-query fusion, Eq. (2)-(4), Fig. 3(a)
# ----------------------------------------------------------------------------------------------
class PixelWordAttention(nn.Module):
    """A(v, L), Eq. (2): every visual token attends over the words.

    q = IN(Conv1x1(v)), k = Linear(L), val = Linear(L), heads of 64 channels,
    softmax(q kᵀ / 8 + (1e4·mask - 1e4)) val, out = IN(Conv1x1(heads concatenated)),
    y = GELU(Conv1x1(out + v)). IN is instance norm over the positions, without affine.

    The released code divides the scores by a fixed 8; `attention`'s 1/√(head width) is that 8
    because every head has 64 channels. A width under 64 (a model smaller than `tiny`) gets one
    head of that width, and its own 1/√width; any other width must be a multiple of 64."""

    def __init__(self, dim, text_dim, inner, head_dim=64):
        super().__init__()
        if inner > head_dim and inner % head_dim:
            raise ValueError(f"fusion width {inner} is not a multiple of the {head_dim}-channel heads; "
                             f"make swin.embed_dim a multiple of 32")
        self.heads = max(1, inner // head_dim)
        self.query = nn.Conv1d(dim, inner, 1)
        self.key = nn.Linear(text_dim, inner)
        self.value = nn.Linear(text_dim, inner)
        self.out = nn.Conv1d(inner, dim, 1)
        self.project = nn.Conv1d(dim, dim, 1)

    def forward(self, v, L, key_bias):
        """v (B, N, C), L (B, T, hidden), key_bias (B, 1, 1, T) -> (B, N, C)."""
        q = split_heads(instance_norm(pointwise(self.query, v)), self.heads)   # (B, heads, N, 64)
        k = split_heads(self.key(L), self.heads)                               # (B, heads, T, 64)
        val = split_heads(self.value(L), self.heads)
        out = merge_heads(attention(q, k, val, key_bias))                      # (B, N, D)
        out = instance_norm(pointwise(self.out, out))                          # (B, N, C)
        return F.gelu(pointwise(self.project, out + v))


def pointwise(conv, x):
    """A 1x1 Conv1d applied to tokens (B, N, C_in) -> (B, N, C_out), as a matrix product."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def instance_norm(x, eps=1e-5):
    """InstanceNorm1d without affine over the positions of tokens (B, N, C): a layer norm over N
    of the (B, C, N) view, the same statistics in one fused kernel (faster than var_mean here)."""
    return F.layer_norm(x.transpose(1, 2), x.shape[1:2], eps=eps).transpose(1, 2)


class Gate(nn.Module):
    """tanh(W_b · ReLU(W_a · x)), the released code's form of Eq. (3)'s FFN (no biases)."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return torch.tanh(self.fc2(F.relu(self.fc1(x))))


class VisionQueryFusion(nn.Module):
    """Vision-query fusion of stage i, Eq. (2)-(4), on either side of Swin's patch merging:

        forward:  M̂_i   = A1(V_i, L_i)             -> the decoder (after norm_i)
                  M_i   = V_i + gate1(M̂_i) ⊙ M̂_i
        (Swin)    D_i   = PatchMerging(M_i)
        merged:   F̂     = A2(D_i, L_i)
                  F_V^i = D_i + gate2(F̂) ⊙ F̂      -> vision stage i+1 and language stage i+1

    Stage 4 has no merging, so only A1 (its gate would be dead: the released code computes M_4
    and never uses it)."""

    def __init__(self, dim, text_dim, inner, merged):
        super().__init__()
        self.attn1 = PixelWordAttention(dim, text_dim, inner)
        if merged:
            self.gate1 = Gate(dim)
            self.attn2 = PixelWordAttention(2 * dim, text_dim, 2 * dim)
            self.gate2 = Gate(2 * dim)

    def forward(self, V, L, key_bias):
        """V (B, N, C) -> M̂, M (B, N, C); M is None at stage 4."""
        M_hat = self.attn1(V, L, key_bias)
        if not hasattr(self, "gate1"):                  # stage 4: nothing is merged after it
            return M_hat, None
        return M_hat, V + self.gate1(M_hat) * M_hat

    def merged(self, D, L, key_bias):
        """D (B, N/4, 2C), the merged M -> F_V (B, N/4, 2C)."""
        F_hat = self.attn2(D, L, key_bias)
        return D + self.gate2(F_hat) * F_hat


# ----------------------------------------------------------------------------------------------
# Feature-based alignment, Sec. III-C, Eq. (5)-(6)
# ----------------------------------------------------------------------------------------------
class FeatureAlignment(nn.Module):
    """Eq. (5)-(6): align map_i = <normalize(z_V), normalize(z_L)> / τ_i with z_V = Linear(V_i) per
    position and z_L = Linear(L_i[:, 0]), the [CLS] hidden state of stage i (no pooler, no tanh)."""

    def __init__(self, vision_dim, text_dim, dim, learnable_tau):
        super().__init__()
        self.vision_proj = nn.Linear(vision_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.tau = nn.Parameter(torch.ones(()), requires_grad=learnable_tau)

    def forward(self, V, L, H, W):
        """V (B, H*W, C), L (B, T, hidden) -> (B, 1, H, W) logits."""
        z_v = F.normalize(self.vision_proj(V), dim=-1)           # (B, HW, d)
        z_l = F.normalize(self.text_proj(L[:, 0]), dim=-1)       # (B, d)
        sim = torch.einsum("bnd,bd->bn", z_v, z_l) / self.tau
        return sim.view(V.shape[0], 1, H, W)


class AuxiliaryMaskHead(nn.Module):
    """Table III (e): a 1x1 mask predictor on V_i in place of the alignment of stage i."""

    def __init__(self, vision_dim):
        super().__init__()
        self.proj = nn.Linear(vision_dim, 1)

    def forward(self, V, L, H, W):
        return self.proj(V).transpose(1, 2).reshape(V.shape[0], 1, H, W)


# ----------------------------------------------------------------------------------------------
# Decoder, Sec. III-D
# ----------------------------------------------------------------------------------------------
# Winograd's F(4x4, 3x3) (Lavin & Gray 2016): each 4x4 block of outputs from the 6x6 input tile
# around it, as Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A; the ⊙ summed over input channels is 36 matrix products.
_B_T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[6, 0, 0], [-4, -4, -4], [-4, 4, -4], [1, 2, 4], [1, -2, 4], [0, 0, 24]]     # x 1/24
_A_T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
WINOGRAD = tuple(torch.kron(m, m) for m in (                 # (36, 36), (36, 9), (16, 36)
    torch.tensor(_B_T, dtype=torch.float32), torch.tensor(_G, dtype=torch.float32) / 24,
    torch.tensor(_A_T, dtype=torch.float32)))


def conv3x3(x, weight):
    """F.conv2d(x, weight, padding=1), x (B, C, H, W), weight (K, C, 3, 3) -> (B, K, H, W): the
    decoder's convolutions, half of CrossVLT-B's multiply-adds. On a CPU in fp32, for maps of
    56 x 56 and more (at 480 px the 120 and 60 px ones), as Winograd's F(4x4, 3x3): the same sums
    regrouped, 2.25 multiplies an output instead of 9; measured 1.2-1.5x faster than PyTorch's
    convolution there, forward and backward, break-even at 48 px and slower below (README
    "Benchmarks"). In fp32 it rounds within ~1e-5 relative of direct summation; in bf16 it was
    ~10x further off than a direct bf16 convolution, so bf16 and other devices take F.conv2d, as
    does torch.compile: the loop over the images would pin a batch size marked dynamic."""
    B, C, H, W = x.shape
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32 \
            or torch.is_autocast_enabled("cpu") or min(H, W) < 56 or B == 0:
        return F.conv2d(x, weight, padding=1)
    transform_in, transform_weight, transform_out = WINOGRAD
    K, h, w = weight.shape[0], round_up(H, 4) // 4, round_up(W, 4) // 4     # h x w tiles of 4x4
    U = (transform_weight @ weight.reshape(K * C, 9).T).view(36, K, C)       # G g Gᵀ
    x = F.pad(x, (0, 4 * w - W, 0, 4 * h - H)) if (H % 4 or W % 4) else x   # (F.pad would copy)
    Y = []
    for image in x.split(1):          # one image at a time: measured faster than the whole batch
        V = F.conv2d(image.reshape(C, 1, 4 * h, 4 * w), transform_in.view(36, 1, 6, 6), stride=4,
                     padding=1)                                             # Bᵀ d B (C, 36, h, w)
        M = U @ V.view(C, 36, h * w).transpose(0, 1)                # (36, C, tiles) -> (36, K, tiles)
        Y.append((transform_out @ M.view(36, -1)).view(4, 4, K, h, w).permute(2, 3, 0, 4, 1))   # Aᵀ M A
    return torch.stack(Y).reshape(B, K, 4 * h, 4 * w)[..., :H, :W]    # from (B, K, h, 4, w, 4)


class DecoderBlock(nn.Module):
    """[Conv3x3 (no bias) -> BatchNorm -> ReLU] x 2. The nn.Conv2d modules hold the weights under
    the released checkpoint's names; conv3x3 applies them."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, dim, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x):
        x = F.relu(self.bn1(conv3x3(x, self.conv1.weight)))
        return F.relu(self.bn2(conv3x3(x, self.conv2.weight)))


class Decoder(nn.Module):
    """Sec. III-D. Coarse to fine: x = block(up(x) ⊕ skip) for skips M̂_3, M̂_2, M̂_1 (after
    norm_i), starting from M̂_4; then a 1x1 convolution to one mask logit per pixel (at stage-1
    resolution)."""

    def __init__(self, widths, dim):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths)
        c1, c2, c3, c4 = widths
        self.blocks = nn.ModuleList([DecoderBlock(c4 + c3, dim), DecoderBlock(dim + c2, dim),
                                     DecoderBlock(dim + c1, dim)])
        self.head = nn.Conv2d(dim, 1, 1)

    def forward(self, features):
        """features: [(M̂_i (B, H_i*W_i, C_i), H_i, W_i)] for i = 1..4 -> (B, 1, H_1, W_1)."""
        maps = [norm(x).transpose(1, 2).reshape(x.shape[0], -1, H, W)
                for norm, (x, H, W) in zip(self.norms, features)]
        x = maps[3]
        for block, skip in zip(self.blocks, (maps[2], maps[1], maps[0])):
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, skip.shape[-2:], mode="bilinear", align_corners=True)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


# ----------------------------------------------------------------------------------------------
# CrossVLT, Fig. 2
# ----------------------------------------------------------------------------------------------
class CrossVLTOutput(NamedTuple):
    """mask_logits (B, 1, H, W) at the input size; align_logits [4 x (B, 1, H_i, W_i) or None]."""
    mask_logits: torch.Tensor
    align_logits: list


class CrossVLT(nn.Module):
    """Fig. 2: Swin + stage-divided BERT with cross-aware early fusion and feature-based alignment.

    model(images (B, 3, H, W), input_ids (B, T), attention_mask (B, T)) -> CrossVLTOutput."""

    def __init__(self, config: CrossVLTConfig):
        super().__init__()
        self.config = c = config.validate()
        self.swin = SwinTransformer(c.swin)
        widths, text_dim = [c.swin.embed_dim * 2 ** i for i in range(4)], c.bert.hidden_size   # C_i
        self.text = BertModel(c.bert, num_layers=c.lang_split[0])          # language stage 1
        self.text.embeddings.requires_grad_(not c.freeze_text_embeddings)
        bi = c.fusion_direction == "bi"
        self.lang_stages = nn.ModuleDict({
            str(i): LanguageStage(c.bert, c.lang_split[i - 1],
                                  widths[i - 1] if bi and i in c.fusion_stages else None)
            for i in (2, 3, 4)})
        # A1's inner width is C_i, except at stage 1 where the released code gives it 2·C_1 (256
        # for Swin-B, four heads of 64 instead of two); the paper does not say why, the
        # checkpoints need it.
        self.fusion = nn.ModuleDict({
            str(i): VisionQueryFusion(widths[i - 1], text_dim, 2 * widths[0] if i == 1 else widths[i - 1],
                                      merged=i < 4)
            for i in c.fusion_stages})
        self.align = nn.ModuleDict()
        for i in (1, 2, 3, 4):
            if c.intermediate_loss == "seg" and i < 4:
                self.align[str(i)] = AuxiliaryMaskHead(widths[i - 1])
            elif i in c.align_stages:
                self.align[str(i)] = FeatureAlignment(widths[i - 1], text_dim, c.align_dim, c.learnable_tau)
        self.decoder = Decoder(widths, c.decoder_dim)
        self._init_new_parts()

    def _init_new_parts(self):
        """What the released code ends up with before Swin/BERT are loaded: trunc-normal Linears and
        kaiming 1x1 convolutions on the vision side, N(0, 0.02) language stages, defaults elsewhere."""
        self.lang_stages.apply(_init_bert)
        for m in self.fusion.modules():
            if isinstance(m, nn.Linear):
                _init_swin(m)
            elif isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in")
                nn.init.zeros_(m.bias)
        # gate_init="zero": closed gates (M_i = V_i at the start), set after the Linears' init above, which would
        # overwrite them. Only W_b is zeroed: with W_a zero too (the module code) neither would get a gradient.
        for m in self.fusion.modules():
            if isinstance(m, Gate) and self.config.gate_init == "zero":
                nn.init.zeros_(m.fc2.weight)
        for i, m in self.align.items():
            if isinstance(m, FeatureAlignment):
                _init_swin(m.vision_proj)
                # Stage 1's [CLS] projection sits inside the released code's BERT wrapper, which
                # its init pass does not visit: it keeps PyTorch's default Linear init.
                if i != "1":
                    _init_bert(m.text_proj)

    def compile(self, dynamic=False, **options):
        """torch.compile in place (the state dict keeps its names). One graph per image size:
        torch 2.13's inductor fails on symbolic image sizes (a stride comparison it cannot
        decide); a batch size that varies call by call is one more graph with `any_batch`."""
        # Dynamo warns that it traces through relative_position_index's and shifted_window_mask's
        # lru_cache: they are pure functions of sizes, so tracing them is right.
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
        super().compile(dynamic=dynamic, **options)
        return self

    def checkpoint_activations(self, on=True):
        """Recompute the Swin blocks' and language stages 2-4's activations in the backward."""
        for m in self.modules():
            if isinstance(m, (SwinStage, LanguageStage)):
                m.checkpointing = on
        return self

    def forward(self, images, input_ids, attention_mask):
        H, W = images.shape[-2:]
        key_bias = key_padding_bias(attention_mask)               # (B, 1, 1, T)
        L = self.text(input_ids, attention_mask)                  # L_1 (B, T, hidden)
        x, h, w = self.swin.patch_embed(images)                   # (B, h*w, C_1)
        features, align_logits = [], []
        for i, stage in enumerate(self.swin.stages, start=1):
            if i > 1:
                L = self.lang_stages[str(i)](L, key_bias, x)      # L_i from L_{i-1} and F_V^{i-1}
            V = stage(x, h, w)                                    # V_i (B, h*w, C_i)
            align = self.align[str(i)] if str(i) in self.align else None
            align_logits.append(align(V, L, h, w) if align is not None else None)
            fusion = self.fusion[str(i)] if str(i) in self.fusion else None
            M_hat, M = fusion(V, L, key_bias) if fusion is not None else (V, V)   # no fusion: V_i on
            features.append((M_hat, h, w))
            if stage.downsample is not None:
                x, h, w = stage.downsample(M, h, w)                # D_i (B, h/2*w/2, 2C_i)
                x = fusion.merged(x, L, key_bias) if fusion is not None else x    # F_V^i
        logits = self.decoder(features)                           # (B, 1, H_1, W_1)
        mask_logits = F.interpolate(logits, (H, W), mode="bilinear", align_corners=True)
        return CrossVLTOutput(mask_logits, align_logits)

    def loss(self, output, target):
        c = self.config
        return crossvlt_loss(output, target, c.class_weights, c.seg_loss_scale, c.align_loss_weight)

    # --- weights -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, swin, bert, **overrides):
        """Training init: Swin from `swin`, BERT embeddings + layers 1..n_1 from `bert` (and with
        bert_init="full" layers n_1+1.. into stages 2-4 where shapes allow); the rest as the
        released code initialises it. Sizes come from the files; overrides are config fields."""
        swin_sd, swin_config, _ = convert_checkpoint(swin, expect="swin")
        bert_sd, bert_config, _ = convert_checkpoint(bert, expect="bert")
        if "drop_path" in overrides:
            swin_config = dataclasses.replace(swin_config, drop_path=overrides.pop("drop_path"))
        config = CrossVLTConfig.base(swin=swin_config, bert=bert_config, **overrides).validate()
        n1, full = config.lang_split[0], config.bert_init == "full"
        if bert_config.num_layers < (needed := sum(config.lang_split) if full else n1):
            raise CheckpointError(f"{bert} has {bert_config.num_layers} layers; lang_split {config.lang_split} needs "
                                  f"{needed}" + (" with bert_init='full'" if full else ""))
        model = cls(config)
        load_weights(model.swin, swin_sd, swin)
        layer = re.compile(r"layers\.(\d+)\.(.*)")
        stage1 = {k: v for k, v in bert_sd.items()
                  if not (m := layer.fullmatch(k)) or int(m.group(1)) < n1}
        load_weights(model.text, stage1, bert)
        if full:
            model._fill_language_stages(bert_sd, n1)
        return model

    def _fill_language_stages(self, bert_sd, first):
        """bert_init="full": BERT layer first, first+1, ... into the layers of stages 2-4, each
        tensor whose shape matches; the fusion layers' key/value stay random."""
        k = first
        for stage in self.lang_stages.values():
            for j, layer in enumerate(stage.layers):
                for name, p in layer.state_dict().items():
                    src = bert_sd.get(f"layers.{k}.{name}")
                    cross_kv = j == 0 and stage.cross and name.startswith(("attention.key", "attention.value"))
                    if src is not None and src.shape == p.shape and not cross_kv:
                        p.copy_(src)
                k += 1

    def save(self, path):
        save_checkpoint(path, self.state_dict(), "crossvlt", self.config.to_dict())

    @classmethod
    def load(cls, path, map_location="cpu"):
        """Our .safetensors (config in the metadata). A released .pth must be converted first."""
        sd, config, _ = convert_checkpoint(path, expect="crossvlt", converted_only=True)
        with torch.device("meta"):                                # no random init to overwrite
            model = cls(config)
        return load_weights(model, sd, path, assign=True).to(map_location)


def any_batch(*inputs):
    """Model inputs whose batch size varies call by call (evaluation: the expressions of B refs),
    marked so that a compiled model makes one graph for every batch size above 1 instead of one
    per size. A model that is not compiled is not affected."""
    for x in inputs:
        if x.shape[0] > 1:
            torch._dynamo.mark_dynamic(x, 0)
    return inputs


# ----------------------------------------------------------------------------------------------
# Loss, Eq. (7)-(9)
# ----------------------------------------------------------------------------------------------
def crossvlt_loss(output, target, class_weights=(0.9, 1.1), seg_scale=2.0, align_weight=1.0):
    """Eq. (7)-(9): seg_scale · weighted BCE(mask logit, target)
    + λ · Σ_i BCE(align map_i upsampled, target).

    The weighted BCE is Σ w·ℓ / Σ w over every pixel of the batch (w = class_weights[target]),
    which equals the released code's 2-class weighted cross-entropy. target (B, H, W) of 0/1.
    Returns (total, parts): parts = {"seg", "align", "align_1".."align_4"}, detached tensors."""
    target = target.float().view_as(output.mask_logits[:, 0])[:, None]
    size = target.shape[-2:]
    w0, w1 = class_weights
    weights = target * (w1 - w0) + w0
    bce = F.binary_cross_entropy_with_logits(output.mask_logits.float(), target, reduction="none")
    seg = (weights * bce).sum() / weights.sum()
    total, parts = seg_scale * seg, {"seg": seg.detach()}
    align_total = torch.zeros((), device=seg.device)
    for i, logits in enumerate(output.align_logits, start=1):
        if logits is None:
            continue
        up = F.interpolate(logits.float(), size, mode="bilinear", align_corners=True)
        loss_i = F.binary_cross_entropy_with_logits(up, target)
        align_total = align_total + loss_i
        parts[f"align_{i}"] = loss_i.detach()
    total = total + align_weight * align_total
    parts["align"] = align_total.detach()
    return total, parts


# ----------------------------------------------------------------------------------------------
# Weights: the foreign layouts as prefix tables, one reader, one strict loader, one writer
# ----------------------------------------------------------------------------------------------
class CheckpointError(Exception):
    """A checkpoint that cannot be read, recognised or loaded; the message says what to do."""


KINDS = ("crossvlt", "swin", "bert")


def read_checkpoint(path):
    """path -> (flat {name: tensor}, safetensors metadata or {}). Reads .safetensors, HF model
    folders, and .pth/.bin with torch.load(weights_only=True) (argparse.Namespace allowed for
    the released train.py checkpoints); unwraps {'model': ...} and strips 'module.'."""
    path = str(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return read_checkpoint(os.path.join(path, name))
        raise CheckpointError(f"{path}: folder has neither model.safetensors nor pytorch_model.bin")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    import pickle
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:                                                  # zip format: read lazily
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:                             # legacy format (old hub .bin)
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        if isinstance(e, pickle.UnpicklingError):         # a global outside weights_only's allow-list
            raise CheckpointError(f"{path}: refused to unpickle (weights_only): {first}") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {first})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def checkpoint_kind(sd, metadata, source="checkpoint"):
    """Which layout a state dict is in: ours ('crossvlt'|'swin'|'bert' in the metadata) or
    'crossvlt-official', 'swin-microsoft', 'swin-timm', 'swin-hf', 'bert-hf'."""
    if metadata.get("crossvlt_kind") in KINDS:
        return metadata["crossvlt_kind"]
    keys = set(sd)
    if "swin.patch_embed.proj.weight" in keys:
        raise CheckpointError(f"{source}: crossvlt's own layout without its config (a train.py state.pt?); load the "
                              "run's last.safetensors or best.safetensors")
    if "backbone.0.patch_embed.proj.weight" in keys:
        return "crossvlt-official"
    if "patch_embed.proj.weight" in keys:
        merged_first = "layers.0.downsample.reduction.weight" not in keys
        return "swin-timm" if merged_first and "layers.1.downsample.reduction.weight" in keys \
            else "swin-microsoft"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "swin-hf"
    if any(k.endswith("embeddings.word_embeddings.weight") for k in keys):
        return "bert-hf"
    raise CheckpointError(f"{source}: unrecognised layout (first keys: {sorted(keys)[:3]}); expected "
                          "a Microsoft/timm/HF Swin, an HF BERT, a released CrossVLT or our own file")


# The foreign layouts, each a table: source prefix -> our prefix, to check by eye against the key
# lists. "{i}" (any letter) stands for a number carried over, as it is or shifted ("{i+1}": the
# released code counts stages from 0, our fusion and alignment modules from 1). A key takes the
# longest prefix it starts with; the rest of the key is kept.
BERT_LAYER = {"attention.self.": "attention.",                         # query, key, value
              "attention.output.dense.": "attention.output.", "attention.output.LayerNorm.": "attention.norm.",
              "intermediate.dense.": "ffn.fc1.", "output.dense.": "ffn.fc2.", "output.LayerNorm.": "ffn.norm."}


def bert_layer(source, ours, attention="attention."):
    """BERT_LAYER under a layer prefix on each side (the released fusion layer's attention is
    "crossattention.")."""
    return {source + s.replace("attention.", attention, 1): ours + d for s, d in BERT_LAYER.items()}


BERT_HF = {"embeddings.": "embeddings.", "embeddings.LayerNorm.": "embeddings.norm.",
           **bert_layer("encoder.layer.{i}.", "layers.{i}.")}

SWIN_MICROSOFT = {"patch_embed.": "patch_embed.", "layers.{i}.blocks.": "stages.{i}.blocks.",
                  "layers.{i}.downsample.": "stages.{i}.downsample."}
SWIN_TIMM = SWIN_MICROSOFT | {"layers.{i}.downsample.": "stages.{i-1}.downsample."}  # merges first
SWIN_HF = {  # after hf_qkv has stacked query, key and value
    "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
    "embeddings.norm.": "patch_embed.norm.",
    "encoder.layers.{i}.blocks.{j}.layernorm_before.": "stages.{i}.blocks.{j}.norm1.",
    "encoder.layers.{i}.blocks.{j}.attention.self.": "stages.{i}.blocks.{j}.attn.",
    "encoder.layers.{i}.blocks.{j}.attention.output.dense.": "stages.{i}.blocks.{j}.attn.proj.",
    "encoder.layers.{i}.blocks.{j}.layernorm_after.": "stages.{i}.blocks.{j}.norm2.",
    "encoder.layers.{i}.blocks.{j}.intermediate.dense.": "stages.{i}.blocks.{j}.mlp.fc1.",
    "encoder.layers.{i}.blocks.{j}.output.dense.": "stages.{i}.blocks.{j}.mlp.fc2.",
    "encoder.layers.{i}.downsample.": "stages.{i}.downsample.",
}

PIXEL_WORD_ATTENTION = {"v_q.0.": "query.", "l_q.": "key.", "values_l.": "value.", "w_v.0.": "out.",
                        "project_mm.0.": "project."}
CROSSVLT_RELEASED = {
    "backbone.0.patch_embed.": "swin.patch_embed.",
    "backbone.{i}.layers.blocks.": "swin.stages.{i}.blocks.",
    "backbone.{i}.layers.downsample.": "swin.stages.{i}.downsample.",
    "backbone.{i}.layers.proj.": "align.{i+1}.vision_proj.",
    **{f"backbone.{{i}}.layers.{a}.{s}": f"fusion.{{i+1}}.{a}.{d}"
       for a in ("attn1", "attn2") for s, d in PIXEL_WORD_ATTENTION.items()},
    "backbone.{i}.layers.linear1.0.": "fusion.{i+1}.gate1.fc1.",
    "backbone.{i}.layers.linear1.2.": "fusion.{i+1}.gate1.fc2.",
    "backbone.{i}.layers.linear2.0.": "fusion.{i+1}.gate2.fc1.",
    "backbone.{i}.layers.linear2.2.": "fusion.{i+1}.gate2.fc2.",
    "backbone.{i}.norm{i}.": "decoder.norms.{i}.",
    "lang_stage1.embeddings.": "text.embeddings.",
    "lang_stage1.embeddings.LayerNorm.": "text.embeddings.norm.",
    **bert_layer("lang_stage1.encoder.layer.{j}.", "text.layers.{j}."),
    "lang_stage1.encoder.proj.": "align.1.text_proj.",
    **bert_layer("lang_stage{i}.", "lang_stages.{i}.layers.0.", "crossattention."),  # the fusion layer
    **bert_layer("lang_stage{i}.layer.{j}.", "lang_stages.{i}.layers.{j+1}."),
    "lang_stage{i}.proj.": "align.{i}.text_proj.",
    **{f"classifier.{part}_{k}.": f"decoder.blocks.{block}.{part}."
       for k, block in (("4", 0), ("3", 1), ("2", 2)) for part in ("conv1", "bn1", "conv2", "bn2")},
    "classifier.conv1_1.": "head.",                              # 2 classes, folded to one below
}

REBUILT = "a buffer the model rebuilds from its sizes"
SWIN_DROPS = {"*relative_position_index": REBUILT, "*attn_mask": REBUILT,
              **dict.fromkeys(("head.*", "norm.*", "layernorm.*", "pooler.*", "classifier.*"),
                              "the ImageNet classifier and its final norm: not part of the backbone")}
BERT_DROPS = {"embeddings.position_ids": REBUILT,
              **dict.fromkeys(("pooler.*", "cls.*"), "BERT's pre-training heads (pooler, masked-word and "
                                                     "next-sentence)")}
CROSSVLT_DROPS = {"*relative_position_index": REBUILT, "*attn_mask": REBUILT,
                  "*num_batches_tracked": "BatchNorm's step counter: unused with a fixed momentum",
                  "backbone.3.layers.linear1.*": "the stage-4 gate: computed, never used by the released model"}


def rename(sd, table, drops, source):
    """Our names for a foreign state dict by a prefix `table`. Keys matching a `drops` glob are
    left out with the reason; a key that neither renames nor drops is an error, so nothing in a
    source file is ignored silently. Returns (ours, {dropped key: why})."""
    rules = sorted(((len(src), _prefix_regex(src), dst) for src, dst in table.items()),
                   key=lambda rule: -rule[0])
    out, dropped = {}, {}
    for key, value in sd.items():
        why = next((why for glob, why in drops.items() if fnmatch.fnmatchcase(key, glob)), None)
        if why is not None:
            dropped[key] = why
            continue
        found = next(((m, dst) for _, regex, dst in rules if (m := regex.match(key))), None)
        if found is None:
            raise CheckpointError(f"{source}: unexpected key {key!r} for this layout")
        m, dst = found
        ours = re.sub(r"\{(\w)([+-]\d)?\}", lambda n: str(int(m[n[1]]) + int(n[2] or 0)), dst)
        out[ours + key[m.end():]] = value
    return out, dropped


def _prefix_regex(prefix):
    """"layers.{i}.blocks.{j}." -> the regex layers\\.(?P<i>\\d+)\\.blocks\\.(?P<j>\\d+)\\.; a
    letter used twice must stand for the same number."""
    parts, pattern = re.split(r"\{(\w)\}", prefix), ""
    for j, part in enumerate(parts):
        named = j % 2 and f"(?P<{part}>" in pattern
        pattern += (f"(?P={part})" if named else f"(?P<{part}>\\d+)") if j % 2 else re.escape(part)
    return re.compile(pattern)


def convert_swin(sd, kind, source):
    """Microsoft / timm / HF Swin -> ours (SwinTransformer keys)."""
    if kind == "swin-hf":
        sd = hf_qkv({k.removeprefix("swin."): v for k, v in sd.items()})
    table = {"swin-microsoft": SWIN_MICROSOFT, "swin-timm": SWIN_TIMM, "swin-hf": SWIN_HF}[kind]
    out, dropped = rename(sd, table, SWIN_DROPS, source)
    return out, infer_swin_config(out, source), dropped


def hf_qkv(sd):
    """HF Swin keeps query/key/value apart; ours (and Microsoft's) stacks them as qkv."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.*attention\.self\.)(query|key|value)\.(weight|bias)", k)
        if m is None:
            out[k] = v
        elif m[2] == "query":
            out[f"{m[1]}qkv.{m[3]}"] = torch.cat([sd[f"{m[1]}{n}.{m[3]}"] for n in ("query", "key", "value")])
    return out


def infer_swin_config(sd, source="checkpoint"):
    """SwinConfig from our-layout Swin keys: widths, depths, heads and window from the shapes."""
    try:
        proj = sd["patch_embed.proj.weight"]                      # (C, in_chans, p, p)
        depths = []
        while any(k.startswith(f"stages.{len(depths)}.blocks.") for k in sd):
            i = len(depths)
            depths.append(len({k.split(".")[3] for k in sd if k.startswith(f"stages.{i}.blocks.")}))
        tables = [sd[f"stages.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(len(depths))]
        fc1 = sd["stages.0.blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise CheckpointError(f"{source}: Swin tensor {e} is missing") from None
    window = (math.isqrt(tables[0].shape[0]) + 1) // 2
    return SwinConfig(embed_dim=proj.shape[0], depths=tuple(depths), num_heads=tuple(t.shape[1] for t in tables),
                      window_size=window, mlp_ratio=fc1.shape[0] / proj.shape[0], patch_size=proj.shape[-1],
                      in_chans=proj.shape[1])


def convert_bert(sd, source, config_json=None):
    """HF BERT (with or without 'bert.', LayerNorm gamma/beta or weight/bias) -> ours."""
    sd = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k.removeprefix("bert."))): v
          for k, v in sd.items()}
    out, dropped = rename(sd, BERT_HF, BERT_DROPS, source)
    return out, bert_config(out, config_json, source), dropped


def bert_config(sd, config_json=None, source="checkpoint"):
    """BertConfig from an HF config.json (dict) when there is one, else from the tensor shapes."""
    try:
        word = sd["embeddings.word_embeddings.weight"]
        inferred = BertConfig(
            vocab_size=word.shape[0], hidden_size=word.shape[1],
            num_layers=len({k.split(".")[1] for k in sd if k.startswith("layers.")}),
            num_heads=max(1, word.shape[1] // 64),
            intermediate_size=sd["layers.0.ffn.fc1.weight"].shape[0],
            max_position=sd["embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=sd["embeddings.token_type_embeddings.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"{source}: BERT tensor {e} is missing") from None
    if config_json:
        if config_json.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{source}: hidden_act {config_json['hidden_act']!r}; only 'gelu' is built")
        inferred = dataclasses.replace(
            inferred, num_heads=config_json.get("num_attention_heads", inferred.num_heads),
            dropout=config_json.get("hidden_dropout_prob", inferred.dropout),
            layer_norm_eps=config_json.get("layer_norm_eps", inferred.layer_norm_eps))
    heads = inferred.num_heads
    if not isinstance(heads, int) or heads < 1 or inferred.hidden_size % heads:
        raise CheckpointError(f"{source}: {heads!r} attention heads do not divide the hidden size "
                              f"{inferred.hidden_size}; check num_attention_heads in config.json")
    return inferred


def convert_official_crossvlt(sd, source):
    """The authors' released checkpoint -> ours: renames, τ split per stage, the 2-class head
    folded to one logit (w1 - w0, b1 - b0), and the dead stage-4 gate dropped."""
    sd = dict(sd)
    temp = sd.pop("temp", None)                                   # τ_1..τ_4, one per stage
    out, dropped = rename(sd, CROSSVLT_RELEASED, CROSSVLT_DROPS, source)
    if "head.weight" not in out:
        raise CheckpointError(f"{source}: a released CrossVLT checkpoint without its classifier: an incomplete file?")
    for i in range(1, 5):
        if f"align.{i}.vision_proj.weight" in out:
            out[f"align.{i}.tau"] = (temp[i - 1] if temp is not None else torch.ones(())).clone()
    w, b = out.pop("head.weight"), out.pop("head.bias")
    out["decoder.head.weight"], out["decoder.head.bias"] = w[1:2] - w[0:1], b[1:2] - b[0:1]
    for k in [k for k in out if k.endswith("running_var")]:      # the count is not needed: 0
        out[k.replace("running_var", "num_batches_tracked")] = torch.zeros((), dtype=torch.long)
    return out, infer_crossvlt_config(out, source), dropped


def infer_crossvlt_config(sd, source="checkpoint"):
    """CrossVLTConfig (code defaults) with the sizes found in an our-layout CrossVLT state dict."""
    swin = infer_swin_config({k[5:]: v for k, v in sd.items() if k.startswith("swin.")}, source)
    text = {k[5:]: v for k, v in sd.items() if k.startswith("text.")}
    split = [len({k.split(".")[1] for k in text if k.startswith("layers.")})]
    for j in (2, 3, 4):
        split.append(len({k.split(".")[3] for k in sd if k.startswith(f"lang_stages.{j}.layers.")}))
    bert = dataclasses.replace(bert_config(text, None, source), num_layers=sum(split))
    try:
        dims = dict(align_dim=sd["align.1.vision_proj.weight"].shape[0],
                    decoder_dim=sd["decoder.blocks.0.conv1.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"{source}: CrossVLT tensor {e} is missing") from None
    return CrossVLTConfig(swin=swin, bert=bert, lang_split=tuple(split), **dims)


def convert_checkpoint(path, expect=None, converted_only=False):
    """Any supported file -> (our state dict, config, dropped source keys). `expect` is 'swin',
    'bert' or 'crossvlt': a file of another kind is an error that says what it is."""
    sd, metadata = read_checkpoint(path)
    kind = checkpoint_kind(sd, metadata, path)
    family = kind.split("-")[0]
    if expect and family != expect:
        raise CheckpointError(f"{path} is a {family} checkpoint, not {expect}")
    if converted_only and kind not in KINDS:
        raise CheckpointError(f"{path} is a released CrossVLT checkpoint; convert it first: "
                              f"python weights/convert.py {path} {os.path.splitext(path)[0]}.safetensors")
    return convert_state_dict(sd, kind, metadata, path)


def convert_state_dict(sd, kind, metadata, source):
    """A state dict of a known kind (checkpoint_kind) -> (ours, config, dropped source keys)."""
    if kind in KINDS:
        try:
            raw = json.loads(metadata["config"])
            config = CrossVLTConfig.from_dict(raw).validate() if kind == "crossvlt" else \
                _dataclass_from_dict({"swin": SwinConfig, "bert": BertConfig}[kind], raw)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: config in the metadata is unreadable ({e})") from None
        return sd, config, {}
    if kind == "crossvlt-official":
        return convert_official_crossvlt(sd, source)
    if kind.startswith("swin"):
        return convert_swin(sd, kind, source)
    config = Path(source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))) / "config.json"
    try:
        config_json = json.loads(config.read_text()) if config.exists() else {}
    except ValueError as e:
        raise CheckpointError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(config_json, dict):
        raise CheckpointError(f"{config}: expected a JSON object of BERT settings")
    return convert_bert(sd, source, config_json)


def load_weights(module, sd, source, assign=False):
    """Strict load: nothing is left silently at its random init. A mismatch raises CheckpointError
    naming every missing, unexpected and mis-shaped key. assign=True adopts the tensors (for a
    model built on the meta device). Returns the module."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def some(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        problems = [f"{len(keys)} {what}: {some(keys)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("of another shape (file vs model)", wrong))
                    if keys]
        raise CheckpointError(f"{source} does not fit this {type(module).__name__} ({'; '.join(problems)}); "
                              "was it made for another config?")
    module.load_state_dict(sd, assign=assign)
    return module


def save_checkpoint(path, sd, kind, config_dict):
    """Safetensors file: tensors + {"crossvlt_kind", "config"} metadata, written atomically."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    metadata = {"crossvlt_kind": kind, "config": json.dumps(config_dict)}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_atomic(path, write):
    """write(tmp) to a temporary file beside `path`, flush it to disk, then rename it onto `path`.
    A reader (or a run resumed after a crash or power loss) sees the old file or the whole new
    one, never a half-written or empty one. A failed write removes its temporary file; one left by
    a killed process is overwritten by the next write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")          # one name: a killed write's leftover is reused
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)        # make the rename itself durable
    try:
        os.fsync(directory)
    except OSError:                                       # some network filesystems refuse it
        pass
    finally:
        os.close(directory)


def write_text(path, text):
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
