"""The one training loop: setup -> data -> model + method -> optimizer -> `for step in ...` -> export.

Read top to bottom: `train()` calls `setup()` (everything a step needs, restored from the newest
checkpoint on --resume), `fit()` (the loop: step, log, validate, checkpoint) and `finish()`
(final validation, weights, summary). `Session.loss()` is one training step's loss and is what the
benchmark times.

Exact resumes rest on two rules (see batches.py): the images of a step are a function of
(seed, step), and every random draw of a step comes from a generator seeded by (seed, step), so
nothing depends on how many steps ran in this process. The checkpoint still stores every global RNG
state (dropout in LoRA layers uses it) and the optimizer, schedule, EMA and scaler states.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthcxr.config import save_config
from synthcxr.errors import ConfigError, DataError, TrainingError
from synthcxr.fileio import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from synthcxr.logging_utils import get_logger, progress_bar
from synthcxr.rundir import RunDir, write_environment
from synthcxr.train import checkpoint as ckpt
from synthcxr.train.batches import BatchPlan, ImageLoader, step_generator, total_steps
from synthcxr.train.cache import LatentCache, TextCache, sample_latents
from synthcxr.train.config import RESUME_SAFE_KEYS, TrainConfig, config_differences
from synthcxr.train.methods import Method, Models

log = get_logger(__name__)

DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM: a checkpoint was saved; `--resume` continues from it. A stop the user asked for,
    not an error: the CLI says "stopped:" and exits with 130 (the shell's code for Ctrl-C)."""

    label = "stopped"
    exit_code = 130


@dataclass
class Session:
    """Everything the loop touches, built once by `setup()`."""

    cfg: TrainConfig
    run: RunDir
    accelerator: Any
    models: Models
    method: Method
    plan: BatchPlan
    total: int
    start_step: int
    weight_dtype: Any
    train_sources: list[Any]
    prompts: list[str]
    class_sources: list[Any]
    class_prompt: str | None
    val_sources: list[Any]
    val_prompts: list[str]
    unet: Any  # prepared (DDP-wrapped when distributed) denoiser used for training forwards (UNet or transformer)
    text_encoder: Any
    optimizer: Any
    lr_scheduler: Any
    trainable: dict[str, Any]
    base_model: str
    ema: Any = None
    latent_cache: LatentCache | None = None
    class_cache: LatentCache | None = None
    text_cache: TextCache | None = None
    train_time_s: float = 0.0  # training steps only, over every session of this run (restored on resume)
    validation_time_s: float = 0.0  # in-loop and final validation (not in train_time_s)
    checkpoint_time_s: float = 0.0  # writing checkpoints (not in train_time_s)
    tb: Any = None
    memo: dict[str, Any] = field(default_factory=dict)  # held-out latents/embeddings
    objective: Any = None  # train/objectives.py: (noisy, timesteps, target, weights) from latents and noise
    text_encoders: dict[str, Any] = field(default_factory=dict)  # the prepared text encoders that train, by name
    encoders_parked: bool = False  # frozen text encoders in CPU memory: every training prompt is cached

    @contextlib.contextmanager
    def text_encoders_on_device(self) -> Any:
        """Bring parked text encoders to the device for validation's prompts, and park them again."""
        if not self.encoders_parked:
            yield
            return
        for encoder in self.models.text_encoders.values():
            encoder.to(self.device)
        try:
            yield
        finally:
            _park(self.models.text_encoders.values())

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> Any:
        return self.accelerator.device

    # ------------------------------------------------------------------ one step's loss
    def encode_prompts(self, prompts: list[str], encoders: dict[str, Any] | None = None) -> dict[str, Any]:
        """The family's conditioning of `prompts` (through the prepared, training encoders when given)."""
        models = self.models
        return models.family.encode_prompts({**models.text_encoders, **(encoders or {})}, models.tokenizers,
                                            prompts, self.device)

    def unwrapped_models(self) -> Models:
        """The models with the training (possibly DDP-wrapped or compiled) modules unwrapped, for sampling and export."""
        import dataclasses

        unwrap = self.accelerator.unwrap_model
        encoders = {**self.models.text_encoders, **{k: unwrap(v) for k, v in self.text_encoders.items()}}
        return dataclasses.replace(self.models, unet=unwrap(self.unet), text_encoder=encoders["text_encoder"],
                                   text_encoders=encoders)

    def encode_pixels(self, pixels: Any) -> Any:
        """Latent-distribution parameters (mean, log-variance) of a batch of [-1, 1] images."""
        vae = self.models.vae
        return self.models.family.encode_params(vae, pixels.to(self.device)).float()

    def latent_shape(self) -> tuple[int, int, int]:
        return self.models.family.latent_shape(self.models.vae, self.cfg.data.resolution)

    def loss(self, item: dict[str, Any]) -> Any:
        """Loss of one micro-batch on this process (instance + weighted prior part)."""
        import torch

        from synthcxr.train.objectives import per_sample_loss

        cfg, plan = self.cfg.train, self.plan
        rank = self.accelerator.process_index
        prior = bool(item["class_indices"])
        G = plan.global_micro_batch
        channels, h, w = self.latent_shape()
        n_rows = G * (2 if prior else 1)
        # 1. every random draw of this micro-step, for the whole global batch (batches.py explains why)
        g = step_generator(cfg.seed, item["step"], item["micro"], self.device)
        kw = {"generator": g, "device": self.device}
        eps = torch.randn((n_rows, channels, h, w), **kw)
        noise = torch.randn((n_rows, channels, h, w), **kw)
        draw = self.objective.draw(n_rows, g, self.device)  # DDPM timesteps, or flow matching's u
        offset = torch.randn((n_rows, channels, 1, 1), **kw)
        flips = torch.rand((n_rows,), **kw) < 0.5
        r0, r1 = rank * plan.batch_size, (rank + 1) * plan.batch_size  # this process's rows (slices: no host sync)

        def mine(x: Any) -> Any:
            return torch.cat([x[r0:r1], x[G + r0:G + r1]]) if prior else x[r0:r1]

        eps, noise, draw, offset, flips = (mine(x) for x in (eps, noise, draw, offset, flips))
        use_flips = self.cfg.data.hflip
        # 2. latent distributions: from the cache, or the VAE now (same numbers either way)
        B = len(item["indices"])
        parts = [self._latent_params(item["indices"], item.get("pixels"), flips[:B] if use_flips else None,
                                     self.latent_cache)]
        prompts = [self.prompts[i] for i in item["indices"]]
        if prior:
            parts.append(self._latent_params(item["class_indices"], item.get("class_pixels"),
                                             flips[B:] if use_flips else None, self.class_cache))
            prompts += [self.class_prompt] * B
        family = self.models.family
        latents = sample_latents(torch.cat(parts), eps, *family.latent_scale(self.models.vae))
        # 3. noise (with offset noise) at the drawn timesteps: the objective gives input, target and weights
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * offset
        noised = self.objective.apply(latents, noise, draw)
        # 4. text conditioning (cached when the text encoders are frozen)
        if self.text_cache is not None:
            cond = self.text_cache.get(prompts)
        else:
            with torch.set_grad_enabled(bool(self.text_encoders)):
                cond = self.encode_prompts(prompts, self.text_encoders)
        # 5. denoiser forward under autocast, per-sample weighted MSE (min-SNR-gamma or flow weighting)
        noisy = noised.noisy
        if self.cfg.train.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with self.accelerator.autocast():
            pred = family.denoise(self.unet, noisy, noised.timesteps, cond, resolution=self.cfg.data.resolution)
        per_sample = per_sample_loss(pred, noised)
        if prior:
            return per_sample[:B].mean() + self.cfg.method.prior_loss_weight * per_sample[B:].mean()
        return per_sample.mean()

    def _latent_params(self, indices: list[int], pixels: Any, flips: Any, cache: LatentCache | None) -> Any:
        import torch

        if cache is not None:
            return cache.get(indices, flips.tolist() if flips is not None else None)
        if flips is not None:
            pixels = torch.where(flips.cpu()[:, None, None, None], torch.flip(pixels, dims=[3]), pixels)
        with torch.no_grad():
            return self.encode_pixels(pixels)

    # ------------------------------------------------------------------ one optimizer step
    def batches(self) -> Any:
        """Iterator over this process's micro-batches from `start_step` on (images decoded ahead by workers)."""
        import torch
        from torch.utils.data import DataLoader

        cfg = self.cfg
        loader = DataLoader(
            ImageLoader(self.plan, self.train_sources, self.class_sources, self.accelerator.process_index,
                        cfg.data.resolution, cfg.data.resize, self.start_step, self.total,
                        load_pixels=self.latent_cache is None),
            batch_size=None, shuffle=False, num_workers=cfg.train.num_workers,
            # its own generator: the global RNG (LoRA dropout) stays exactly as restored
            generator=torch.Generator().manual_seed(cfg.train.seed))
        for m in self.trained_modules:
            m.train()
        return iter(loader)

    @property
    def trained_modules(self) -> list[Any]:
        return [self.unet, *self.text_encoders.values()]

    def train_step(self, batches: Any) -> Any:
        """Forward/backward over the accumulation micro-batches (gradients synced on the last only),
        then clip, update, schedule and EMA. Returns the step's loss as a device tensor (no sync)."""
        import torch

        acc, t = self.accelerator, self.cfg.train
        step_loss = torch.zeros((), device=acc.device)
        try:
            for micro in range(t.gradient_accumulation):
                item = next(batches)
                with contextlib.ExitStack() as stack:
                    if micro < t.gradient_accumulation - 1:
                        for m in self.trained_modules:
                            stack.enter_context(acc.no_sync(m))
                    loss = self.loss(item)
                    acc.backward(loss / t.gradient_accumulation)
                step_loss += loss.detach() / t.gradient_accumulation
            params = list(self.trainable.values())
            if t.max_grad_norm is not None:
                acc.clip_grad_norm_(params, t.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(params)
        except torch.OutOfMemoryError as exc:
            raise _oom_error(self.cfg, exc) from exc
        return step_loss

    # ------------------------------------------------------------------ validation (validation.py)
    def validate(self, step: int) -> dict[str, Any]:
        from synthcxr.train.validation import validate

        return validate(self, step)

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> Path | None:
        import torch

        params = list(self.trainable.values())
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise TrainingError(
                f"trainable weights are not finite at step {step}; not saving them",
                fix=self._nan_fix(),
            )
        root = self.run.checkpoints
        tmp = ckpt.tmp_dir_for(root, step)
        if self.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        ckpt.write_rng(tmp, self.accelerator.process_index)
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            state = {
                "step": step, "epoch": self.plan.epoch_of(step), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
                "num_processes": self.accelerator.num_processes, "train_time_s": self.train_time_s,
                "validation_time_s": self.validation_time_s, "checkpoint_time_s": self.checkpoint_time_s,
            }
            path = ckpt.save_checkpoint(root, step, self.trainable, state, self.cfg.train.keep_checkpoints,
                                        meta={"epoch": self.plan.epoch_of(step), "total_steps": self.total})
            log.info("checkpoint saved: %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def restore(self, path: Path) -> int:
        import torch

        tensors, state, rng = ckpt.load_checkpoint(path, self.accelerator.process_index)
        if state.get("num_processes") != self.accelerator.num_processes:
            raise TrainingError(
                f"checkpoint was written by {state.get('num_processes')} process(es), this run has "
                f"{self.accelerator.num_processes}; the data order and global batch would change",
                file=path, fix="resume with the same number of processes")
        missing = set(self.trainable) ^ set(tensors)
        if missing:
            raise TrainingError(f"checkpoint does not match this model/method ({len(missing)} weights differ, "
                                f"e.g. {sorted(missing)[0]})", file=path, fix="resume with the run's own config")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(tensors[name].to(param.device, param.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.accelerator.scaler is not None and state.get("scaler") is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.validation_time_s = float(state.get("validation_time_s", 0.0))
        self.checkpoint_time_s = float(state.get("checkpoint_time_s", 0.0))
        return int(state["step"])

    def _nan_fix(self) -> str:
        last = ckpt.latest_checkpoint(self.run.checkpoints)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        return (f"{where}. Start a new run with a lower optimizer.lr, mixed_precision bf16 instead of fp16, "
                "or train.max_grad_norm set (e.g. 1.0)")


# ====================================================================== setup
def _check_run_dir(cfg: TrainConfig, root: Path, resume: bool, family: Any = None) -> str:
    """Refuse to overwrite a run; on --resume insist on the same config (a safe subset may change).

    A run directory that holds no training work yet (a start that stopped during setup) is "fresh":
    a corrected command may reuse it, with or without --resume. Returns "new", "fresh", "resume" or
    "done" (the run already finished: nothing to do).
    """
    from synthcxr.config import load_config
    from synthcxr.generate.lock import LOCK_FILE

    ours = (root / "config.yaml").is_file()
    work = RunDir(root).training_work() if ours else []
    if ours and not work:
        log.info("reusing %s: it holds no checkpoint and no finished step yet", root)
        return "fresh"
    if not resume:
        if root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
            held = f" (it holds {', '.join(work)})" if work else ""
            raise ConfigError(f"the run directory already exists and is not empty{held}", file=root,
                              fix="continue it with --resume, or choose another --out")
        return "new"
    if not ours:
        raise ConfigError("nothing to resume: no config.yaml in this run directory", file=root,
                          fix="start the run without --resume first, or check --out")
    old = load_config(TrainConfig, root / "config.yaml")
    # a run saved before the family layer names the LoRA targets that are today's None (family default)
    defaults = {"method.target_modules": list(family.lora_targets)} if family is not None else None
    diffs = {k: v for k, v in config_differences(old, cfg, defaults).items() if k not in RESUME_SAFE_KEYS}
    if diffs:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diffs.items()))
        raise ConfigError(f"--resume with a different config: {lines}", file=root / "config.yaml",
                          fix="resume with the run's own config (only " + ", ".join(RESUME_SAFE_KEYS)
                          + " may change), or start a new run with another --out")
    return "done" if (root / "DONE").exists() else "resume"


def _accelerator(cfg: TrainConfig):
    import torch
    from accelerate import Accelerator

    on_gpu = torch.cuda.is_available()
    mp = cfg.train.mixed_precision
    if not on_gpu and mp == "fp16" and not cfg.train.allow_cpu_fp16:
        raise ConfigError("train.mixed_precision=fp16 on a CPU is slow and poorly supported",
                          fix="use bf16 or no on a CPU, or set train.allow_cpu_fp16=true to insist")
    # accelerate keeps one global state per process; several runs in one process (tests, a grid)
    # may use different precisions, so forget the previous run's (the distributed setup is kept)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mp, cpu=not on_gpu)


def _determinism(cfg: TrainConfig) -> None:
    import torch
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _read_data(cfg: TrainConfig, processes: int, resuming: bool) -> tuple[list[Any], dict[str, list[Any]]]:
    """Records and their split, checked (enough training images for one step) without writing anything.

    A run that already trained with repeats in its steps is resumed with a warning (its config may not change).
    """
    from synthcxr.data.dataset import load_records
    from synthcxr.data.splits import split_records

    records = load_records(cfg.data)
    splits = split_records(records, cfg.data.split)
    n, t = len(splits["train"]), cfg.train
    if not n:
        raise DataError("no training images after the split", file=cfg.data.paths[0],
                        fix="add images, or lower data.split.val / data.split.test")
    per_step = t.batch_size * t.gradient_accumulation * processes
    if per_step > n:
        what = (f"one optimizer step takes {per_step} images (train.batch_size {t.batch_size} x "
                f"gradient_accumulation {t.gradient_accumulation} x {processes} process(es)) but the training "
                f"split has {n}, so every step would hold the same image more than once")
        if t.repeats == 1 and not resuming:
            raise ConfigError(what, fix=f"set train.batch_size (x gradient_accumulation) to at most {n}, add images, "
                              "or lower data.split.val/test; set train.repeats > 1 to repeat images on purpose")
        why = f"train.repeats={t.repeats} asks for repeats" if t.repeats > 1 else "resuming a run that trains so"
        log.warning("%s (%s)", what, why)
    return records, splits


def _save_split(cfg: TrainConfig, run: RunDir, records: list[Any], is_main: bool,
                splits: dict[str, list[Any]]) -> tuple[list[Any], list[Any]]:
    """Save the split in the run directory (a resumed run reuses the one saved there)."""
    from synthcxr.data.splits import split_records

    if is_main:
        splits = split_records(records, cfg.data.split, out_path=run.root / "splits.json")
    return splits["train"], splits.get("val", [])[: cfg.train.max_validation_images]


def _load_models(cfg: TrainConfig) -> tuple[Models, str, Any]:
    """The pipeline's modules, the base model as recorded, and the family's training objective."""
    import torch

    from synthcxr.models.families import family_of
    from synthcxr.models.load import load_pipeline, resolve_source
    from synthcxr.train.objectives import build_objective

    # a base that will be quantized is read in the mixed-precision dtype: half the CPU memory of fp32 meanwhile
    dtype = getattr(torch, DTYPES[cfg.train.mixed_precision]) if cfg.model.quantize != "none" else None
    pipe = load_pipeline(cfg.model.path, prediction_type=cfg.model.prediction_type,
                         single_file_config=cfg.model.single_file_config, load_lora=False, family=cfg.model.family,
                         drop_t5=cfg.model.drop_t5, torch_dtype=dtype)
    family = family_of(pipe)
    source = resolve_source(cfg.model.path)
    base = str(Path(cfg.model.path).resolve()) if source.kind in ("folder", "file") else cfg.model.path
    objective = build_objective(family.objective, pipe.scheduler.config, cfg.objective,
                                min_snr_gamma=cfg.train.min_snr_gamma)
    models = Models(unet=getattr(pipe, family.denoiser), vae=pipe.vae, text_encoder=pipe.text_encoder,
                    tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, noise_scheduler=objective.scheduler,
                    family=family, text_encoders={s.encoder: getattr(pipe, s.encoder) or family.dropped_encoder(pipe, s)
                                                  for s in family.text_encoders},
                    tokenizers={s.tokenizer: getattr(pipe, s.tokenizer) for s in family.text_encoders})
    return models, base, objective


def _place_models(models: Models, method: Method, cfg: TrainConfig, device: Any, weight_dtype: Any) -> None:
    """Frozen weights in the mixed-precision dtype (half the memory); trainable ones stay fp32 masters."""
    import torch

    from synthcxr.train import methods as M

    def place(module: Any, dtype: Any) -> None:
        module.to(device)
        if module.dtype != dtype:  # (diffusers warns on every .to(dtype=...), even a no-op one)
            module.to(dtype=dtype)

    place(models.vae, weight_dtype)
    trained = M.trained_text_encoders(cfg.method, models.family)
    for name, encoder in models.text_encoders.items():
        place(encoder, torch.float32 if name in trained and method.full_weights else weight_dtype)
    place(models.unet, torch.float32 if method.full_weights else weight_dtype)
    for module in (models.unet, *models.text_encoders.values()):
        for p in module.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    if cfg.train.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for name in trained:
            models.text_encoders[name].gradient_checkpointing_enable()
    if cfg.train.channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if cfg.train.vae_tiling:
        models.vae.enable_tiling()
    if cfg.train.vae_slicing:
        models.vae.enable_slicing()


def _park(encoders: Any) -> None:
    """Frozen text encoders to CPU memory and the accelerator's cache emptied (T5-XXL alone is ~9 GB)."""
    import gc

    import torch

    for encoder in encoders:
        encoder.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def setup(cfg: TrainConfig, out_dir: str | Path, resume: bool = False) -> Session | None:
    import torch

    from synthcxr.models.quantize import check_quantization_runs, quantize_linear_layers
    from synthcxr.train import methods as M
    from synthcxr.train.cache import (
        build_latent_cache,
        build_text_cache,
        module_fingerprint,
        tokenizer_fingerprint,
    )
    from synthcxr.train.family_checks import check_family_config
    from synthcxr.train.optimizers import build_lr_scheduler, build_optimizer, check_optimizer_config

    # 1. run directory and config checks: fail before any heavy work
    root = Path(out_dir)
    check_optimizer_config(cfg.optimizer)
    family = check_family_config(cfg)
    state = _check_run_dir(cfg, root, resume, family)
    if state == "done":
        log.info("run %s already finished (DONE exists); nothing to do", root)
        return None
    accelerator = _accelerator(cfg)
    if not accelerator.is_main_process:  # one copy of every message, from the main process
        import logging

        logging.getLogger("synthcxr").setLevel(logging.WARNING)
    _determinism(cfg)
    weight_dtype = getattr(torch, DTYPES[cfg.train.mixed_precision])
    check_quantization_runs(cfg.model.quantize, accelerator.device)

    # 2. inputs, read and checked before anything is written: a bad data folder or model path leaves no
    # run directory behind that the corrected command would then have to resume or refuse
    records, splits = _read_data(cfg, accelerator.num_processes, resuming=state == "resume")
    models, base_model, objective = _load_models(cfg)
    if cfg.model.quantize != "none":  # QLoRA: the frozen base in 4-bit before any adapter is added
        quantize_linear_layers(models.unet, cfg.model.quantize, accelerator.device, weight_dtype)

    # 3. the run directory: config first (a run dir with its config can always be resumed)
    run = RunDir(root)
    if accelerator.is_main_process:
        if state == "fresh":  # a stopped start's split may come from other settings or data
            for stale in (run.root / "splits.json", run.metrics):
                stale.unlink(missing_ok=True)
        save_config(cfg, run.config)
        run = RunDir.create(root)
        write_environment(run.environment)
    accelerator.wait_for_everyone()
    train_records, val_records = _save_split(cfg, run, records, accelerator.is_main_process, splits)
    prompts = [M.prompt_for(r, cfg) for r in train_records]
    val_prompts = [M.prompt_for(r, cfg) for r in val_records]

    # class images come from the base model, before any adapter or update
    models.unet.to(accelerator.device)
    models.vae.to(accelerator.device)
    for encoder in models.text_encoders.values():
        encoder.to(accelerator.device)
    cache_root = cfg.train.cache_dir or run.root / "cache"
    class_sources: list[Any] = []
    class_prompt = None
    if cfg.method.prior_preservation:
        class_prompt = M.class_prompt(cfg)
        folder = M.class_images_dir(cache_root, cfg, module_fingerprint(models.unet))
        if accelerator.is_main_process:
            M.ensure_class_images(models, cfg, folder, accelerator.device, weight_dtype)
        accelerator.wait_for_everyone()
        class_sources = [folder / f"class_{i:05d}.png" for i in range(cfg.method.num_class_images)]

    # 4. method: what trains; placement and precision
    method = M.apply_method(models, cfg.method)
    _place_models(models, method, cfg, accelerator.device, weight_dtype)
    trainable = M.trainable_named_parameters(models)

    # 5. caches (latents as distribution parameters; embeddings only for a frozen text encoder)
    latent_cache = class_cache = text_cache = None
    kind = cfg.train.cache_latents
    if kind != "none":
        cache_dir = cache_root if kind == "disk" else None
        load = lambda s: load_pixels(cfg, s)  # noqa: E731
        common = {"resolution": cfg.data.resolution, "resize": cfg.data.resize, "flips": cfg.data.hflip,
                  "vae_fingerprint": module_fingerprint(models.vae) + ("-tiled" if cfg.train.vae_tiling else ""),
                  "batch_size": cfg.train.batch_size,
                  "device": accelerator.device}
        encode = lambda px: models.family.encode_params(models.vae, px.to(accelerator.device))  # noqa: E731
        with accelerator.main_process_first():
            latent_cache = build_latent_cache(kind, cache_dir, train_records, load, encode, **common)
            if class_sources:
                class_cache = build_latent_cache(kind, cache_dir, class_sources, load, encode, what="class images",
                                                 **common)
            if not cfg.method.train_text_encoder:
                def encode_text(batch: list[str]) -> Any:
                    return models.family.encode_prompts(models.text_encoders, models.tokenizers, batch,
                                                        accelerator.device)

                fingerprint = "".join([*map(tokenizer_fingerprint, models.tokenizers.values()),
                                       *map(module_fingerprint, models.text_encoders.values())])
                text_cache = build_text_cache(kind, cache_dir, prompts + ([class_prompt] if class_prompt else []),
                                              encode_text, text_fingerprint=fingerprint, device=accelerator.device)
    parked = text_cache is not None and not M.trained_text_encoders(cfg.method, models.family)
    if parked:  # every training prompt is cached: the encoders are only needed again for validation
        _park(models.text_encoders.values())

    # 6. step count, optimizer, schedule, EMA; accelerate wraps what trains (DDP etc.)
    plan = BatchPlan(len(train_records), cfg.train.repeats, cfg.train.batch_size, cfg.train.gradient_accumulation,
                     accelerator.num_processes, cfg.train.seed, n_class=len(class_sources))
    total = total_steps(len(train_records), cfg.train.repeats, cfg.train.batch_size, cfg.train.gradient_accumulation,
                        accelerator.num_processes, cfg.train.epochs, cfg.train.max_steps)
    optimizer = build_optimizer(M.param_groups(models, cfg), cfg.optimizer)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.optimizer, cfg.schedule, total)
    ema = None
    if cfg.train.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(list(trainable.values()), decay=cfg.train.ema_decay)
        ema.to(accelerator.device)
    unet, optimizer = accelerator.prepare(models.unet, optimizer)
    text_encoders = {name: accelerator.prepare(models.text_encoders[name])
                     for name in M.trained_text_encoders(cfg.method, models.family)}
    text_encoder = text_encoders.get("text_encoder", models.text_encoder)
    if cfg.train.compile != "none":
        unet = torch.compile(unet, mode=None if cfg.train.compile == "default" else cfg.train.compile)

    session = Session(cfg=cfg, run=run, accelerator=accelerator, models=models, method=method, plan=plan, total=total,
                      start_step=0, weight_dtype=weight_dtype, train_sources=train_records, prompts=prompts,
                      class_sources=class_sources, class_prompt=class_prompt, val_sources=val_records,
                      val_prompts=val_prompts, unet=unet, text_encoder=text_encoder, optimizer=optimizer,
                      lr_scheduler=lr_scheduler, trainable=trainable, base_model=base_model, ema=ema,
                      latent_cache=latent_cache, class_cache=class_cache, text_cache=text_cache,
                      objective=objective, text_encoders=text_encoders, encoders_parked=parked)

    # 7. resume: weights, optimizer, schedule, EMA, scaler, RNG, step
    if resume:
        if accelerator.is_main_process:
            ckpt.remove_partial(run.checkpoints)
        accelerator.wait_for_everyone()
        latest = ckpt.latest_checkpoint(run.checkpoints)
        if latest is not None:
            session.start_step = session.restore(latest)
            log.info("resumed from %s (step %d of %d, epoch %d)", latest, session.start_step, total,
                     plan.epoch_of(session.start_step))
        else:
            log.info("no checkpoint yet in %s; starting from step 0", run.checkpoints)
        if accelerator.is_main_process:  # metric rows after the checkpoint are recomputed identically
            rows = [r for r in read_jsonl(run.metrics) if r.get("step", 0) <= session.start_step]
            import json

            atomic_write_text(run.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return session


def load_pixels(cfg: TrainConfig, source: Any) -> Any:
    """One image as the VAE's input (3xHxW in [-1, 1]), preprocessed as the data config says."""
    from synthcxr.data.preprocess import load_image, to_model_tensor

    return to_model_tensor(load_image(source, cfg.data.resolution, cfg.data.resize))


# ====================================================================== the loop
class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _oom_error(cfg: TrainConfig, exc: BaseException) -> TrainingError:
    t = cfg.train
    hints = [f"train.batch_size={t.batch_size} -> {max(1, t.batch_size // 2)} (raise train.gradient_accumulation to keep the global batch)"]
    if not t.gradient_checkpointing:
        hints.append("train.gradient_checkpointing=true")
    if t.mixed_precision == "no":
        hints.append("train.mixed_precision=bf16 (or fp16 on GPUs without bf16)")
    if t.cache_latents == "none":
        hints.append("train.cache_latents=ram (no VAE/text encoder work during steps)")
    if cfg.method.name != "lora":
        hints.append("method.name=lora (trains ~1% of the weights)")
    if cfg.optimizer.name in ("adam", "adamw"):
        hints.append("optimizer.name=adamw8bit or adafactor (smaller optimizer state)")
    return TrainingError(f"out of GPU memory: {exc}".splitlines()[0],
                         fix="change one of: " + "; ".join(hints) + " (use --set key=value)")


def _stop_requested(stop: _StopSignal, acc: Any, check_all: bool) -> bool:
    """Did a signal arrive? With several processes they must agree (one all-reduce, at log steps only)."""
    if acc.num_processes == 1:
        return stop.signum is not None
    if not check_all:
        return False
    import torch

    flag = torch.tensor(float(stop.signum is not None), device=acc.device)
    if acc.reduce(flag, reduction="sum").item() > 0:
        stop.signum = stop.signum or signal.SIGTERM
        return True
    return False


def _bar(session: Session):
    if session.is_main:
        return progress_bar(session.total, "train", completed=session.start_step)
    return contextlib.nullcontext((None, None))


def fit(session: Session) -> None:
    import torch

    from synthcxr.train.optimizers import current_lr

    s, cfg, acc = session, session.cfg, session.accelerator
    t = cfg.train
    if s.is_main:
        from torch.utils.tensorboard import SummaryWriter

        s.tb = SummaryWriter(log_dir=str(s.run.logs))
    batches = s.batches()
    global_batch = t.batch_size * acc.num_processes * t.gradient_accumulation
    log.info("training %s with %s: %d steps (%d per epoch; %d images x %d repeats; global batch %d) from step %d",
             cfg.method.name, cfg.optimizer.name, s.total, s.plan.steps_per_epoch, s.plan.n_images, t.repeats,
             global_batch, s.start_step)
    window_loss = torch.zeros((), device=acc.device)
    window_steps, window_start = 0, time.perf_counter()
    session_start = time.perf_counter()
    with _StopSignal() as stop, _bar(s) as (progress, task):
        for step in range(s.start_step, s.total):
            # 1-2. forward/backward over the micro-batches, then clip, update, schedule, EMA
            window_loss += s.train_step(batches)
            done = step + 1
            window_steps += 1
            if progress is not None:
                progress.advance(task)
            # 3. log (this reads the loss from the device, so not every step on a GPU)
            save_now = done % t.checkpoint_every == 0 or done == s.total
            stopping = _stop_requested(stop, acc, check_all=done % t.log_every == 0 or save_now)
            if done % t.log_every == 0 or save_now or stopping:
                mean_loss = acc.reduce(window_loss, reduction="mean").item() / window_steps
                if not math.isfinite(mean_loss):
                    raise TrainingError(f"loss became {mean_loss} at step {done}; stopping without saving these weights",
                                        fix=s._nan_fix())
                elapsed = time.perf_counter() - window_start
                lr = current_lr(s.optimizer, s.lr_scheduler)
                row = {"step": done, "kind": "train", "epoch": s.plan.epoch_of(step), "loss": mean_loss, "lr": lr,
                       "images_per_s": window_steps * global_batch / elapsed if elapsed > 0 else None,
                       "time": time.time()}
                if s.is_main:
                    append_jsonl(s.run.metrics, row)
                    s.tb.add_scalar("train/loss", mean_loss, done)
                    s.tb.add_scalar("train/lr", lr, done)
                    if progress is not None:  # loss and lr shown beside the exact step count and ETA
                        progress.update(task, description=f"train loss {mean_loss:.4f} lr {lr:.2e} epoch {row['epoch']}")
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            # 4. validation and checkpoints, timed apart: train_time_s and images/s count training only
            paused = time.perf_counter()
            if t.validate_every and done % t.validate_every == 0 and done < s.total:
                s.validate(done)
                s.validation_time_s += time.perf_counter() - paused
            if save_now or stopping:
                s.train_time_s += paused - session_start
                began = time.perf_counter()
                path = s.save(done)
                s.checkpoint_time_s += time.perf_counter() - began
                session_start = time.perf_counter()
            else:
                session_start += time.perf_counter() - paused
            window_start += time.perf_counter() - paused
            if stopping:  # (a checkpoint was just saved)
                name = signal.Signals(stop.signum).name
                raise TrainingInterrupted(f"{name} received at step {done} of {s.total}; checkpoint saved: {path}",
                                          fix=f"continue with: synthcxr train {s.run.config} --out {s.run.root} --resume")
    s.train_time_s += time.perf_counter() - session_start


# ====================================================================== finish
def _peak_memory_gib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def finish(session: Session) -> Path:
    """Final validation, final weights (EMA ones when EMA is on), summary.json, DONE."""
    s = session
    began = time.perf_counter()
    last_val = s.validate(s.total)
    s.validation_time_s += time.perf_counter() - began
    if s.is_main:
        from synthcxr.train.optimizers import to_eval_weights

        to_eval_weights(s.optimizer)  # schedule-free: export the averaged weights validation scored
        if s.ema is not None:
            s.ema.copy_to(list(s.trainable.values()))
        from synthcxr.models.quantize import base_parameter_count
        from synthcxr.train.methods import export_final

        unwrapped = s.unwrapped_models()
        if s.method.full_weights:  # export in the precision the user will load: fp32, like the base model
            import torch

            for module in (unwrapped.vae, *unwrapped.text_encoders.values()):
                if module.dtype != torch.float32:  # .to() on an fp32 VAE only prints a diffusers notice
                    module.to(torch.float32)
        export_final(s.method, unwrapped, s.run.root, s.cfg, s.base_model)
        train_rows = [r for r in read_jsonl(s.run.metrics) if r.get("kind") == "train"]
        summary = {
            "method": s.cfg.method.name, "optimizer": s.cfg.optimizer.name, "family": s.models.family.name,
            "family_label": s.models.family.label, "resolution": s.cfg.data.resolution,
            "model_params": base_parameter_count(s.models.unet),  # a 4-bit base counted unpacked
            "steps": s.total,
            "epochs": s.plan.epoch_of(s.total - 1) + 1 if s.total else 0,
            "global_batch": s.cfg.train.batch_size * s.accelerator.num_processes * s.cfg.train.gradient_accumulation,
            "num_processes": s.accelerator.num_processes, "train_images": s.plan.n_images,
            "train_time_s": s.train_time_s, "validation_time_s": s.validation_time_s,
            "checkpoint_time_s": s.checkpoint_time_s,
            "images_per_s": (s.total * s.cfg.train.batch_size * s.accelerator.num_processes
                             * s.cfg.train.gradient_accumulation / s.train_time_s) if s.train_time_s > 0 else None,
            "peak_memory_gib": _peak_memory_gib(),
            "trainable_params": int(sum(p.numel() for p in s.trainable.values())),
            "final_loss": train_rows[-1]["loss"] if train_rows else None,
            "final_val_loss": last_val.get("val_loss"),
            "mixed_precision": s.cfg.train.mixed_precision, "device": str(s.accelerator.device),
        }
        atomic_write_json(s.run.root / "summary.json", summary)
        atomic_write_text(s.run.done_marker, f"finished step {s.total}\n")
        if s.tb is not None:
            s.tb.close()
        log.info("done: %s (final weights in %s)", s.run.root, s.run.final)
    s.accelerator.wait_for_everyone()
    s.accelerator.end_training()
    return s.run.root


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Train (or continue with resume=True) one run into `out_dir`; returns the run directory."""
    with _run_lock(Path(out_dir)):
        session = setup(cfg, out_dir, resume)
        if session is None:
            return Path(out_dir)
        fit(session)
        return finish(session)


def _run_lock(root: Path) -> Any:
    """One training per run directory: a second start (or --resume) while one runs stops at once.

    Held by the first process only (RANK 0): the others of a distributed run share the directory.
    """
    from synthcxr.generate.lock import output_lock

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return output_lock(root, busy=(
        "another `synthcxr train` is using this run directory",
        "wait for it to finish or stop it (Ctrl-C saves a checkpoint), then --resume; or choose another --out"))
