"""CUDA checks, outside the default run: pytest.ini deselects the `gpu` mark. On a machine with
an NVIDIA GPU, in two commands, each estimated (never measured) at a few minutes on one
H100/H200 and kept under a 10-minute limit by its timeouts:

    python -m pytest -m gpu -s -q -k "not compile"     # parity, bf16, training, torchrun, sweep
    python -m pytest -m gpu -s -q -k compile            # inductor on a base training step

They print what they measure (-s shows it). None has run yet: no session so far had a GPU.
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import crossvlt
import data
import train
from conftest import ROOT, reference_file, run_convert, square_batch
from crossvlt import CrossVLT, CrossVLTConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def released(official_small):
    """The released model at depths [2,2,2,2] (seed-0 weights, converted) and its inputs/outputs."""
    path = run_convert(official_small["crossvlt"], official_small["dir"] / "gpu.safetensors")
    ref = load_file(reference_file("parity_small.safetensors"))
    images = torch.randn(2, 3, 480, 480, generator=torch.Generator().manual_seed(1))
    return CrossVLT.load(path).eval(), images, ref


def test_fp32_cuda_matches_the_released_code(released):
    model, images, ref = released
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # true fp32
    try:
        with torch.no_grad():
            out = model.cuda()(images.cuda(), ref["input_ids"].cuda(), ref["attention_mask"].cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    expected = F.interpolate(ref["mask_logit_120"], size=480, mode="bilinear", align_corners=True)
    diff = (out.mask_logits.cpu() - expected).abs().max().item()
    maps = max((a.cpu() - ref[f"sim_{i}"]).abs().max().item() for i, a in enumerate(out.align_logits, 1))
    print(f"\nfp32 CUDA vs released: mask logit {diff:.2e} (tolerance 1e-3), maps {maps:.2e} (1e-4)")
    assert diff < 1e-3 and maps < 1e-4


def test_bf16_cuda_follows_fp32_cpu(released):
    model, images, ref = released
    ids, mask = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        exact = model.cpu()(images, ids, mask).mask_logits
        with crossvlt.autocast("cuda", "bf16"):
            low = model.cuda()(images.cuda(), ids.cuda(), mask.cuda()).mask_logits.float().cpu()
    corr = torch.corrcoef(torch.stack([exact.flatten(), low.flatten()]))[0, 1].item()
    same_side = ((exact > 0) == (low > 0)).float().mean().item()
    print(f"\nbf16 CUDA vs fp32 CPU: correlation {corr:.5f}, max abs difference "
          f"{(exact - low).abs().max():.3f}, {same_side:.2%} of pixels on the same side of 0")
    assert corr > 0.999


def test_thirty_bf16_steps_lower_the_loss():
    torch.manual_seed(0)
    model = CrossVLT(CrossVLTConfig.tiny()).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = square_batch()                     # train_step moves it to the model's device
    losses = [train.train_step(model, model.loss, optimizer, [batch], "bf16")["loss"].item() for _ in range(30)]
    print(f"\n30 bf16 steps on CUDA: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]


@pytest.fixture(scope="module")
def shapes_32(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data.make_shapes(root, seed=0, num_images=32)
    return root


def test_plain_train_py_on_cuda(shapes_32, tmp_path):
    """python train.py without torchrun: "cuda" is the current GPU, with its index."""
    done = subprocess.run([sys.executable, "train.py", "--dataset", "shapes", "--data-root", str(shapes_32),
                           "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--image-size", "64",
                           "--max-steps", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cuda:0, fp32, 1 process(es)" in done.stdout


def test_torchrun_over_nccl_with_sync_batchnorm(shapes_32, tmp_path):
    """One process under torchrun is DDP over NCCL with SyncBatchNorm, as on many GPUs."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "train.py", "--dataset", "shapes", "--data-root", str(shapes_32),
                           "--out", str(tmp_path / "run"),
                           "--epochs", "1", "--batch-size", "4", "--image-size", "64", "--precision", "bf16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cuda:0, bf16, 1 process(es)" in done.stdout
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    print(f"\ntorchrun/NCCL epoch: {record}")
    assert "oIoU" in record["val"]


def test_compile_on_cuda(tmp_path):
    """--compile on CUDA (inductor): a compiled base training step at batch 16, 480, bf16, timed
    against the uncompiled one; its first step (the compiling) is printed too. Training only:
    it is where compiling can pay back its minutes (README "Benchmarks", --compile)."""
    rows = []
    for flags in ([], ["--compile"]):
        out = tmp_path / f"compile{len(flags)}.json"
        done = subprocess.run([sys.executable, "evaluate.py", "--benchmark", "--preset", "base", "--device", "cuda",
                               "--precision", "bf16", "--modes", "train", "--batch-sizes", "16",
                               "--image-sizes", "480", "--steps", "3", "--data-workers", "--out", str(out), *flags],
                              cwd=ROOT, capture_output=True, text=True, timeout=420 if flags else 150)
        print("\n" + done.stdout)
        assert done.returncode == 0, done.stderr[-3000:]
        rows += json.loads(out.read_text())
    assert [(r["mode"], r["compile"]) for r in rows] == [("train", False), ("train", True)]   # none failed
    plain, compiled = rows
    print(f"train b16: {plain['images_per_s']} -> {compiled['images_per_s']} images/s compiled "
          f"(first step {compiled['first_step_s']} s)")


def test_benchmark_sweep(tmp_path):
    """Throughput, GFLOP/s against the bf16 matrix-product ceiling, and peak memory of `base`:
    the GPU goals are >= 300 training images/s at batch 16, 480x480, bf16, within 40 GB, and
    >= 1,000 evaluated expressions/s (eval at batch 32). Eval at batch 1 and 32, training at batch
    16 on 384, 480 and 640, and the data pipeline with 4 workers. Printed; asserted only that
    every setting ran."""
    rows = []
    for modes, batches, sizes, workers in ((["eval"], [1, 32], [480], ["4"]), (["train"], [16], [384, 480, 640], [])):
        out = tmp_path / f"bench{len(rows)}.json"
        done = subprocess.run([sys.executable, "evaluate.py", "--benchmark", "--preset", "base", "--device", "cuda",
                               "--precision", "bf16", "--modes", *modes, "--batch-sizes", *map(str, batches),
                               "--image-sizes", *map(str, sizes), "--steps", "5", "--data-workers", *workers,
                               "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
        print("\n" + done.stdout)
        assert done.returncode == 0, done.stderr[-3000:]
        rows += json.loads(out.read_text())
    assert [(r["mode"], r["batch"], r["image_size"]) for r in rows] == \
        [("eval", 1, 480), ("eval", 32, 480), ("train", 16, 384), ("train", 16, 480), ("train", 16, 640)]
