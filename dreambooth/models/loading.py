"""The one model loader: hub id, local diffusers folder or `tiny://` reference, same code path.

A hub id is checked before anything loads it: one metadata request with a short timeout, so an
unreachable hub costs seconds and one line naming the model and the way out, not minutes of
download retries that end in an unrelated error. With HF_HUB_OFFLINE set, or when the hub cannot
be reached, a copy in the local Hugging Face cache is used as a folder.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from dreambooth.errors import InputError
from dreambooth.images import load_rgb
from dreambooth.storage import cached_folder, is_gcs
from dreambooth.models.cache import default_cache_dir
from dreambooth.models.tiny import TINY_SCHEME, resolve_tiny_model

if TYPE_CHECKING:  # torch is imported where a model loads: commands that only read settings start without it
    import torch

METADATA_FILE = "dreambooth.json"  # beside every trained result: identifier, class noun, base model
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' adapter file name (load_lora_weights reads it)
SINGLE_FILE_LORA = "lora_kohya.safetensors"  # the same adapter for web UIs (training.lora.export_single_file)
# A learned token's embedding (textual_inversion, pivotal), by diffusers' default name, so that
# `pipe.load_textual_inversion(folder)` finds it.
EMBEDDINGS_FILE = "learned_embeds.safetensors"
# SDXL's embedding file holds one tensor per text encoder, under the names web UIs read.
WEB_UI_EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
RESULT_ON_BASE_FILES = (LORA_WEIGHTS, EMBEDDINGS_FILE)  # a result that loads on top of its base model
# A zero-shot baseline's result (training.method reference, dreambooth.baseline): its photos' folder,
# and model_index.json's class of each reference-image pipeline -> the images one call takes (None: several).
REFERENCES_DIR = "references"
REFERENCE_PIPELINES = {
    "Flux2KleinPipeline": None,
    "Flux2Pipeline": None,
    "QwenImageEditPlusPipeline": None,
    "FluxKontextPipeline": 1,
    "QwenImageEditPipeline": 1,
}
DEFAULT_TRANSFORMER_SIDE = 1024
HUB_PROBE_SECONDS = 8  # one metadata request; huggingface_hub may retry it once
# Text processors whose image half a text-to-image prompt never uses (FLUX.2 [dev]'s PixtralProcessor,
# which transformers builds only with torchvision): the pipeline gets their tokenizer alone.
TEXT_ONLY_PROCESSORS = {"PixtralProcessor"}
MIN_TOKENIZER_SIZE = 256  # a byte-level BPE has at least its 256 byte tokens; an empty load has 2
# model_index.json's pipeline class -> model family (config model.family); each has a training recipe.
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "Flux2KleinPipeline": "flux2-klein",
    "Flux2Pipeline": "flux2",
    "ZImagePipeline": "z-image",
    "QwenImagePipeline": "qwen-image",
    "StableDiffusionUpscalePipeline": "sd-upscaler",
}
_logger = logging.getLogger(__name__)


def _is_path(reference: str) -> bool:
    return reference.startswith(("/", ".", "~")) or reference.count("/") > 1 or Path(reference).expanduser().exists()


def _cached_snapshot(repo_id: str, revision: Optional[str]) -> Optional[str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _hub_source(repo_id: str, revision: Optional[str], setting: str) -> str:
    """The hub id when the hub serves it, else its cached snapshot folder; InputError when neither."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    way_out = f"set {setting} to a local folder, or use --config tiny for an offline run"
    if constants.HF_HUB_OFFLINE:
        cached = _cached_snapshot(repo_id, revision)
        if cached:
            return cached
        raise InputError(
            f"{setting}: {repo_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
            f"run `dreambooth warm-cache` where the hub is reachable, {way_out}"
        )
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_PROBE_SECONDS)
        return repo_id
    except GatedRepoError:
        raise InputError(f"{setting}: {repo_id!r} is gated; accept its licence on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"{setting}: {repo_id!r} is no model on {constants.ENDPOINT} (private? set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise InputError(f"{setting}: {repo_id!r} has no revision {revision!r}") from None
    except HFValidationError:
        raise InputError(f"{setting}: {repo_id!r} is neither a folder here nor a hub id") from None
    except Exception as error:  # unreachable: DNS, refused, timed out, 5xx
        cached = _cached_snapshot(repo_id, revision)
        if cached:
            _logger.warning("%s: hub unreachable (%s); using the cached copy of %s", setting, type(error).__name__, repo_id)
            return cached
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"{setting}: cannot reach the Hugging Face hub ({constants.ENDPOINT}) for {repo_id!r} ({reason}); "
            f"set HF_HUB_OFFLINE=1 to use a cached copy, {way_out}"
        ) from None


def resolve_model_source(reference: str, revision: Optional[str] = None, setting: str = "model.base") -> str:
    """What `from_pretrained` should read: a folder (tiny models built, LPIPS weights fetched) or a reachable hub id."""
    from dreambooth.models.lpips_weights import LPIPS_SCHEME, fetch_lpips

    if reference.startswith(TINY_SCHEME):
        return str(resolve_tiny_model(reference))
    if reference.startswith(LPIPS_SCHEME):
        return str(fetch_lpips(reference, setting))
    if is_gcs(reference):  # only a complete upload, fetched once into the model cache
        root = default_cache_dir() / "gcs"
        root.mkdir(parents=True, exist_ok=True)
        return str(cached_folder(reference, root))
    if _is_path(reference):
        if not Path(reference).expanduser().is_dir():
            raise InputError(f"{setting}: {reference!r} is not a folder here")
        return str(Path(reference).expanduser())
    return _hub_source(reference, revision, setting)


def describe_model_source(reference: str, revision: Optional[str] = None, setting: str = "model.base") -> str:
    """Where a model would load from, without building or downloading it (preflight); InputError if nowhere."""
    from dreambooth.models.lpips_weights import LPIPS_SCHEME, describe_lpips

    if reference.startswith(TINY_SCHEME):
        return "tiny random model, built offline"
    if reference.startswith(LPIPS_SCHEME):
        return describe_lpips(reference, setting)
    source = resolve_model_source(reference, revision, setting)
    if _is_path(reference):
        return f"local folder {source}"
    return "on the hub" if source == reference else f"cached copy {source}"


def denoiser_parameters(reference: str, revision: Optional[str] = None) -> Optional[int]:
    """The denoiser's parameter count, read from its safetensors headers where a copy is here (a folder,
    a cached hub snapshot); None where no copy is here (nothing is downloaded or built)."""
    import math

    if reference.startswith(TINY_SCHEME) or is_gcs(reference):
        return None
    folder = Path(reference).expanduser() if _is_path(reference) else _cached_snapshot(reference, revision)
    if folder is None:
        return None
    files = [path for sub in ("unet", "transformer") for path in sorted(Path(folder, sub).glob("*.safetensors"))]
    if not files:
        return None
    count = 0
    for path in files:
        with path.open("rb") as weights:  # 8 bytes: the header's length, then the JSON header naming every tensor's shape
            header = json.loads(weights.read(int.from_bytes(weights.read(8), "little")))
        count += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return count


def best_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Pickle weights (.bin, .pt) can run code when loaded: only safetensors load unless the run's
# settings say model.allow_pickle (each task and command applies its settings before loading).
_PICKLE_ALLOWED = False


def allow_pickle_weights(allowed: bool) -> None:
    global _PICKLE_ALLOWED
    _PICKLE_ALLOWED = allowed


def weights_format() -> dict:
    """The from_pretrained keyword (diffusers and transformers) that enforces the weights policy;
    allowed, the loaders' default: safetensors where present, pickle otherwise."""
    return {} if _PICKLE_ALLOWED else {"use_safetensors": True}


def load_failure_reason(error: Exception) -> str:
    """The first line of a loader's error; for weights refused as pickle, what to do about it."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if not _PICKLE_ALLOWED and "safetensors" in reason:
        reason += "; only safetensors weights load, as pickle files can run code: convert them, or set model.allow_pickle: true for a model you trust"
    return reason


def _load_error(reference: str, what: str, error: Exception) -> InputError:
    return InputError(f"model.base: cannot load the {what} of {reference!r} ({load_failure_reason(error)})")


def _model_index(reference: str, revision: Optional[str], setting: str) -> dict:
    source = resolve_model_source(reference, revision, setting)
    try:
        if Path(source).is_dir():
            return json.loads((Path(source) / "model_index.json").read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "model_index.json", revision=revision)).read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{setting}: {reference!r} has no readable model_index.json, so it is no diffusers pipeline ({error})") from None


def component_config(reference: str, revision: Optional[str], subfolder: str, setting: str = "model.base") -> dict:
    """A pipeline component's config.json (the UNet's, the VAE's), read without its weights."""
    source = resolve_model_source(reference, revision, setting)
    try:
        if Path(source).is_dir():
            return json.loads((Path(source) / subfolder / "config.json").read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, f"{subfolder}/config.json", revision=revision)).read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{setting}: cannot read the {subfolder} config of {reference!r} ({error})") from None


def result_metadata(folder: str | Path) -> dict:
    """A trained result's dreambooth.json ({} when the folder has none: a plain pipeline)."""
    metadata = Path(folder) / METADATA_FILE
    return json.loads(metadata.read_text()) if metadata.is_file() else {}


def pipeline_class_name(reference: str, revision: Optional[str] = None, setting: str = "model.base") -> str:
    """The diffusers pipeline class model_index.json names (StableDiffusionPipeline, Flux2KleinPipeline, ...)."""
    return _model_index(reference, revision, setting).get("_class_name", "")


def model_family(reference: str, revision: Optional[str] = None, setting: str = "model.base", declared: Optional[str] = None) -> str:
    """sd, sdxl, sd3, flux or sd-upscaler, from the pipeline class in model_index.json (a LoRA result: its base's);
    a `declared` family (config model.family) must agree."""
    if (base := adapter_base(reference)) is not None:
        return model_family(base[0], base[1], setting, declared)
    pipeline_class = _model_index(reference, revision, setting).get("_class_name")
    if pipeline_class not in FAMILIES:
        raise InputError(f"{setting}: {reference!r} is a {pipeline_class}; supported: {', '.join(FAMILIES)}")
    if declared and declared != FAMILIES[pipeline_class]:
        raise InputError(f"model.family: {declared}, but {reference!r} is a {FAMILIES[pipeline_class]} model")
    return FAMILIES[pipeline_class]


def load_tokenizer(reference: str, revision: Optional[str] = None, subfolder: str = "tokenizer"):
    """A tokenizer of the model (`subfolder`: tokenizer, or SDXL's tokenizer_2): CLIP's, or Qwen's for Flux.2."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(reference, revision), subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as error:
        raise _load_error(reference, subfolder, error) from None
    # transformers 5 builds an empty tokenizer when its files are missing instead of failing.
    if len(tokenizer) < MIN_TOKENIZER_SIZE:
        raise InputError(f"model.base: the {subfolder} of {reference!r} has {len(tokenizer)} tokens; its files are missing or broken")
    return tokenizer


def adapter_base(reference: str) -> Optional[tuple[str, Optional[str]]]:
    """(base model, revision) when `reference` is a result that loads on its base (a LoRA adapter, a
    learned embedding, or both), else None (its VAE: `adapter_vae`)."""
    folder = Path(reference)
    if not any((folder / name).is_file() for name in RESULT_ON_BASE_FILES):
        return None
    metadata = json.loads((folder / METADATA_FILE).read_text()) if (folder / METADATA_FILE).is_file() else {}
    if not metadata.get("base_model"):
        raise InputError(f"{reference}: an adapter or embedding without {METADATA_FILE} naming its base model")
    return metadata["base_model"], metadata.get("base_revision")


def learned_token_names(token: str, num_vectors: int) -> list[str]:
    """The tokens a learned embedding of several vectors takes, named as diffusers' loader names them."""
    return [token] + [f"{token}_{index}" for index in range(1, num_vectors)]


def load_learned_token(pipeline, folder: Path) -> None:
    """Add a result's learned token to the pipeline's tokenizers and text encoders, through diffusers'
    own loader: the token is the identifier in the result's metadata."""
    from safetensors.torch import load_file

    token = json.loads((folder / METADATA_FILE).read_text())["identifier"]
    tensors = load_file(folder / EMBEDDINGS_FILE)
    if token in tensors:  # one text encoder (SD)
        pipeline.load_textual_inversion(tensors[token], token=token)
        return
    for encoder_name, key in WEB_UI_EMBEDDING_KEYS.items():
        tokenizer = getattr(pipeline, encoder_name.replace("text_encoder", "tokenizer"))
        pipeline.load_textual_inversion(tensors[key], token=token, text_encoder=getattr(pipeline, encoder_name), tokenizer=tokenizer)


def adapter_vae(reference: str) -> Optional[str]:
    """The VAE a LoRA result was trained with when it replaced the base's own (model.vae)."""
    return json.loads((Path(reference) / METADATA_FILE).read_text()).get("vae")


def denoiser_quantization(mode: str, device: torch.device, library: str = "diffusers"):
    """The quantization config of `library` (diffusers for a denoiser, transformers for a text encoder)
    for a frozen model in `mode` (model.quantization); None for none."""
    if mode == "none":
        return None
    if mode in ("nf4", "fp8") and device.type != "cuda":
        raise InputError(f"model.quantization: {mode} needs a CUDA GPU and this run has none; int8 (torchao) runs on CPUs too")
    configs = importlib.import_module(library)  # both libraries name their configs alike
    if mode == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("model.quantization: nf4 needs the bitsandbytes package (docker/gpu-requirements.txt)") from None
        import torch

        return configs.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return configs.TorchAoConfig(Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig())


def _quantized_components(source: str, revision: Optional[str], torch_dtype: torch.dtype, mode: str, device: torch.device,
                          text_encoders: bool) -> dict:
    """{component name: the pipeline's UNet or transformer (and with `text_encoders` its text encoders), loaded quantized}."""
    index = _model_index(source, revision, "model.base")
    names = ["unet" if "unet" in index else "transformer"]
    if text_encoders:
        names += [name for name, entry in index.items() if name.startswith("text_encoder") and entry and entry[0] == "transformers"]
    loaded = {}
    for name in names:
        library, class_name = index[name]
        dtype = {"torch_dtype" if library == "diffusers" else "dtype": torch_dtype}  # transformers 5 renamed it
        try:
            loaded[name] = getattr(importlib.import_module(library), class_name).from_pretrained(
                source, subfolder=name, revision=revision, quantization_config=denoiser_quantization(mode, device, library),
                **dtype, **weights_format())
        except (OSError, ValueError) as error:
            raise _load_error(source, name, error) from None
    return loaded


def has_text_only_processor(reference: str, revision: Optional[str] = None) -> bool:
    """Whether the pipeline's tokenizer is a processor this project loads as its tokenizer alone
    (TEXT_ONLY_PROCESSORS): plain `DiffusionPipeline.from_pretrained` needs torchvision for it."""
    return _tokenizer_alone(_model_index(reference, revision, "model.base"))


def _tokenizer_alone(index: dict) -> bool:
    return (index.get("tokenizer") or [None, None])[1] in TEXT_ONLY_PROCESSORS


def load_pipeline(
    reference: str,
    revision: Optional[str] = None,
    torch_dtype: Optional[torch.dtype] = None,  # None: float32
    device: Optional[torch.device] = None,
    vae: Optional[str] = None,
    quantization: str = "none",
    quantize_text_encoders: bool = False,
):
    """A text-to-image DiffusionPipeline without a safety checker (DreamBooth trains on user photos).

    `reference` is a full pipeline (hub id, folder, tiny://) or a result folder that loads on its
    base model: a LoRA adapter applied, a learned token added (and the VAE it was trained with). `vae` (model.vae)
    replaces the pipeline's own, e.g. SDXL's fp16-safe VAE; `quantization` (model.quantization) loads
    the denoiser quantized, to train adapters on, and with `quantize_text_encoders` the text encoders too.
    """
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline

    torch_dtype = torch_dtype or torch.float32
    if is_gcs(reference):  # a result on a bucket: its local copy, which may be a LoRA folder
        reference = resolve_model_source(reference)
    baseline = result_metadata(reference)
    if baseline.get("method") == "reference":  # the zero-shot baseline: its pipeline, handed the subject's photos
        photos = [load_rgb(Path(reference) / REFERENCES_DIR / name, 1 << 40).image for name in baseline["references"]]
        return ReferencePipeline(load_pipeline(baseline["base_model"], baseline.get("base_revision"), torch_dtype, device), photos)
    if (base := adapter_base(reference)) is not None:
        pipeline = load_pipeline(base[0], base[1], torch_dtype, device, adapter_vae(reference))
        if (Path(reference) / LORA_WEIGHTS).is_file():
            pipeline.load_lora_weights(reference, weight_name=LORA_WEIGHTS)
        if (Path(reference) / EMBEDDINGS_FILE).is_file():
            load_learned_token(pipeline, Path(reference))
        return pipeline
    source = resolve_model_source(reference, revision)
    # Only SD 1.x/2.x pipelines carry a safety checker (the others warn about the keyword).
    index = _model_index(source, revision, "model.base")  # read once: which class, which tokenizer
    components = dict(safety_checker=None, requires_safety_checker=False) if index.get("_class_name") == "StableDiffusionPipeline" else {}
    if vae:
        try:
            components["vae"] = AutoencoderKL.from_pretrained(resolve_model_source(vae, setting="model.vae"), dtype=torch_dtype, **weights_format())
        except (OSError, ValueError) as error:
            raise InputError(f"model.vae: cannot load the VAE {vae!r} ({load_failure_reason(error)})") from None
    text_only = _tokenizer_alone(index)
    if text_only:
        components["tokenizer"] = None  # loaded below: diffusers would check a substitute against the processor class
    if quantization != "none":
        components.update(_quantized_components(source, revision, torch_dtype, quantization, device or best_device(),
                                                quantize_text_encoders))
    try:
        pipeline = DiffusionPipeline.from_pretrained(source, revision=revision, dtype=torch_dtype, **components, **weights_format())
    except (OSError, ValueError, EnvironmentError) as error:
        raise _load_error(reference, "pipeline", error) from None
    if text_only:
        pipeline.register_modules(tokenizer=load_tokenizer(source, revision))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or best_device())


class ReferencePipeline:
    """A reference-image pipeline that is handed the subject's photos with every call; everything
    else (its scheduler, device, progress bar) is the wrapped pipeline's."""

    def __init__(self, pipeline, photos: list):
        object.__setattr__(self, "__wrapped__", pipeline)
        takes = REFERENCE_PIPELINES.get(type(pipeline).__name__)
        object.__setattr__(self, "references", photos[0] if takes == 1 else photos)

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("image", self.references)
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.__wrapped__, name)

    def __setattr__(self, name, value):
        setattr(self.__wrapped__, name, value)


def use_sampler(pipeline, scheduler_name: str) -> None:
    """Swap the pipeline's sampler, keeping the model's noise schedule (e.g. a 25-step DPM-Solver)."""
    import diffusers

    scheduler_class = getattr(diffusers, scheduler_name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise InputError(f"sampler.scheduler: {scheduler_name!r} is not a diffusers scheduler class")
    current, compatible = type(pipeline.scheduler), pipeline.scheduler.compatibles
    if scheduler_class is not current and scheduler_class not in compatible:
        # e.g. a DDPM-family sampler on a flow-matching model (Flux): it would draw noise
        raise InputError(
            f"sampler.scheduler: {scheduler_name} cannot sample this model (its scheduler is {current.__name__}; "
            f"compatible: {', '.join(sorted(c.__name__ for c in compatible))})"
        )
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)


def inference_dtype(precision: str = "auto") -> torch.dtype:
    """The dtype a frozen model samples in; weights being trained always stay float32."""
    import torch

    if precision != "auto":
        return getattr(torch, precision)
    if torch.cuda.is_available():
        return torch.float16
    cpu_has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if cpu_has_bf16 else torch.float32


def native_resolution(pipeline) -> int:
    """The size a pipeline draws by default: 512 for SD 1.x, 1024 for SDXL and Flux."""
    if hasattr(pipeline, "unet"):
        return pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    if not hasattr(pipeline, "default_sample_size"):
        return DEFAULT_TRANSFORMER_SIDE  # Z-Image's pipeline draws 1024 px unless told, and says so nowhere else
    return pipeline.default_sample_size * pipeline.vae_scale_factor


@dataclass(frozen=True)
class ModelUse:
    """A model a run loads, by the setting that names it."""

    setting: str
    reference: str
    revision: Optional[str] = None
    pipeline: bool = False  # a diffusers pipeline: downloaded with diffusers' own file selection


def models_in_use(config) -> list[ModelUse]:
    uses = [ModelUse("model.base", config.model.base, config.model.revision, pipeline=True)]
    if config.model.vae:
        uses.append(ModelUse("model.vae", config.model.vae))
    if config.model.reference and (config.training.method == "reference" or config.evaluation.gate.against == "reference"):
        uses.append(ModelUse("model.reference", config.model.reference, pipeline=True))
    if config.ingest.captioner:
        uses.append(ModelUse("ingest.captioner", config.ingest.captioner))
    if config.superres.enabled:
        uses.append(ModelUse("superres.base", config.superres.base, pipeline=True))
    if config.evaluation.enabled:
        settings = config.evaluation
        uses += [ModelUse("evaluation.dino_model", settings.dino_model), ModelUse("evaluation.clip_model", settings.clip_model),
                 ModelUse("evaluation.lpips_model", settings.lpips_model)]
    return uses


def fetch_model(use: ModelUse) -> str:
    """Put a model where runs find it offline: hub ids in the Hugging Face cache, the rest in the model cache."""
    source = resolve_model_source(use.reference, use.revision, use.setting)
    if source != use.reference or _is_path(use.reference):
        return source  # already a folder: local, cached, built or fetched
    if use.pipeline:
        from diffusers import DiffusionPipeline

        return str(DiffusionPipeline.download(use.reference, revision=use.revision))
    from huggingface_hub import snapshot_download

    # Encoders ship TensorFlow, Flax and ONNX copies too; transformers reads safetensors or .bin.
    return snapshot_download(use.reference, revision=use.revision, ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "*.ot"])
