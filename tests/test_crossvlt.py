"""crossvlt.py and weights/convert.py: parity with the released code, shapes, attention against
brute force, padding invariance, gradients, loss, checkpoint conversion and round trips."""
import argparse
import dataclasses
import functools
import json
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import crossvlt
from crossvlt import CheckpointError, CrossVLT, CrossVLTConfig
from conftest import official_weights, raises_naming, reference_file, run_convert
from weights import convert as convert_cli


def tiny_inputs(B=2, size=64, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, size, size, generator=g)
    ids = torch.randint(1, 1000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    ids[0, 5:] = 0
    return images, ids, mask


# ----------------------------------------------------------------------------------------------
# Parity with the released model (depths [2,2,2,2], seed-0 weights)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(official_small):
    dst = run_convert(official_small["crossvlt"], official_small["dir"] / "crossvlt_small.safetensors")
    return CrossVLT.load(dst).eval()


def capture(model):
    """Forward hooks recording V_i, L_i, M̂_i, F_V^i, z_L of stage i (`Z{i}`: align_i.text_proj of
    L_i[:, 0], before normalising) and the stage output the decoder reads (`N{i}`: norm_i(M̂_i))."""
    seen = {}
    for i, stage in enumerate(model.swin.stages, start=1):
        stage.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"V{i}", out))
        model.fusion[str(i)].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"M{i}", out[0]))
        if i > 1:                                       # F_V^{i-1}: what vision stage i reads
            stage.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(f"F{i - 1}", args[0]))
        model.align[str(i)].text_proj.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(f"Z{i}", out))
        model.decoder.norms[i - 1].register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(f"N{i}", out))
    model.text.register_forward_hook(lambda m, a, out: seen.__setitem__("L1", out))
    for j, stage in model.lang_stages.items():
        stage.register_forward_hook(lambda m, a, out, j=j: seen.__setitem__(f"L{j}", out))
    return seen


REFERENCE_DIGESTS = {  # tests/reference/README.md; BERT's over the weight/bias names
    "crossvlt_sd": "8a827b44e1622a4ec55944e6e7e46a43bbfc3dfccc5feb5a8eb4e8e82de6e46d",
    "swin_sd": "628e92033ce80c9a46fb7b4eab1b2d5f88205e913594e31ae3403086264ce33b",
    "bert_sd": "98103aa6ad63108545db57c89301a314b92c70e1c0748d7b50d67c57c2b9ba0f",
}


def test_generated_weights_are_the_reference_weights(official_small):
    """tests/reference/official_weights.py gives, bit for bit, the weights the released code's
    outputs in parity_small.safetensors were computed from."""
    with safe_open(reference_file("parity_small.safetensors"), "pt") as f:
        assert f.metadata()["weights_digest"] == REFERENCE_DIGESTS["crossvlt_sd"]
    for name, expected in REFERENCE_DIGESTS.items():
        assert official_weights.digest(official_small[name]) == expected, name


def test_parity_with_released_code(converted):
    """The released code's outputs (tests/reference/parity_small.safetensors) on its seed-0 weights,
    converted by weights/convert.py. Per stage first, so a failure names where it starts: z_L and
    the stage output the decoder reads (a mean over positions) within 5e-4, the alignment map
    within 1e-4; then the mask logit within 1e-3. Measured: at most 3.2e-5 (z_L), 7.7e-5 (stage
    output), 1.6e-5 (maps), 8.1e-5 (mask): float32 rounding, as each side is about as far from
    our float64 forward pass. Taking V_i for M̂_i, say, moves the stage output by more than 1."""
    ref = load_file(reference_file("parity_small.safetensors"))
    images = torch.randn(2, 3, 480, 480, generator=torch.Generator().manual_seed(1))
    seen = capture(converted)
    with torch.no_grad():
        out = converted(images, ref["input_ids"], ref["attention_mask"])
    for i in range(1, 5):
        diff = (seen[f"Z{i}"] - ref[f"lang{i}_cls_proj"]).abs().max()
        assert diff < 5e-4, f"stage {i}: language [CLS] projection z_L differs by {diff:.2e}"
        diff = (seen[f"N{i}"].mean(1) - ref[f"stage{i}_out_channel_mean"]).abs().max()
        assert diff < 5e-4, f"stage {i}: norm_{i}(M̂_{i}) (mean over positions) differs by {diff:.2e}"
        diff = (out.align_logits[i - 1] - ref[f"sim_{i}"]).abs().max()
        assert diff < 1e-4, f"stage {i}: alignment map differs by {diff:.2e}"
    mask_logit = F.interpolate(ref["mask_logit_120"], size=480, mode="bilinear", align_corners=True)
    diff = (out.mask_logits - mask_logit).abs().max()
    assert diff < 1e-3, f"mask logit differs by {diff:.2e}"
    # shapes of every stage at 480x480 (Swin-B widths, BERT-base hidden)
    B, T = 2, 21
    for i, (C, S) in enumerate(zip((128, 256, 512, 1024), (120, 60, 30, 15)), start=1):
        assert seen[f"V{i}"].shape == (B, S * S, C)
        assert seen[f"M{i}"].shape == (B, S * S, C)
        assert seen[f"L{i}"].shape == (B, T, 768)
        assert out.align_logits[i - 1].shape == (B, 1, S, S)
        if i < 4:
            assert seen[f"F{i}"].shape == (B, (S // 2) ** 2, 2 * C)
    assert "F4" not in seen
    assert out.mask_logits.shape == (B, 1, 480, 480)


def test_odd_input_size_pads_right_and_bottom_and_upsamples_back(converted):
    """A 470x390 image: patch embedding and merging pad on the right and bottom (ceil sizes at
    every stage), the merging gathers each 2x2 neighbourhood in Swin's order, and the mask logit
    is the stage-1 decoder output upsampled back to the input size."""
    seen, merged, decoded = capture(converted), [], []
    for stage in converted.swin.stages[:3]:
        stage.downsample.register_forward_hook(lambda m, args, out: merged.append((args, out)))
    converted.decoder.register_forward_hook(lambda m, args, out: decoded.append(out))
    images = torch.randn(1, 3, 470, 390)
    ids = torch.tensor([[101, 1996, 2158, 102] + [0] * 17])
    with torch.no_grad():
        out = converted(images, ids, (ids > 0).long())
        embedded, _, _ = converted.swin.patch_embed(images)
        padded = F.pad(images, (0, 2, 0, 2))                               # 470x390 -> 472x392
        by_hand = converted.swin.patch_embed.norm(converted.swin.patch_embed.proj(padded).flatten(2).mT)
    torch.testing.assert_close(embedded, by_hand)
    sizes = [(118, 98), (59, 49), (30, 25), (15, 13)]
    for i, (h, w) in enumerate(sizes, start=1):
        assert seen[f"V{i}"].shape == (1, h * w, 128 * 2 ** (i - 1))
        assert out.align_logits[i - 1].shape == (1, 1, h, w)
    (x, H, W), (y, H2, W2) = merged[1]                                     # 59x49 -> 30x25
    assert (H, W, H2, W2) == (59, 49, 30, 25)
    grid = F.pad(x.view(1, H, W, -1), (0, 0, 0, 1, 0, 1))[0]               # zero row and column
    m = converted.swin.stages[1].downsample
    for r, c in [(3, 5), (29, 24)]:                                        # inside; the corner
        block = torch.cat([grid[2 * r + dr, 2 * c + dc] for dc in (0, 1) for dr in (0, 1)])   # x0, x1, x2, x3
        torch.testing.assert_close(y[0, r * W2 + c], m.reduction(m.norm(block)))
    assert out.mask_logits.shape == (1, 1, 470, 390)
    torch.testing.assert_close(out.mask_logits, F.interpolate(decoded[0], (470, 390), mode="bilinear",
                                                              align_corners=True))


def test_without_fusion_the_vision_side_is_the_plain_swin_encoder():
    """CrossVLT drives Swin through the same stage API as SwinTransformer.forward: with no fusion
    stage, its V_1..V_4 are the plain encoder's features."""
    torch.manual_seed(0)
    model = CrossVLT(CrossVLTConfig.tiny(fusion_stages=())).eval()
    seen = {}
    for i, stage in enumerate(model.swin.stages, start=1):
        stage.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    images, ids, mask = tiny_inputs(size=80)
    with torch.no_grad():
        model(images, ids, mask)
        plain = model.swin(images)
    for i, feature in enumerate(plain, start=1):                            # (B, C_i, H_i, W_i)
        assert torch.equal(seen[i], feature.flatten(2).transpose(1, 2))


def test_from_swin_and_bert_files_matches_released_weights(official_small, converted):
    """Building from the derived Swin .pth and HF BERT (gamma/beta) gives the very tensors the
    released loaders copy; bert_init='full' fills stages 2-4 from layers 7-12 except the
    fusion layers' key/value."""
    model = CrossVLT.from_pretrained(swin=official_small["swin"], bert=official_small["bert"],
                                     bert_init="full")
    assert model.config.swin.depths == (2, 2, 2, 2)
    ref = converted.state_dict()
    for name, t in model.swin.state_dict().items():
        assert torch.equal(t, ref["swin." + name]), name
    for name, t in model.text.state_dict().items():
        assert torch.equal(t, ref["text." + name]), name
    bert = official_small["bert_sd"]
    stage2 = model.lang_stages["2"].layers
    assert torch.equal(stage2[0].attention.query.weight, bert["bert.encoder.layer.6.attention.self.query.weight"])
    assert torch.equal(stage2[0].ffn.norm.weight, bert["bert.encoder.layer.6.output.LayerNorm.weight"])
    assert torch.equal(stage2[1].attention.key.weight, bert["bert.encoder.layer.7.attention.self.key.weight"])
    assert torch.equal(model.lang_stages["4"].layers[1].ffn.fc2.bias, bert["bert.encoder.layer.11.output.dense.bias"])
    assert stage2[0].attention.key.weight.shape == (768, 256)          # cross key stays random
    code = CrossVLT.from_pretrained(swin=official_small["swin"], bert=official_small["bert"])
    assert not torch.equal(code.lang_stages["2"].layers[0].attention.query.weight,
                           stage2[0].attention.query.weight)
    too_deep = functools.partial(CrossVLT.from_pretrained, swin=official_small["swin"], bert=official_small["bert"],
                                 bert_init="full", lang_split=(6, 3, 2, 2))     # 13 layers of a 12-layer BERT
    raises_naming(CheckpointError, too_deep, official_small["bert"], "12 layers", "needs 13")


def test_parameter_count_matches_released_model():
    with torch.device("meta"):
        model = CrossVLT(CrossVLTConfig.base())
    total = sum(p.numel() for p in model.parameters())
    # released: 236,711,038 = ours + the dead stage-4 gate (2 x 1024^2) + the 2nd head class
    assert total == 236_711_038 - 2 * 1024 * 1024 - 513


# ----------------------------------------------------------------------------------------------
# Shifted-window attention against brute force
# ----------------------------------------------------------------------------------------------
def brute_force_block(block, x, H, W):
    """Global attention over the padded, rolled map; pairs in different windows excluded,
    pairs in different shift regions get -100, relative position bias within a window."""
    w, s = block.window, block.shift
    B, _, C = x.shape
    Hp, Wp = math.ceil(H / w) * w, math.ceil(W / w) * w
    y = F.pad(block.norm1(x).view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
    y = torch.roll(y, (-s, -s), (1, 2)).reshape(B, Hp * Wp, C)
    r, c = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    r, c = r.flatten(), c.flatten()
    window_id = (r // w) * (Wp // w) + c // w

    def band(i, n):
        return (i >= n - w).long() + (i >= n - s).long() if s else torch.zeros_like(i)

    region = band(r, Hp) * 3 + band(c, Wp)
    heads = block.attn.heads
    hd = C // heads
    q, k, v = block.attn.qkv(y).view(B, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
    scores = (q * hd ** -0.5) @ k.transpose(-1, -2)                      # (B, heads, P, P)
    dr = (r % w)[:, None] - (r % w)[None, :] + w - 1
    dc = (c % w)[:, None] - (c % w)[None, :] + w - 1
    scores = scores + block.attn.relative_position_bias_table[dr * (2 * w - 1) + dc].permute(2, 0, 1)
    scores = scores + torch.where(region[:, None] == region[None, :], 0.0, -100.0)
    scores = scores.masked_fill(window_id[:, None] != window_id[None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Hp, Wp, C)
    out = torch.roll(block.attn.proj(out), (s, s), (1, 2))[:, :H, :W].reshape(B, H * W, C)
    x = x + out
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("H,W,window,shift", [(6, 7, 4, 0), (6, 7, 4, 2), (15, 15, 12, 6), (15, 15, 12, 0)])
def test_window_attention_equals_brute_force(H, W, window, shift):
    torch.manual_seed(0)
    block = crossvlt.SwinBlock(32, 2, window, shift, 4.0, 0.0).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(std=1.0)
        x = torch.randn(2, H * W, 32)
        assert torch.allclose(block(x, H, W), brute_force_block(block, x, H, W), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Text padding, gradients, loss
# ----------------------------------------------------------------------------------------------
def test_padded_tokens_do_not_change_outputs():
    torch.manual_seed(0)
    model = CrossVLT(CrossVLTConfig.tiny()).eval()
    images, ids, mask = tiny_inputs()
    other = ids.clone()
    other[0, 5:] = torch.arange(400, 403)                   # garbage behind the mask
    with torch.no_grad():
        a, b = model(images, ids, mask), model(images, other, mask)
        bert_a, bert_b = model.text(ids, mask), model.text(other, mask)
    assert torch.allclose(bert_a[0, :5], bert_b[0, :5], atol=1e-5)
    assert torch.allclose(a.mask_logits, b.mask_logits, atol=1e-5)
    for x, y in zip(a.align_logits, b.align_logits):
        assert torch.allclose(x, y, atol=1e-5)
    assert not torch.allclose(bert_a[0, 5:], bert_b[0, 5:])           # the test can fail


ABLATIONS = [
    {},
    {"fusion_stages": (4,)},
    {"fusion_stages": (1, 3)},
    {"fusion_direction": "uni"},
    {"align_stages": (1, 3)},
    {"intermediate_loss": "seg"},
    {"lang_split": (2, 1, 1, 3)},
    {"learnable_tau": True},
    {"gate_init": "zero"},
]


@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_trainable_parameter_gets_a_gradient(options):
    torch.manual_seed(0)
    model = CrossVLT(CrossVLTConfig.tiny(**options)).train()
    images, ids, mask = tiny_inputs()
    target = (torch.rand(2, 64, 64) > 0.5).float()
    if options.get("gate_init") == "zero":    # W_b = 0 blocks W_a's gradient for one step only
        loss, _ = model.loss(model(images, ids, mask), target)
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.zero_grad()
    loss, parts = model.loss(model(images, ids, mask), target)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith("text.embeddings.") or n.endswith(".tau") for n in frozen)
    taus = [n for n, _ in model.named_parameters() if n.endswith(".tau")]
    assert taus and all((n in frozen) != options.get("learnable_tau", False) for n in taus)
    expected_maps = {i for i in (1, 2, 3, 4) if i in model.config.align_stages}
    if options.get("intermediate_loss") == "seg":
        expected_maps |= {1, 2, 3}
    assert {int(k.split("_")[1]) for k in parts if k.startswith("align_")} == expected_maps


def test_language_stage_structure_follows_options():
    uni = CrossVLT(CrossVLTConfig.tiny(fusion_direction="uni"))
    assert not any(s.cross for s in uni.lang_stages.values()) and len(uni.fusion) == 4
    last = CrossVLT(CrossVLTConfig.tiny(fusion_stages=(4,)))
    assert [s.cross for s in last.lang_stages.values()] == [False, False, True]
    assert list(last.fusion) == ["4"] and not hasattr(last.fusion["4"], "gate1")
    split = CrossVLT(CrossVLTConfig.tiny(lang_split=(2, 1, 1, 3)))
    assert len(split.text.layers) == 2 and len(split.lang_stages["4"].layers) == 3


def test_zero_gates_start_closed():
    """gate_init="zero": every gate's W_b is 0, so M_i = V_i and F_V^i = D_i at the start; W_a keeps its init."""
    model = CrossVLT(CrossVLTConfig.tiny(gate_init="zero"))
    gates = [m for m in model.fusion.modules() if isinstance(m, crossvlt.Gate)]
    assert len(gates) == 6 and all(not g.fc2.weight.any() and g.fc1.weight.abs().sum() > 0 for g in gates)
    fusion, (images, ids, mask) = model.fusion["2"], tiny_inputs()
    V, L, D = torch.randn(2, 16, 64), torch.randn(2, 8, 128), torch.randn(2, 4, 128)
    bias = crossvlt.key_padding_bias(mask)
    assert torch.equal(fusion(V, L, bias)[1], V) and torch.equal(fusion.merged(D, L, bias), D)
    assert all(g.fc2.weight.any() for g in CrossVLT(CrossVLTConfig.tiny()).modules() if isinstance(g, crossvlt.Gate))


def test_wide_and_tall_images_decode_at_their_size():
    """Stages of equal height and different widths (a 16 x 256 image) are upsampled too."""
    model = CrossVLT(CrossVLTConfig.tiny()).eval()
    _, ids, mask = tiny_inputs(B=1)
    for H, W in [(16, 256), (256, 16)]:
        with torch.no_grad():
            assert model(torch.randn(1, 3, H, W), ids, mask).mask_logits.shape == (1, 1, H, W)


def test_a_swin_of_other_than_four_stages_is_refused():
    swin = crossvlt.SwinConfig(embed_dim=32, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=8)
    raises_naming(ValueError, lambda: CrossVLT(CrossVLTConfig.tiny(swin=swin)), "swin.depths", "(1, 1, 1)")


def test_loss_equals_two_class_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    two = torch.randn(3, 2, 32, 32, generator=g)
    maps = [torch.randn(3, 1, s, s, generator=g) for s in (16, 8, 4, 2)]
    target = (torch.rand(3, 32, 32, generator=g) > 0.6).long()
    output = crossvlt.CrossVLTOutput(two[:, 1:] - two[:, :1], maps)
    total, parts = crossvlt.crossvlt_loss(output, target)
    ce = F.cross_entropy(two, target, weight=torch.tensor([0.9, 1.1]))
    aux = sum(F.binary_cross_entropy_with_logits(
        F.interpolate(m, (32, 32), mode="bilinear", align_corners=True), target[:, None].float()) for m in maps)
    assert abs(parts["seg"] - ce) < 1e-6
    assert abs(total - (2 * ce + aux)) < 1e-6


def test_bf16_autocast_follows_fp32():
    torch.manual_seed(0)
    model = CrossVLT(CrossVLTConfig.tiny()).eval()
    images, ids, mask = tiny_inputs()
    with torch.no_grad():
        ref = model(images, ids, mask).mask_logits
        with crossvlt.autocast("cpu", "bf16"):
            low = model(images, ids, mask).mask_logits.float()
    assert torch.isfinite(low).all()
    assert torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1] > 0.99


# ----------------------------------------------------------------------------------------------
# Checkpoints: our format, the converter on every layout, errors
# ----------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    config = CrossVLTConfig.tiny(fusion_stages=(2, 3, 4), lang_split=(2, 1, 1, 1))
    model = CrossVLT(config).eval()
    model.save(tmp_path / "m.safetensors")
    again = CrossVLT.load(tmp_path / "m.safetensors").eval()
    assert again.config == config
    images, ids, mask = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(model(images, ids, mask).mask_logits, again(images, ids, mask).mask_logits)
    other = CrossVLT(dataclasses.replace(config, decoder_dim=32))
    sd, _ = crossvlt.read_checkpoint(tmp_path / "m.safetensors")
    raises_naming(CheckpointError, lambda: crossvlt.load_weights(other, sd, "m.safetensors"),   # file, key, both sizes
                  "m.safetensors", "decoder.blocks.0.bn1.bias", "(64,)", "(32,)")
    raises_naming(CheckpointError, lambda: crossvlt.load_weights(CrossVLT(CrossVLTConfig.tiny()), sd, "m.safetensors"),
                  "missing", "fusion.1.attn1.query.weight")


def test_released_checkpoint_layouts_convert_alike(official_small, converted, tmp_path):
    """train.py style ({'model': 'module.'-prefixed, 'epoch', 'args': Namespace, 'best_oIoU'})
    converts to exactly what the bare test.py file gives; the head is folded."""
    sd = official_small["crossvlt_sd"]
    wrapped = {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 39,
               "args": argparse.Namespace(lr=3e-5, batch_size=6), "best_oIoU": 0.7}
    torch.save(wrapped, tmp_path / "train_style.pth")
    run_convert(tmp_path / "train_style.pth", tmp_path / "train_style.safetensors")
    ours, _ = crossvlt.read_checkpoint(tmp_path / "train_style.safetensors")
    ref = converted.state_dict()
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    w, b = sd["classifier.conv1_1.weight"], sd["classifier.conv1_1.bias"]
    assert torch.equal(ours["decoder.head.weight"], w[1:] - w[:1])
    assert torch.equal(ours["decoder.head.bias"], b[1:] - b[:1])
    assert torch.equal(ours["fusion.2.attn2.query.weight"], sd["backbone.1.layers.attn2.v_q.0.weight"])
    assert torch.equal(ours["fusion.3.gate2.fc2.weight"], sd["backbone.2.layers.linear2.2.weight"])
    assert torch.equal(ours["decoder.blocks.1.bn2.running_var"], sd["classifier.bn2_3.running_var"])
    assert torch.equal(ours["lang_stages.3.layers.1.ffn.norm.bias"], sd["lang_stage3.layer.0.output.LayerNorm.bias"])
    assert torch.equal(ours["lang_stages.4.layers.0.attention.key.weight"],
                       sd["lang_stage4.crossattention.self.key.weight"])
    assert torch.equal(ours["align.3.text_proj.weight"], sd["lang_stage3.proj.weight"])
    assert torch.equal(ours["align.1.text_proj.weight"], sd["lang_stage1.encoder.proj.weight"])
    assert torch.equal(ours["decoder.norms.3.weight"], sd["backbone.3.norm3.weight"])
    assert not any("gate1" in k for k in ours if k.startswith("fusion.4."))


def test_swin_layouts(official_small, tmp_path):
    """Microsoft .pth, timm (merging at the next stage's start) and HF (separate q/k/v) all give
    the same SwinTransformer; qkv rows land where they belong."""
    ms = official_small["swin_sd"]
    swin = crossvlt.SwinTransformer.from_pretrained(official_small["swin"])
    assert swin.config.depths == (2, 2, 2, 2) and swin.config.window_size == 12
    assert torch.equal(swin.stages[2].blocks[1].attn.qkv.weight, ms["layers.2.blocks.1.attn.qkv.weight"])
    assert torch.equal(swin.stages[0].downsample.reduction.weight, ms["layers.0.downsample.reduction.weight"])
    run_convert(official_small["swin"], tmp_path / "swin.safetensors")
    again = crossvlt.SwinTransformer.from_pretrained(tmp_path / "swin.safetensors")
    ref = swin.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in again.state_dict().items())

    timm = {}
    for k, v in ms.items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i + 1}.downsample")
        timm[k.replace("head.", "head.fc.")] = v
    hf = {}
    for k, v in ms.items():
        k = (k.replace("layers.", "swin.encoder.layers.").replace("norm1", "layernorm_before")
             .replace("norm2", "layernorm_after").replace("attn.proj", "attention.output.dense")
             .replace("attn.relative", "attention.self.relative").replace("mlp.fc1", "intermediate.dense")
             .replace("mlp.fc2", "output.dense")
             .replace("patch_embed.proj", "swin.embeddings.patch_embeddings.projection")
             .replace("patch_embed.norm", "swin.embeddings.norm"))
        if k.startswith("norm."):
            k = "swin.layernorm." + k[5:]
        if k.startswith("head."):
            k = "classifier." + k[5:]
        if "attn.qkv" in k:
            for name, part in zip(("query", "key", "value"), v.chunk(3)):
                hf[k.replace("attn.qkv", f"attention.self.{name}")] = part
        else:
            hf[k] = v
    for kind, sd in (("swin-timm", timm), ("swin-hf", hf)):
        assert crossvlt.checkpoint_kind(sd, {}) == kind
        out, config, _ = crossvlt.convert_swin(sd, kind, kind)
        assert config == swin.config
        assert out.keys() == ref.keys(), kind
        assert all(torch.equal(out[k], ref[k]) for k in ref), kind


def test_bert_layouts(official_small, tmp_path):
    """HF BERT folder (.bin, LayerNorm gamma/beta, 'bert.' prefix) and weight/bias names without
    the prefix land identically; gamma -> weight."""
    hub = official_small["bert_sd"]
    bert = crossvlt.BertModel.from_pretrained(official_small["bert"])
    assert len(bert.layers) == 12 and bert.config.hidden_size == 768
    assert torch.equal(bert.layers[3].attention.norm.weight,
                       hub["bert.encoder.layer.3.attention.output.LayerNorm.weight"])
    assert torch.equal(bert.embeddings.norm.bias, hub["bert.embeddings.LayerNorm.bias"])
    plain = {k.removeprefix("bert."): v for k, v in hub.items() if not k.startswith("cls.")}
    plain["embeddings.position_ids"] = torch.arange(512)[None]
    out, config, dropped = crossvlt.convert_bert(plain, "plain")
    ref = bert.state_dict()
    assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)
    assert "embeddings.position_ids" in dropped and "pooler.dense.weight" in dropped
    run_convert(official_small["bert"], tmp_path / "bert.safetensors")
    again = crossvlt.BertModel.from_pretrained(tmp_path / "bert.safetensors")
    assert all(torch.equal(t, ref[k]) for k, t in again.state_dict().items())


def test_bert_sizes_come_from_config_json(tmp_path):
    """Any BERT: a 384-wide 6-layer MiniLM-like model in an HF folder with model.safetensors."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    small = crossvlt.BertConfig(vocab_size=500, hidden_size=384, num_layers=6, num_heads=12,
                                intermediate_size=1536, max_position=64)
    model = crossvlt.BertModel(small).eval()
    names = {"attention.query": "attention.self.query", "attention.key": "attention.self.key",
             "attention.value": "attention.self.value", "attention.output": "attention.output.dense",
             "attention.norm": "attention.output.LayerNorm", "ffn.fc1": "intermediate.dense",
             "ffn.fc2": "output.dense", "ffn.norm": "output.LayerNorm", "embeddings.norm": "embeddings.LayerNorm"}
    hf = {}
    for k, v in model.state_dict().items():
        for ours, theirs in names.items():
            k = k.replace(ours, theirs)
        hf[k.replace("layers.", "encoder.layer.")] = v.clone()
    save_file(hf, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(
        {"hidden_size": 384, "num_attention_heads": 12, "num_hidden_layers": 6, "hidden_act": "gelu"}))
    loaded = crossvlt.BertModel.from_pretrained(tmp_path).eval()
    assert loaded.config.num_heads == 12                      # from config.json, not 384 // 64
    ids = torch.randint(1, 500, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(loaded(ids, mask), model(ids, mask), atol=1e-6)


def test_bad_checkpoints_give_one_line_errors(tmp_path, official_small):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    torch.save({"x": Evil()}, tmp_path / "evil_zip.pth")
    for name in ("evil.pth", "evil_zip.pth"):
        raises_naming(CheckpointError, lambda: crossvlt.read_checkpoint(tmp_path / name), tmp_path / name)
    assert not marker.exists()
    (tmp_path / "notes.txt").write_text("hello")
    raises_naming(CheckpointError, lambda: crossvlt.read_checkpoint(tmp_path / "notes.txt"), tmp_path / "notes.txt")
    raises_naming(CheckpointError, lambda: crossvlt.read_checkpoint(tmp_path / "missing.pth"), tmp_path / "missing.pth")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    raises_naming(CheckpointError, lambda: crossvlt.convert_checkpoint(tmp_path / "odd.pth"), tmp_path / "odd.pth",
                  "foo.weight")
    torch.save({"model": CrossVLT(CrossVLTConfig.tiny()).state_dict()}, tmp_path / "state.pt")   # train.py's
    raises_naming(CheckpointError, lambda: CrossVLT.load(tmp_path / "state.pt"), tmp_path / "state.pt",
                  "last.safetensors")
    raises_naming(CheckpointError, lambda: CrossVLT.load(official_small["crossvlt"]),          # and the command to run
                  official_small["crossvlt"], "weights/convert.py")
    raises_naming(CheckpointError, lambda: CrossVLT.load(official_small["swin"]),
                  official_small["swin"], "swin", "crossvlt")
    raises_naming(CheckpointError, lambda: crossvlt.SwinTransformer.from_pretrained(official_small["bert"]),
                  official_small["bert"], "bert", "swin")


def test_convert_cli_reports_errors_without_traceback(tmp_path, capsys, official_small):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as info:
        convert_cli.main([str(tmp_path / "notes.txt"), str(tmp_path / "out.safetensors")])
    assert str(tmp_path / "notes.txt") in str(info.value.code) and "\n" not in str(info.value.code)
    assert not (tmp_path / "out.safetensors").exists()
    save_file({"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}, tmp_path / "swin.safetensors")
    before = (tmp_path / "swin.safetensors").read_bytes()
    with pytest.raises(SystemExit) as info:                    # DST is SRC: refused, SRC untouched
        convert_cli.main([str(tmp_path / "swin.safetensors"), str(tmp_path / "swin.safetensors")])
    assert info.value.code == 2 and str(tmp_path / "swin.safetensors") in capsys.readouterr().err
    assert (tmp_path / "swin.safetensors").read_bytes() == before
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(SystemExit) as info:                    # DST cannot be written: one line naming it
        convert_cli.main([str(official_small["swin"]), str(tmp_path / "folder.safetensors")])
    assert "folder.safetensors" in str(info.value.code) and "\n" not in str(info.value.code)


def test_a_checkpoint_whose_config_cannot_build_a_model_is_refused(tmp_path):
    model = CrossVLT(CrossVLTConfig.tiny())
    config = model.config.to_dict() | {"image_size": 0}
    crossvlt.save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), "crossvlt", config)
    raises_naming(CheckpointError, lambda: CrossVLT.load(tmp_path / "m.safetensors"), tmp_path / "m.safetensors",
                  "image_size")


def test_convert_cli_names_each_dropped_group_and_why(official_small, tmp_path, capsys):
    run_convert(official_small["crossvlt"], tmp_path / "c.safetensors")
    lines = capsys.readouterr().out.splitlines()
    gate = [line for line in lines if "backbone.3.layers.linear1.{0,2}.weight" in line]
    assert len(gate) == 1 and "stage-4 gate" in gate[0]
    assert any("backbone.{0,1,2,3}.layers.blocks.{0,1}.attn.relative_position_index" in line for line in lines)
    run_convert(official_small["swin"], tmp_path / "s.safetensors")
    lines = capsys.readouterr().out.splitlines()
    assert any("head.{bias,weight}" in line and "classifier" in line for line in lines)


def test_write_atomic_flushes_before_the_rename_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    path.write_text("old")
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or replace(a, b))
    crossvlt.write_atomic(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and events[:2] == ["fsync", "replace"]

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        crossvlt.write_atomic(path, fails)
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["state.pt"]
    events.clear()                                     # checkpoints go through the same writer
    crossvlt.save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(2)}, "crossvlt", {})
    assert events[:2] == ["fsync", "replace"] and sorted(os.listdir(tmp_path)) == ["m.safetensors", "state.pt"]


def test_attention_paths_agree():
    """The fused kernel and the plain products (taken when the bias needs a gradient, and under
    bf16 on a CPU) compute the same attention; a padded key gets no weight."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5, generator=g)
    bias[..., -1] = -1e4
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, -1) @ v
    fused = crossvlt.attention(q, k, v, bias)
    plain = crossvlt.attention(q, k, v, bias.clone().requires_grad_())
    assert torch.allclose(fused, expected, atol=1e-6) and torch.allclose(plain, expected, atol=1e-6)
    v2 = v.clone()
    v2[:, :, -1] += 100                                       # the masked key's value is never read
    assert torch.allclose(crossvlt.attention(q, k, v2, bias), fused, atol=1e-5)
    with crossvlt.autocast("cpu", "bf16"):
        low = crossvlt.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)
    assert low.dtype == torch.bfloat16 and (low.float() - expected).abs().max() < 0.05


@pytest.mark.parametrize("shape", [(1, 16, 8, 56, 56), (2, 10, 6, 61, 58), (1, 4, 3, 60, 58)])
def test_winograd_convolution_computes_the_convolution_and_its_gradients(shape, monkeypatch):
    """conv3x3 on a CPU in fp32 at 56 px and more runs Winograd's F(4x4, 3x3) (its input transform
    is the one convolution it calls, with 6x6 kernels, once an image): output and both gradients
    equal the float64 convolution to fp32 rounding, also where the size is not a multiple of the
    4x4 tiles. Small maps, bf16, float64 and a compiled model (any batch size) take the plain
    convolution."""
    B, C, K, H, W = shape
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(B, C, H, W, generator=g).requires_grad_(), torch.randn(K, C, 3, 3, generator=g).requires_grad_()
    kernels, conv2d = [], F.conv2d                     # the kernel sizes conv3x3 convolves with
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a, **kw: kernels.append(w.shape[-1]) or conv2d(x, w, *a, **kw))
    y = crossvlt.conv3x3(x, w)
    assert kernels == [6] * B                          # one input transform an image
    grad = torch.randn(y.shape, generator=g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = conv2d(x64, w64, padding=1)
    y64.backward(grad.double())
    for ours, exact in zip((y, *torch.autograd.grad(y, (x, w), grad)), (y64, x64.grad, w64.grad)):
        assert (ours.double() - exact).abs().max() < 1e-5 * exact.abs().max()
    small = x[..., :40, :40]
    with torch.no_grad():
        assert torch.equal(crossvlt.conv3x3(small, w), conv2d(small, w, padding=1))
        with crossvlt.autocast("cpu", "bf16"):
            assert torch.equal(crossvlt.conv3x3(x, w), conv2d(x, w, padding=1))
        assert torch.equal(crossvlt.conv3x3(x.double(), w.double()), conv2d(x.double(), w.double(), padding=1))
        compiled = torch.compile(crossvlt.conv3x3, backend="eager")      # as a compiled evaluation
        assert torch.allclose(compiled(*crossvlt.any_batch(x), w), conv2d(x, w, padding=1), atol=1e-5)
    assert kernels == [6] * B + [3, 3, 3, 3]


def test_checkpointed_activations_give_the_same_gradients():
    """Recomputing the Swin blocks and language stages in the backward replays their dropout and
    drop-path draws: the loss and every gradient are the very same."""
    config = CrossVLTConfig.tiny(swin=dataclasses.replace(CrossVLTConfig.tiny().swin, drop_path=0.3),
                                 bert=dataclasses.replace(CrossVLTConfig.tiny().bert, dropout=0.1))
    images, ids, mask = tiny_inputs()
    target = (torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = CrossVLT(config).train().checkpoint_activations(on)
        loss, _ = model.loss(model(images, ids, mask), target)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert model.swin.stages[0].checkpointing and model.lang_stages["2"].checkpointing
