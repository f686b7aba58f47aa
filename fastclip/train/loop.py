"""The training loop: model, loss, optimizer, schedule, data, logging, evaluation and checkpoints.

:class:`Trainer` takes the resolved options of ``fastclip train`` (a dict, see :data:`fastclip.train.cli.DEFAULTS`),
and :meth:`Trainer.run` trains. Under ``torchrun`` every process runs the same loop on its share of each global batch
(DDP averages the gradients; the loss sees the global batch through its distributed mode).

Per step: zero the gradients; forward and backward on the local batch, whole or by gradient caching
(:func:`fastclip.train.gradcache.backward_step`); the loss averaged over ranks is checked to be finite; unscale
(fp16), clip the gradient norm, AdamW step, scheduler step; clamp the log logit scale to [0, log 100].
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from fastclip.train import checkpoint as ckpt
from fastclip.train.data import CLASS_TEMPLATES, CachedTokenizer, Loader, heldout_set, image_folder_set, make_source
from fastclip.train.evaluate import zero_shot
from fastclip.train.gradcache import backward_step
from fastclip.train.models import build_model

METRICS = "metrics.jsonl"
CONFIG = "config.json"
CURVES = "curves.png"
MAX_LOGIT_SCALE = math.log(100)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message says at which step and where the last good checkpoint is."""


def cosine_lr(step: int, *, steps: int, warmup: int) -> float:
    """The learning-rate factor of step ``step`` (0-based): linear warm-up (step + 1) / warmup, then
    0.5 * (1 + cos(pi * (step - warmup) / (steps - warmup)))."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """AdamW groups as open_clip's: no decay on gains, biases (any tensor with ndim < 2) and the logit scale/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's max allocated on a GPU, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(device: str):
    """(rank, world_size, local_rank, device) from torchrun's environment; initializes the process group (NCCL on
    GPUs, gloo on the CPU) when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, local, dev


def build_loss(kind: str, dist_impl: Optional[str], rank: int, world: int) -> Callable:
    """loss(image, text, scale, bias) for ``--loss clip|siglip`` and the distributed mode ``--dist-impl``.

    clip: 'gather' (the global loss on every rank, gradients of the global batch: local_loss=False,
    gather_with_grad=True), 'local' (local_loss=True, gather_with_grad=True) or 'ring'. siglip: 'bidir', 'shift',
    'reduce', 'gather', 'ring' (open_clip's exchanges, and the ring). Every mode gives DDP the global batch's
    gradients.
    """
    import fastclip

    if kind == "clip":
        impl = dist_impl or "gather"
        if impl not in ("gather", "local", "ring"):
            raise ValueError(f"--dist-impl {impl!r} with --loss clip: expected gather, local or ring")
        return fastclip.ContrastiveLoss(local_loss=impl == "local", gather_with_grad=True, rank=rank,
                                        world_size=world, dist_impl="ring" if impl == "ring" else None)
    if kind == "siglip":
        impl = dist_impl or "bidir"
        if impl not in fastclip.SigLIPLoss.DIST_IMPLS:
            raise ValueError(f"--dist-impl {impl!r} with --loss siglip: expected one of "
                             f"{', '.join(fastclip.SigLIPLoss.DIST_IMPLS)}")
        return fastclip.SigLIPLoss(rank=rank, world_size=world, dist_impl=impl)
    raise ValueError(f"--loss must be 'clip' or 'siglip', got {kind!r}")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class Trainer:
    """A training run from resolved options (a dict); see the module docstring."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.rank, self.world, self.local_rank, self.device = init_distributed(cfg["device"])
        self.is_main = self.rank == 0
        self.out = cfg["out"]
        if cfg["batch_size"] % self.world:
            raise ValueError(f"--batch-size {cfg['batch_size']} is not divisible by the {self.world} processes")
        self.local_batch = cfg["batch_size"] // self.world
        precision = cfg["precision"]
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA GPU (use bf16 or fp32 on the CPU)")
        self.precision = precision

        seed_everything(cfg["seed"])  # the same initial weights on every rank
        module = build_model(cfg["model"], pretrained=cfg["pretrained"], siglip=cfg["loss"] == "siglip",
                             attn_impl=cfg["attn"]).to(self.device)
        if cfg["grad_checkpointing"]:
            module.set_grad_checkpointing(True)
        self.module = module
        seed_everything(cfg["seed"] + self.rank)  # then each rank its own stream
        self.ddp = None
        model = module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = model = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = torch.compile(model) if cfg["compile"] else model
        self.loss_fn = build_loss(cfg["loss"], cfg["dist_impl"], self.rank, self.world)
        self.optimizer = torch.optim.AdamW(param_groups(module, cfg["wd"]), lr=cfg["lr"],
                                           betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"])
        steps, warmup = cfg["steps"], cfg["warmup"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_lr(s, steps=steps, warmup=warmup))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

        import fastclip

        size = module.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.transform = fastclip.image_transform(self.image_size)
        self.tokenizer = CachedTokenizer(module.context_length)
        source = make_source(cfg["data"], seed=cfg["seed"], image_size=self.image_size, img_key=cfg["csv_img_key"],
                             caption_key=cfg["csv_caption_key"], separator=cfg["csv_separator"])
        self.loader = Loader(source, self.local_batch, transform=self.transform, tokenizer=self.tokenizer,
                             rank=self.rank, world_size=self.world, seed=cfg["seed"], workers=cfg["workers"])
        self.eval_set = self._eval_set() if self.is_main else None
        self.step = 0
        self.last_saved: Optional[tuple] = None  # (step, path)
        self._elapsed_before = 0.0  # wall seconds of training before this process (from the checkpoint)
        self._t_start = time.perf_counter()

    def elapsed(self) -> float:
        """Wall seconds spent in the run so far, earlier processes of a resumed run included."""
        return self._elapsed_before + time.perf_counter() - self._t_start

    # -- pieces --------------------------------------------------------------------------------------------------

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _eval_set(self):
        cfg = self.cfg
        what = cfg["eval_data"] or ("synthetic" if cfg["data"] == "synthetic" else None)
        if what is None:
            return None
        if what == "synthetic":
            images, labels, names = heldout_set(cfg["seed"], self.image_size, cfg["eval_samples"], self.transform)
            return images, labels, names, "synthetic-heldout"
        images, labels, names = image_folder_set(what, self.transform, cfg["eval_classnames"], cfg["eval_samples"])
        return images, labels, names, os.path.basename(os.path.normpath(what))

    def evaluate(self) -> dict:
        if self.eval_set is None:
            return {}
        images, labels, names, split = self.eval_set
        res = zero_shot(self.module, images, labels, names, CLASS_TEMPLATES, self.tokenizer, autocast=self.autocast)
        res["eval_split"] = split
        return res

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().reshape(1).clone()
        if self.world > 1:
            dist.all_reduce(x)
            x /= self.world
        return x[0]

    def train_step(self, images: torch.Tensor, texts: torch.Tensor) -> float:
        """One optimizer step on this rank's share of a global batch; returns the loss (mean over ranks)."""
        self.optimizer.zero_grad(set_to_none=True)
        images, texts = images.to(self.device, non_blocking=True), texts.to(self.device, non_blocking=True)
        loss = backward_step(self.model, self.loss_fn, images, texts, micro_batch=self.cfg["micro_batch"],
                             autocast=self.autocast, no_sync=self.ddp.no_sync if self.ddp is not None else None)
        loss = float(self._mean_over_ranks(loss))
        if not math.isfinite(loss):
            where = (f"the last good checkpoint is {self.last_saved[1]} (step {self.last_saved[0]}); resume with "
                     f"--resume {self.out} and a lower --lr" if self.last_saved else "no checkpoint was written yet")
            raise NonFiniteLossError(f"the loss is {loss} at step {self.step + 1}: stopping without updating the "
                                     f"model; {where}")
        if self.cfg["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        with torch.no_grad():
            self.module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1
        return loss

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        mine = {"data": self.loader.state_dict(), "rng": ckpt.rng_state()}
        ranks = [mine]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        return {"step": self.step, "state_dict": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "ranks": ranks,
                "world_size": self.world, "config": self.cfg, "elapsed_s": self.elapsed()}

    def save(self) -> None:
        state = self.state_dict()  # every rank joins the gather
        if self.is_main:
            keep = bool(self.cfg["save_every"]) and self.step % self.cfg["save_every"] == 0
            path = ckpt.save(self.out, state, self.step, keep=keep)
            self.last_saved = (self.step, path)

    def load(self, path: str) -> None:
        state = ckpt.load(path)
        if state["world_size"] != self.world:
            raise ValueError(f"--resume: {path} was written by {state['world_size']} process(es), this run has "
                             f"{self.world}; resume with the same number of processes")
        self.module.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self._elapsed_before, self._t_start = state["elapsed_s"], time.perf_counter()
        mine = state["ranks"][self.rank]
        self.loader.load_state_dict(mine["data"])
        ckpt.set_rng_state(mine["rng"])
        self.last_saved = (self.step, path)

    # -- the run -------------------------------------------------------------------------------------------------

    def _open_metrics(self, resumed: bool):
        path = os.path.join(self.out, METRICS)
        kept = []
        if resumed and os.path.exists(path):  # drop what a killed run logged after its last checkpoint
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
        with open(path, "w") as f:
            f.writelines(kept)
        return open(path, "a")

    def _write_config(self) -> None:
        import platform

        import fastclip
        from fastclip.bench.common import git_sha

        info = {"options": self.cfg, "world_size": self.world, "device": str(self.device), "precision": self.precision,
                "local_batch": self.local_batch, "resumed_at_step": self.step or None,
                "versions": {"fastclip": fastclip.__version__, "torch": torch.__version__, "numpy": np.__version__,
                             "python": platform.python_version()},
                "commit": git_sha(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = os.path.join(self.out, CONFIG + ".tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, os.path.join(self.out, CONFIG))

    def run(self) -> dict:
        """Train to ``steps``; returns the last metrics record (with the final evaluation)."""
        cfg = self.cfg
        resumed = False
        if cfg["resume"]:
            path = ckpt.last_checkpoint(cfg["resume"])
            if path is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {os.path.join(cfg['resume'], 'checkpoints')}")
            self.load(path)
            resumed = True
        metrics = None
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
            self._write_config()
            metrics = self._open_metrics(resumed)
        progress = _Progress(cfg["steps"], self.step, enabled=self.is_main)
        record: dict = {}
        try:
            t_last, steps_since = time.perf_counter(), 0
            while self.step < cfg["steps"]:
                images, texts = next(self.loader)
                loss = self.train_step(images, texts)
                steps_since += 1
                progress.update(loss, _used_lr(self.scheduler))
                s = self.step
                done = s == cfg["steps"]
                evaluating = done or (cfg["eval_every"] and s % cfg["eval_every"] == 0)
                if done or evaluating or s % cfg["log_every"] == 0:
                    now = time.perf_counter()
                    record = {"step": s, "loss": loss, "lr": _used_lr(self.scheduler),
                              "logit_scale": float(self.module.logit_scale.detach().exp()),
                              "samples_per_s": steps_since * cfg["batch_size"] / max(now - t_last, 1e-9),
                              "peak_mem_mb": peak_memory_mb(self.device), "epoch": self.loader.epoch,
                              "skipped_samples": self.loader.skipped, "elapsed_s": self.elapsed()}
                    if self.module.logit_bias is not None:
                        record["logit_bias"] = float(self.module.logit_bias.detach())
                    if evaluating and self.is_main:
                        record.update(self.evaluate())
                    t_last, steps_since = time.perf_counter(), 0  # samples/s leaves out evaluation and logging
                    if self.is_main:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                        progress.log(record)
                if done or (cfg["save_every"] and s % cfg["save_every"] == 0):
                    self.save()
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()
                from fastclip.train.plot import plot_run

                plot_run(self.out)
        return record


def _used_lr(scheduler) -> float:
    """The learning rate of the step just taken (the scheduler has already moved on to the next one)."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch - 1)


class _Progress:
    """A tqdm bar (loss, samples/s, ETA) on a terminal; plain lines at each logged step otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.total = total
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.t0, self.first = time.perf_counter(), initial

    def update(self, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def log(self, r: dict) -> None:
        if not self.enabled:
            return
        line = (f"step {r['step']}/{self.total}  loss {r['loss']:.4f}  lr {r['lr']:.3g}  scale "
                f"{r['logit_scale']:.2f}  {r['samples_per_s']:.0f} samples/s  peak {r['peak_mem_mb']:.0f} MB")
        if "zeroshot_top1" in r:
            line += (f"  zero-shot top1 {r['zeroshot_top1']:.3f} top5 {r['zeroshot_top5']:.3f} (chance "
                     f"{r['chance']:.3f})")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{r['loss']:.4f}", sps=f"{r['samples_per_s']:.0f}", refresh=True)
            if "zeroshot_top1" in r:
                self.bar.write(line)
            return
        done = r["step"] - self.first
        if done > 0:
            eta = (time.perf_counter() - self.t0) / done * (self.total - r["step"])
            line += f"  eta {int(eta // 60)}:{int(eta % 60):02d}"
        print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["Trainer", "NonFiniteLossError", "cosine_lr", "param_groups", "build_loss", "init_distributed"]
