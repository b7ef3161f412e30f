"""Convert an official checkpoint into crossvlt's own layout (.safetensors, config in metadata).

    python weights/convert.py SRC DST.safetensors

SRC is recognised from its keys: Microsoft Swin .pth ({'model': ...}), timm / HF Swin
safetensors, HF BERT (a folder, .bin or .safetensors; LayerNorm gamma/beta or weight/bias; with
or without 'bert.'), or a released CrossVLT checkpoint (test.py's bare state dict or train.py's
{'model', 'epoch', 'args', 'best_oIoU'}, possibly 'module.'-prefixed). The result loads with
CrossVLT.load, SwinTransformer.from_pretrained or BertModel.from_pretrained, as SRC's kind says.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import crossvlt  # noqa: E402


def summarise(dropped):
    """{dropped key: why} -> one line per group of keys that differ only in their numbers and
    their last word, these listed: 'backbone.3.layers.linear1.{0,2}.weight — the stage-4 gate'."""
    groups = {}
    for key, why in dropped.items():
        tokens = re.findall(r"\d+|[A-Za-z]+|[^A-Za-z\d]+", key)
        varies = [t.isdigit() or i == len(tokens) - 1 for i, t in enumerate(tokens)]
        shape = tuple("#" if v else t for t, v in zip(tokens, varies))
        values = groups.setdefault((shape, why), [set() for _ in tokens])
        for seen, token in zip(values, tokens):
            seen.add(token)
    lines = []
    for (shape, why), values in groups.items():
        sort = [sorted(v, key=lambda t: (len(t), t)) for v in values]
        name = "".join(t if t != "#" else (v[0] if len(v) == 1 else "{" + ",".join(v) + "}")
                       for t, v in zip(shape, sort))
        lines.append(f"  {name} — {why}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="official checkpoint file or HF folder")
    p.add_argument("dst", help="output .safetensors")
    a = p.parse_args(argv)
    if not a.dst.endswith(".safetensors"):
        p.error(f"DST must end in .safetensors, got {a.dst}")
    if os.path.realpath(a.dst) == os.path.realpath(a.src):
        p.error(f"DST is SRC ({a.src}): write the conversion to another file")
    try:
        sd, metadata = crossvlt.read_checkpoint(a.src)
        kind = crossvlt.checkpoint_kind(sd, metadata, a.src)
        if kind in crossvlt.KINDS:
            raise crossvlt.CheckpointError(f"{a.src} is already in crossvlt's layout ({kind})")
        sd, config, dropped = crossvlt.convert_state_dict(sd, kind, metadata, a.src)
        family = kind.split("-")[0]
        with crossvlt.torch.device("meta"):                    # shapes only, no memory
            model = {"crossvlt": crossvlt.CrossVLT, "swin": crossvlt.SwinTransformer,
                     "bert": crossvlt.BertModel}[family](config)
        crossvlt.load_weights(model, sd, a.src, assign=True)   # every tensor has its place
        crossvlt.save_checkpoint(a.dst, sd, family, crossvlt.dataclasses.asdict(config))
    except (crossvlt.CheckpointError, OSError) as e:                   # OSError: DST cannot be written
        sys.exit(f"error: {e}")
    print(f"{a.src}: {kind}, {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} values -> {a.dst}")
    if dropped:
        print(f"dropped {len(dropped)} source keys on purpose:\n{summarise(dropped)}")
    if kind == "crossvlt-official":
        print("2-class head folded into one logit (w1 - w0, b1 - b0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
