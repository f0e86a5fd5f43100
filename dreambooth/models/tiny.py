"""Tiny random Stable Diffusion models, built offline in the exact diffusers folder layout.

No machine here can download weights, so tests, the demo and the CPU benchmark use
these. They are loaded by the same `from_pretrained` code as a real model; only their
size differs. Their images are noise: the weights are random.

`tiny://dino`, `tiny://clip` and `tiny://lpips` are the evaluation encoders in the layouts of
facebook/dino-vits16, openai/clip-vit-base-patch32 and an LPIPS AlexNet folder; `tiny://captioner`
is ingest.captioner's BLIP.

`tiny://sd` is the fast test model (64 px, 0.8M-parameter UNet); `tiny://sd-bench` has
Stable Diffusion's UNet layout (4 levels, 2 layers each) at 17.6M parameters (64 px), the
CPU benchmark's model. `tiny://sdxl` and `tiny://flux` are the other families' layouts at 64 px:
SDXL's two CLIP text encoders and time-conditioned UNet, Flux's CLIP + T5 encoders, guidance-
embedding transformer, 16-channel packing VAE and flow-matching scheduler; `tiny://sd3` is SD 3.5's
(two CLIPs and T5, an MMDiT with dual attention and QK norm, the shifted flow-matching scheduler).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from dreambooth.models.cache import default_cache_dir

TINY_SCHEME = "tiny://"
# Bump when a builder changes, so cached folders are rebuilt.
BUILDER_VERSION = 4
TINY_T5_MAX_LENGTH = 512  # Flux's default max_sequence_length

# Words the tiny tokenizer knows as whole tokens: enough for the shipped prompts.
_COMMON_WORDS = (
    "a an the of on in with and at by for to from photo picture image dog cat backpack teapot "
    "beach snow jungle city street grass table wooden floor red blue green purple shiny wet cube "
    "top mountain river sunset desert water pool lake sea sky night rainbow hat santa chef outfit "
    "sleeping bag jacket sunglasses crown wizard police firefighter toy bear plush bowl boot vase"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # The byte-to-printable mapping of GPT-2 / CLIP byte-level BPE.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _rare_words(count: int) -> list[str]:
    # Short letter strings that are not words: stand-ins for the rare tokens of a real vocabulary.
    import random

    rng = random.Random(7)
    consonants = "bcdfghjklmnpqrstvwxz"
    words: list[str] = []
    while len(words) < count:
        length = rng.choice((2, 3, 3))
        word = "".join(rng.choice(consonants) for _ in range(length))
        if word not in words:
            words.append(word)
    return words


def build_tiny_tokenizer():
    """A CLIP BPE tokenizer with a small vocabulary: bytes, common words, then rare short tokens."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []

    def add_word(word: str) -> None:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in vocab:
                merges.append((left, right))
                vocab[merged] = len(vocab)
            left = merged

    for word in _COMMON_WORDS:
        add_word(word)
    for word in _rare_words(200):
        add_word(word)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_t5_tokenizer():
    """A sentencepiece-style (Unigram) T5 tokenizer over the same words, in the layout Flux loads."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(char, -5.0) for char in string.ascii_lowercase + string.digits + string.punctuation]
    vocab += [("\u2581" + word, -3.0) for word in _COMMON_WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)


# Qwen3's chat template for what the pipelines send (one user turn, a generation prompt, thinking off).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
TINY_QWEN_MAX_LENGTH = 512  # the Flux.2 pipelines' max_sequence_length


def _byte_level_vocabulary(extra_words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE over the CLIP tokenizer's words and `extra_words`: the 256 byte
    symbols, then each word merged letter by letter, alone and after a space (`Ġdog`), then rare words."""
    byte_symbols = _bytes_to_unicode()
    space = byte_symbols[ord(" ")]
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols.values())}
    merges: list[tuple[str, str]] = []

    def add_word(word: str) -> None:
        left = word[0]
        for right in word[1:]:
            if left + right not in vocab:
                merges.append((left, right))
                vocab[left + right] = len(vocab)
            left += right

    for word in (*_COMMON_WORDS, *extra_words):
        add_word(space + word)
        add_word(word)
    for word in _rare_words(200):
        add_word(space + word)
    return vocab, merges


def build_tiny_qwen_tokenizer():
    """A byte-level BPE tokenizer in Qwen's layout (Qwen2Tokenizer, its special tokens and chat template)
    over the same words as the CLIP one: a word after a space is one token (`Ġdog`), as in Qwen's vocabulary."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_vocabulary(("user", "assistant", "system"))
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=TINY_QWEN_MAX_LENGTH,
                               additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# Mistral Small 3's chat template for what Flux2Pipeline sends: a system turn and a user turn, each
# content a string or a list of text blocks, no generation prompt.
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message.content is string %}{%- set text = message.content %}"
    "{%- else %}{%- set text = message.content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message.role == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message.role == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}{%- endfor %}"
)
MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[IMG]", "[IMG_BREAK]", "[IMG_END]")


def build_tiny_mistral_tokenizer():
    """A byte-level BPE tokenizer in Mistral Small 3's manner (its control tokens, its chat template), over
    the same words: what FLUX.2 [dev]'s text processor holds besides its image processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_vocabulary(("system", "image", "description"))
    for token in MISTRAL_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[4:]),
                                        model_max_length=TINY_QWEN_MAX_LENGTH)
    tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
    return tokenizer


def _tiny_qwen3(tokenizer, hidden: int = 16, layers: int = 28, causal_lm: bool = True):
    """A Qwen3 language model over the tiny tokenizer (the causal LM, or its bare Qwen3Model); 28 layers
    by default, as FLUX.2 [klein] reads hidden states 9, 18 and 27."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=TINY_QWEN_MAX_LENGTH,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))


def _tiny_text_config(tokenizer, hidden: int) -> dict:
    """A two-layer CLIP text encoder over the tiny tokenizer (the SD text encoder's architecture)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# UNet and VAE shapes per variant; both keep Stable Diffusion's block layout.
_VARIANTS = {
    "sd": dict(
        unet=dict(
            block_out_channels=(32, 64),
            # Attention below the top resolution only (as the tiny SDXL and upscaler): over the 32x32
            # latents it took three quarters of every step, in each test and the demo alike.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=8,
            sample_size=32,
        ),
        vae=dict(block_out_channels=(32, 64)),
        text_hidden=32,
    ),
    "sd-bench": dict(
        unet=dict(
            block_out_channels=(32, 64, 128, 256),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            attention_head_dim=8,
            sample_size=32,
        ),
        vae=dict(block_out_channels=(32, 64)),
        text_hidden=64,
    ),
}


def build_tiny_stable_diffusion(out_dir: Path, variant: str = "sd", seed: int = 0) -> Path:
    """Write a random StableDiffusionPipeline (safetensors) to `out_dir` and return it."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    shape = _VARIANTS[variant]
    torch.manual_seed(seed)
    hidden = shape["text_hidden"]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=hidden, **shape["unet"])
    vae_channels = shape["vae"]["block_out_channels"]
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=vae_channels,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        sample_size=shape["unet"]["sample_size"] * 2 ** (len(vae_channels) - 1),
    )
    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_text_config(tokenizer, hidden)))
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _tiny_vae(latent_channels: int = 4, **config):
    """A two-level KL VAE (8x -> 2x downsampling): 64 px images, 32 px latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(32, 64),
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64, **config,
    )


def build_tiny_sdxl(out_dir: Path, seed: int = 0) -> Path:
    """A random StableDiffusionXLPipeline: two CLIP text encoders (the second with a projection, whose
    pooled output and the size/crop time ids condition the UNet), their hidden states concatenated."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    hidden, time_embed = 32, 8
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * hidden,  # both encoders' hidden states, side by side
        addition_embed_type="text_time", addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + hidden,  # 6 time ids + the pooled embedding
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_tiny_vae(scaling_factor=0.13025),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_tiny_text_config(tokenizer, hidden))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_tiny_text_config(tokenizer, hidden), projection_dim=hidden)),
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
        ),
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_flux(out_dir: Path, seed: int = 0) -> Path:
    """A random FluxPipeline (FLUX.1-dev's layout): CLIP pooled + T5 sequence conditioning, a
    guidance-embedding transformer over 2x2-packed latents, the flow-matching scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    hidden, latent_channels = 32, 4
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=hidden, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=hidden, pooled_projection_dim=hidden, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    )
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        ),
        vae=_tiny_vae(latent_channels, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_tiny_text_config(tokenizer, hidden))),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_sd3(out_dir: Path, seed: int = 0) -> Path:
    """A random StableDiffusion3Pipeline (SD 3.5's layout): two CLIP encoders with projections, whose
    penultimate states (side by side, zero-padded to T5's width) precede T5's sequence and whose pooled
    outputs are concatenated; an MMDiT transformer over 2x2 patches; the shifted flow-matching scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer_3 = build_tiny_t5_tokenizer()
    hidden, latent_channels = 32, 4
    clip = lambda: CLIPTextModelWithProjection(CLIPTextConfig(**_tiny_text_config(build_tiny_tokenizer(), hidden), projection_dim=hidden))  # noqa: E731
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=2 * hidden, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=latent_channels, out_channels=latent_channels, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=2 * hidden, caption_projection_dim=32,
        pooled_projection_dim=2 * hidden, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(latent_channels, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=clip(), tokenizer=build_tiny_tokenizer(),
        text_encoder_2=clip(), tokenizer_2=build_tiny_tokenizer(),
        text_encoder_3=t5, tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


TINY_FLUX2_TEXT_HIDDEN = 16


def _tiny_flux2_image_parts(guidance_embeds: bool) -> dict:
    """The Flux.2 pipelines' transformer (over three text layers side by side), batch-normalised VAE
    and dynamically shifted flow-matching scheduler, tiny."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    latent_channels = 4
    return dict(
        transformer=Flux2Transformer2DModel(
            in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=3 * TINY_FLUX2_TEXT_HIDDEN, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=guidance_embeds,
        ),
        vae=AutoencoderKLFlux2(
            block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            latent_channels=latent_channels, layers_per_block=1, sample_size=64,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        ),
    )


def build_tiny_flux2_klein(out_dir: Path, seed: int = 0) -> Path:
    """A random Flux2KleinPipeline (FLUX.2 [klein]'s layout): a Qwen3 text encoder whose hidden states 9,
    18 and 27 side by side condition a transformer without guidance embedding over 2x2-patchified,
    batch-normalised latents of the Flux.2 VAE; the flow-matching scheduler with dynamic shifting."""
    import torch
    from diffusers import Flux2KleinPipeline

    torch.manual_seed(seed)
    tokenizer = build_tiny_qwen_tokenizer()
    image_parts = _tiny_flux2_image_parts(guidance_embeds=False)  # drawn first, as before the text encoder
    pipeline = Flux2KleinPipeline(text_encoder=_tiny_qwen3(tokenizer, TINY_FLUX2_TEXT_HIDDEN), tokenizer=tokenizer, **image_parts)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _tiny_mistral3(tokenizer, hidden: int = 16, layers: int = 31):
    """A Mistral 3 vision-language model over the tiny tokenizer with a one-layer Pixtral vision tower;
    31 language layers, as FLUX.2 [dev] reads hidden states 10, 20 and 30."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=TINY_QWEN_MAX_LENGTH,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ).to_dict(),
        vision_config=PixtralVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=8, image_size=64, patch_size=16).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
    ))


def _as_pixtral_processor(tokenizer_dir: Path, model_index: Path) -> None:
    """Make a saved tokenizer folder what FLUX.2 [dev] ships: a PixtralProcessor (its tokenizer beside
    an image processor's config), named so in model_index.json."""
    (tokenizer_dir / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": 16, "spatial_merge_size": 2,
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]",
    }, indent=2))
    (tokenizer_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor", "patch_size": 16,
        "size": {"longest_edge": 64}, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True, "resample": 3,
    }, indent=2))
    index = json.loads(model_index.read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    model_index.write_text(json.dumps(index, indent=2))


def build_tiny_flux2(out_dir: Path, seed: int = 0) -> Path:
    """A random Flux2Pipeline (FLUX.2 [dev]'s layout): a Mistral 3 text encoder whose hidden states 10, 20
    and 30 of the system-prompted chat condition a guidance-distilled transformer (guidance embedding)
    over the Flux.2 VAE's patchified, batch-normalised latents; the text processor is a PixtralProcessor."""
    import torch
    from diffusers import Flux2Pipeline

    torch.manual_seed(seed)
    tokenizer = build_tiny_mistral_tokenizer()
    image_parts = _tiny_flux2_image_parts(guidance_embeds=True)
    pipeline = Flux2Pipeline(text_encoder=_tiny_mistral3(tokenizer, TINY_FLUX2_TEXT_HIDDEN), tokenizer=tokenizer, **image_parts)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    _as_pixtral_processor(out_dir / "tokenizer", out_dir / "model_index.json")
    return out_dir


def build_tiny_z_image(out_dir: Path, seed: int = 0) -> Path:
    """A random ZImagePipeline (Z-Image's layout): a Qwen3 text encoder whose second-to-last hidden states,
    the prompt's tokens only, condition a single-stream transformer that patchifies the latents itself;
    a KL VAE with a shift factor; the shifted flow-matching scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_qwen_tokenizer()
    hidden, latent_channels = 16, 4
    transformer = ZImageTransformer2DModel(
        in_channels=latent_channels, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=hidden,
        axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
    )
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(latent_channels, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=_tiny_qwen3(tokenizer, hidden, layers=2, causal_lm=False), tokenizer=tokenizer, transformer=transformer,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_qwen_image(out_dir: Path, seed: int = 0) -> Path:
    """A random QwenImagePipeline (Qwen-Image's layout): a Qwen2.5-VL text encoder whose last hidden states,
    the prompt's own tokens after its system prompt, condition a transformer over 2x2-packed latents of the
    causal 3D VAE (one frame), normalised by the VAE's per-channel mean and std; the flow-matching
    scheduler with exponential dynamic shifting."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tiny_qwen_tokenizer()
    hidden, latent_channels = 16, 4
    special = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, **special),
        vision_config=dict(depth=1, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=2, out_hidden_size=hidden),
        **special,
    ))
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
            time_shift_type="exponential",
        ),
        vae=AutoencoderKLQwenImage(base_dim=16, z_dim=latent_channels, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                   latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 2.0, 1.2]),
        text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=QwenImageTransformer2DModel(in_channels=4 * latent_channels, out_channels=latent_channels, num_layers=1,
                                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=hidden,
                                                axes_dims_rope=(4, 6, 6)),
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_dino(out_dir: Path, seed: int = 0) -> Path:
    """A random ViT in facebook/dino-vits16's layout (224 px, patch 16), much narrower."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=224, patch_size=16
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """A random CLIPModel in openai/clip-vit-base-patch32's layout, with the tiny tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config=_tiny_text_config(tokenizer, 32),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32
        ),
        projection_dim=32,
    )
    CLIPModel(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(CLIP_PREPROCESSOR)
    return out_dir


CLIP_PREPROCESSOR = ('{"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, '
                     '"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}')


def build_tiny_safety_checker(out_dir: Path, seed: int = 0) -> Path:
    """A random StableDiffusionSafetyChecker in CompVis/stable-diffusion-safety-checker's layout: random
    concept embeddings, every threshold at cosine 1, so it flags nothing (a test lowers them to flag)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32)
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=32))
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
    checker.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "preprocessor_config.json").write_text(CLIP_PREPROCESSOR)
    return out_dir


CAPTION_WORDS = ("a an the of on in with and dog cat person woman man backpack sitting standing lying grass sofa table "
                 "beach snow floor red blue green brown white black small large photo close up").split()


def build_tiny_captioner(out_dir: Path, seed: int = 0) -> Path:
    """A random BLIP captioner in Salesforce/blip-image-captioning-base's layout (64 px images, a
    word-level vocabulary of CAPTION_WORDS): it writes random but real word sequences."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocabulary = out_dir / "vocab.txt"
    vocabulary.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CAPTION_WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocabulary), model_max_length=32)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder starts from [DEC]
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(
        out_dir, safe_serialization=True
    )
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def build_tiny_lpips(out_dir: Path, seed: int = 0) -> Path:
    """LPIPS' AlexNet layout with random weights (non-negative heads, as trained LPIPS has)."""
    import torch

    from dreambooth.models.lpips import LpipsAlexNet, save_lpips

    torch.manual_seed(seed)
    model = LpipsAlexNet()
    with torch.no_grad():
        for lin in model.lins:
            lin.weight.abs_()
    return save_lpips(model, out_dir)


def build_tiny_upscaler(out_dir: Path, seed: int = 0) -> Path:
    """A random StableDiffusionUpscalePipeline in stabilityai/stable-diffusion-x4-upscaler's layout:
    a 7-channel UNet (4 latent + 3 low-res RGB) conditioned on the noise level as a class label,
    a 4x VAE with the upscaler's scaling factor, and a low-res DDPM noise scheduler."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    unet = UNet2DConditionModel(
        in_channels=7,
        out_channels=4,
        sample_size=16,
        block_out_channels=(32, 64),
        # Attention below the top resolution only, as the real upscaler: at the top (the low-res
        # input's own size) it would cost as much as everything else together.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_class_embeds=1000,  # covers max_noise_level (350), as the real upscaler's
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_text_config(tokenizer, 32)))
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction", set_alpha_to_one=False
        ),
        max_noise_level=350,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


_BUILDERS = {
    **{variant: (lambda out, v=variant: build_tiny_stable_diffusion(out, v)) for variant in _VARIANTS},
    "dino": build_tiny_dino,
    "clip": build_tiny_clip,
    "safety-checker": build_tiny_safety_checker,
    "lpips": build_tiny_lpips,
    "captioner": build_tiny_captioner,
    "sd-upscaler": build_tiny_upscaler,
    "sdxl": build_tiny_sdxl,
    "flux": build_tiny_flux,
    "sd3": build_tiny_sd3,
    "flux2-klein": build_tiny_flux2_klein,
    "flux2": build_tiny_flux2,
    "z-image": build_tiny_z_image,
    "qwen-image": build_tiny_qwen_image,
}


def resolve_tiny_model(reference: str, cache_dir: Path | None = None) -> Path:
    """Build (once) and return the folder for a `tiny://NAME` reference."""
    variant = reference.removeprefix(TINY_SCHEME)
    if variant not in _BUILDERS:
        from dreambooth.errors import InputError

        raise InputError(f"unknown tiny model {reference!r} (known: {', '.join(_BUILDERS)})")
    folder = (cache_dir or default_cache_dir()) / f"tiny-{variant}-v{BUILDER_VERSION}"
    if folder.is_dir():  # folders appear only complete, by rename
        return folder
    # Build beside the target and rename, so a concurrent task never sees half a model.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    _BUILDERS[variant](staging)
    try:
        staging.rename(folder)
    except OSError:  # another process won the race; its folder is complete
        shutil.rmtree(staging, ignore_errors=True)
    return folder
