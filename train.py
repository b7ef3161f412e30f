"""Train CrossVLT with the released code's recipe (or the paper's, or an ablation).

    python train.py --dataset shapes                        # the built-in demo: tiny model, CPU
    python train.py --dataset refcoco --data-root data --swin weights/swin_base.safetensors \
        --bert weights/bert-base-uncased --out runs/refcoco
    torchrun --nproc_per_node 2 train.py --dataset refcoco ...      # DDP, one process per GPU
    python train.py --resume runs/refcoco                   # continue exactly where it stopped

Recipe (the released code's defaults): AdamW, lr 3e-5 for every group, weight decay 1e-2 except the vision
side's norms and relative position tables, polynomial decay (1 - step/total)^0.9 per step, 40 epochs, global
batch 12, last partial batch dropped, BERT embeddings and τ frozen. Every epoch ends with validation (oIoU/mIoU
at the model's input size), a line in OUT/log.jsonl, OUT/last.safetensors, OUT/best.safetensors (best val oIoU)
and OUT/state.pt, each written atomically. state.pt holds weights, optimizer, schedule, the position in the
epoch's sample order, the loss sums so far and the random state. It is also written every --save-every steps,
and on SIGTERM/SIGINT (preemption, Ctrl-C) once the step in progress is done; the run then prints the command
that continues it and exits with 128 + the signal. --resume from it ends with the very weights of an
uninterrupted run (bit for bit on the CPU); after a hard kill it repeats the steps since the last save.
"""
import argparse
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import signal
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
import evaluate

RECIPE_BATCH = 12
# The demo's schedule (measured on a 2-core CPU, README "Results"): 96x96 runs ~60 img/s, so 2 epochs take
# 4 minutes (val oIoU 72.6; 3 epochs on an earlier vocabulary: 74.2 in 5.5); lr 2e-3 and a learnable τ learned
# fastest of the settings tried. fp32 even where bf16 is native: at this lr bf16 stalled at the all-background
# mask (seg loss flat at 0.19 from step 200, val oIoU 0.2 where fp32 had 68), and for a model this small it was
# no faster.
SHAPES = dict(preset="tiny", epochs=2, batch_size=16, lr=2e-3, workers=1, learnable_tau=True, save_every=100,
              precision="fp32")
REAL = dict(preset="base", epochs=40, batch_size=6, lr=3e-5, workers=4, save_every=500)


def parse_args(argv=None):
    """The command line, checked and completed with the dataset's defaults; args.given: the flags given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=list(data.SPLIT_BYS), default="shapes", help="default: shapes")
    p.add_argument("--split-by", help="unc | google | umd (default: the dataset's first)")
    p.add_argument("--data-root", help="default: data")
    p.add_argument("--swin", help="Swin checkpoint (Microsoft .pth, timm/HF or converted)")
    p.add_argument("--bert", help="BERT folder (config.json, weights, vocab.txt) or converted file")
    p.add_argument("--vocab", help="vocab.txt (default: the BERT folder's, or the shapes set's)")
    p.add_argument("--out", help="run folder (default: runs/DATASET)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from state.pt")
    g = p.add_argument_group("recipe", "Defaults: the released code's (base, 40 epochs, batch 6 per device, lr 3e-5, "
                             "480 px, 4 workers); for --dataset shapes a CPU-sized schedule (tiny, 2 epochs, "
                             "batch 16, lr 2e-3, 96 px, 1 worker, learnable τ, fp32).")
    g.add_argument("--preset", choices=["base", "tiny"])
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per device")
    g.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps (default: 1)")
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float, default=1e-2, help="default: 1e-2")
    g.add_argument("--image-size", type=int)
    g.add_argument("--workers", type=int)
    g.add_argument("--seed", type=int, default=0, help="default: 0")
    g.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 autocast where the device multiplies "
                   "bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX), else fp32")
    g.add_argument("--device", help="default: cuda if available")
    g.add_argument("--max-steps", type=int, help="end the schedule after this many optimizer steps")
    g.add_argument("--stop-after", type=int, help="end this invocation after N epochs (the schedule stays that of "
                   "--epochs): for time-limited jobs; continue with --resume")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear lr warm-up, not in the recipe (default: 0)")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this, not in the recipe (default: off)")
    g.add_argument("--checkpoint-activations", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute the Swin blocks' and language stages' activations: less memory, ~30%% more compute")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model: minutes of compiling first (README 'Benchmarks' says when it "
                   "pays); --no-compile turns it off on --resume")
    g.add_argument("--log-every", type=int, default=20, help="optimizer steps between progress lines (default: 20)")
    g.add_argument("--val-every", type=int, default=1, help="epochs between validations (default: 1)")
    g.add_argument("--save-every", type=int, help="optimizer steps between mid-epoch saves of state.pt (default: 500; "
                   "shapes: 100); every epoch end saves too")
    g.add_argument("--benchmark", type=int, metavar="STEPS", help="measure instead of training: this run's data "
                   "pipeline (items/s with --workers) and STEPS optimizer steps; writes nothing")
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
    for action in p._actions:      # parsed again without defaults: the flags given, even at a default's value
        action.default = argparse.SUPPRESS
    args.given = sorted(set(vars(p.parse_args(argv))) - {"resume"})
    at_least = dict(epochs=1, batch_size=1, accumulate=1, image_size=32, workers=0, max_steps=1, benchmark=1,
                    stop_after=1, warmup_steps=0, log_every=1, val_every=1, save_every=1)
    for name, low in at_least.items():
        if (value := getattr(args, name)) is not None and value < low:
            p.error(f"{flags([name])} must be >= {low}, got {value}")
    for name, bound in dict(lr="> 0", clip_grad="> 0", class_weights="> 0", weight_decay=">= 0",
                            seg_loss_scale=">= 0", align_loss_weight=">= 0").items():
        value = getattr(args, name)
        values = value if isinstance(value, list) else [] if value is None else [value]
        if not all(math.isfinite(v) and (v > 0 if bound == "> 0" else v >= 0) for v in values):
            p.error(f"{flags([name])} must be finite and {bound}, got {value}")
    if args.device is not None and (problem := evaluate.device_problem(args.device)):
        p.error(problem)
    if bool(args.swin) != bool(args.bert):
        p.error("give both --swin and --bert (or neither, to train from scratch)")
    if args.bert_init == "full" and not args.bert:
        p.error("--bert-init full fills language stages 2-4 from --bert's layers: give --swin and --bert")
    if args.dataset != "shapes" and not args.resume and not args.swin:
        p.error(f"--dataset {args.dataset} trains from the official weights: give --swin and --bert "
                "(weights/README.md says where to get them)")
    for name in ("swin", "bert", "vocab"):
        if getattr(args, name) and not os.path.exists(getattr(args, name)):
            p.error(f"--{name} {getattr(args, name)}: no such file or folder")
    for k, v in (SHAPES if args.dataset == "shapes" else REAL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.image_size = args.image_size or getattr(CrossVLTConfig, args.preset)().image_size
    args.split_by = args.split_by or data.SPLIT_BYS[args.dataset][0]
    args.out = args.out or f"runs/{args.dataset}"
    args.data_root = args.data_root or "data"
    for name in ("data_root", "vocab", "swin", "bert"):   # saved absolute: --resume may run elsewhere
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


def flags(names):
    """The command-line spelling of argparse names: ["stop_after", "lr"] -> "--stop-after, --lr"."""
    return ", ".join("--" + name.replace("_", "-") for name in names)


RESUME_FLAGS = {"stop_after", "workers", "device", "log_every", "save_every", "checkpoint_activations", "compile",
                "data_root"}                # may change on --resume (data_root: data moved to another disk)
MODEL_OPTIONS = ("fusion_stages", "fusion_direction", "align_stages", "intermediate_loss", "lang_split",
                 "learnable_tau", "gate_init", "bert_init", "seg_loss_scale", "class_weights", "align_loss_weight")


def read_args(argv):
    """The command line, or with --resume RUN the run's own settings (a few may change): (args, state.pt or None)."""
    args = parse_args(argv)
    given = vars(args).pop("given")
    if not args.resume:
        held = [] if args.benchmark else [name for name in ("state.pt", "last.safetensors", "best.safetensors")
                                          if Path(args.out, name).exists()]
        if held:
            resume = f"continue it with python train.py --resume {args.out}, or " if "state.pt" in held else ""
            raise CheckpointError(f"{args.out} already holds a run ({held[0]}): {resume}start anew in another "
                                  "--out (or delete it)")
        return args, None
    state_path = Path(args.resume) / "state.pt"
    if not state_path.exists():
        raise CheckpointError(f"{state_path}: no such file; --resume takes a run folder written by train.py")
    if ignored := sorted(set(given) - RESUME_FLAGS):
        raise CheckpointError(f"--resume continues {args.resume} with its own settings; drop {flags(ignored)} "
                              f"(only {flags(sorted(RESUME_FLAGS))} may change)")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        last = Path(args.resume) / "last.safetensors"
        fallback = f"the last complete epoch's weights are in {last}" if last.exists() else "no epoch was completed"
        raise CheckpointError(f"{state_path} cannot be read ({type(e).__name__}); {fallback}") from None
    if not isinstance(state, dict) or not {"progress", "args", "model"} <= set(state):
        raise CheckpointError(f"{state_path} is not a state.pt of this train.py (an older one saved no position); "
                              f"start a new run from {args.resume}/last.safetensors")
    kept = {k: getattr(args, k) for k in given if k in RESUME_FLAGS}
    resumed = ["--dataset", state["args"].get("dataset", "shapes"), "--resume", args.resume]
    defaults = {k: v for k, v in vars(parse_args(resumed)).items() if k != "given"}   # for flags newer than the run
    settings = defaults | state["args"] | {"resume": args.resume, "stop_after": args.stop_after} | kept
    return argparse.Namespace(**settings), state


def build_model(args, vocab_size):
    """From Swin + BERT files (the recipe), or from scratch (the shapes demo)."""
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()
                 if k in MODEL_OPTIONS and v is not None} | {"image_size": args.image_size}
    if args.swin:                                     # parse_args saw to --bert with it
        return CrossVLT.from_pretrained(swin=args.swin, bert=args.bert, **overrides)
    preset = getattr(CrossVLTConfig, args.preset)()
    bert = dataclasses.replace(preset.bert, vocab_size=vocab_size)
    return CrossVLT(dataclasses.replace(preset, bert=bert, **overrides))


def parameter_groups(model, weight_decay):
    """The recipe's AdamW groups: no decay for the vision side's norms and relative position tables (Swin,
    fusion, the decoder's input norms), decay for the rest; frozen ones (BERT embeddings, τ by default) left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vision = name.startswith(("swin.", "fusion.", "decoder.norms."))
        exempt = vision and ("norm" in name or "relative_position_bias_table" in name)
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def native_bf16(device):
    """Whether `device` multiplies bf16 natively, so that bf16 autocast pays: CUDA GPUs from Ampere
    on, CPUs with AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and any(getattr(torch.cpu, f, lambda: False)() for f in
                                        ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def setup_distributed(args):
    """Returns (rank, world size, device, ddp): DDP under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK),
    even in one process (NCCL and SyncBatchNorm then run as on many GPUs), else one plain process."""
    ddp = "LOCAL_RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":                     # set_device needs an index: "cuda" is the current GPU
        index = int(os.environ["LOCAL_RANK"]) if ddp else device.index
        device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        torch.cuda.set_device(device)
    if ddp:
        # the other ranks wait at a barrier while rank 0 validates and saves: minutes on a large val split,
        # where NCCL's default would give up after 10
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return rank, world, device, ddp


# ----------------------------------------------------------------------------------------------
# Where a run is, and how it is asked to stop

@dataclasses.dataclass
class Progress:
    """Where the run is, saved in state.pt beside weights and optimizer: --resume continues at that very step
    (and sample)."""
    epoch: int = 0              # epochs finished
    step: int = 0               # optimizer steps taken, all epochs
    epoch_step: int = 0         # optimizer steps taken in the current epoch
    seen: int = 0               # images this process trained on in the current epoch
    seconds: float = 0.0        # time spent training in the current epoch
    sums: dict = dataclasses.field(default_factory=dict)    # loss parts, summed over micro-batches
    best: float = -1.0          # best val oIoU so far
    history: list = dataclasses.field(default_factory=list)  # one record per finished epoch


class StopRequest:
    """SIGTERM (a scheduler preempting the job) or SIGINT (Ctrl-C) asks the run to stop after the optimizer step
    it is in, and says so at once; a second SIGINT stops at once. Under torchrun the ranks agree every --log-every
    steps, when the losses go to the host anyway, so that all stop after the same step without a host
    synchronisation per step; torchrun kills its processes --shutdown-timeout seconds (30) after a signal, so
    that must outlast --log-every steps and a validation."""

    def __init__(self, quiet=False):
        self.quiet = quiet                          # the ranks but the first: one message is enough

    def __enter__(self):
        self.signum, self.interrupted = 0, False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.interrupted:
            raise KeyboardInterrupt
        self.signum, self.interrupted = signum, self.interrupted or signum == signal.SIGINT
        if not self.quiet:       # os.write, not print: a print that this handler interrupts would be re-entered
            os.write(2, f"{signal.Signals(signum).name}: stopping after this step, then saving (Ctrl-C again "
                        "stops at once)\n".encode())

    def agreed(self, ddp, device):
        """The signal any rank received (0: none), now every rank's (under DDP one tiny all-reduce; every rank
        must call it at the same step)."""
        if ddp:
            flag = torch.tensor([self.signum], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item())
        return self.signum


def ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which ends them when it is done (a scheduler
    signals every process of the job; a worker dying then would abort the step)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def end_workers():
    """Kill the DataLoader workers a failed run leaves: they ignore SIGTERM (ignore_stop_signals), by which Python's
    exit ends them, so it would wait forever. PyTorch's worker-death handler goes first (it would report the kill)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in multiprocessing.active_children():
        worker.kill()


# ----------------------------------------------------------------------------------------------
# One optimizer step: what the benchmark times

def train_step(model, loss_fn, optimizer, micro_batches, precision, clip_grad=None, scheduler=None):
    """One optimizer step over the gradient-accumulation micro-batches (dicts of image, mask, input_ids,
    attention_mask): forward in `precision`, loss in fp32, each micro-batch's share backward (DDP averages
    the gradients on the last only), clipping, update. Returns the loss parts summed over the micro-batches,
    on the device (no host synchronisation); evaluate.py --benchmark times this very step."""
    sums, n = {}, len(micro_batches)
    device = next(model.parameters()).device
    for j, batch in enumerate(micro_batches):
        batch = {k: t.to(device, non_blocking=True) for k, t in batch.items()}
        accumulating = hasattr(model, "no_sync") and j < n - 1               # DDP: sync the last
        with model.no_sync() if accumulating else nullcontext():
            with crossvlt.autocast(device, precision):
                output = model(batch["image"], batch["input_ids"], batch["attention_mask"])
            loss, parts = loss_fn(output, batch["mask"])
            (loss / n).backward()
        for k, v in (parts | {"loss": loss.detach()}).items():
            sums[k] = sums.get(k, 0.0) + v
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return sums


# ----------------------------------------------------------------------------------------------
# A run: set up, restore, train an epoch, end it, save

def set_up(args, state):
    """Data, model, optimizer and schedule, DDP, the run folder. Returns the run's namespace."""
    rank, world, device, ddp = setup_distributed(args)
    run = argparse.Namespace(args=args, rank=rank, world=world, device=device, ddp=ddp,
                             log=print if rank == 0 else (lambda *a, **k: None))
    torch.manual_seed(args.seed)
    args.precision = args.precision or ("bf16" if native_bf16(device) else "fp32")
    tokenizer = load_data(run)
    if state is None:
        model = build_model(args, tokenizer.vocab_size)
    else:
        model = CrossVLT(CrossVLTConfig.from_dict(state["config"]))
        crossvlt.load_weights(model, state["model"], f"{args.resume}/state.pt")
    run.core = model.to(device).checkpoint_activations(args.checkpoint_activations)
    if args.compile:                           # in place: the state dict keeps its names
        run.core.compile()
    groups = parameter_groups(model, args.weight_decay)
    # fused: one kernel for all parameters (CPU and CUDA), the same update as the default loop
    run.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    run.sampler = torch.utils.data.DistributedSampler(run.train_set, num_replicas=world, rank=rank,
                                                      shuffle=True, seed=args.seed)
    run.steps_per_epoch = len(run.sampler) // args.batch_size // args.accumulate
    if run.steps_per_epoch == 0:
        raise data.DataError(f"{len(run.train_set)} training refs make no full batch of "
                             f"{args.batch_size * args.accumulate} per device")
    run.total_steps = min(args.epochs * run.steps_per_epoch, args.max_steps or float("inf"))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda s: lr_factor(s, run.total_steps, args.warmup_steps))
    if ddp and device.type == "cuda":                       # SyncBatchNorm runs on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    run.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp else model
    run.effective = args.batch_size * world * args.accumulate
    trained = sum(p.numel() for g in groups for p in g["params"]) / 1e6
    run.log(f"{args.dataset} ({args.split_by}): {len(run.train_set)} train refs, {len(run.val_set)} val refs | "
            f"model {sum(p.numel() for p in run.core.parameters()) / 1e6:.1f}M parameters ({trained:.1f}M trained) | "
            f"{device}, {args.precision}, {world} process(es) | batch {args.batch_size} x {world} x "
            f"{args.accumulate} = {run.effective}, {run.steps_per_epoch} steps/epoch, {args.epochs} epochs")
    if run.effective != RECIPE_BATCH and args.dataset != "shapes":
        run.log(f"note: effective batch {run.effective} differs from the recipe's {RECIPE_BATCH}")
    run.out, run.vocab = Path(args.resume or args.out), tokenizer.path
    run.trained_images, run.trained_seconds = 0, 0.0                  # this invocation, for img/s
    return run


def load_data(run):
    """The train and val sets (the shapes set is generated on first use); returns the tokenizer."""
    args = run.args
    if args.dataset == "shapes":
        if run.rank == 0 and not Path(args.data_root, "shapes", "refs(unc).p").exists():
            t = time.time()
            data.ensure_shapes(args.data_root)
            run.log(f"built the shapes data set in {args.data_root}/shapes ({time.time() - t:.0f}s)")
        if run.ddp:
            dist.barrier()
    refer = data.Refer(args.data_root, args.dataset, args.split_by)
    if args.vocab:
        vocab = args.vocab
    elif args.dataset == "shapes" and not args.bert:
        vocab = Path(args.data_root, "shapes", "vocab.txt")
    elif args.bert and os.path.isdir(args.bert):
        vocab = os.path.join(args.bert, "vocab.txt")
    else:
        raise data.DataError("give --vocab (the BERT vocab.txt) when --bert is not a folder holding one")
    tokenizer = data.Tokenizer(vocab)
    run.train_set = data.RefDataset(refer, "train", tokenizer, args.image_size, train=True, seed=args.seed)
    run.val_set = data.RefDataset(refer, "val", tokenizer, args.image_size, train=False)
    return tokenizer


def restore(run, state):
    """Optimizer, schedule, position and random state from state.pt (or a fresh start)."""
    if state is None:
        return Progress()
    if state.get("train_refs", len(run.train_set)) != len(run.train_set):
        raise CheckpointError(f"{run.out}/state.pt was trained on {state['train_refs']} refs, {run.args.data_root} "
                              f"holds {len(run.train_set)}: resume on the same data (--data-root)")
    if state.get("world", 1) != run.world:
        raise CheckpointError(f"{run.out}/state.pt was written by {state.get('world', 1)} process(es), this run has "
                              f"{run.world}: resume with the same number, so that the sample order and schedule match")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if run.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"])
    progress = Progress(**state["progress"])
    progress.sums = {k: v.to(run.device) for k, v in progress.sums.items()}
    run.log(f"resumed {run.out} at epoch {progress.epoch + 1}, step {progress.step} "
            f"({progress.epoch_step} of the epoch's {run.steps_per_epoch} done)")
    return progress


def loader(run, dataset, **kw):
    """DataLoader with its own random generator: creating one leaves the global random state
    (dropout, drop-path) untouched, so a resumed run draws what the uninterrupted one drew."""
    return torch.utils.data.DataLoader(dataset, num_workers=run.args.workers, generator=torch.Generator(),
                                       pin_memory=run.device.type == "cuda", worker_init_fn=ignore_stop_signals, **kw)


def train_epoch(run, progress, stop):
    """Optimizer steps until the epoch (or the schedule) ends, a save on the --save-every
    cadence, a progress line every --log-every steps. Returns False when asked to stop."""
    args = run.args
    run.sampler.set_epoch(progress.epoch)
    run.train_set.set_epoch(progress.epoch)
    skip = progress.epoch_step * args.accumulate * args.batch_size       # already trained on
    batches = iter(loader(run, run.train_set, batch_size=args.batch_size, drop_last=True,
                          sampler=list(run.sampler)[skip:]))
    end = min(run.steps_per_epoch, progress.epoch_step + run.total_steps - progress.step)  # or where the schedule ends
    run.core.train()
    while progress.epoch_step < end:
        t0 = time.time()
        micro_batches = [next(batches) for _ in range(args.accumulate)]
        sums = train_step(run.model, run.core.loss, run.optimizer, micro_batches, args.precision,
                          args.clip_grad, run.scheduler)
        for k, v in sums.items():
            progress.sums[k] = progress.sums.get(k, 0.0) + v
        images = sum(len(b["image"]) for b in micro_batches)
        elapsed = time.time() - t0
        progress.step += 1
        progress.epoch_step += 1
        progress.seen += images
        progress.seconds += elapsed
        run.trained_images += images
        run.trained_seconds += elapsed
        at_log = progress.step % args.log_every == 0 or progress.step == run.total_steps
        if at_log:
            log_progress(run, progress)
        if (at_log or not run.ddp) and stop.agreed(run.ddp, run.device):
            return False
        if progress.step % args.save_every == 0 and progress.epoch_step < end:     # the end saves anyway
            save_state(run, progress)
    return True


def train_losses(progress, accumulate):
    """The epoch's mean loss parts over the micro-batches trained on so far; stops the run on a
    non-finite loss (checked here, when the losses reach the host, before anything is saved)."""
    micro = max(progress.epoch_step * accumulate, 1)
    losses = {k: float(v) / micro for k, v in progress.sums.items()}
    if not all(map(torch.isfinite, map(torch.tensor, losses.values()))):
        raise FloatingPointError(f"loss is {losses['loss']} in epoch {progress.epoch + 1} by step "
                                 f"{progress.step}; stopping without writing a checkpoint (try a lower --lr)")
    return losses


def log_progress(run, progress):
    losses = train_losses(progress, run.args.accumulate)
    rate = run.trained_images * run.world / max(run.trained_seconds, 1e-9)
    left = (run.total_steps - progress.step) * run.effective / rate
    run.log(f"epoch {progress.epoch + 1} step {progress.step}/{run.total_steps} | loss {losses['loss']:.4f} "
            f"(seg {losses['seg']:.4f}, align {losses['align']:.4f}) | lr {run.scheduler.get_last_lr()[0]:.2e} | "
            f"{rate:.1f} img/s | ETA {format_time(left)}", flush=True)


def end_epoch(run, progress, val_loader):
    """Save state.pt, validate (every --val-every epochs and at the end), record the epoch, save again. The first
    save refuses non-finite weights before best/last are written, and a failure or a kill during validation
    loses no step: --resume finds the epoch's steps done and ends it again."""
    args = run.args
    save_state(run, progress)
    record = {"epoch": progress.epoch + 1, "step": progress.step, "time": round(progress.seconds, 1),
              "train": {k: round(v, 5) for k, v in train_losses(progress, args.accumulate).items()}}
    last = progress.epoch + 1 == args.epochs or progress.step >= run.total_steps
    if run.rank == 0 and ((progress.epoch + 1) % args.val_every == 0 or last):
        t = time.time()
        metrics, _, records = evaluate.run_evaluation(run.core, val_loader, run.device, original=False,
                                                      precision=args.precision)
        record |= {"val": metrics, "val_time": round(time.time() - t, 1)}
        run.log(f"epoch {record['epoch']} val: oIoU {metrics['oIoU']:.2f} mIoU {metrics['mIoU']:.2f} "
                f"P@0.5 {metrics['P@0.5']:.2f} ({record['val_time']:.0f}s)", flush=True)
        if last and args.dataset == "shapes":        # what the demo has learned, word kind by kind
            record["val_by_kind"] = evaluate.metrics_by_kind(records)
            run.log(evaluate.kinds_table(record["val_by_kind"]))
        if metrics["oIoU"] > progress.best:
            progress.best = metrics["oIoU"]
            run.core.save(run.out / "best.safetensors")
    progress.history.append(record)
    progress.epoch += 1
    progress.epoch_step, progress.seen, progress.seconds, progress.sums = 0, 0, 0.0, {}
    if run.rank == 0:
        run.core.save(run.out / "last.safetensors")
        crossvlt.write_text(run.out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in progress.history))
    save_state(run, progress)
    if run.ddp:
        dist.barrier()


def save_state(run, progress):
    """state.pt (rank 0 writes; the ranks' states are alike): everything --resume needs."""
    train_losses(progress, run.args.accumulate)                  # no checkpoint after a NaN
    if run.rank != 0:
        return
    # the weights too: a finite loss can still come with inf gradients (under DDP from any rank: the averaged
    # update spreads them to every rank's weights, rank 0's included)
    if not torch.stack([p.isfinite().all() for p in run.core.parameters()]).all():
        raise FloatingPointError(f"weights are not finite after step {progress.step}; stopping without "
                                 "writing a checkpoint (try a lower --lr or --clip-grad)")
    position = dataclasses.asdict(progress) | {"sums": {k: v.cpu() for k, v in progress.sums.items()}}
    state = {"model": run.core.state_dict(), "config": run.core.config.to_dict(), "args": vars(run.args),
             "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "progress": position,
             "world": run.world, "train_refs": len(run.train_set), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
    crossvlt.write_atomic(run.out / "state.pt", lambda tmp: torch.save(state, tmp))


def stop_on_signal(run, progress, stop, saved):
    """Write state.pt (unless just written), say how to continue, exit with 128 + the signal."""
    if not saved:
        save_state(run, progress)
    if run.ddp:
        dist.barrier()                          # the others wait for rank 0's write to finish
    run.log(f"{signal.Signals(stop.signum).name}: stopped after step {progress.step} (epoch "
            f"{progress.epoch + (0 if saved else 1)}), state saved; continue with: python train.py "
            f"--resume {run.out}", flush=True)
    raise SystemExit(128 + stop.signum)


def main(argv=None):
    """A training run (returns its best val oIoU), or with --benchmark a measurement (returns seconds per step)."""
    args, state = read_args(argv)
    run = set_up(args, state)
    try:
        return benchmark(run) if args.benchmark else run_training(run, state)
    finally:
        if run.ddp:
            dist.destroy_process_group()


def run_training(run, state):
    """Restore, then for each epoch: train, validate, save; a signal stops it cleanly."""
    args, progress = run.args, restore(run, state)
    if run.rank == 0:                           # after restore's checks: a refused --resume changes no file
        run.out.mkdir(parents=True, exist_ok=True)
        crossvlt.write_text(run.out / "args.json", json.dumps(vars(args), indent=1))
        crossvlt.write_text(run.out / "vocab.txt", Path(run.vocab).read_text(encoding="utf-8"))   # for evaluate.py
    val_loader = loader(run, run.val_set, batch_size=args.batch_size, collate_fn=data.collate_eval)
    first_epoch = progress.epoch
    with StopRequest(quiet=run.rank != 0) as stop:
        # a run stopped during its last step has that epoch's end still to do
        while progress.epoch < args.epochs and (progress.step < run.total_steps or progress.epoch_step):
            if args.stop_after and progress.epoch - first_epoch >= args.stop_after:
                run.log(f"stopping after {args.stop_after} epoch(s) as asked: continue with "
                        f"python train.py --resume {run.out}")
                return progress.best
            finished = train_epoch(run, progress, stop)
            if finished:
                end_epoch(run, progress, val_loader)                 # saves state.pt too
            if not finished or stop.agreed(run.ddp, run.device):     # a signal during validation
                stop_on_signal(run, progress, stop, saved=finished)
    run.log(f"done: best val oIoU {progress.best:.2f}; checkpoints in {run.out}/")
    return progress.best


def benchmark(run):
    """--benchmark STEPS: the training items/s of this run's DataLoader, then STEPS optimizer steps (after
    a warm-up) with its model, device, precision and batch: time, images/s, GFLOP/s against the machine's
    matrix-product rate, peak memory. Writes nothing; returns the seconds of a step."""
    args, steps = run.args, run.args.benchmark
    batches = iter(loader(run, run.train_set, batch_size=args.batch_size, shuffle=True, drop_last=True))
    available = len(run.sampler) // args.batch_size - 1 - args.accumulate   # the first and the timed ones
    if available < 1:
        raise data.DataError(f"--benchmark needs {args.accumulate + 2} batches of {args.batch_size}; the "
                             f"{len(run.train_set)} train refs make {len(run.sampler) // args.batch_size}")
    rate = evaluate.items_per_s(batches, min(steps * args.accumulate, available))
    per = f", {rate / args.workers:.0f} per worker" if args.workers else ""
    run.log(f"data: {rate:.0f} training items/s with {args.workers} worker(s){per} "
            f"({args.dataset} at {args.image_size} px)", flush=True)
    micro = [next(batches) for _ in range(args.accumulate)]
    first, seconds = evaluate.time_steps(lambda: train_step(run.model, run.core.loss, run.optimizer, micro,
                                                            args.precision, args.clip_grad), steps, run.device)
    peak, images = evaluate.peak_memory_mib(run.device), args.batch_size * args.accumulate   # before the count
    gflops = evaluate.model_flops(run.core.config, images, args.image_size, train=True) / seconds / 1e9
    ceiling = evaluate.matmul_gflops(str(run.device), args.precision)
    memory = "peak GPU memory" if run.device.type == "cuda" else "peak RSS"
    run.log(f"train: first step (warm-up{', compiling' if args.compile else ''}) {first:.1f} s; then {steps} optimizer "
            f"steps of {images} images per process: {seconds:.3f} s/step, {images * run.world / seconds:.1f} images/s "
            f"over {run.world} process(es), {gflops:.1f} GFLOP/s ({gflops / ceiling:.0%} of the {ceiling:.0f} GFLOP/s "
            f"matrix products reach here), {memory} {peak:.0f} MiB")
    return seconds


def lr_factor(step, total, warmup=0):
    """The recipe's poly decay (1 - step/total)^0.9, after `warmup` linear warm-up steps (not in the
    recipe; for training from scratch)."""
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
        sys.exit(f"error: {evaluate.one_line(e)}")
    except KeyboardInterrupt:
        sys.exit("interrupted at once (Ctrl-C before the run could stop cleanly, or a second one): "
                 "python train.py --resume RUN continues from the run's last save, if it made one")
    finally:
        end_workers()
