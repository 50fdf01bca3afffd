"""Typed configuration: frozen dataclasses that Hydra validates at compose time.

Everything below `epd/run.py` receives these objects, never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional


class Role(str, Enum):
    """What a worker does for a request. A str enum: equal to its name as a string (configs, events)."""

    ENCODE = "encode"
    PREFILL = "prefill"
    DECODE = "decode"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


ROLES = (Role.ENCODE, Role.PREFILL, Role.DECODE)  # in pipeline order


@dataclass(frozen=True)
class VisionTowerConfig:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    image_size: int = 56
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    norm_type: str = "layer_norm"  # InternViT: layer_norm | rms_norm
    use_qk_norm: bool = False
    # Qwen2-VL / Qwen2.5-VL: patches merged 2x2 into one LM token, two frames per temporal patch;
    # Qwen2.5-VL attends within windows of `window_size` pixels except every `full_attention_every`-th layer.
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    full_attention_every: int = 8
    tokens_per_second: int = 2  # Qwen2.5-VL: temporal positions per second of video


@dataclass(frozen=True)
class TextModelConfig:
    arch: str = "llama"  # llama | qwen2 | qwen3_5_text (hybrid: gated DeltaNet linear-attention layers between full ones)
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    # qwen3_5_text only. head_dim 0: hidden_size / num_heads.
    head_dim: int = 0
    partial_rotary_factor: float = 1.0  # the share of each head's dims that is rotated
    full_attention_interval: int = 4  # every Nth layer attends over the KV cache; the others are linear
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4

    @property
    def is_hybrid(self) -> bool:
        return self.arch == "qwen3_5_text"

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def full_attention_layers(self) -> tuple[int, ...]:
        """The layers that keep KV in the paged cache (every layer but a hybrid's linear ones)."""
        if not self.is_hybrid:
            return tuple(range(self.num_layers))
        return tuple(i for i in range(self.num_layers) if (i + 1) % self.full_attention_interval == 0)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny-llava"
    family: str = "llava"  # the HF model_type: llava | internvl | qwen2_vl | qwen2_5_vl | minicpmv4_6
    load_format: str = "dummy"  # dummy (random, seeded) | hf (local checkpoint dir)
    path: Optional[str] = None
    dtype: str = "float32"
    device: str = "cpu"  # cpu | cuda | auto
    seed: int = 0
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextModelConfig = field(default_factory=TextModelConfig)
    image_token_id: int = 3
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    downsample_ratio: float = 0.5  # internvl pixel shuffle
    max_tiles: int = 12  # internvl dynamic tiling; minicpmv: most slices of a large image
    use_thumbnail: bool = True
    # qwen2_vl: images resized (aspect kept, sides multiples of 28) to between these many pixels;
    # each image's placeholders are wrapped in these tokens, as the Qwen chat template does
    # (minicpmv: <image> and </image> around an image's overview).
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    vision_start_token_id: int = 5
    vision_end_token_id: int = 6
    video_token_id: int = 4
    # minicpmv: pieces of about scale_resolution^2 pixels; the tower's window merger after this layer;
    # <slice> and </slice> around each slice's placeholders, rows of slices split by a newline token.
    scale_resolution: int = 448
    vision_merger_layer: int = 6
    slice_start_token_id: int = 7
    slice_end_token_id: int = 8
    newline_token_id: int = 9
    cuda_graphs: bool = True  # capture the decode step on CUDA devices
    # Prefill and mixed steps of up to this many tokens replay piecewise CUDA graphs (attention eager
    # between them, steps padded to a bucket); larger steps, which the GPU bounds anyway, run eagerly. 0: off.
    step_graph_tokens: int = 4096
    # An E worker's vision tower (fixed-tile families: LLaVA, InternVL) replays CUDA graphs captured for 1..8
    # tiles and every multiple of 8 up to this many; a larger batch runs as pieces of that size. 0: eager.
    vision_graph_tiles: int = 32
    # Where an E worker resizes and tiles images: "host" (PIL on its CPU cores, exactly what the
    # transformers processors give) or "device" (decoded on the host, resized by torch on its
    # device; a GPU does in ~1 ms what PIL does in ~0.1 s; pixels differ from PIL's by < 0.3 levels
    # on average).
    image_resize: str = "host"
    image_decode: str = "host"  # device: JPEGs decoded by nvJPEG on the E worker's GPU (needs image_resize=device)


@dataclass(frozen=True)
class PoolConfig:
    """One pool of identical workers. Its roles come from its name in DeploymentConfig."""

    instances: int = 1
    tp: int = 1
    max_images_per_batch: int = 8
    max_prefill_tokens: int = 8192
    max_decode_seqs: int = 64
    kv_blocks: int = 1024
    kv_block_size: int = 16
    mm_blocks: int = 256
    mm_block_tokens: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Encoded images kept by content hash in the MM pool of an instance that encodes, evicted least
    # recently used when blocks are needed: None lets every free MM block hold them, 0 turns it off.
    encoder_cache_blocks: Optional[int] = None
    # An instance that encodes and prefills stops encoding while its prefill queue holds this many steps
    # (max_prefill_tokens each) of encoded prompts: images are encoded shortly before their prefill, not all
    # of a burst ahead of the first prefill. 0 (default): no bound. In the simulator (one H200) 2 halves a
    # LLaVA burst's median TTFT but costs InternVL's tile-heavy workload 4-5% of its throughput (images'
    # host preparation starts at dispatch, so it stops overlapping): bench/results/sim-encode-ahead.md.
    encode_ahead_steps: int = 0
    # Images an instance that encodes decodes and resizes on its host: in processes of their own (True), or in threads
    # of the worker beside its batch thread (False). None: processes where the worker has a GPU (its batch thread
    # holds the interpreter lock much of each step), threads on CPU (no process start in tests). `num_cpus` of them,
    # started with a worker that encodes (one that switches to encoding later uses threads).
    prep_processes: Optional[bool] = None
    # Hybrid LMs (linear-attention layers): sequences a prefill or decode instance keeps state for at once,
    # each a slot of the worker's state pool; 0: twice max_decode_seqs.
    state_slots: int = 0

    @property
    def state_slot_count(self) -> int:
        return self.state_slots or 2 * self.max_decode_seqs


TRANSFER_BACKENDS = ("object_store", "ipc", "nccl", "local")
# Backends that copy the data out at send time: the sender's blocks are free at once (the others keep
# them until the receiver's pulling batch has completed). The transfer classes declare the same.
COPIES_ON_SEND = frozenset({"object_store"})

# Pool field name -> the roles its workers hold, in pipeline order.
POOL_ROLES: dict[str, tuple[Role, ...]] = {
    "encode": (Role.ENCODE,),
    "encode_prefill": (Role.ENCODE, Role.PREFILL),
    "aggregated": (Role.ENCODE, Role.PREFILL, Role.DECODE),
    "prefill": (Role.PREFILL,),
    "prefill_decode": (Role.PREFILL, Role.DECODE),
    "decode": (Role.DECODE,),
}


def describe_layout(counts: dict[str, int]) -> str:
    """Instances per pool in words, in pipeline order: {'encode': 2, 'prefill': 1, 'decode': 1} -> '2E1P1D'."""
    letters = {Role.ENCODE: "E", Role.PREFILL: "P", Role.DECODE: "D"}
    return "".join(f"{counts[n]}{''.join(letters[r] for r in POOL_ROLES[n])}" for n in POOL_ROLES if n in counts)


@dataclass(frozen=True)
class DeploymentConfig:
    name: str = "epd"
    encode: Optional[PoolConfig] = None
    prefill: Optional[PoolConfig] = None
    decode: Optional[PoolConfig] = None
    encode_prefill: Optional[PoolConfig] = None
    prefill_decode: Optional[PoolConfig] = None
    aggregated: Optional[PoolConfig] = None
    irp: bool = False  # intra-request parallelism: spread one request's images over E instances
    routing: str = "round_robin"  # round_robin | least_loaded
    transfer: str = "object_store"
    max_pending_transfers: int = 64  # per sender; back-pressure beyond this
    # Schedule an instance's next batch while its current one runs (the worker finds it queued, so it
    # never waits for the driver between steps); decode finishes are then seen one step late and the
    # extra token is discarded. False: one batch at a time, each scheduled after the last one's result.
    async_scheduling: bool = True
    # Prompts longer than a pool's max_prefill_tokens are prefilled in chunks of at most that many tokens
    # per step; an instance that also decodes runs its running decodes and prefill chunks in one step,
    # decodes first (the step's token budget is max_prefill_tokens). False: whole prompts only.
    chunked_prefill: bool = True
    # Where an instance prefills and decodes (chunked prefill on): "mixed" runs its decodes and prefill
    # chunks in one forward (as vLLM does), "alternate" runs a decode step (a full-graph replay) after
    # every prefill step while both have work, bounding the decodes' wait to one chunk.
    prefill_decode_steps: str = "mixed"
    # KV of decoding sequences: "on_demand" (blocks allocated as they grow; when the pool runs dry the
    # newest running sequence is preempted, its blocks freed, and recomputed later) or "reserve" (prompt
    # + max_tokens reserved at admission: never preempted, but fewer sequences fit).
    kv_allocation: str = "on_demand"
    # Prefill instances keep the KV blocks of prompts they prefilled (by a hash chained over tokens and
    # images) and reuse them for requests that begin the same way; unused blocks are evicted LRU.
    prefix_caching: bool = True
    # A worker process that dies is replaced: a new one is started in its place (its GPU and cores),
    # loads the weights while the siblings serve, and rejoins its stage (Ray executor; not for workers in
    # process groups: tensor parallelism, nccl transfers). False: the stage goes on without it.
    replace_lost_workers: bool = True

    def pools(self) -> dict[str, PoolConfig]:
        return {n: getattr(self, n) for n in POOL_ROLES if getattr(self, n) is not None}

    def pool_for(self, role: str) -> str:
        owners = [n for n in self.pools() if role in POOL_ROLES[n]]
        if len(owners) != 1:
            raise ValueError(f"deployment {self.name!r}: role {role.value!r} is held by pools {owners}; need one")
        return owners[0]

    def describe(self) -> str:
        """Deployment in words, e.g. '2E1P1D', '3EP1D', '4EPD'."""
        return describe_layout({n: p.instances for n, p in self.pools().items()})

    def validate(self) -> None:
        for role in ROLES:
            self.pool_for(role)
        for n, p in self.pools().items():
            if p.instances < 1:
                raise ValueError(f"deployment.{n}.instances must be >= 1, got {p.instances}")
            if p.tp < 1:
                raise ValueError(f"deployment.{n}.tp must be >= 1, got {p.tp}")
            if p.state_slots < 0:
                raise ValueError(f"deployment.{n}.state_slots must be >= 0 (0: twice max_decode_seqs), got {p.state_slots}")
        if self.transfer not in TRANSFER_BACKENDS:
            raise ValueError(f"deployment.transfer must be one of {', '.join(TRANSFER_BACKENDS)}, got {self.transfer!r}")
        self._validate_tp()
        self._validate_block_sizes()
        if self.irp and self.pool_for("encode") != "encode":
            raise ValueError("deployment.irp needs a separate encode pool (encode images apart from prefill)")
        if self.prefill_decode_steps not in ("mixed", "alternate"):
            raise ValueError(f"deployment.prefill_decode_steps must be mixed or alternate, got {self.prefill_decode_steps!r}")
        if self.kv_allocation not in ("on_demand", "reserve"):
            raise ValueError(f"deployment.kv_allocation must be on_demand or reserve, got {self.kv_allocation!r}")
        for n, p in self.pools().items():
            if p.encoder_cache_blocks is not None and not 0 <= p.encoder_cache_blocks <= p.mm_blocks:
                raise ValueError(
                    f"deployment.{n}.encoder_cache_blocks must be in [0, mm_blocks={p.mm_blocks}] or null, got {p.encoder_cache_blocks}"
                )
            if not isinstance(p.encode_ahead_steps, int) or p.encode_ahead_steps < 0:
                got = p.encode_ahead_steps
                raise ValueError(f"deployment.{n}.encode_ahead_steps must be a whole number >= 0 (0: no bound), got {got!r}")
        if self.routing not in ("round_robin", "least_loaded"):
            raise ValueError(f"deployment.routing must be round_robin or least_loaded, got {self.routing!r}")

    def _validate_tp(self) -> None:
        pools = self.pools()
        if "encode" in pools and pools["encode"].tp != 1:
            raise ValueError(f"deployment.encode.tp={pools['encode'].tp}: tensor parallelism splits the LM; encode pools use tp: 1")
        lm_tp = {n: p.tp for n, p in pools.items() if {"prefill", "decode"} & set(POOL_ROLES[n])}
        if len(set(lm_tp.values())) > 1:
            raise ValueError(f"pools holding the LM must share one tp (their KV caches are split alike), got {lm_tp}")
        moves_kv = self.pool_for("prefill") != self.pool_for("decode")
        moves_mm = self.pool_for("encode") != self.pool_for("prefill")
        if max(lm_tp.values()) > 1 and (moves_kv or moves_mm) and self.transfer == "object_store":
            raise ValueError("tp > 1 with transfers between pools needs deployment.transfer=ipc or nccl (per-rank transfers)")

    def _validate_block_sizes(self) -> None:
        """Block-copying backends move whole blocks: both sides of a hand-off must use the same block size."""
        if self.transfer not in ("local", "ipc"):
            return
        pools = self.pools()
        e, p, d = (pools[self.pool_for(r)] for r in ROLES)
        if self.pool_for("encode") != self.pool_for("prefill") and e.mm_block_tokens != p.mm_block_tokens:
            raise ValueError(
                f"transfer={self.transfer} copies whole blocks: mm_block_tokens of {self.pool_for('encode')} ({e.mm_block_tokens})"
                f" and {self.pool_for('prefill')} ({p.mm_block_tokens}) must match"
            )
        if self.pool_for("prefill") != self.pool_for("decode") and p.kv_block_size != d.kv_block_size:
            raise ValueError(
                f"transfer={self.transfer} copies whole blocks: kv_block_size of {self.pool_for('prefill')} ({p.kv_block_size})"
                f" and {self.pool_for('decode')} ({d.kv_block_size}) must match"
            )


@dataclass(frozen=True)
class WorkloadConfig:
    name: str = "tiny"
    kind: str = "synthetic"  # synthetic | dataset
    arrival: str = "poisson"  # poisson | gamma | constant | trace | offline
    rate: float = 2.0  # requests per second
    cv: float = 1.0  # gamma coefficient of variation
    num_requests: int = 16
    seed: int = 0
    images_per_request: int = 1
    images_per_request_max: Optional[int] = None  # uniform in [images_per_request, max] when set
    videos_per_request: int = 0  # videos of `video_frames` procedural frames (image_width x image_height) each
    video_frames: int = 8
    video_fps: float = 2.0  # the rate the frames stand for
    image_width: int = 640
    image_height: int = 480
    prompt_tokens: int = 16
    prompt_tokens_max: Optional[int] = None
    output_tokens: int = 8
    output_tokens_max: Optional[int] = None
    ignore_eos: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    # Output lengths: "uniform" in [output_tokens, output_tokens_max], or "lognormal" (mean output_tokens,
    # a long tail of sigma output_sigma, capped at output_tokens_max or 8x the mean).
    output_dist: str = "uniform"
    output_sigma: float = 1.0
    # The drawn length is the answer's: each request ends with EOS there (max_tokens is the cap), so the
    # schedulers, like a real server's, do not know when it will stop. False: max_tokens is the length.
    answer_lengths: bool = False
    long_prompt_share: float = 0.0  # share of requests whose text prompt is long_prompt_tokens long
    long_prompt_tokens: int = 2048
    repeat_image_share: float = 0.0  # share of images drawn from `image_pool` popular ones (the same bytes again)
    image_pool: int = 8
    system_prompt_tokens: int = 0  # each text prompt begins with one of `system_prompts` shared prefixes this long
    system_prompts: int = 1
    # Synthetic images as requests carry them: "procedural" (drawn from a seed by whoever reads them, no
    # file) or "jpeg" (photo-like pictures encoded once into files under image_cache_dir, reused by later
    # runs; the engine decodes them as it would a client's). image_cache_dir None: $EPD_IMAGE_CACHE or
    # ~/.cache/epd/images.
    image_format: str = "procedural"
    image_cache_dir: Optional[str] = None
    dataset_path: Optional[str] = None
    trace_path: Optional[str] = None
    # A workload whose mix shifts: each phase overrides fields of this one (num_requests, images, output
    # tokens, rate...) and follows the previous one in time (offline: in queue order).
    phases: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class SLOConfig:
    name: str = "cpu"
    ttft: float = 2.0  # seconds
    tpot: float = 0.2  # seconds per output token
    attainment_target: float = 0.9


@dataclass(frozen=True)
class AllocationConfig:
    """How many workers each stage gets, decided again while serving (`epd/allocation/`)."""

    policy: str = "static"  # static | queue | simulated | scripted
    interval_s: float = 1.0  # how often the policy looks at the load
    # queue: move a worker when the busiest stage's pressure exceeds the idlest's by this factor, for `patience` looks in a row
    hysteresis: float = 2.0
    min_pressure: float = 1.0  # ... and the busiest stage has at least this much waiting work per worker
    patience: int = 2
    cooldown_s: float = 2.0  # after a switch ends, wait this long before the next
    # simulated: re-run the simulator's split search on the last `window` requests
    window: int = 64
    # scripted (tests, experiments): "T:INSTANCE:POOL" entries, e.g. "0.5:encode-1:prefill"
    script: list[str] = field(default_factory=list)
    switch_cost_s: float = 0.5  # what a switch costs in the simulator (measure it: ROLE_SWITCH events of a real run)


@dataclass(frozen=True)
class HardwareConfig:
    name: str = "cpu"
    peak_flops: float = 2e11  # dense bf16 (fp32 on CPU) FLOP/s
    memory_bandwidth: float = 2e10  # bytes/s
    link_bandwidth: float = 5e9  # bytes/s between workers
    link_latency: float = 1e-4  # seconds per transfer
    compute_efficiency: float = 0.5
    memory_efficiency: float = 0.7
    # Seconds per batch beyond compute: on the worker between back-to-back batches (input set-up,
    # sampling, the queued task's dispatch), and the driver round trip that a worker scheduled one
    # batch at a time (deployment.async_scheduling=false) waits out as well.
    step_overhead: float = 1e-3
    rpc_latency: float = 1e-3
    # The fixed device time of an LM step (prefill or decode): what a straight-line fit of the runtime's own
    # step times over their FLOPs (prefill) or bytes (decode) leaves at zero; the efficiencies are the slopes.
    step_floor: float = 0.0
    # A hybrid LM's linear-attention layers (MiniCPM-V 4.6): the fixed device time each adds to a step (its
    # convolution, norms and gates are many small kernels), and how many times a step's kernels read and
    # write each sequence's state (1: once, the bytes floor).
    linear_layer_floor: float = 0.0
    state_passes: float = 1.0
    # The vision tower's share of peak FLOP/s (0: compute_efficiency, the LM's) and the fixed device time of
    # an encode batch: a ViT's GEMMs are narrower than a 7B LM's, and its LayerNorms and GELUs are unfused.
    vision_efficiency: float = 0.0
    encode_floor: float = 0.0
    memory_bytes: float = 2.4e10
    shared_cores: int = 0  # > 0: all workers share this many CPU cores (CPU runs); 0: a device each
    # Host CPU an E worker spends per image before the GPU sees it (decode, resize, tiling), one core:
    # seconds per source megapixel plus per tile produced (`python bench/preprocess.py` measures them).
    preprocess_s_per_mpixel: float = 0.0  # resizing (with model.image_resize=host)
    preprocess_s_per_tile: float = 0.0
    decode_s_per_mpixel: float = 0.0  # decoding on the host (model.image_decode=host)
    # The E worker's GPU per image, serial with its tower (`python bench/encode_throughput.py --split` measures them):
    device_decode_s_per_mpixel: float = 0.0  # nvJPEG (model.image_decode=device), per source megapixel
    device_resize_s_per_mpixel: float = 0.0  # resizing and tiling (model.image_resize=device)
    device_resize_s_per_tile: float = 0.0


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "ray"  # ray (real engine on Ray) | local (real engine, one process) | sim (SimPy) | online (HTTP server)
    address: Optional[str] = None  # existing Ray cluster; None starts a local one
    # How a deployment's workers are laid over the cluster's nodes (a Ray placement-group strategy):
    # PACK (as few nodes as fit, the default), SPREAD (over as many as possible), STRICT_PACK, STRICT_SPREAD.
    placement: str = "PACK"
    num_cpus: Optional[int] = None
    latency_model: str = "roofline"  # sim: roofline | profiled
    # sim: the vision tower's cost (FLOPs and weights) times this: what-if studies of the encoder/LM cost
    # ratio (`task=regime`). 1: the model as it is.
    sim_encoder_scale: float = 1.0
    profile_path: Optional[str] = None
    timeout_s: float = 600.0
    # Before the engine reports ready, warm-up requests run through every instance (kernels compiled,
    # transfers connected): start-up stays out of what a run measures.
    warmup: bool = True
    # A Ray worker that has not answered its oldest batch within max(floor, factor x that instance's
    # typical time for that kind of batch) is taken for hung: killed, its work redone, and replaced.
    # worker_deadline_floor_s <= 0: never.
    worker_deadline_factor: float = 20.0
    worker_deadline_floor_s: float = 60.0


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from, passed down whole: EngineCore, OfflineLLM and AsyncLLM
    take this one object (or its fields, which they gather into one)."""

    model: ModelConfig
    deployment: DeploymentConfig
    executor: str = "ray"  # ray: one Ray actor per worker (and tensor-parallel rank) | local: in this process
    backend: BackendConfig = field(default_factory=BackendConfig)

    @staticmethod
    def of(model, deployment=None, executor: str = "ray", backend: Optional[BackendConfig] = None) -> EngineConfig:
        """An EngineConfig as given, or gathered from its fields."""
        if isinstance(model, EngineConfig):
            if deployment is not None:
                raise TypeError("pass an EngineConfig alone, or the model, deployment, executor and backend")
            return model
        if deployment is None:
            raise TypeError("an engine needs a deployment (or an EngineConfig)")
        return EngineConfig(model, deployment, executor, backend or BackendConfig())


@dataclass(frozen=True)
class LoggerConfig:
    kind: str = "wandb"  # wandb | none
    project: str = "epd"
    mode: str = "offline"  # offline unless the user configured W&B
    group: Optional[str] = None


@dataclass(frozen=True)
class PathsConfig:
    output_dir: str = "outputs"


@dataclass(frozen=True)
class SearchConfig:
    """`task=optimize`: which deployments to try and how to find each one's goodput."""

    gpus: int = 8
    include_irp: bool = True
    include_baselines: bool = True  # PD splits and the aggregated deployment too
    rate_low: float = 0.05
    rate_high: float = 8.0
    iterations: int = 7  # bisection steps on the rate
    processes: int = 2
    num_requests: int = 100


@dataclass(frozen=True)
class RegimeConfig:
    """`task=regime`: where EPD beats PD and aggregated serving. For every encoder cost scale x images per
    request x GPU memory, the simulated goodput of the best EPD split, the best PD split and aggregated
    instances on `gpus` GPUs (each pool's KV blocks from the memory left after its weights)."""

    gpus: int = 4
    encoder_scales: list = field(default_factory=lambda: [0.25, 1.0, 4.0, 16.0])
    images_per_request: list = field(default_factory=lambda: [1, 2, 4, 8])
    memory_gb: list = field(default_factory=lambda: [40, 80, 141])
    reserve_fraction: float = 0.1  # of each GPU's memory kept for activations, graphs and the allocator


@dataclass(frozen=True)
class CompareConfig:
    """`task=compare`: several deployments over a rate sweep on the same workload, real and simulated."""

    deployments: dict[str, Any] = field(default_factory=dict)  # name -> deployment fields (see compare_deployments)
    rates: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    real: bool = True  # run the engine (backend.kind ray|local)
    simulate: bool = True  # and the simulator's prediction of every point
    sim_latency_model: str = "roofline"  # roofline | profiled
    sim_profile_path: Optional[str] = None
    warmup_requests: int = 4  # offline requests run first on each deployment's fresh workers (compile, graphs)
    # Runs per point, with workload seeds seed, seed+1, ...: compare.md and compare.json give each
    # metric's mean and its `ci_level` interval over them (and goodput's, per seed).
    repeats: int = 3
    ci_level: float = 0.95
    # name -> allocation fields (e.g. {static: {policy: static}, queue: {policy: queue}}); empty: the run's allocation
    allocations: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProfileConfig:
    """`task=profile`: the grid of batch shapes measured on the real engine."""

    encode_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    prefill_lens: list[int] = field(default_factory=lambda: [32, 128, 256, 512, 1024])
    prefill_batch: list[int] = field(default_factory=lambda: [1, 2, 4])
    decode_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    decode_contexts: list[int] = field(default_factory=lambda: [64, 256, 1024])
    transfer_bytes: list[int] = field(default_factory=lambda: [1 << 16, 1 << 20, 1 << 23])
    repeats: int = 3
    calibrate: bool = True  # also run the engine on Ray to measure its slowdown and per-batch overhead


@dataclass(frozen=True)
class ServerConfig:
    """`python -m epd.serve` and the online benchmark (`backend=online`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None  # bearer token; None: no authentication
    served_model_name: Optional[str] = None  # default: model.name
    max_concurrent_requests: int = 64  # beyond this: 429 with Retry-After
    max_images_per_request: int = 8
    max_image_bytes: int = 20_000_000
    max_videos_per_request: int = 2
    max_video_bytes: int = 64_000_000
    video_fps: float = 2.0  # videos are sampled at this many frames a second (Qwen2-VL's default)
    max_video_frames: int = 64
    max_body_bytes: int = 32 * 1024 * 1024  # a larger request body gets 413 before it is parsed
    max_inflight_bytes: int = 512 * 1024 * 1024  # images and prompts of the requests in flight; beyond: 429
    image_root: Optional[str] = None  # local image files are allowed only under this directory
    allow_remote_images: bool = False
    default_max_tokens: int = 64
    url: Optional[str] = None  # online benchmark: an existing server; None starts one on loopback
    drain_timeout_s: float = 30.0  # on SIGTERM: requests in flight get this long to finish, then are aborted
    client_retries: int = 0  # online benchmark: a request refused (429/503) is sent again after Retry-After, this many times


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    task: str = "serve"  # serve (run the workload) | profile | optimize | compare | regime
    experiment: str = "default"
    seed: int = 0
