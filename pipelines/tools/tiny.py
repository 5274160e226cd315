"""Tiny random-weight checkpoints with the real repos' classes and layout, built locally in seconds.

They are the embedded default that lets fluxd run on any machine (`fluxd serve --demo`) and the fixture of
every CPU test. Each folder is what `save_pretrained` writes, so it is loaded through the very same
`from_pretrained` path as a real checkpoint. Tokenizers are trained here on text diffusers ships; nothing is
fetched. Everything is deterministic from the seed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipelines.contract.lora_catalog import FOLDER as LORA_FOLDER

logger = logging.getLogger(__name__)

TINY_MARKER = "fluxd-tiny.json"
TURBO_LORA_RANK = 4
# One user LoRA per family in the demo's weights/loras/ (file name, key layout), for the playground and tests.
EXAMPLE_LORAS = {"flux.2-dev": ("tiny-flux2-style", "bfl"), "flux.1-dev": ("tiny-flux1-style", "diffusers")}

_MISTRAL_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
]

# A Mistral-style chat template: system prompt, user turns with text and image parts, assistant turns.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set parts = m['content'] if m['content'] is not string "
    "else [{'type': 'text', 'text': m['content']}] %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for p in parts %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]"
    "{% for p in parts %}{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}[IMG]{% endif %}{% endfor %}"
    "[/INST]"
    "{% else %}{% for p in parts %}{{ p['text'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def _corpus() -> Iterator[str]:
    """English text that ships with diffusers, so tokenizers train offline on realistic prompts."""
    from diffusers.pipelines.flux2 import system_messages

    for name in dir(system_messages):
        value = getattr(system_messages, name)
        # Not the module's own dunders: __file__ is the install path, which would make the tokenizers (and so
        # every tiny checkpoint's pixels) depend on where the virtual environment lives.
        if isinstance(value, str) and not name.startswith("__"):
            yield from value.splitlines()
    yield from [
        "a photo of a cat wearing a hat",
        "a red fox in the snow, golden hour, 35mm",
        "a lighthouse on a cliff at night with a starry sky",
        "turn the sky purple and add a moon",
        "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz .,;:!?'\"()-",
    ]


def _byte_level_bpe(vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def _unigram(vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def _flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The FLUX repos' scheduler config: dynamic shifting on the image sequence length.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _pixtral_processor():
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(1000, _MISTRAL_SPECIALS),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    image_processor = PixtralImageProcessor(size={"longest_edge": 64}, patch_size=8)
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        spatial_merge_size=2,
        chat_template=_CHAT_TEMPLATE,
        image_token="[IMG]",
        image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]",
    )


def build_flux2(seed: int = 0):
    """A tiny Flux2Pipeline: a 30-layer Mistral3 (the real (10, 20, 30) taps exist) and a 4-block VAE."""
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    processor = _pixtral_processor()
    tok = processor.tokenizer
    text_hidden = 16
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tok),
            "hidden_size": text_hidden,
            "intermediate_size": 32,
            "max_position_embeddings": 4096,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "num_hidden_layers": 30,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1_000_000_000.0,
            "sliding_window": None,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 64,
            "patch_size": 8,
            "num_channels": 3,
        },
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    # Random weights never emit EOS: bound prompt enhancement in the checkpoint itself, as a real model's
    # generation_config.json would, so serving code needs no tiny-model special case.
    text_encoder.generation_config.max_new_tokens = 16
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_hidden,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return Flux2Pipeline(
        scheduler=_flow_match_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=processor,
        transformer=transformer,
    )


def build_flux1(pipeline_class: str, seed: int = 0):
    """A tiny FLUX.1 pipeline (FluxPipeline or FluxKontextPipeline): CLIP-L + T5 + MMDiT + 4-block VAE."""
    import diffusers
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    clip_tokenizer = CLIPTokenizer(
        tokenizer_object=_byte_level_bpe(600, ["<unk>", "<|startoftext|>", "<|endoftext|>"]),
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    t5_tokenizer = T5Tokenizer(
        tokenizer_object=_unigram(600, ["<pad>", "</s>", "<unk>"]),
        unk_token="<unk>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=512,
    )
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(seed)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    ).eval()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipeline_cls = getattr(diffusers, pipeline_class)
    return pipeline_cls(
        scheduler=_flow_match_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


LORA_LAYOUTS: dict[str, tuple[str, ...]] = {
    # The key layouts diffusers' converters load, per family, that a tiny transformer can carry. FLUX.1 reads
    # BFL names with kohya's lora_down/lora_up (ComfyUI's files); fal's FLUX.1 Kontext layout
    # (base_model.model.) converts for the full 19 + 38 blocks only.
    "flux2": ("diffusers", "kohya", "bfl", "peft"),
    "flux1": ("diffusers", "kohya", "comfyui"),
}


def _bfl_shapes(transformer) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of the attention and fused single-block layers under BFL's module names."""
    config = transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    flux2 = "mlp_ratio" in config  # FLUX.2's MLP is gated (SwiGLU, 2x the input) at ratio 3; FLUX.1's 4x
    mlp_hidden = int(inner * config.mlp_ratio) if flux2 else 4 * inner
    mlp_in = 2 * mlp_hidden if flux2 else mlp_hidden
    shapes: dict[str, tuple[int, int]] = {}
    for block in range(config.num_layers):
        for stream in ("img", "txt"):
            shapes[f"double_blocks.{block}.{stream}_attn.qkv"] = (inner, 3 * inner)
            shapes[f"double_blocks.{block}.{stream}_attn.proj"] = (inner, inner)
    for block in range(config.num_single_layers):
        # linear1 fuses QKV with the MLP input, linear2 the attention and MLP outputs. diffusers splits
        # FLUX.1's linear1 at FLUX.1 [dev]'s own sizes (3072 x 3 + 12288), which a tiny one cannot have.
        if flux2:
            shapes[f"single_blocks.{block}.linear1"] = (inner, 3 * inner + mlp_in)
        shapes[f"single_blocks.{block}.linear2"] = (inner + mlp_hidden, inner)
    return shapes


def _diffusers_shapes(transformer) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of every attention Linear under diffusers' module names."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and ".attn." in name and "norm" not in name
    }


def lora_state_dict(
    transformer, layout: str = "bfl", seed: int = 0, rank: int = TURBO_LORA_RANK
) -> dict[str, torch.Tensor]:
    """A random LoRA for `transformer` keyed in one published layout: diffusers/PEFT (`transformer.`), kohya
    (`lora_unet_`, with alphas), BFL/ai-toolkit (`diffusion_model.`, as fal's Turbo file is), ComfyUI's (BFL
    names, kohya's matrices) or PEFT's `base_model.model.` prefix; diffusers converts each on load."""
    generator = torch.Generator().manual_seed(seed)
    shapes = _diffusers_shapes(transformer) if layout == "diffusers" else _bfl_shapes(transformer)
    names = {
        "diffusers": lambda name: (f"transformer.{name}", "lora_A", "lora_B"),
        "kohya": lambda name: ("lora_unet_" + name.replace(".", "_"), "lora_down", "lora_up"),
        "bfl": lambda name: (f"diffusion_model.{name}", "lora_A", "lora_B"),
        "comfyui": lambda name: (f"diffusion_model.{name}", "lora_down", "lora_up"),
        "peft": lambda name: (f"base_model.model.{name}", "lora_A", "lora_B"),
    }[layout]
    state: dict[str, torch.Tensor] = {}
    for name, (fan_in, fan_out) in shapes.items():
        key, down, up = names(name)
        state[f"{key}.{down}.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.5
        state[f"{key}.{up}.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.5
        if layout == "kohya":
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def turbo_lora_state_dict(transformer, seed: int = 0, rank: int = TURBO_LORA_RANK) -> dict[str, torch.Tensor]:
    """A random LoRA keyed as fal's Turbo file is (BFL/ai-toolkit names), which diffusers converts on load."""
    return lora_state_dict(transformer, "bfl", seed, rank)


def write_tiny(root: Path, seed: int = 0) -> list[Path]:
    """Write tiny checkpoints for every servable id under `root` (one folder per weights id)."""
    from pipelines.contract.specs import SPECS

    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    flux2 = build_flux2(seed)
    builders = {
        "flux.2-dev": lambda: flux2,
        "flux.1-dev": lambda: build_flux1("FluxPipeline", seed),
        "flux.1-kontext-dev": lambda: build_flux1("FluxKontextPipeline", seed),
    }
    lora_folder = root / LORA_FOLDER
    lora_folder.mkdir(exist_ok=True)
    for model_id, build in builders.items():
        folder = root / model_id
        pipe = build()
        pipe.save_pretrained(folder, safe_serialization=True)
        written.append(folder)
        if model_id in EXAMPLE_LORAS:
            name, layout = EXAMPLE_LORAS[model_id]
            state = lora_state_dict(pipe.transformer, layout, seed + 1)
            save_file(state, lora_folder / f"{name}.safetensors")
    turbo = SPECS["flux.2-dev-turbo"].adapter
    assert turbo is not None
    turbo_folder = root / "flux.2-dev-turbo"
    turbo_folder.mkdir(exist_ok=True)
    save_file(turbo_lora_state_dict(flux2.transformer, seed), turbo_folder / turbo.weight_name)
    written.append(turbo_folder)
    written.append(lora_folder)
    from pipelines.contract.image_prompts import FOLDER as REDUX_FOLDER
    from pipelines.engine.safety import FOLDER as SAFETY_FOLDER
    from pipelines.tools.tiny_extras import write_redux, write_safety_checker

    written.append(write_safety_checker(root / SAFETY_FOLDER, seed))
    written.append(write_redux(root / REDUX_FOLDER, seed))
    for folder in written:
        (folder / TINY_MARKER).write_text(json.dumps({"tiny": True, "seed": seed}) + "\n")
    logger.info("wrote tiny random-weight checkpoints for %s under %s", [p.name for p in written], root)
    return written
