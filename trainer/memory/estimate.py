"""Will a training fit? Its peak memory, predicted from the base model's config files before any
weight loads, and the check that refuses a run that would run out of memory an hour in.

The parts (trainer/memory/shapes.py) are set up on the meta device by the engine's own code, which
gives every tensor's dtype: frozen weights in the mixed-precision dtype, trainable ones fp32, the
VAE fp32 except under bf16. From the trainable tensors follow the gradients (fp32) and the
optimizer state: torch AdamW 8 bytes a parameter (+ a 4-byte step per tensor); bitsandbytes' 8-bit
AdamW 2 bytes a parameter + two fp32 block maxima per 256 for tensors of 4,096 elements or more,
8 bytes a parameter below that. Activations come from tracing each phase of a run on fake tensors
(trainer/memory/profiles.py): the training step, class-image generation, the VAE encode,
validation samples. The peak is the largest phase; on CUDA plus the CUDA context and allocator
slack, on the CPU plus the process itself and its malloc's slack.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.data.photos import IMAGE_SUFFIXES
from trainer.memory.parking import parked_parts
from trainer.memory.profiles import (
    encoding_profile,
    generation_profile,
    step_profile,
)
from trainer.memory.shapes import ModelShapes, parameter_counts, part_tensors, read_shapes
from trainer.model_files import TEXT_ENCODERS
from trainer.models import eight_bit_adam, weight_dtype
from trainer.scores.measure import draw_batch

GiB = 2**30
MiB = 2**20
# The CUDA context, cuBLAS/cuDNN handles and the kernels a training loads (CUDA 12's lazy module
# loading): 300-500 MiB by nvidia-smi for a PyTorch process that has run convolutions and matmuls,
# outside what torch's allocator reports. The upper end, so that "fits" errs on the safe side.
CUDA_CONTEXT = 512 * MiB
# The caching allocator rounds blocks up and cannot always reuse freed ones for new sizes: what it
# reserves runs ~5-15% above what is allocated, on the tensors that come and go (not the weights).
CUDA_ALLOCATOR_SLACK = 0.10
# A training process before its first tensor: Python, torch, diffusers, transformers, accelerate,
# peft, bitsandbytes (ru_maxrss after `import trainer.loop` on the CPU: 485 MiB). With CUDA
# initialised, its libraries add about 1 GiB of host memory.
CPU_PROCESS = 490 * MiB
CUDA_PROCESS_RAM = 1536 * MiB
# What the first training step adds on the CPU beyond its tensors: library code paged in, oneDNN's
# compiled kernels, the modules' Python objects (the tiny model's process grows 75-80 MiB for ~10 MiB
# of tensors; bench/memory_model.py).
CPU_FIRST_STEP = 80 * MiB
# glibc's malloc serves tensors under its (dynamic, up to 32 MiB) mmap threshold from its heap, which
# does not shrink: freed activations leave holes that later, differently sized ones do not fit, and
# the heap outgrows the live tensors (mallinfo2 after an SD 1.5 LoRA step: 1.2 GiB free in the heap).
# And oneDNN and MKL repack each weight into their blocked layouts at every convolution and matmul,
# in buffers torch does not see, from the same heap. Fitted on bench/memory_model.py's fp32 steps of
# the tiny, mid, SD 1.5 and SDXL UNets (full and LoRA, with and without checkpointing): peak RSS =
# the tensors + 0.30 x the tensors that come and go + 0.17 x the weights the step computes with.
CPU_HEAP_SLACK = 0.30
CPU_REPACK = 0.17
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 state
BNB_BLOCK = 256  # blockwise quantization: one fp32 absmax per block and state
BNB_QMAPS = 2 * 256 * 4  # the two quantization maps, shared by every tensor
ASSUMED_PHOTOS = 20  # instance photos counted when the folders cannot be read (the most DreamBooth wants)


@dataclass(frozen=True)
class MemoryEstimate:
    """A training's predicted memory, in bytes. `activations`: of the training step at its peak
    (saved activations and backward temporaries; gradients apart). `phases`: the tensor bytes on the
    device at the peak of each phase of the run; the largest plus `overhead` is `peak_accelerator`."""

    device_type: str
    weights: int
    weights_by_part: dict[str, int]  # "unet", "text_encoder"[, "text_encoder_2"], "vae"
    gradients: int
    optimizer_state: int
    activations: int
    caches: int
    class_generation: int
    overhead: int
    phases: dict[str, int]
    peak_accelerator: int
    peak_ram: int
    # parts off the device during the training step (trainer/memory/parking.py: on a GPU, the VAE once latents
    # are cached, frozen text encoders once every prompt's embedding is); their bytes are in `weights`
    parked: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = field(default=())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def describe(self) -> str:
        """A table for people, in GiB."""
        rows = [
            ("weights (as trained)", self.weights),
            *([(f"of which in CPU RAM during the steps ({', '.join(self.parked)})", sum(self.parked.values()))]
              if self.parked else []),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("activations (training step)", self.activations),
            ("cached latents and prompt embeddings", self.caches),
        ]
        rows += [(f"phase: {name}", value) for name, value in self.phases.items()]
        what = "CUDA context + allocator slack" if self.device_type == "cuda" else "the process + allocator slack"
        rows += [
            (what, self.overhead),
            (f"**peak** ({self.peak_phase})", self.peak_accelerator),
            ("peak system RAM", self.peak_ram),
        ]
        device = "GPU memory (CUDA)" if self.device_type == "cuda" else "RAM (CPU training)"
        lines = [f"Predicted {device}:", "", "| | GiB |", "|---|---|"]
        lines += [f"| {name} | {value / GiB:.2f} |" for name, value in rows]
        return "\n".join(lines + [f"\nNote: {note}" for note in self.notes])


@dataclass(frozen=True)
class _Held:
    """The bytes a training holds whatever its batch and resolution (and its optimizer step's extra)."""

    weights_by_part: dict[str, int]
    gradients: int
    optimizer: int
    caches: int
    step_temporaries: int
    parked: int = 0  # weights off the device during the steps

    @property
    def weights(self) -> int:
        return sum(self.weights_by_part.values())


def estimate(
    config: TrainConfig,
    device_type: str = "cuda",
    *,
    shapes: ModelShapes | None = None,
    local_only: bool = False,
    family: str | None = None,
) -> MemoryEstimate:
    """The peak memory of training `config` on `device_type` ("cuda" or "cpu"). The base model's config
    files are read (`local_only`: from a folder or the Hub cache only); where they cannot be, the known
    architecture of `family` stands in, and the estimate's notes say so."""
    shapes = shapes or read_shapes(
        config.pretrained_model, config.revision, config.pretrained_vae, local_only=local_only, family=family
    )
    by_part, trainable, loaded = _static(
        shapes, config.method, config.lora_rank, config.lora_alpha, config.train_text_encoder, config.mixed_precision
    )
    eight_bit = eight_bit_adam(config)
    by_part = dict(by_part)
    if config.from_base_prediction and config.method == "full":  # the base UNet, frozen, beside the trained one
        by_part[FROZEN_UNET] = frozen_part_bytes(shapes, "unet", config.mixed_precision)
    if config.score_checkpoints and device_type == "cpu":  # loaded once, kept for the run, on the CPU always
        by_part[SCORERS] = SCORER_BYTES
    parked = {name: by_part[name] for name in parked_parts(config, shapes.text_encoder_names, device_type)}
    held = _Held(
        weights_by_part=by_part,
        gradients=4 * sum(trainable),  # trainable weights are fp32, so are their gradients
        optimizer=optimizer_state_bytes(trainable, eight_bit),
        caches=cache_bytes(shapes, config),
        step_temporaries=_step_temporaries(trainable, eight_bit, device_type),
        parked=sum(parked.values()),
    )
    phases, activations = _phases(shapes, config, device_type, held)
    computing = by_part["unet"] + sum(by_part[n] for n in shapes.text_encoder_names if config.train_text_encoder)
    on_device = held.weights - (held.parked if max(phases, key=phases.get) == TRAINING else 0)
    transient = max(0, max(phases.values()) - on_device - held.optimizer - held.caches)
    overhead = device_overhead(device_type, transient, computing)
    peak = max(phases.values()) + overhead
    return MemoryEstimate(
        device_type=device_type,
        weights=held.weights,
        weights_by_part=held.weights_by_part,
        gradients=held.gradients,
        optimizer_state=held.optimizer,
        activations=activations,
        caches=held.caches,
        class_generation=phases.get(CLASS_IMAGES, 0),
        overhead=overhead,
        phases=phases,
        peak_accelerator=peak,
        parked=parked,
        peak_ram=(CUDA_PROCESS_RAM + loaded + (SCORER_BYTES if config.score_checkpoints else 0) if device_type == "cuda"
                  else max(peak, CPU_PROCESS + loaded)),
        notes=(shapes.fallback,) if shapes.fallback else (),
    )


def device_overhead(device_type: str, transient: int, computing: int) -> int:
    """Memory beyond the tensors: the CUDA context or the process itself, and the allocator's slack on
    `transient`, the bytes that come and go (everything but weights, optimizer state and caches); on
    the CPU also the kernels' repacked copies of `computing`, the weights the step computes with, and
    both as glibc's malloc keeps them."""
    if device_type == "cuda":
        return CUDA_CONTEXT + round(CUDA_ALLOCATOR_SLACK * transient)
    return CPU_PROCESS + CPU_FIRST_STEP + round(CPU_HEAP_SLACK * transient + CPU_REPACK * computing)


TRAINING, CLASS_IMAGES, CACHING, ENCODING, SAMPLES, SCORING = (
    "training step",
    "class images",
    "caching latents",
    "encoding photos each step",
    "validation samples",
    "scoring a checkpoint",
)


def _phases(
    shapes: ModelShapes, config: TrainConfig, device_type: str, held: _Held
) -> tuple[dict[str, int], int]:
    """Tensor bytes on the device at the peak of each phase, and the training step's activations."""
    rows = config.train_batch_size * (2 if config.with_prior_preservation else 1)
    latent = config.resolution // shapes.vae_scale_factor
    pixels = latent * latent
    step = step_profile(shapes, config, device_type, one_row=rows == 1)
    accumulating = held.gradients if config.gradient_accumulation_steps > 1 else None  # micro-batches add up
    live, grads_then = step.peak(rows, pixels, accumulating)
    kept = held.weights + held.optimizer + held.caches
    phases = {TRAINING: kept - held.parked + max(live, held.gradients + held.step_temporaries)}
    if class_images_to_make(config):
        batch = min(config.sample_batch_size, config.num_class_images)
        made = generation_profile(shapes, config.mixed_precision, device_type, batch == 1)
        weights_then = _generation_weights(shapes, config.mixed_precision, device_type)
        phases[CLASS_IMAGES] = weights_then + made.peak(batch, pixels)[0]
    encode = encoding_profile(shapes, config.mixed_precision).peak(1, pixels)[0]
    if config.cache_latents and not config.augments:
        phases[CACHING] = held.weights + held.caches + encode  # before the first step: no optimizer state
    else:
        phases[ENCODING] = held.weights + held.optimizer + encode
    if config.validation_prompts:
        sample = generation_profile(shapes, config.mixed_precision, device_type, True)
        phases[SAMPLES] = kept + sample.peak(1, pixels)[0]
    if config.score_checkpoints:  # on a GPU one image at a time, as validation samples; on the CPU all together
        rows = draw_batch(config, device_type)
        drawn = generation_profile(shapes, config.mixed_precision, device_type, rows == 1)
        phases[SCORING] = kept + drawn.peak(rows, pixels)[0]
    return phases, live - grads_then


FROZEN_UNET = "unet (frozen copy)"
SCORERS = "scoring models"
# The default scorers in fp32: facebook/dinov2-small (22.1 M parameters) and openai/clip-vit-base-patch32
# (151.3 M); other scorers are counted as these. They run on the CPU (trainer/scores/measure.py): on a GPU they
# take system RAM, not accelerator memory.
SCORER_BYTES = 4 * (22_100_000 + 151_300_000)


def frozen_part_bytes(shapes: ModelShapes, name: str, mixed_precision: str) -> int:
    """A part's bytes frozen in the mixed-precision dtype (as `_static` counts a part not trained)."""
    part = part_tensors(shapes)[name]
    size = weight_dtype(mixed_precision).itemsize
    return size * (sum(part.params) + part.float_buffers) + part.other_buffers


@functools.lru_cache(maxsize=256)
def _static(
    shapes: ModelShapes, method: str, rank: int, alpha: int | None, train_text_encoder: bool, mixed_precision: str
) -> tuple[dict[str, int], tuple[int, ...], int]:
    """(bytes of each part's weights as trained, the size of each trainable tensor, bytes of all weights
    as loaded: fp32). As trainer.models.prepare_for_training sets the parts up: frozen ones (and
    every buffer) in the mixed-precision dtype, trained ones fp32, LoRA's matrices (rank x in,
    out x rank) fp32, the VAE fp32 except under bf16 (tests/test_memory.py holds the two equal)."""
    frozen = weight_dtype(mixed_precision).itemsize
    by_part, trainable = {}, []
    for name, part in part_tensors(shapes).items():
        size = (2 if mixed_precision == "bf16" else 4) if name == "vae" else frozen
        trained = name == "unet" or (name in TEXT_ENCODERS and train_text_encoder)
        full = trained and method == "full"
        by_part[name] = (4 if full else size) * sum(part.params) + size * part.float_buffers + part.other_buffers
        trainable += part.params if full else ()
        if trained and method == "lora":
            lora = [
                n for features_in, features_out in part.lora_targets for n in (rank * features_in, features_out * rank)
            ]
            trainable += lora
            by_part[name] += 4 * sum(lora)
    return by_part, tuple(trainable), 4 * sum(parameter_counts(shapes).values())


@functools.lru_cache(maxsize=256)
def _generation_weights(shapes: ModelShapes, mixed_precision: str, device_type: str) -> int:
    """The weights while class images are made: as loaded (fp32); on CUDA the UNet and text encoders
    cast to the mixed-precision dtype (trainer.loop.prepare_class_images)."""
    half = weight_dtype(mixed_precision).itemsize if device_type == "cuda" else 4
    total = 0
    for name, part in part_tensors(shapes).items():
        size = 4 if name == "vae" else half
        total += size * (sum(part.params) + part.float_buffers) + part.other_buffers
    return total


def optimizer_state_bytes(numels: list[int], eight_bit: bool) -> int:
    """AdamW's state for trainable tensors of these sizes (fp32 parameters)."""
    if not eight_bit:
        return sum(8 * n + 4 for n in numels)  # exp_avg, exp_avg_sq, and a step tensor
    small = sum(8 * n for n in numels if n < BNB_MIN_8BIT_SIZE)
    big = [n for n in numels if n >= BNB_MIN_8BIT_SIZE]
    return small + sum(2 * n + 8 * math.ceil(n / BNB_BLOCK) for n in big) + (BNB_QMAPS if big else 0)


def _step_temporaries(numels: list[int], eight_bit: bool, device_type: str) -> int:
    """What the optimizer step allocates beyond its state. On CUDA bitsandbytes updates each tensor
    in place. On the CPU it dequantizes one tensor at a time: both moments in fp32 (8 bytes an
    element), then, quantizing one moment, its scaled copy, bins and codes (9 bytes). torch AdamW on CUDA is the multi-tensor one: it takes the square root of every
    exp_avg_sq at once; on the CPU it steps one tensor at a time, with two temporaries of that
    tensor's size."""
    if not numels:
        return 0
    if eight_bit:
        big = [n for n in numels if n >= BNB_MIN_8BIT_SIZE]
        if device_type == "cuda" or not big:
            return 0
        return 17 * max(big)
    return 4 * sum(numels) if device_type == "cuda" else 8 * max(numels)


def cache_bytes(shapes: ModelShapes, config: TrainConfig) -> int:
    """Latents cached on the device (mean and std of each photo and class image, fp32) and prompt
    embeddings (one per distinct prompt, in the text encoders' dtype)."""
    photos = count_images(config.instance_data) or ASSUMED_PHOTOS
    classes = config.num_class_images if config.class_images_used else 0
    latent = config.resolution // shapes.vae_scale_factor
    channels = shapes.configs["unet"].get("in_channels", 4)
    latents = (photos + classes) * 2 * channels * latent * latent * 4 if config.cache_latents else 0
    encoders = [shapes.configs[name] for name in shapes.text_encoder_names]
    width = sum(c.get("hidden_size", 768) * c.get("max_position_embeddings", 77) for c in encoders)
    pooled = encoders[-1].get("projection_dim", 0) if len(encoders) > 1 else 0
    itemsize = weight_dtype(config.mixed_precision).itemsize
    prompts = photos + (1 if config.with_prior_preservation else 0)
    return latents + prompts * (width + pooled) * itemsize


def count_images(sources: tuple[str, ...] | list[str]) -> int:
    """Image files in these folders and files (0 when none can be read)."""
    count = 0
    for source in sources:
        path = Path(source)
        if path.is_dir():
            count += sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            count += 1
    return count


def class_images_to_make(config: TrainConfig) -> int:
    """Class images the run will generate: those its folder and the shared cache do not hold."""
    if not config.class_images_used:
        return 0
    from trainer.preservation.class_images import cache_dir_for

    own = count_images([config.class_data_dir]) if config.class_data_dir else 0
    cached = count_images([str(cache_dir_for(config))]) if config.class_prompt else 0
    return max(0, config.num_class_images - own - cached)


# --- does it fit ------------------------------------------------------------------------------------
def device_capacity(device: torch.device) -> tuple[int, str]:
    """Bytes a training may use on `device`, and the device in words. CUDA: the GPU's total memory
    (the estimate counts the CUDA context). CPU: the RAM available now (this process is in already)."""
    if device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        return total, f"this GPU ({torch.cuda.get_device_name(device)}, {total / GiB:.1f} GiB)"
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    return available, f"this machine's available RAM ({available / GiB:.1f} GiB)"


def needed(memory: MemoryEstimate) -> int:
    """Bytes the training needs from the capacity `device_capacity` gives (on the CPU the process
    itself is resident already)."""
    return memory.peak_accelerator - (CPU_PROCESS if memory.device_type == "cpu" else 0)


def weights_and_trainables(config: TrainConfig, shapes: ModelShapes) -> tuple[dict[str, int], tuple[int, ...]]:
    """Each part's weight bytes as trained, and the elements of each trainable tensor (no tracing)."""
    by_part, trainable, _loaded = _static(
        shapes, config.method, config.lora_rank, config.lora_alpha, config.train_text_encoder, config.mixed_precision
    )
    return dict(by_part), trainable


def lower_bound(config: TrainConfig, device_type: str, shapes: ModelShapes) -> int:
    """What `needed` is at least: weights, gradients and optimizer state (and the CUDA context), known
    without tracing anything. Enough to rule a setting out cheaply."""
    by_part, trainable = weights_and_trainables(config, shapes)
    held = sum(by_part.values()) + 4 * sum(trainable) + optimizer_state_bytes(trainable, eight_bit_adam(config))
    return held + (CUDA_CONTEXT if device_type == "cuda" else 0)
