"""train.py: the model can learn, runs resume exactly, DDP under torchrun (CPU, gloo), the
recipe's parameter groups, and the CLI's errors.

Not checked here (no GPU lent to the sessions so far): bf16 autocast and SyncBatchNorm on CUDA,
NCCL, CUDA timings, RefCOCO numbers.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

import crossvlt
import data
import evaluate
import train
from conftest import ROOT, raises_naming, run_script, square_batch
from crossvlt import CrossVLT, CrossVLTConfig


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = CrossVLT(CrossVLTConfig.tiny()).train()
    optimizer = torch.optim.AdamW(train.parameter_groups(model, 1e-2), lr=1e-3)
    batch = square_batch()
    images, masks, ids, attn = batch["image"], batch["mask"], batch["input_ids"], batch["attention_mask"]
    assert torch.equal(images[0], images[1]) and not torch.equal(masks[0], masks[1])
    for _ in range(40):
        train.train_step(model, model.loss, optimizer, [batch], "fp32")
    model.eval()
    with torch.no_grad():
        pred = model(images, ids, attn).mask_logits[:, 0] > 0
    iou = (pred & masks.bool()).flatten(1).sum(1) / (pred | masks.bool()).flatten(1).sum(1)
    assert (iou > 0.9).all(), iou


def test_parameter_groups_follow_the_recipe():
    model = CrossVLT(CrossVLTConfig.tiny(freeze_text_embeddings=True))      # as base: the code's
    decay, no_decay = train.parameter_groups(model, 1e-2)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 1e-2
    assert "swin.stages.0.blocks.0.attn.relative_position_bias_table" in exempt
    assert "swin.patch_embed.norm.weight" in exempt and "decoder.norms.2.bias" in exempt
    assert all(n.startswith(("swin.", "decoder.norms.")) for n in exempt)
    decayed = {names[id(p)] for p in decay["params"]}
    assert "text.layers.0.attention.norm.weight" in decayed          # BERT LayerNorms decay
    assert "decoder.blocks.0.bn1.weight" in decayed and "swin.stages.0.blocks.0.attn.qkv.bias" in decayed
    assert not any(n.startswith("text.embeddings.") or n.endswith(".tau") for n in decayed | exempt)
    assert len(decayed | exempt) == sum(p.requires_grad for p in model.parameters())
    tiny = CrossVLT(CrossVLTConfig.tiny())                  # from scratch: word embeddings train
    decay, _ = train.parameter_groups(tiny, 1e-2)
    assert any(p is tiny.text.embeddings.word_embeddings.weight for p in decay["params"])


def run(args, out):
    return train.main(["--dataset", "shapes", "--batch-size", "4", "--image-size", "64",
                       "--workers", "0", "--log-every", "1000", "--out", str(out)] + args)


@pytest.mark.parametrize("accumulate", [1, 3])   # 3: an epoch's last micro-batches make no step
def test_resume_gives_identical_weights(shapes_root, tmp_path, accumulate):
    common = ["--data-root", str(shapes_root), "--epochs", "2", "--lr", "1e-3",
              "--accumulate", str(accumulate)]
    run(common, tmp_path / "straight")
    run(common + ["--stop-after", "1"], tmp_path / "split")
    history = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]
    train.main(["--resume", str(tmp_path / "split")])
    a, _ = crossvlt.read_checkpoint(tmp_path / "straight" / "last.safetensors")
    b, _ = crossvlt.read_checkpoint(tmp_path / "split" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and "oIoU" in history[-1]["val"]
    first = CrossVLT.load(tmp_path / "straight" / "last.safetensors")
    assert first.config.image_size == 64
    vocab = (shapes_root / "shapes" / "vocab.txt").read_text()
    assert (tmp_path / "straight" / "vocab.txt").read_text() == vocab           # for evaluate.py


def test_resume_of_a_run_saved_before_newer_flags_existed(shapes_root, tmp_path):
    out = tmp_path / "old"
    run(["--data-root", str(shapes_root), "--epochs", "2", "--stop-after", "1"], out)
    state = torch.load(out / "state.pt", weights_only=True)
    del state["args"]["compile"], state["args"]["benchmark"]               # as an older train.py saved it
    torch.save(state, out / "state.pt")
    train.main(["--resume", str(out)])
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_flag_newer_than_a_refcoco_run_takes_refcocos_default(tmp_path):
    (tmp_path / "swin.pth").write_bytes(b"")
    saved = vars(train.parse_args(["--dataset", "refcoco", "--out", str(tmp_path), "--swin", str(tmp_path / "swin.pth"),
                                   "--bert", str(tmp_path)]))
    del saved["given"], saved["save_every"]                                # as a train.py before it saved them
    torch.save({"progress": {}, "args": saved, "model": {}}, tmp_path / "state.pt")
    args, _ = train.read_args(["--resume", str(tmp_path)])
    assert args.dataset == "refcoco" and args.save_every == train.REAL["save_every"] != train.SHAPES["save_every"]


def test_epoch_loss_averages_the_micro_batches_trained_on(shapes_root, tmp_path, monkeypatch):
    """9 batches an epoch, --accumulate 2: 4 steps use 8 micro-batches and the 9th is left out,
    so a loss of 1.0 on every micro-batch averages to exactly 1.0 in every epoch."""
    monkeypatch.setattr(CrossVLT, "loss", lambda self, out, target: (
        out.mask_logits.mean() * 0 + 1.0, {"seg": torch.tensor(0.5), "align": torch.tensor(0.25)}))
    run(["--data-root", str(shapes_root), "--epochs", "2", "--accumulate", "2"], tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    for record in records:
        assert record["train"] == {"seg": 0.5, "align": 0.25, "loss": 1.0}


# ----------------------------------------------------------------------------------------------
# Preemption: a run stopped mid-epoch by SIGTERM, or killed outright, resumes to the same weights

def preemptible(shapes_root, out):
    """Two epochs of 9 steps, state.pt every 3 steps, the default DataLoader workers (1)."""
    return ["--dataset", "shapes", "--data-root", str(shapes_root), "--epochs", "2", "--batch-size", "4",
            "--image-size", "64", "--lr", "1e-3", "--log-every", "1", "--save-every", "3", "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train.main(preemptible(shapes_root, out))
    return out


def start_and_wait_for(command, text, **kw):
    """Start `command` and return once it has printed a line holding `text`; finish(proc) gives
    the rest of its output. stderr goes to a temporary file, so that neither pipe can fill up."""
    stderr = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=stderr, **kw)
    proc.stderr_file = stderr
    for line in proc.stdout:
        if text in line:
            return proc
    raise AssertionError(f"{command} ended before printing {text!r}: {finish(proc)[1][-2000:]}")


def finish(proc):
    """(the rest of stdout, all of stderr) once `proc` has ended."""
    stdout = proc.stdout.read()
    proc.wait(timeout=120)
    proc.stderr_file.seek(0)
    return stdout, proc.stderr_file.read()


def train_py(args):
    return [sys.executable, "-u", "train.py", *args]


def assert_same_run(a, b):
    wa, _ = crossvlt.read_checkpoint(a / "last.safetensors")
    wb, _ = crossvlt.read_checkpoint(b / "last.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ha, hb = ([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (a, b))
    assert [(h["step"], h["train"], h["val"]) for h in ha] == [(h["step"], h["train"], h["val"]) for h in hb]


def saved_progress(out):
    return torch.load(out / "state.pt", weights_only=True)["progress"]


def test_compile_trains_and_resumes_as_the_uncompiled_run(shapes_root, uninterrupted, tmp_path, monkeypatch):
    """--compile goes through torch.compile, here with its "eager" backend (the graph capture
    without minutes of code generation): the run, a resume and its files end bit-identical to an
    uncompiled run, and the checkpoint keeps the model's own key names."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, real=torch.compile, **kw: compiled.append(kw)
                        or real(fn, backend="eager", **kw))
    train.main(preemptible(shapes_root, tmp_path / "compiled") + ["--compile", "--stop-after", "1"])
    train.main(["--resume", str(tmp_path / "compiled")])
    assert compiled == [{"dynamic": False}] * 2
    assert_same_run(uninterrupted, tmp_path / "compiled")


def test_sigterm_finishes_the_step_saves_and_resumes_bit_identical(shapes_root, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait_for(train_py(preemptible(shapes_root, out)), "epoch 2 step 11/18")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and f"train.py --resume {out}" in stdout
    assert "SIGTERM: stopping after this step" in stderr                  # said when it arrives
    progress = saved_progress(out)
    assert progress["epoch"] == 1 and 0 < progress["epoch_step"] < 9
    assert f"stopped after step {progress['step']}" in stdout
    train.main(["--resume", str(out)])
    assert_same_run(uninterrupted, out)


def test_sigkill_resumes_from_the_last_save_bit_identical(shapes_root, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = start_and_wait_for(train_py(preemptible(shapes_root, out)), "epoch 2 step 14/18")
    proc.kill()
    finish(proc)
    progress = saved_progress(out)
    assert progress["epoch"] == 1 and progress["epoch_step"] in (3, 6) and progress["step"] % 3 == 0
    train.main(["--resume", str(out)])
    assert_same_run(uninterrupted, out)


def test_a_stop_during_the_last_step_still_ends_the_epoch_on_resume(shapes_root, tmp_path, monkeypatch):
    """SIGTERM in the schedule's very last step: the resumed run validates, records and saves that
    epoch, ending as the uninterrupted run does."""
    args = ["--data-root", str(shapes_root), "--epochs", "1", "--lr", "1e-3"]
    run(args, tmp_path / "straight")
    step, calls = train.train_step, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 9:                                  # the 9th and last step
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*args, **kw)
    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as exit:
        run(args, tmp_path / "stopped")
    assert exit.value.code == 128 + signal.SIGTERM and saved_progress(tmp_path / "stopped")["step"] == 9
    assert not (tmp_path / "stopped" / "log.jsonl").exists()
    monkeypatch.setattr(train, "train_step", step)
    train.main(["--resume", str(tmp_path / "stopped")])
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    validate = evaluate.run_evaluation                  # a failure in the epoch's validation loses no step

    def failing(*args, **kw):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(evaluate, "run_evaluation", failing)
    with pytest.raises(RuntimeError):
        run(args + ["--save-every", "1000"], tmp_path / "failed")
    assert saved_progress(tmp_path / "failed")["step"] == 9 and not (tmp_path / "failed" / "log.jsonl").exists()
    monkeypatch.setattr(evaluate, "run_evaluation", validate)
    train.main(["--resume", str(tmp_path / "failed")])
    assert_same_run(tmp_path / "straight", tmp_path / "failed")


DDP_WRAPPER = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import train
out = {out!r}
open(os.path.join(out, "pid" + os.environ["RANK"]), "w").write(str(os.getpid()))
wrapped = []
def keep(model, **kw):
    wrapped.append(model)
    return DDP(model, **kw)
DDP, train.DistributedDataParallel = train.DistributedDataParallel, keep
if os.environ.get("EAGER_COMPILE"):                          # the graph capture, not inductor's minutes
    compile_ = torch.compile
    def eager(fn, **kw):
        open(os.path.join(out, "compiled" + os.environ["RANK"]), "w").close()
        return compile_(fn, backend="eager", **kw)
    torch.compile = eager
if os.environ["RANK"] == os.environ.get("SIGTERM_RANK"):     # a signal to this rank alone, mid-step
    step, steps = train.train_step, []
    def train_step(*args, **kw):
        steps.append(1)
        if len(steps) == int(os.environ["SIGTERM_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*args, **kw)
    train.train_step = train_step
train.main(sys.argv[1:])
params = {{k: v for k, v in wrapped[0].named_parameters()}}
torch.save(params, os.path.join(out, "rank" + os.environ["RANK"] + ".pt"))
"""


def torchrun(folder, *args):
    """The command that runs train.py in 2 processes on the CPU (gloo), through a wrapper that
    writes each rank's pid and final parameters into `folder`."""
    wrapper = folder / "ddp.py"
    wrapper.write_text(DDP_WRAPPER.format(root=str(ROOT), out=str(folder)))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(wrapper), *args]


def ddp_args(shapes_root, out):
    return ["--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(out), "--epochs", "2",
            "--batch-size", "2", "--image-size", "64", "--workers", "0", "--log-every", "1"]


ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def ddp_run(shapes_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    done = subprocess.run(torchrun(folder, *ddp_args(shapes_root, folder / "run")), capture_output=True,
                          text=True, timeout=240, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder, done.stdout


def test_two_processes_under_torchrun(shapes_root, ddp_run):
    """DDP on the CPU (gloo): each process takes half the refs, the ranks end with the same
    weights, rank 0 alone logs and writes."""
    folder, stdout = ddp_run
    refs = len(data.Refer(shapes_root, "shapes", "unc").refs("train"))
    per_epoch = (refs + 1) // 2 // 2                          # DistributedSampler pads to even
    assert f"batch 2 x 2 x 1 = 4, {per_epoch} steps/epoch" in stdout
    assert stdout.count("epoch 1 val:") == 1 and stdout.count("done: best val") == 1
    history = [json.loads(line) for line in (folder / "run" / "log.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["step"]) for h in history] == [(1, per_epoch), (2, 2 * per_epoch)]
    ranks = [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])    # gradients averaged
    saved = CrossVLT.load(folder / "run" / "last.safetensors").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in ranks[0].items())


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(shapes_root, ddp_run, tmp_path):
    """SIGTERM reaches rank 1 alone, during its step 11; the ranks agree every 4 steps
    (--log-every), so both stop after step 12 and rank 0 saves. The resumed DDP run, compiled
    (--compile with the compiler's eager backend, as in the other compile tests), ends with the
    uncompiled uninterrupted run's weights on both ranks."""
    out = tmp_path / "run"
    stopped = subprocess.run(torchrun(tmp_path, *ddp_args(shapes_root, out), "--log-every", "4"), capture_output=True,
                             text=True, timeout=240, env=ONE_THREAD | {"SIGTERM_RANK": "1", "SIGTERM_AT_STEP": "11"})
    assert stopped.returncode != 0
    progress = saved_progress(out)
    assert (progress["epoch"], progress["step"], progress["epoch_step"]) == (1, 12, 3), stopped.stderr[-2000:]
    assert stopped.stdout.count("SIGTERM: stopped after step 12 ") == 1               # rank 0 speaks
    assert "epoch 2 step 12/18" in stopped.stdout and "epoch 2 step 16/18" not in stopped.stdout
    assert not (tmp_path / "rank0.pt").exists() and not (tmp_path / "rank1.pt").exists()
    done = subprocess.run(torchrun(tmp_path, "--resume", str(out), "--compile"), capture_output=True, text=True,
                          timeout=240, env=ONE_THREAD | {"EAGER_COMPILE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "compiled0").exists() and (tmp_path / "compiled1").exists()       # both ranks compiled
    assert_same_run(ddp_run[0] / "run", out)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


def test_non_finite_loss_stops_without_a_checkpoint(shapes_root, tmp_path, monkeypatch):
    monkeypatch.setattr(CrossVLT, "loss", lambda self, out, target: (out.mask_logits.sum() * float("nan"), {}))
    with pytest.raises(FloatingPointError) as error:
        run(["--data-root", str(shapes_root), "--epochs", "1", "--save-every", "1"], tmp_path / "nan")
    assert all(name in str(error.value) for name in ("nan", "epoch 1", "step 1"))
    assert not list((tmp_path / "nan").glob("*.safetensors")) and not (tmp_path / "nan" / "state.pt").exists()


@pytest.mark.parametrize("at, save_every", [(2, "2"), (9, "1000")])     # before a mid-epoch save; the epoch's end
def test_non_finite_weights_are_never_saved(shapes_root, tmp_path, monkeypatch, at, save_every):
    """A finite loss with an inf update (as an overflow in the backward makes): no state.pt, no checkpoint."""
    step, calls = train.train_step, []

    def overflowing(model, *args, **kw):
        sums = step(model, *args, **kw)
        calls.append(1)
        if len(calls) == at:                                 # the update of that step, before its save
            with torch.no_grad():
                model.decoder.head.bias.fill_(float("inf"))
        return sums
    monkeypatch.setattr(train, "train_step", overflowing)
    with pytest.raises(FloatingPointError) as error:
        run(["--data-root", str(shapes_root), "--epochs", "1", "--save-every", save_every], tmp_path / "inf")
    assert f"step {at}" in str(error.value)
    assert not [name for name in os.listdir(tmp_path / "inf") if name not in ("args.json", "vocab.txt")]


def cli(*args):
    return run_script("train.py", *args, timeout=120)


def test_cli_help_and_errors(tmp_path):
    assert cli("--help").returncode == 0
    (tmp_path / "swin.pth").write_bytes(b"")
    (tmp_path / "bert").mkdir()
    weights = ["--swin", str(tmp_path / "swin.pth"), "--bert", str(tmp_path / "bert")]
    for args, named in [                                    # the error names the path to look at
        (["--dataset", "refcoco", "--data-root", str(tmp_path / "nowhere"), *weights],
         tmp_path / "nowhere" / "refcoco"),
        (["--dataset", "shapes", "--resume", str(tmp_path / "norun")], tmp_path / "norun" / "state.pt"),
    ]:
        result = cli(*args)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(named) in lines[0], result.stderr


def test_lr_factor_is_the_recipes_poly_decay_after_an_optional_warm_up():
    assert train.lr_factor(0, 100) == 1.0
    assert train.lr_factor(50, 100) == pytest.approx(0.5 ** 0.9)
    assert train.lr_factor(100, 100) == 0.0
    assert train.lr_factor(0, 100, warmup=9) == pytest.approx(0.1 * 1.0)
    assert train.lr_factor(4, 100, warmup=9) == pytest.approx(0.5 * 0.96 ** 0.9)
    assert train.lr_factor(20, 100, warmup=9) == pytest.approx(0.8 ** 0.9)


def test_clip_grad_and_warm_up_act_at_every_step(shapes_root, tmp_path, monkeypatch):
    calls, lrs, step = [], [], train.train_step
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, norm: calls.append(norm) or clip(params, norm))
    monkeypatch.setattr(train, "train_step", lambda model, loss_fn, optimizer, *a, **kw:
                        lrs.append(optimizer.param_groups[0]["lr"]) or step(model, loss_fn, optimizer, *a, **kw))
    run(["--data-root", str(shapes_root), "--epochs", "1", "--clip-grad", "0.5", "--warmup-steps", "2",
         "--lr", "1e-3"], tmp_path / "clip")
    steps = json.loads((tmp_path / "clip" / "log.jsonl").read_text().splitlines()[-1])["step"]
    assert steps > 0 and calls == [0.5] * steps
    decay = [(1 - k / steps) ** 0.9 for k in range(3)]                 # the poly decay, by hand
    assert lrs[:3] == pytest.approx([1e-3 / 3 * decay[0], 1e-3 * 2 / 3 * decay[1], 1e-3 * decay[2]])


def test_fused_adamw_takes_the_default_step():
    """train.py's fused AdamW makes the same update as the default implementation."""
    torch.manual_seed(0)
    a = [torch.randn(7, 5, requires_grad=True), torch.randn(3, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    fused = torch.optim.AdamW(a, lr=1e-2, weight_decay=1e-2, fused=True)
    plain = torch.optim.AdamW(b, lr=1e-2, weight_decay=1e-2)
    for step in range(3):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step(), plain.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a, b))
    assert not torch.allclose(a[0], b[0].new_zeros(7, 5))


def test_native_bf16_follows_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    native = "avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags
    assert train.native_bf16("cpu") == native


@pytest.mark.parametrize("native", [True, False])
def test_precision_defaults_to_bf16_only_where_it_is_native(shapes_root, tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(train, "native_bf16", lambda device: native)
    monkeypatch.setitem(train.SHAPES, "precision", None)          # as for RefCOCO: detect
    run(["--data-root", str(shapes_root), "--epochs", "1", "--max-steps", "1"], tmp_path / "run")
    expected = "bf16" if native else "fp32"
    assert f"cpu, {expected}, 1 process(es)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "args.json").read_text())["precision"] == expected   # kept on resume


def test_benchmark_times_data_and_steps_and_writes_nothing(shapes_root, tmp_path, capsys, monkeypatch):
    calls, step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    order = []                           # the peak is the steps' own, before the count and the ceiling allocate
    for name in ("peak_memory_mib", "model_flops", "matmul_gflops"):
        monkeypatch.setattr(evaluate, name, lambda *a, name=name, f=getattr(evaluate, name), **kw:
                            order.append(name) or f(*a, **kw))
    seconds = train.main(["--data-root", str(shapes_root), "--benchmark", "2", "--out", str(tmp_path / "run"),
                          "--workers", "0", "--image-size", "64", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert calls == [1] * 3 and seconds > 0 and not (tmp_path / "run").exists()    # warm-up + 2
    assert order == ["peak_memory_mib", "model_flops", "matmul_gflops"]
    assert "training items/s with 0 worker(s)" in printed and "s/step" in printed and "GFLOP/s" in printed


def test_resume_takes_a_changeable_flag_back_to_its_default(shapes_root, tmp_path, capsys):
    run(["--data-root", str(shapes_root), "--epochs", "2", "--stop-after", "1", "--checkpoint-activations",
         "--log-every", "3"], tmp_path / "run")
    printed = capsys.readouterr().out
    assert "stopping after 1 epoch(s)" in printed and "done:" not in printed           # not done: resumable
    args, _ = train.read_args(["--resume", str(tmp_path / "run"), "--no-checkpoint-activations", "--log-every", "20"])
    assert args.checkpoint_activations is False and args.log_every == 20 and args.epochs == 2


def test_resume_refuses_changed_settings(shapes_root, tmp_path):
    run(["--data-root", str(shapes_root), "--epochs", "2", "--stop-after", "1"], tmp_path / "run")
    with pytest.raises(crossvlt.CheckpointError) as error:           # names each refused flag
        train.main(["--resume", str(tmp_path / "run"), "--lr", "1", "--epochs", "9"])
    assert "--epochs" in str(error.value) and "--lr" in str(error.value)
    (tmp_path / "run" / "state.pt").write_bytes(b"truncated")
    with pytest.raises(crossvlt.CheckpointError) as error:           # names the file and the fallback
        train.main(["--resume", str(tmp_path / "run"), "--workers", "0"])
    assert str(tmp_path / "run" / "state.pt") in str(error.value) and "last.safetensors" in str(error.value)


@pytest.mark.parametrize("args, named", [(["--dataset", "refcoco"], "--swin"), (["--swin", "swin.pth"], "--bert"),
                                         (["--swin", "nowhere.pth", "--bert", "."], "nowhere.pth"),
                                         (["--bert-init", "full"], "--bert")])
def test_weights_are_asked_for_before_any_work(args, named, capsys):
    """RefCOCO needs both official files, which must exist: said before the data or the vocabulary is read."""
    with pytest.raises(SystemExit) as exit:
        train.parse_args(args)
    assert exit.value.code == 2 and named in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--val-every", "0"), ("--log-every", "0"),
                                         ("--accumulate", "0"), ("--warmup-steps", "-1"), ("--lr", "0"),
                                         ("--lr", "inf"), ("--weight-decay", "nan"), ("--seg-loss-scale", "-1"),
                                         ("--fusion-stages", "5"), ("--device", "tpu")])
def test_bad_numbers_are_refused_before_any_work(flag, value, capsys):
    with pytest.raises(SystemExit) as exit:
        train.parse_args([flag, value])
    assert exit.value.code == 2 and flag in capsys.readouterr().err


def test_a_resume_elsewhere_reads_the_same_data_and_refuses_other_data(shapes_root, tmp_path, monkeypatch):
    """Relative paths are saved absolute: a resume from another folder trains on the run's data.
    --data-root may change on --resume (data moved), but not to a set of another size."""
    shutil.copytree(shapes_root / "shapes", tmp_path / "here" / "data" / "shapes")
    data.make_shapes(tmp_path / "other", num_images=8)
    monkeypatch.chdir(tmp_path / "here")
    run(["--data-root", "data", "--epochs", "2", "--stop-after", "1"], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    raises_naming(crossvlt.CheckpointError, lambda: train.main(["--resume", str(tmp_path / "run"), "--data-root",
                                                                str(tmp_path / "other")]), tmp_path / "other")
    saved = json.loads((tmp_path / "run" / "args.json").read_text())          # the refused resume changed nothing
    assert saved["data_root"] == str(tmp_path / "here" / "data")
    train.main(["--resume", str(tmp_path / "run")])
    history = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]


def test_a_run_folder_in_use_is_not_overwritten(tmp_path):
    for held in (["best.safetensors"], ["state.pt", "best.safetensors"]):     # finished, or stopped midway
        out = tmp_path / str(len(held))
        out.mkdir()
        for name in held:
            (out / name).write_bytes(b"a run's file")
        message = raises_naming(crossvlt.CheckpointError, lambda: train.main(["--out", str(out), "--data-root",
                                                                              str(tmp_path / "data")]), out)
        assert ("--resume" in message) == ("state.pt" in held)         # only a state.pt can be resumed
        assert sorted(os.listdir(out)) == sorted(held) and not (tmp_path / "data").exists()


def test_a_data_error_in_a_worker_ends_the_run_with_one_line(shapes_root, tmp_path):
    """The DataLoader workers ignore SIGTERM, which is how Python's exit ends them: a run failing
    with workers alive ends them itself instead of waiting for them forever."""
    shutil.copytree(shapes_root / "shapes", tmp_path / "data" / "shapes")
    for image in (tmp_path / "data" / "shapes" / "images").iterdir():
        image.unlink()
    done = cli("--data-root", tmp_path / "data", "--out", tmp_path / "run", "--image-size", 64, "--workers", 1)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: missing image") and str(tmp_path / "data") in lines[0]


def test_benchmark_needs_batches_to_time(shapes_root):
    train_refs = len(data.Refer(shapes_root, "shapes", "unc").refs("train"))
    raises_naming(data.DataError, lambda: train.main(["--data-root", str(shapes_root), "--benchmark", "1", "--workers",
                                                      "0", "--batch-size", str(train_refs // 2), "--image-size", "64"]),
                  "--benchmark", train_refs)
