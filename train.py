"""Selective repulsive knowledge distillation: FetalCLIP (teacher) -> MobileFetalCLIP (student).

    python train.py                  # the demo: synthetic benchmark, demo teacher first, then distillation (CPU)
    python train.py --preset=paper --teacher_ckpt=FetalCLIP_weights.pt --student_init=mobileclip2_s0.pt \
        --train_data='shards/{000000..000246}.tar' --planes_dir=FETAL_PLANES_DB --hc18_dir=HC18   # paper Sec. 3.6
    torchrun --standalone --nproc_per_node=8 train.py --preset=paper ...
    python train.py --data_dir= --train_data=shards --eval_tasks=my_task/    # your pairs (prepare.py), your task
Any global below can be overridden with --key=value; --resume=True continues out_dir/ckpt.pt exactly (settings
other than RESUMABLE ones must not change). --max_steps=N is a smoke test: the schedule fits N steps, and the
demo teacher trained first stops as early, in a folder of its own (demo_teacher_max_stepsN) no full run takes.
About 720 lines, past a script's ~700: one concern still, one training run read top to bottom (settings,
checks, data, models, schedule, resume, loop, summary), as nanoGPT's train.py.
"""

import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import configurator
import data
import evaluate
import protocol
from loss import KD_MODES, distill_loss, feature_kd_loss
from model import (
    MODEL_CONFIGS,
    context_length_of,
    create_model,
    load_checkpoint,
    load_model,
    read_checkpoint,
)

# ------------------------------------------------------------------ settings: --key=value
# I/O
# ckpt.pt (latest), best.pt (best by Avg), log.jsonl: configurator.CHECKPOINT, BEST, LOG
out_dir = "out"
# the synthetic benchmark, written when missing; '' = none (your data)
data_dir = configurator.DEMO_DIR
train_data = ""  # WebDataset shards, brace-expanded (prepare.py writes them); '' = the demo shards in data_dir
planes_dir = ""  # Planes DB folder; '' = data_dir/planes, none without data_dir
hc18_dir = ""  # HC18 folder; '' = data_dir/hc18, none without data_dir
eval_tasks = ""  # your task folders (evaluate.py --task), comma-separated: evaluated every epoch beside the protocol
eval_every = 1  # zero-shot evaluation + best.pt every N epochs; 0 = never
eval_split = "all"  # 'all' = the published protocol; 'select' = held-out patients (evaluate.py)
log_interval = 10  # micro-batches between log lines
resume = False  # continue from out_dir/ckpt.pt
wandb_log = False  # also log to Weights & Biases (needs `pip install wandb`)
wandb_project = "mobilefetalclip"
# models
student = "demo_student"  # model.py name
student_init = ""  # open_clip / Apple MobileCLIP2 file to start from; '' = random init
teacher = "demo_teacher"  # model.py name
# teacher weights; '' with demo_teacher = train one into out_dir/demo_teacher (see below)
teacher_ckpt = ""
demo_teacher_epochs = 7  # epochs of CLIP training for that demo teacher
teacher_cache = ""  # folder written by `python -m tools.cache`: replay its teacher embeddings, never run the teacher
# distillation (paper Sec. 3.1-3.4): mode is a loss.KD_MODES entry, none | coupled (Eq. 4-5) | selective
# (Eq. 6-7); each mode's weight at t = 0 (w0) is the setting its entry names, with its default there:
# lambda0 = 1.0 (coupled, Eq. 5), beta0 = 2.0 (selective, Eq. 7); a mode added to KD_MODES brings its own
mode = "selective"
globals().update({kd["weight"]: kd["w0"] for kd in KD_MODES.values() if kd["weight"]})
r = -0.8  # weight at the end = w0 * r; r < 0 turns attraction into repulsion
tau_kd = 1.0  # teacher temperature (Eq. 2); the paper's 5 softens FetalCLIP's logit scale 100 to 20, the demo
# teacher learns ~14 in its short run, which 5 would flatten to ~3 (nearly uniform targets): 1 keeps it ~14
smoothing = 0.0  # confidence-penalty baseline: teacher rows (1 - eps) p + eps / N
feature_kd = 0.0  # weight of the feature-KD baseline (2000 in the paper); 0 = off
# optimisation (paper Sec. 3.6)
epochs = 6
batch_size = 64  # global micro-batch: the logit matrices are batch_size x batch_size
grad_accum = 1  # micro-batches per optimiser step (only averages gradients)
samples_per_epoch = -1  # -1 = every sample of the shards once
learning_rate = 2e-3
warmup_steps = 20  # optimiser steps of linear warm-up, then cosine to 0
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.98
eps = 1e-6
grad_clip = 1.0  # the gradient norm is clipped to this; 0 = off (as in nanoGPT)
max_bad_steps = 5  # consecutive non-finite losses before the run stops
max_steps = -1  # stop after this many optimiser steps, the schedule fitted to them (smoke tests); -1 = all epochs
# system
device = ""  # '' = cuda, else mps, else cpu
dtype = ""  # '' = bf16 (or fp16 + grad scaler) on cuda, fp32 elsewhere; or float32|bfloat16|float16
num_workers = 2  # data loader processes per rank
shuffle_buffer = 1000  # samples; 1 keeps the shards' order
seed = 0
# seed of the augmentation draws; -1 = seed. Fix it to share one teacher cache across seeds
augment_seed = -1
PRESETS = {
    "paper": {  # paper Sec. 3.6; the real data: --train_data, --planes_dir, --hc18_dir
        "student": "mobilefetalclip",
        "teacher": "fetalclip",
        "epochs": 20,
        "batch_size": 512,
        "grad_accum": 2,
        "tau_kd": 5.0,
        "learning_rate": 1e-5,
        "warmup_steps": 500,
        "dtype": "float16",
        "log_interval": 50,
        "num_workers": 8,
        "data_dir": "",
    }
}
RESUMABLE = (
    "log_interval",
    "eval_every",
    "num_workers",
    "device",
    "wandb_log",
    "wandb_project",
    "resume",
)

# in every checkpoint and log
config = configurator.configure(configurator.settings(globals()), sys.argv[1:], PRESETS)
globals().update(config)
one_step = batch_size * grad_accum  # pairs per optimiser step
rules = [  # (setting, holds, expected): checked before anything runs, after every float is checked to be finite
    configurator.choice("mode", mode, KD_MODES),
    configurator.choice("student", student, MODEL_CONFIGS),
    configurator.choice("teacher", teacher, MODEL_CONFIGS),
    configurator.choice("dtype", dtype, ("", "float32", "bfloat16", "float16")),
    configurator.choice("eval_split", eval_split, protocol.SPLITS),
    ("batch_size", batch_size > 0, "a positive number of pairs"),
    ("grad_accum", grad_accum > 0, "at least 1"),
    ("epochs", epochs > 0, "at least 1"),
    (
        "samples_per_epoch",
        samples_per_epoch == -1 or samples_per_epoch >= one_step,
        f"-1 or at least {one_step}",
    ),
    ("num_workers", num_workers >= 0, "0 or more"),
    ("log_interval", log_interval > 0, "at least 1"),
    ("eval_every", eval_every >= 0, "0 (never) or more"),
    (
        "eval_every",
        not eval_every or data_dir or planes_dir or hc18_dir or eval_tasks,
        "0: nothing to evaluate",
    ),
    ("max_bad_steps", max_bad_steps > 0, "at least 1"),
    ("max_steps", max_steps == -1 or max_steps > 0, "-1 (all epochs) or at least 1"),
    ("shuffle_buffer", shuffle_buffer > 0, "at least 1"),
    ("demo_teacher_epochs", demo_teacher_epochs > 0, "at least 1"),
    ("seed", seed >= 0, "0 or more"),
    ("augment_seed", augment_seed >= -1, "-1 (= seed) or 0 or more"),
    ("warmup_steps", warmup_steps >= 0, "0 or more"),
    ("learning_rate", learning_rate > 0, "a positive number"),
    ("weight_decay", weight_decay >= 0, "0 or more"),
    ("beta1", 0 <= beta1 < 1, "a number in [0, 1)"),
    ("beta2", 0 <= beta2 < 1, "a number in [0, 1)"),
    ("eps", eps > 0, "a positive number"),
    ("grad_clip", grad_clip >= 0, "0 (off) or a positive gradient norm"),
    ("tau_kd", tau_kd > 0, "a positive temperature"),
    ("smoothing", 0 <= smoothing < 1, "a number in [0, 1)"),
    ("feature_kd", feature_kd >= 0, "0 (off) or a positive weight"),
]
configurator.refuse(config, rules)

# ------------------------------------------------------------------ system
ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
device = configurator.pick_device(device)
if ddp:
    # rank 0 evaluates alone at the end of an epoch while the others wait at a barrier: allow it an hour
    dist.init_process_group(
        backend="nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=1)
    )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master = rank == 0
device_type = device.split(":")[0]
if not dtype:
    dtype = (
        ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        if device_type == "cuda"
        else "float32"
    )
amp_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = (
    nullcontext() if amp_dtype == torch.float32 else torch.autocast(device_type, dtype=amp_dtype)
)
augment_seed = seed if augment_seed < 0 else augment_seed
if batch_size % world_size:
    raise SystemExit(f"--batch_size={batch_size} must be divisible by the {world_size} processes")
torch.manual_seed(seed + rank)
with configurator.user_errors("train.py"):
    configurator.check_folder(out_dir, "--out_dir")
# a new run never writes over another's checkpoints, nor leaves its best.pt beside its own
held = [
    f
    for f in (configurator.CHECKPOINT, configurator.BEST)
    if os.path.exists(os.path.join(out_dir, f))
]
if held and not resume:
    raise SystemExit(
        f"--out_dir={out_dir} holds a run already ({', '.join(held)}): --resume=True continues it; a new "
        "run needs another --out_dir (or those files deleted)"
    )
os.makedirs(out_dir, exist_ok=True)

# ------------------------------------------------------------------ data
demo_folders = {}
if data_dir:  # the demo's synthetic benchmark, written by tools/synthetic.py
    from tools import synthetic

    if not os.path.isdir(data_dir):
        if master:
            print(
                f"{data_dir} is missing: writing the demo benchmark (python -m tools.synthetic --out_dir={data_dir})"
            )
            synthetic.generate(data_dir, seed=seed)
        if ddp:
            dist.barrier()
    demo_folders = synthetic.layout(data_dir)
train_data = train_data or demo_folders.get("train_data", "")
planes_dir = planes_dir or demo_folders.get("planes_dir", "")
hc18_dir = hc18_dir or demo_folders.get("hc18_dir", "")
tasks = []  # the user's zero-shot tasks (--eval_tasks), read once
with configurator.user_errors(
    "the data (--train_data, --planes_dir, --hc18_dir, --eval_tasks; --eval_every=0 trains without evaluating)"
):  # a wrong path, a bad image or an empty evaluation set fails now, not after epoch 0
    data.expand_urls(train_data)
    if eval_every > 0 and master:
        context = context_length_of(student)  # the task prompts must fit the student's text context
        tasks = evaluate.check_sets(
            planes_dir, hc18_dir, eval_tasks, split=eval_split, context_length=context
        )


def demo_teacher_path():
    """Where the demo teacher's run lives: out_dir/demo_teacher, or under --max_steps=N (a smoke test, whose
    teacher stops after N steps too) out_dir/demo_teacher_max_stepsN, a folder no full run reads. The
    student learns from its ckpt.pt, the last epoch: a teacher is not chosen on the benchmark it is
    evaluated on."""
    folder = configurator.DEMO_TEACHER + (f"_max_steps{max_steps}" if max_steps > 0 else "")
    return os.path.join(out_dir, folder, configurator.CHECKPOINT)


def demo_teacher_trained(path):
    """Its ckpt.pt counts the epochs its run finished (and the steps, where --max_steps stopped it)."""
    if not os.path.exists(path):
        return False
    with configurator.user_errors("the demo teacher"):
        checkpoint = read_checkpoint(path)
    stopped = max_steps > 0 and checkpoint["opt_step"] >= max_steps
    return checkpoint["epoch"] == demo_teacher_epochs or stopped


def train_demo_teacher(path):
    """The demo's teacher: this same script with the CLIP loss only, run once and reused. An interrupted run
    is resumed; one made with other settings (epochs included) is refused, naming them."""
    flags = {
        "mode": "none",
        "student": teacher,
        "out_dir": os.path.dirname(path),
        "data_dir": data_dir,
        "train_data": train_data,
        "planes_dir": planes_dir,
        "hc18_dir": hc18_dir,
        "eval_tasks": eval_tasks,
        "eval_every": eval_every,
        "seed": seed,
        "epochs": demo_teacher_epochs,
        "device": device,
        "resume": os.path.exists(path),
        "num_workers": num_workers,
    }
    if max_steps > 0:
        flags["max_steps"] = max_steps
    command = [sys.executable, os.path.abspath(__file__), *(f"--{k}={v}" for k, v in flags.items())]
    print(
        f"{'resuming' if flags['resume'] else 'training'} the demo teacher first ({' '.join(command[1:])})"
    )
    environment = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    if subprocess.run(command, env=environment).returncode != 0:
        raise SystemExit(
            f"the demo teacher's run in {os.path.dirname(path)} failed: its error is above"
        )
    print(
        f"the demo teacher is trained: the student learns from {path} (its last epoch, not its best.pt)"
    )


# ------------------------------------------------------------------ models
class Distillee(nn.Module):
    """The student plus, when projected, the Linear(D_S, D_T) that projected KD terms read (the feature-KD
    baseline, or a mode whose KD_MODES entry asks for it): one unit for DDP and the optimiser."""

    def __init__(self, student_net, teacher_dim, projected):
        super().__init__()
        self.student = student_net
        self.feature_proj = nn.Linear(student_net.embed_dim, teacher_dim) if projected else None

    def forward(self, images, tokens):
        image_features, text_features, logit_scale = self.student(images, tokens)
        projected = self.feature_proj(image_features) if self.feature_proj is not None else None
        return image_features, text_features, logit_scale, projected


raw_student = create_model(student)
if student_init:
    with configurator.user_errors("--student_init"):
        load_checkpoint(raw_student, student_init)
    print(f"student initialised from {student_init}")
# built before the teacher, so the teacher's (random, then overwritten) initialisation does not shift the
# projection's: a cached-teacher run starts from exactly the live run's weights
projected = KD_MODES[mode]["projected"] or feature_kd > 0
distillee = Distillee(raw_student, MODEL_CONFIGS[teacher]["embed_dim"], projected).to(device)
CONTEXT, TEACHER_SIZE = raw_student.context_length, MODEL_CONFIGS[teacher]["image_size"]

teacher_net, cached_teacher = None, None
# the teacher is never built: its outputs are on disk
if teacher_cache and (mode != "none" or feature_kd > 0):
    teacher_view = TEACHER_SIZE, MODEL_CONFIGS[teacher]["mean"], MODEL_CONFIGS[teacher]["std"]
    with configurator.user_errors(f"--teacher_cache={teacher_cache}"):
        cached_teacher = data.check_cache(
            teacher_cache,
            train_data,
            teacher=teacher,
            teacher_sha256=configurator.file_sha256(teacher_ckpt) if teacher_ckpt else "",
            teacher_ckpt=teacher_ckpt,
            seed=augment_seed,
            view=teacher_view,
            context_length=CONTEXT,
        )
    cached_scale = torch.tensor(cached_teacher["logit_scale"], device=device)
    made = f"{cached_teacher['teacher']} from {cached_teacher['teacher_ckpt']} ({cached_teacher['teacher_sha256']})"
    augs = cached_teacher["augs"]
    print(f"teacher: cached {made}, {augs} augmentations replayed as epoch % {augs}")
    # nothing was checked against a checkpoint: say loudly whose outputs these are
    if not teacher_ckpt:
        print(
            f"WARNING: no --teacher_ckpt given: distilling from the cache's teacher {made} unchecked"
        )
elif mode != "none" or feature_kd > 0:
    if not teacher_ckpt:
        if teacher != "demo_teacher":
            raise SystemExit(
                f"--teacher={teacher} needs --teacher_ckpt=PATH (e.g. FetalCLIP_weights.pt)"
            )
        teacher_ckpt = demo_teacher_path()
        if master and not demo_teacher_trained(teacher_ckpt):
            train_demo_teacher(teacher_ckpt)
        if ddp:
            dist.barrier()
    with configurator.user_errors("--teacher_ckpt"):
        teacher_net = load_model(teacher_ckpt, teacher).to(device)  # in eval mode and frozen
    if teacher_net.context_length != raw_student.context_length:
        raise SystemExit(
            f"teacher {teacher} reads {teacher_net.context_length} tokens, student {student} "
            f"{raw_student.context_length}: both must see the same captions"
        )
model = (
    DistributedDataParallel(distillee, device_ids=[device] if device_type == "cuda" else None)
    if ddp
    else distillee
)


def is_decayed(name, parameter):
    """AdamW decay only on weight matrices (paper Sec. 3.6): not on norms, biases, gains or the temperature."""
    return parameter.ndim >= 2 and not any(
        s in name for s in ("bn", "ln", "bias", "norm", "logit_scale")
    )


named = [(n, p) for n, p in distillee.named_parameters() if p.requires_grad]
decayed = {"params": [p for n, p in named if is_decayed(n, p)], "weight_decay": weight_decay}
not_decayed = {"params": [p for n, p in named if not is_decayed(n, p)], "weight_decay": 0.0}
fused = device_type in ("cuda", "cpu")  # 4x faster on CPU too
optimizer = torch.optim.AdamW(
    [decayed, not_decayed], lr=learning_rate, betas=(beta1, beta2), eps=eps, fused=fused
)
scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)

# ------------------------------------------------------------------ schedule and state
if samples_per_epoch < 0:
    samples_per_epoch = data.count_samples(train_data)
# schedule step t counts micro-batches (S in Eq. 5 / 7); an epoch ends on an optimiser step, so an epoch's
# checkpoint never holds half an accumulation window (at most grad_accum - 1 micro-batches are dropped)
micro_per_epoch = samples_per_epoch // batch_size // grad_accum * grad_accum
if micro_per_epoch == 0:
    raise SystemExit(
        f"{train_data}: {samples_per_epoch} samples make no {grad_accum} batches of {batch_size}"
    )
# the schedule follows the run's real length: --max_steps compresses all of it (KD weight, warm-up, cosine),
# so a smoke test runs the shape of the full run in its few steps
full_opt = micro_per_epoch * epochs // grad_accum
total_opt = min(full_opt, max_steps) if max_steps > 0 else full_opt
total_micro = total_opt * grad_accum  # S in Eq. 5 / 7
warmup = math.ceil(warmup_steps * total_opt / full_opt)  # optimiser steps of linear warm-up
w0 = config[KD_MODES[mode]["weight"]] if KD_MODES[mode]["weight"] else 0.0  # lambda0, beta0, ...
kd_schedule = KD_MODES[mode]["schedule"]  # lambda(t) (Eq. 5), beta(t) (Eq. 7); None without KD


def lr_at(opt_step):
    """Linear warm-up, then cosine to 0 over the remaining optimiser steps (paper Sec. 3.6)."""
    if opt_step < warmup:
        return learning_rate * (opt_step + 1) / warmup
    progress = min((opt_step - warmup) / max(total_opt - warmup, 1), 1.0)
    return learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


step, opt_step, start_epoch, best_score, bad_steps = 0, 0, 0, -math.inf, 0
# optimiser steps that changed the weights (a window with a non-finite loss does not)
applied_steps = 0
grad_norm = 0.0  # of the last optimiser step, before clipping (logged)
window_finite = True  # every micro-batch of the current accumulation window had a finite loss
ckpt_path = os.path.join(out_dir, configurator.CHECKPOINT)
best_path = os.path.join(out_dir, configurator.BEST)
log_path = os.path.join(out_dir, configurator.LOG)


def last_good_checkpoint():
    return ckpt_path if os.path.exists(ckpt_path) else "none yet"


def best_of(saved):
    """A checkpoint's best selection score (best_avg in files from before the user's tasks)."""
    return saved.get("best_score", saved.get("best_avg"))


def best_of_this_run(run_config):
    """out_dir/best.pt, refused when another run wrote it (its settings differ beyond RESUMABLE)."""
    best = torch.load(best_path, weights_only=True, mmap=True)
    other = [
        f"{k} {v!r} -> {run_config.get(k)!r}"
        for k, v in best["config"].items()
        if k not in RESUMABLE and run_config.get(k) != v
    ]
    if other:
        raise SystemExit(
            f"--resume=True: {best_path} is another run's ({', '.join(other[:3])}); move it away to resume"
        )
    return best


resumed_changes = {}
if resume:
    with configurator.user_errors("--resume=True"):
        checkpoint = read_checkpoint(ckpt_path)
        missing = [
            k for k in ("config", "optimizer", "step", "rng") if k not in checkpoint
        ]  # e.g. an open_clip file
        if missing:
            where = f"{ckpt_path} is not a train.py checkpoint (no {', '.join(missing)})"
            raise ValueError(
                f"{where}: to start from its weights, use --student_init={ckpt_path} without --resume"
            )
    changed = {k: [v, config[k]] for k, v in checkpoint["config"].items() if config.get(k, v) != v}
    resumed_changes = {k: pair for k, pair in changed.items() if k != "resume"}
    refused = [
        f"{k} {old!r} -> {new!r}" for k, (old, new) in resumed_changes.items() if k not in RESUMABLE
    ]
    if refused:
        raise SystemExit(
            f"--resume=True: {ckpt_path} was trained with other settings: {', '.join(refused)} "
            f"(only {', '.join(RESUMABLE)} may change on resume)"
        )
    raw_student.load_state_dict(checkpoint["model"])
    if distillee.feature_proj is not None:
        distillee.feature_proj.load_state_dict(checkpoint["feature_proj"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    step, opt_step, start_epoch = checkpoint["step"], checkpoint["opt_step"], checkpoint["epoch"]
    best_score, applied_steps = best_of(checkpoint), checkpoint["applied_steps"]
    # written after ckpt.pt when that epoch's evaluation found a new best
    if os.path.exists(best_path):
        best_score = max(best_score, best_of(best_of_this_run(checkpoint["config"])))
    torch.set_rng_state(checkpoint["rng"])
    if max_steps > 0 and opt_step >= max_steps:
        raise SystemExit(f"--resume=True: {ckpt_path} has run its --max_steps={max_steps} already")
    changes = "".join(f"; {k} {old!r} -> {new!r}" for k, (old, new) in resumed_changes.items())
    print(
        f"resuming {ckpt_path} at epoch {start_epoch}, micro-batch {step}, optimiser step {opt_step}{changes}"
    )


def log(record):
    """One JSON line per record in out_dir/log.jsonl (and wandb), rank 0 only."""
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_log and "config" not in record:  # wandb.init has the config
            wandb.log(record)


def save_checkpoint(path, epoch, metrics):
    """Plain types only, the unwrapped student, written atomically (configurator.atomic_path).
    A student with a non-finite weight or buffer (BatchNorm statistics too) is never written."""
    if not all(
        t.isfinite().all() for t in raw_student.state_dict().values() if t.is_floating_point()
    ):
        raise SystemExit(
            f"stopping at step {step}: the student has non-finite weights; not saving {path}, "
            f"the last good checkpoint is {last_good_checkpoint()}"
        )
    checkpoint = dict(
        model=raw_student.state_dict(),
        model_name=student,
        config=config,
        metrics=metrics,
        epoch=epoch,
    )
    checkpoint.update(
        step=step, opt_step=opt_step, applied_steps=applied_steps, best_score=best_score
    )
    checkpoint.update(
        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=torch.get_rng_state()
    )
    if distillee.feature_proj is not None:
        checkpoint["feature_proj"] = distillee.feature_proj.state_dict()
    with configurator.atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def evaluate_epoch(epoch, late=False):
    """Zero-shot evaluation after `epoch`, best.pt when its selection score wins (the protocol's Avg, or
    without the protocol's data the mean F1 of the user's tasks: evaluate.selection_score), then the log
    record."""
    global best_score
    metrics = evaluate.zero_shot(
        raw_student, planes_dir, hc18_dir, device=device, split=eval_split, tasks=tasks
    )
    line = f"epoch {epoch} | {evaluate.summary(metrics)}"
    if metrics["selection"]["value"] > best_score:
        best_score = metrics["selection"]["value"]
        save_checkpoint(best_path, epoch + 1, metrics)
        line += f" | best so far by {metrics['selection']['rule']}: best.pt"
    print(line)
    log({"epoch": epoch, "step": step, "eval": metrics, **({"late": True} if late else {})})


def all_finite(value):
    """Every rank agrees on whether to skip, so DDP's collectives stay in step."""
    finite = torch.tensor(float(torch.isfinite(value).all()), device=device)
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def keep_records_until(checkpoint_step, checkpoint_epoch):
    """log.jsonl as of ckpt.pt: what a killed run logged after its last checkpoint goes, since those steps
    run again (else every plot of the log would go back on itself)."""
    with open(log_path) as f:
        lines = f.readlines()
    kept = [line for line in lines if not logged_after(line, checkpoint_step, checkpoint_epoch)]
    if len(kept) < len(lines):
        configurator.write_atomic(log_path, "".join(kept))
        print(
            f"{log_path}: {len(lines) - len(kept)} records after {ckpt_path} dropped (run again now)"
        )


def logged_after(line, checkpoint_step, checkpoint_epoch):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # the last line of a run killed while writing it
        return True
    if "skipped" in record:  # written at an epoch's end, before its ckpt.pt
        return record["epoch"] >= checkpoint_epoch
    return record.get("step", -1) > checkpoint_step


if master:
    if not resume and os.path.exists(log_path):
        os.remove(log_path)
    if resume and os.path.exists(log_path):
        keep_records_until(step, start_epoch)
    if wandb_log:
        import wandb

        wandb.init(project=wandb_project, config=config)
    log({"config": config})
    if resumed_changes:
        log({"resumed": start_epoch, "changed": resumed_changes})
    source = f"cache {teacher_cache}" if cached_teacher else teacher_ckpt or "no teacher"
    print(
        f"{student} <- {source} | mode {mode} | {samples_per_epoch} samples x "
        f"{epochs} epochs | {micro_per_epoch} micro-batches of {batch_size} per epoch | {device} {dtype}"
    )
    if total_opt < full_opt:
        print(
            f"--max_steps={max_steps}: the schedule fits {total_opt} of {full_opt} optimiser steps "
            f"(S = {total_micro} micro-batches in Eq. 5 / 7, {warmup} warm-up steps)"
        )

# an epoch's evaluation killed after its ckpt.pt (written first) runs now, never silently skipped
ended_epoch = step == start_epoch * micro_per_epoch and start_epoch > 0  # ckpt.pt is an epoch's end
if master and resume and ended_epoch and eval_every > 0 and start_epoch % eval_every == 0:
    with (
        configurator.user_errors(f"--resume=True: {log_path}"),
        open(log_path) as f,
    ):  # one line per record
        logged = {record["epoch"] for record in map(json.loads, f) if "eval" in record}
    if start_epoch - 1 not in logged:
        print(
            f"epoch {start_epoch - 1} was saved but its evaluation never finished: evaluating it now"
        )
        evaluate_epoch(start_epoch - 1, late=True)
if ddp:
    dist.barrier()

# ------------------------------------------------------------------ training loop
stopped = False


def view(net):
    """What the data pipeline needs to make a model's input: (size, mean, std)."""
    return net.image_size, net.image_mean, net.image_std


views = (view(raw_student), view(teacher_net) if teacher_net else None)
reading = {
    "num_workers": num_workers,
    "seed": seed,
    "rank": rank,
    "world_size": world_size,
    "augment_seed": augment_seed,
    "samples_per_epoch": samples_per_epoch,
    "shuffle_buffer": shuffle_buffer,
    "context_length": CONTEXT,
    "teacher_cache": teacher_cache if cached_teacher else "",
}
for epoch in range(start_epoch, epochs):
    loader = data.train_loader(train_data, *views, batch_size // world_size, epoch=epoch, **reading)
    # a run resumes at an epoch's start: ckpt.pt is written at epoch ends, and the one a --max_steps run
    # writes mid-epoch is never resumed (its run is over, and max_steps may not change on resume)
    bar = tqdm(total=micro_per_epoch, desc=f"epoch {epoch}", disable=not master, leave=False)
    timer = time.time()
    # closed below: the loader's skip report is complete also when the epoch stops early
    batches = iter(loader)
    for index, (student_images, teacher_input, tokens) in enumerate(batches):
        if index >= micro_per_epoch:
            break
        student_images, tokens = student_images.to(device), tokens.to(device)
        teacher_out = None
        if cached_teacher is not None:  # (image, text) features the teacher gave this exact view
            teacher_out = (
                teacher_input[0].to(device).float(),
                teacher_input[1].to(device).float(),
                cached_scale,
            )
        elif teacher_net is not None:  # the frozen teacher runs first, without gradients
            with torch.no_grad(), autocast:
                teacher_out = teacher_net(teacher_input.to(device), tokens)
        last_micro = (step + 1) % grad_accum == 0
        # DDP syncs the window's last backward
        with model.no_sync() if ddp and not last_micro else nullcontext():
            with autocast:
                image_features, text_features, logit_scale, projected = model(
                    student_images, tokens
                )
                student_out = (image_features, text_features, logit_scale, projected)
                weight = kd_schedule(step, total_micro, w0, r) if kd_schedule else 0.0
                parts = distill_loss(student_out, teacher_out, mode, weight, tau_kd, smoothing)
                if feature_kd > 0:  # the feature-KD baseline (paper Table 3), in any mode
                    parts["kd_feat"] = feature_kd * feature_kd_loss(projected, teacher_out[0])
                    parts["loss"] = parts["loss"] + parts["kd_feat"]
            if all_finite(parts["loss"]):
                scaler.scale(parts["loss"] / grad_accum).backward()
                bad_steps = 0
            else:  # no backward; the window's optimiser step is dropped below
                bad_steps += 1
                window_finite = False
                log({"step": step, "nonfinite_loss": parts["loss"].item()})
                tqdm.write(
                    f"step {step}: non-finite loss {parts['loss'].item()}, optimiser step skipped"
                )
                if bad_steps >= max_bad_steps:
                    raise SystemExit(
                        f"stopping at step {step}: {bad_steps} non-finite losses in a row; "
                        f"the last good checkpoint is {last_good_checkpoint()}"
                    )
        step += 1
        bar.update(1)
        if last_micro:
            # a dropped window's gradients are partial (and, under DDP, never synced): all ranks skip it alike
            if window_finite:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(opt_step)
                scaler.unscale_(optimizer)
                # grad_clip 0 = off: max_norm inf measures the norm only (logged); max_norm 0 would zero the
                # gradients
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    distillee.parameters(), grad_clip or math.inf
                )
                scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
                scaler.update()
                applied_steps += 1
            optimizer.zero_grad(set_to_none=True)
            window_finite = True
            with torch.no_grad():  # the student's temperature stays in [1, 100] (paper Sec. 3.6)
                raw_student.logit_scale.clamp_(0, math.log(100))
            opt_step += 1
        if step % log_interval == 0 and master:
            elapsed, timer = time.time() - timer, time.time()
            # loss, clip, then the mode's own parts (kd_diag, kd_off; kd_feat with feature KD; yours)
            terms = {k: v.item() for k, v in parts.items()}
            record = {
                "step": step,
                "epoch": epoch,
                "weight": weight,
                "lr": optimizer.param_groups[0]["lr"],
                **terms,
                "logit_scale": logit_scale.item(),
                "grad_norm": float(grad_norm),
                "samples_per_s": log_interval * batch_size / elapsed,
            }
            tqdm.write(
                f"step {step} | {' | '.join(f'{k} {v:.3f}' for k, v in terms.items())} | weight "
                f"{record['weight']:.2f} | lr {record['lr']:.1e} | scale {record['logit_scale']:.1f} | "
                f"{record['samples_per_s']:.0f} samples/s"
            )
            log(record)
        if max_steps >= 0 and opt_step >= max_steps:
            stopped = True
            break
    bar.close()
    batches.close()
    if any(loader.skipped.values()) and master:  # data.py has printed the counts already
        log({"epoch": epoch, "skipped": loader.skipped})
    if applied_steps == 0:  # the same on every rank: the skip decisions are all-reduced
        nothing = f"no optimiser step was applied in {step} micro-batches (every window had a non-finite loss)"
        raise SystemExit(
            f"stopping: {nothing}; nothing saved, the last good checkpoint is {last_good_checkpoint()}"
        )
    if master:  # ckpt.pt first, so an evaluation that fails or is killed loses no training
        save_checkpoint(ckpt_path, epoch + (0 if stopped else 1), {})
    if stopped:
        print(f"stopped after {opt_step} optimiser steps (--max_steps); saved {ckpt_path}")
        break
    if master and eval_every > 0 and (epoch + 1) % eval_every == 0:
        evaluate_epoch(epoch)
    if ddp:
        dist.barrier()

# ------------------------------------------------------------------ summary
if master and not stopped and eval_every > 0 and os.path.exists(best_path):
    rows = {}
    if teacher_net is not None:
        rows[f"{teacher} (teacher)"] = evaluate.zero_shot(
            teacher_net, planes_dir, hc18_dir, device=device, split=eval_split, tasks=tasks
        )
    rows[f"{student} (best)"] = torch.load(best_path, map_location="cpu", weights_only=True)[
        "metrics"
    ]
    print(
        "\n"
        + "\n".join(f"{name:<28} {evaluate.summary(metrics)}" for name, metrics in rows.items())
    )
    if teacher_net is not None:
        print(f"teacher checkpoint: {teacher_ckpt}")
    print(f"best checkpoint: {best_path}")
if ddp:
    dist.destroy_process_group()
