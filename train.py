"""Train CrossVLT with the released code's recipe (or the paper's, or an ablation).

    python train.py --dataset shapes                        # the built-in demo: tiny model, CPU
    python train.py --dataset refcoco --data-root data --swin weights/swin_base.safetensors \
        --bert weights/bert-base-uncased --out runs/refcoco
    torchrun --nproc_per_node 2 train.py --dataset refcoco ...      # DDP, one process per GPU
    python train.py --resume runs/refcoco                   # continue exactly where it stopped

Recipe (the released code's defaults): AdamW, lr 3e-5 for every group, weight decay 1e-2 except
the vision side's norms and relative position tables, polynomial decay (1 - step/total)^0.9 per
step, 40 epochs, global batch 12, last partial batch dropped, BERT embeddings and τ frozen.
Every epoch ends with validation (oIoU/mIoU at the 480 protocol), a line in OUT/log.jsonl, and
OUT/last.safetensors, OUT/best.safetensors (best val oIoU) and OUT/state.pt (everything needed to
resume), each written to a temporary file and renamed.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import crossvlt
import data
from crossvlt import CheckpointError, CrossVLT, CrossVLTConfig
from evaluate import run_evaluation, write_atomic, write_text

RECIPE_BATCH = 12
# The demo's schedule (measured on a 2-core CPU, see README "Results"): 96x96 runs ~62 img/s, so
# 5 epochs take ~9 minutes; lr 2e-3 and a learnable τ learned fastest of the settings tried.
SHAPES = dict(preset="tiny", epochs=5, batch_size=16, lr=2e-3, image_size=96, workers=1,
              learnable_tau=True)
REAL = dict(preset="base", epochs=40, batch_size=6, lr=3e-5, image_size=480, workers=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=list(data.SPLIT_BYS), default="shapes", help="default: shapes")
    p.add_argument("--split-by", default=None, help="unc | google | umd (default: the dataset's first)")
    p.add_argument("--data-root", default="data", help="default: data")
    p.add_argument("--swin", help="Swin checkpoint (Microsoft .pth, timm/HF or converted)")
    p.add_argument("--bert", help="BERT folder (config.json, weights, vocab.txt) or converted file")
    p.add_argument("--vocab", help="vocab.txt (default: the BERT folder's, or the shapes set's)")
    p.add_argument("--out", help="run folder (default: runs/DATASET)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from state.pt")
    g = p.add_argument_group(
        "recipe", "Defaults: the released code's (base, 40 epochs, batch 6 per device, lr 3e-5, 480 px, "
        "4 workers); for --dataset shapes a CPU-sized schedule (tiny, 5 epochs, batch 16, lr 2e-3, "
        "96 px, 1 worker, learnable τ).")
    g.add_argument("--preset", choices=["base", "tiny"])
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per device")
    g.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps (default: 1)")
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float, default=1e-2, help="default: 1e-2")
    g.add_argument("--image-size", type=int)
    g.add_argument("--workers", type=int)
    g.add_argument("--seed", type=int, default=0, help="default: 0")
    g.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", help="default: cuda if available")
    g.add_argument("--max-steps", type=int, help="end the schedule after this many optimizer steps")
    g.add_argument("--stop-after", type=int, help="end this invocation after N epochs (the schedule "
                   "stays that of --epochs): for time-limited jobs; continue with --resume")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear lr warm-up before the poly "
                   "decay (not in the recipe; default: 0)")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this (not in the "
                   "recipe; default: off)")
    g.add_argument("--log-every", type=int, default=20, help="optimizer steps between progress lines "
                   "(default: 20)")
    g.add_argument("--val-every", type=int, default=1, help="epochs between validations (default: 1)")
    a = p.add_argument_group("model options: the paper's ablations (Tables II-IV) and paper-vs-code")
    a.add_argument("--fusion-stages", type=int, nargs="+", choices=(1, 2, 3, 4))
    a.add_argument("--fusion-direction", choices=["bi", "uni"])
    a.add_argument("--align-stages", type=int, nargs="*", choices=(1, 2, 3, 4))
    a.add_argument("--intermediate-loss", choices=["align", "seg"])
    a.add_argument("--lang-split", type=int, nargs=4)
    a.add_argument("--learnable-tau", action=argparse.BooleanOptionalAction, default=None,
                   help="train τ (the paper); default: off as the code (on for shapes)")
    a.add_argument("--gate-init", choices=["code", "zero"])
    a.add_argument("--bert-init", choices=["code", "full"])
    a.add_argument("--seg-loss-scale", type=float)
    a.add_argument("--class-weights", type=float, nargs=2)
    a.add_argument("--align-loss-weight", type=float)
    args = p.parse_args(argv)
    args.given = [k for k, v in vars(args).items() if v != p.get_default(k) and k != "resume"]
    at_least = dict(epochs=1, batch_size=1, accumulate=1, image_size=32, workers=0, max_steps=1,
                    stop_after=1, warmup_steps=0, log_every=1, val_every=1)
    for name, low in at_least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("lr", "clip_grad"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    defaults = SHAPES if args.dataset == "shapes" else REAL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.split_by = args.split_by or data.SPLIT_BYS[args.dataset][0]
    args.out = args.out or f"runs/{args.dataset}"
    return args


RESUME_FLAGS = {"stop_after", "workers", "device", "log_every"}    # may change on --resume
MODEL_OPTIONS = ("fusion_stages", "fusion_direction", "align_stages", "intermediate_loss", "lang_split",
                 "learnable_tau", "gate_init", "bert_init", "seg_loss_scale", "class_weights",
                 "align_loss_weight")


def model_overrides(args):
    out = {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()} | \
        {"image_size": args.image_size}


def build_model(args, vocab_size):
    """From Swin + BERT files (the recipe), or from scratch (the shapes demo)."""
    overrides = model_overrides(args)
    if args.swin or args.bert:
        if not (args.swin and args.bert):
            raise CheckpointError("give both --swin and --bert (or neither, to train from scratch)")
        return CrossVLT.from_pretrained(swin=args.swin, bert=args.bert, **overrides)
    if args.dataset != "shapes":
        raise CheckpointError(f"--dataset {args.dataset} trains from the official weights: give --swin "
                              "and --bert (weights/README.md says where to get them)")
    preset = getattr(CrossVLTConfig, args.preset)()
    config = dataclasses.replace(preset, bert=dataclasses.replace(preset.bert, vocab_size=vocab_size),
                                 **overrides)
    return CrossVLT(config)


def parameter_groups(model, weight_decay):
    """The released recipe: no decay for the vision side's norms and relative position tables
    (Swin, fusion, the decoder's input norms); everything else decays; frozen parameters
    (BERT embeddings, τ by default) stay out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vision = name.startswith(("swin.", "fusion.", "decoder.norms."))
        exempt = vision and ("norm" in name or "relative_position_bias_table" in name)
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def vocab_path(args):
    if args.vocab:
        return args.vocab
    if args.dataset == "shapes" and not args.bert:
        return str(Path(args.data_root) / "shapes" / "vocab.txt")
    if args.bert and os.path.isdir(args.bert):
        return os.path.join(args.bert, "vocab.txt")
    raise data.DataError("give --vocab (the BERT vocab.txt) when --bert is not a folder holding one")


def setup_distributed(args):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python runs one process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        device = f"cuda:{local}" if world > 1 else device
        torch.cuda.set_device(torch.device(device))
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def main(argv=None):
    args = parse_args(argv)
    given = vars(args).pop("given")
    resume_state = None
    if args.resume:
        state_path = Path(args.resume) / "state.pt"
        if not state_path.exists():
            raise CheckpointError(f"{state_path}: no such file; --resume takes a run folder written by train.py")
        ignored = sorted(set(given) - RESUME_FLAGS)
        if ignored:
            raise CheckpointError(f"--resume continues {args.resume} with its own settings; drop "
                                  + ", ".join("--" + k.replace("_", "-") for k in ignored)
                                  + " (only --stop-after, --workers, --device, --log-every may change)")
        try:
            resume_state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{state_path} cannot be read ({type(e).__name__}); the last complete "
                                  f"epoch's weights are in {args.resume}/last.safetensors") from None
        saved = resume_state["args"]
        args = argparse.Namespace(**(saved | {"resume": args.resume, "stop_after": args.stop_after} |
                                     {k: getattr(args, k) for k in given if k in RESUME_FLAGS}))
    rank, world, device = setup_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    if args.dataset == "shapes":
        if rank == 0:
            t = time.time()
            made = not (Path(args.data_root) / "shapes" / "refs(unc).p").exists()
            data.ensure_shapes(args.data_root)
            if made:
                log(f"built the shapes data set in {args.data_root}/shapes ({time.time() - t:.0f}s)")
        if world > 1:
            dist.barrier()
    refer = data.Refer(args.data_root, args.dataset, args.split_by)
    tokenizer = data.Tokenizer(vocab_path(args))
    train_set = data.RefDataset(refer, "train", tokenizer, args.image_size, train=True, seed=args.seed)
    val_set = data.RefDataset(refer, "val", tokenizer, args.image_size, train=False)

    model = build_model(args, tokenizer.vocab_size) if resume_state is None else \
        CrossVLT(CrossVLTConfig.from_dict(resume_state["config"]))
    if resume_state is not None:
        crossvlt.load_weights(model, resume_state["model"], f"{args.resume}/state.pt")
    model.to(device)
    groups = parameter_groups(model, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed)
    steps_per_epoch = len(sampler) // args.batch_size // args.accumulate
    if steps_per_epoch == 0:
        raise data.DataError(f"{len(train_set)} training refs make no full batch of "
                             f"{args.batch_size * args.accumulate} per device")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = getattr(args, "warmup_steps", 0)          # getattr: runs saved before the flag existed
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    epoch, best, history = 0, -1.0, []
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        epoch, best, history = resume_state["epoch"], resume_state["best"], resume_state["history"]
        torch.set_rng_state(resume_state["rng"])
        if device.type == "cuda" and resume_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume_state["cuda_rng"])
        log(f"resumed {args.resume} at epoch {epoch}, step {scheduler.last_epoch}")

    if world > 1:
        if device.type == "cuda":                            # SyncBatchNorm runs on GPUs only
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    core = model.module if world > 1 else model
    effective = args.batch_size * world * args.accumulate
    n_params = sum(p.numel() for p in core.parameters())
    n_train = sum(p.numel() for g in groups for p in g["params"])
    log(f"{args.dataset} ({args.split_by}): {len(train_set)} train refs, {len(val_set)} val refs | "
        f"model {n_params / 1e6:.1f}M parameters ({n_train / 1e6:.1f}M trained) | {device}, {precision}, "
        f"{world} process(es) | batch {args.batch_size} x {world} x {args.accumulate} = {effective}, "
        f"{steps_per_epoch} steps/epoch, {args.epochs} epochs")
    if effective != RECIPE_BATCH and args.dataset != "shapes":
        log(f"note: effective batch {effective} differs from the recipe's {RECIPE_BATCH}")
    out = Path(args.out if resume_state is None else args.resume)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        shutil.copyfile(tokenizer.path, out / "vocab.txt")         # evaluate.py finds it there

    loader_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                     persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=max(1, args.batch_size // 2),
                                             collate_fn=data.collate_eval, **loader_kw)
    step, first_epoch = scheduler.last_epoch, epoch
    done_images, done_seconds = 0, 0.0            # this invocation's finished epochs, for images/s
    while epoch < args.epochs and step < total_steps:
        if args.stop_after and epoch - first_epoch >= args.stop_after:
            log(f"stopping after {args.stop_after} epoch(s) as asked: continue with --resume {out}")
            break
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                             drop_last=True, **loader_kw)
        model.train()
        t0, seen, sums = time.time(), 0, {}
        for i, (images, masks, ids, attn) in enumerate(loader):
            if i == steps_per_epoch * args.accumulate:      # a partial accumulation would leak
                break                                        # its gradients into the next epoch
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            ids, attn = ids.to(device), attn.to(device)
            last_micro = (i + 1) % args.accumulate == 0
            sync = model.no_sync() if world > 1 and not last_micro else nullcontext()
            with sync:
                with torch.autocast(**autocast):
                    output = model(images, ids, attn)
                loss, parts = core.loss(output, masks)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step + 1}; "
                                             "stopping without writing a checkpoint (try a lower --lr)")
                (loss / args.accumulate).backward()
            for k, v in (parts | {"loss": loss.detach()}).items():
                sums[k] = sums.get(k, 0.0) + v
            seen += len(images)
            if not last_micro:
                continue
            if getattr(args, "clip_grad", None):
                torch.nn.utils.clip_grad_norm_(core.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                rate = (done_images + seen) * world / (done_seconds + time.time() - t0)
                micro = i + 1
                left = (min(total_steps, args.epochs * steps_per_epoch) - step) * effective / rate
                log(f"epoch {epoch + 1} step {step}/{total_steps} | loss {sums['loss'] / micro:.4f} "
                    f"(seg {sums['seg'] / micro:.4f}, align {sums['align'] / micro:.4f}) | "
                    f"lr {scheduler.get_last_lr()[0]:.2e} | {rate:.1f} img/s | ETA {format_time(left)}",
                    flush=True)
            if step >= total_steps:
                break
        epoch += 1
        done_images, done_seconds = done_images + seen, done_seconds + time.time() - t0
        record = {"epoch": epoch, "step": step, "time": round(time.time() - t0, 1),
                  "train": {k: round(float(v) / max(i + 1, 1), 5) for k, v in sums.items()}}
        if rank == 0 and (epoch % args.val_every == 0 or epoch == args.epochs or step >= total_steps):
            t1 = time.time()
            metrics, _, _ = run_evaluation(core, val_loader, device, original=False,
                                           autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
            record["val"] = metrics
            record["val_time"] = round(time.time() - t1, 1)
            log(f"epoch {epoch} val: oIoU {metrics['oIoU']:.2f} mIoU {metrics['mIoU']:.2f} "
                f"P@0.5 {metrics['P@0.5']:.2f} ({record['val_time']:.0f}s)", flush=True)
            if metrics["oIoU"] > best:
                best = metrics["oIoU"]
                core.save(out / "best.safetensors")
        if rank == 0:
            history.append(record)
            core.save(out / "last.safetensors")
            state = {"model": core.state_dict(), "config": core.config.to_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch, "best": best, "history": history, "args": vars(args),
                     "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}
            write_atomic(out / "state.pt", lambda tmp: torch.save(state, tmp))
            write_text(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        if world > 1:
            dist.barrier()
        model.train()
    log(f"done: best val oIoU {best:.2f}; checkpoints in {out}/")
    if world > 1:
        dist.destroy_process_group()
    return best


def lr_factor(step, total, warmup=0):
    """The recipe's poly decay (1 - step/total)^0.9, after `warmup` linear warm-up steps if any
    (not in the recipe; for training from scratch)."""
    ramp = min(1.0, (step + 1) / (warmup + 1)) if warmup else 1.0
    return ramp * max(0.0, 1 - step / total) ** 0.9


def format_time(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, data.DataError, FloatingPointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: resume with --resume (the last finished epoch is kept)")
