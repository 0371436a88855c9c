"""Typed training config: one shape for every run (`model`, `data`, `method`, `optimizer`, `schedule`, `train`).

Every key can be set from the command line with `--set section.key=value`. Names that pick an
implementation (method, optimizer, schedule) are checked against their registries here, so a typo
fails before any model is loaded, with the allowed values and a "did you mean". Every number is
checked here too (finite, within its range; `optimizer.options` against the optimizer's typed
options in train/optimizers.py), so a bad value fails at load, not after minutes of setup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from synthcxr.config import StrictModel, load_config
from synthcxr.data.config import DataConfig
from synthcxr.errors import did_you_mean

METHOD_NAMES = ("dreambooth", "lora", "full")
ADAPTER_NAMES = ("loha", "lokr", "oft")
"""peft adapters besides LoRA; diffusers cannot load them as a LoRA file, so they export merged (methods.py)."""
OPTIMIZER_NAMES = ("adam", "adamw", "adamw8bit", "adafactor", "dadaptation", "prodigy")
"""The seed study's six; the registry in train/optimizers.py is the full list the config accepts."""
LR_FREE_OPTIMIZERS = ("dadaptation", "prodigy", "prodigy_schedulefree")
SCHEDULE_NAMES = ("constant", "constant_with_warmup", "warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def check_name(value: str, allowed: tuple[str, ...], what: str) -> str:
    """Registry-name check with a "did you mean"; pydantic turns the ValueError into a config error."""
    if value in allowed:
        return value
    hint = did_you_mean(value, allowed, cutoff=0.5)
    raise ValueError(f"unknown {what} {value!r}{hint}; allowed: {', '.join(allowed)}")


class Section(StrictModel):
    """A training-config section: NaN and infinity are refused (never a meaningful setting)."""

    model_config = ConfigDict(allow_inf_nan=False)


class ModelSection(Section):
    """The pre-trained model to start from."""

    path: str = SD15
    """A local diffusers folder, a single .safetensors/.ckpt file, or a hub id (must be in the local cache offline)."""

    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override the scheduler's prediction type (SD 2.x 768 px models use v_prediction). None = the model's own."""

    revision: str | None = None
    """Hub revision, recorded with the run for provenance (loading uses the locally cached snapshot)."""

    single_file_config: Path | None = None
    """For a single-file checkpoint offline: a local diffusers folder of the same architecture."""

    family: str | None = None
    """Model family (sd, sdxl, sd3). None = detected from model_index.json (or a single file's tensors)."""

    drop_t5: bool = False
    """Leave out the optional T5 text encoder (SD3/3.5: ~9 GB in bf16); its tokens become zeros, as in
    StableDiffusion3Pipeline(text_encoder_3=None). Recorded with the run; generate then drops it too."""

    quantize: Literal["none", "nf4"] = "none"
    """Hold the frozen denoiser in 4-bit (nf4: bitsandbytes NF4, i.e. QLoRA as in diffusers' Flux example), with
    LoRA adapters trained on top; Flux.1-dev then fits a 24 GB GPU. LoRA only; the LoRA file applies to the
    unquantized base."""

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        from synthcxr.models.families import FAMILIES

        return None if value is None else check_name(value, tuple(FAMILIES), "model family")


class MethodSection(Section):
    """What is trained: the whole UNet (dreambooth/full) or LoRA adapters, and with which prompts."""

    name: str = "lora"
    """dreambooth (full UNet, instance prompt + rare token), lora (peft adapters), full (text-to-image on captions),
    or the peft adapters loha (Hadamard product), lokr (Kronecker product), oft (orthogonal fine-tuning)."""

    prompts: Literal["auto", "instance", "caption"] = "auto"
    """Prompt per training image: the DreamBooth instance prompt ("a sks chest x-ray"), or the caption from
    the clinical reading. auto = instance for dreambooth, caption otherwise."""

    instance_prompt: str | None = None
    """Overrides the instance prompt built from data.captions (instance_token + class_noun)."""

    class_prompt: str | None = None
    """Overrides the class prompt for prior preservation (default "a chest x-ray")."""

    prior_preservation: bool = False
    """DreamBooth prior preservation: also train on class images generated once by the base model."""

    prior_loss_weight: float = Field(1.0, ge=0.0)
    num_class_images: int = Field(100, ge=1)
    class_image_steps: int = Field(25, ge=1)
    """Sampling steps used to generate the class images (once; they are cached)."""

    class_image_guidance: float = Field(7.5, ge=0.0)

    train_text_encoder: bool = False
    """Also train the text encoder (full weights for dreambooth/full, LoRA adapters for lora)."""

    text_encoder_lr: float | None = Field(None, gt=0.0)
    """Learning rate of the text encoder parameters (None = optimizer.lr)."""

    rank: int = Field(4, ge=1)
    """LoRA rank."""

    alpha: float | None = Field(None, gt=0.0)
    """LoRA alpha (None = rank, i.e. scale 1)."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dora: bool = False
    """Weight-decomposed LoRA (peft `use_dora`)."""

    target_modules: list[str] | None = None
    """Denoiser modules that get adapters. None = the model family's default (SD/SDXL: to_q, to_k, to_v,
    to_out.0; SD3: both attention streams, as diffusers' training examples)."""

    text_encoders: list[str] | None = None
    """With train_text_encoder: which encoders train (e.g. [text_encoder, text_encoder_2]).
    None = every CLIP encoder of the family. T5/Gemma encoders cannot be trained."""

    text_encoder_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])

    decompose_factor: int = Field(-1, ge=-1)
    """LoKr: Kronecker factor of each layer's width (-1 = as square as possible, kohya/LyCORIS's default)."""

    block_size: int = Field(32, ge=1)
    """OFT: size of the orthogonal blocks; must divide the input width of every target layer."""

    export: Literal["auto", "lora_file", "merged"] = "auto"
    """Final weights: lora_file (a file diffusers' load_lora_weights reads; LoRA only), merged (adapters merged
    into a full pipeline folder), auto = lora_file for lora, merged for loha/lokr/oft, a pipeline for
    dreambooth/full."""

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        if value == "boft":
            raise ValueError("boft is not offered: peft compiles its CUDA kernel at run time and, where that fails, "
                             "silently trains with one butterfly factor (plain OFT); use method.name=oft")
        return check_name(value, METHOD_NAMES + ADAPTER_NAMES, "method")

    @model_validator(mode="after")
    def _adapter_checks(self) -> MethodSection:
        if self.export == "lora_file" and self.name != "lora":
            why = ("diffusers' StableDiffusionPipeline.load_lora_weights reads only LoRA keys, so a "
                   f"{self.name} file would not load" if self.name in ADAPTER_NAMES else "it trains whole weights")
            raise ValueError(f"method.export=lora_file needs method.name=lora ({why}); "
                             "set method.export=merged (a full pipeline folder any diffusers loads) or auto")
        if self.export == "merged" and self.name in ("dreambooth", "full"):
            raise ValueError(f"method {self.name} has no adapters to merge; remove method.export (a pipeline is saved)")
        if self.dora and self.name != "lora":
            raise ValueError(f"method.dora is a LoRA variant; remove it for method {self.name}")
        return self

    @property
    def prompt_mode(self) -> str:
        if self.prompts != "auto":
            return self.prompts
        return "instance" if self.name == "dreambooth" else "caption"


class OptimizerSection(Section):
    """Optimizer by name plus its options."""

    name: str = "adamw"
    """adam, adamw, adamw8bit (bitsandbytes), adafactor (transformers), dadaptation (DAdaptAdam), prodigy."""

    lr: float | None = None
    """Learning rate. None = 1.0 for dadaptation/prodigy (learning-rate free), none for adafactor with
    relative_step, else 1e-4."""

    weight_decay: float = Field(1e-2, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    relative_step: bool = False
    """Adafactor only: its own time-dependent learning rate (then lr must be unset and the schedule is Adafactor's)."""

    fused: bool | None = None
    """Fused (single-kernel) Adam/AdamW on CUDA. None = on when every parameter is on a GPU."""

    options: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed to the optimizer class (e.g. d_coef for prodigy), checked at load
    against the optimizer's typed options (train/optimizers.py)."""

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        from synthcxr.train.optimizers import OPTIMIZERS  # the registry is the one list of names

        return check_name(value, tuple(OPTIMIZERS), "optimizer")

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("the learning rate must be > 0 (e.g. 1e-4 for adamw with LoRA, 1.0 for prodigy or "
                             "dadaptation); remove optimizer.lr to use the optimizer's default")
        return value

    @field_validator("eps")
    @classmethod
    def _positive_eps(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("eps must be > 0: it keeps the update finite where a gradient is ~0 (usual: 1e-8)")
        return value

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1): they are moving-average decays (usual: [0.9, 0.999])")
        return value

    @field_validator("options")
    @classmethod
    def _typed_options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:  # the name itself was refused; that error is the one to read
            return value
        from synthcxr.train.optimizers import validate_options

        return validate_options(name, value)

    @property
    def lr_free(self) -> bool:
        return self.name in LR_FREE_OPTIMIZERS

    @property
    def effective_lr(self) -> float | None:
        if self.lr is not None:
            return self.lr
        if self.lr_free:
            return 1.0
        if self.name == "adafactor" and self.relative_step:
            return None
        from synthcxr.train.optimizers import DEFAULT_LR  # each registry entry's documented default

        return DEFAULT_LR.get(self.name, 1e-4)

    @model_validator(mode="after")
    def _check(self) -> OptimizerSection:
        if self.relative_step and self.name != "adafactor":
            raise ValueError("relative_step only applies to optimizer.name=adafactor")
        if self.relative_step and self.lr is not None:
            raise ValueError("adafactor with relative_step computes its own learning rate; leave optimizer.lr unset")
        return self


class ScheduleSection(Section):
    """Learning-rate schedule (diffusers.optimization.get_scheduler)."""

    name: str = "constant"
    """constant, constant_with_warmup (alias warmup), cosine, cosine_with_restarts, linear, polynomial."""

    warmup_steps: int = Field(0, ge=0)
    num_cycles: int = Field(1, ge=1)
    power: float = Field(1.0, gt=0.0)

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        return check_name(value, SCHEDULE_NAMES, "schedule")


class ObjectiveSection(Section):
    """Rectified flow matching options (families trained with flow matching, e.g. sd3); the defaults are
    diffusers' SD3 training example's. Epsilon/v families ignore them (their prediction type is the model's)."""

    sampling: Literal["uniform", "logit_normal", "mode", "cosmap"] = "logit_normal"
    """How sigma is drawn per image (SD3 paper, section 3.1)."""

    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0.0)
    mode_scale: float = 1.29
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Loss weighting per sigma (diffusers' compute_loss_weighting_for_sd3)."""

    shift: float | None = Field(None, gt=0.0)
    """Timestep shift; None = the model scheduler's (SD3/3.5: 3.0)."""


class TrainSection(Section):
    """How long, how big, how precise, and what to save along the way."""

    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train. When unset, `epochs` decides."""

    epochs: int = Field(1, ge=1)
    """Passes over the (repeated) training images; used when max_steps is unset."""

    repeats: int = Field(1, ge=1)
    """Each training image counts this many times per epoch (DreamBooth-style small data sets)."""

    batch_size: int = Field(1, ge=1)
    """Images per process per micro-batch."""

    gradient_accumulation: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    allow_cpu_fp16: bool = False
    """fp16 autocast on a CPU is slow and poorly supported; it is refused unless this is set."""

    gradient_checkpointing: bool = False
    vae_tiling: bool = False
    """diffusers' tiled VAE encode/decode: bounded memory for 1024 px latents (tiles blend; latents differ slightly)."""
    vae_slicing: bool = False
    """Encode/decode one image at a time (same latents, less peak memory)."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seeds Python, NumPy and torch (NumPy takes 0 <= seed < 2**32)."""

    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Gradient clipping (None = off)."""

    min_snr_gamma: float | None = Field(None, gt=0.0)
    """Min-SNR-gamma loss weighting (5.0 is the paper's choice). None = plain MSE."""

    noise_offset: float = Field(0.0, ge=0.0)
    ema: bool = False
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0)
    cache_latents: Literal["none", "ram", "disk"] = "none"
    """Encode images (and prompts, when the text encoder is frozen) once, in RAM or on disk."""

    cache_dir: Path | None = None
    """Disk cache folder (default RUN_DIR/cache); share it between runs on the same data and model."""

    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    validate_every: int | None = Field(None, ge=1)
    """Validation (samples + held-out loss) every N steps and at the end. None = only at the end."""

    validation_prompts: list[str] = Field(default_factory=list)
    """Prompts for sample images. Empty = the instance prompt or the first training captions."""

    validation_seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 1])
    validation_steps: int = Field(25, ge=1)
    """Sampling steps for validation images."""

    validation_guidance: float = Field(7.5, ge=0.0)
    validation_timesteps: list[int] = Field(default_factory=lambda: [100, 300, 500, 700, 900])
    """Fixed timesteps of the held-out validation loss (fixed noise too), so optimizers are comparable."""

    max_validation_images: int = Field(64, ge=1)
    """Held-out images used for the validation loss at most."""

    log_every: int = Field(10, ge=1)
    """Loss/lr logging (and NaN check) every N steps; checking reads the loss from the GPU, a sync."""

    num_workers: int = Field(0, ge=0)
    tf32: bool = True
    """TF32 matmuls on GPUs that have them (Ampere and newer)."""

    deterministic: bool = False
    """torch.use_deterministic_algorithms: bit-identical resumes and reruns, slower on GPUs."""

    channels_last: bool = False
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    """torch.compile the UNet (reduce-overhead uses CUDA graphs)."""

    @field_validator("validation_timesteps")
    @classmethod
    def _timesteps(cls, value: list[int]) -> list[int]:
        if not value or any(t < 0 or t > 999 for t in value):
            raise ValueError("give at least one timestep, each between 0 and 999")
        return value


class TrainConfig(Section):
    """A whole training run; saved resolved as RUN_DIR/config.yaml."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodSection = Field(default_factory=MethodSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        if self.optimizer.relative_step and self.schedule.name not in ("constant",):
            raise ValueError("adafactor relative_step brings its own schedule; set schedule.name=constant")
        if self.train.ema and self.optimizer.name in ("schedulefree_adamw", "prodigy_schedulefree"):
            raise ValueError(f"optimizer {self.optimizer.name} already averages its weights (validation and export "
                             "use that average); an EMA of its training point would replace it: set train.ema=false")
        if self.optimizer.name == "muon" and self.method.name == "oft":
            raise ValueError("optimizer muon orthogonalises weight matrices; OFT's parameters are packed skew-symmetric "
                             "block entries, not matrices of a linear map: use another optimizer (e.g. adamw) with oft")
        return self


RESUME_SAFE_KEYS = (
    "train.max_steps", "train.epochs", "train.checkpoint_every", "train.keep_checkpoints", "train.validate_every",
    "train.validation_prompts", "train.validation_seeds", "train.validation_steps", "train.validation_guidance",
    "train.log_every", "train.num_workers", "train.cache_dir", "train.cache_latents",
)
"""Keys that may differ when resuming: they change how long the run goes and what it writes on the way,
not the state already trained. (A longer max_steps stretches a decaying LR schedule from here on.)"""


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "options":
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(old: TrainConfig, new: TrainConfig,
                       defaults: dict[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ (dotted names -> (old, new)). `defaults` gives what a None value means
    (e.g. method.target_modules None = the family's targets), so an explicit default equals None."""
    a, b = flatten(old.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    for flat in (a, b):
        for key, value in (defaults or {}).items():
            if flat.get(key) is None:
                flat[key] = value
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
