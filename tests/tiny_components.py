"""Tiny SD3 components built offline: tokenizers written from scratch, random tiny models, a full diffusers
`StableDiffusion3Pipeline` saved with save_pretrained. Reused by the prompt and sampling tests.

Sizes: CLIP-L width 16, CLIP-G width 24 (pooled 16 + 24 = 40), T5 d_model 64 (the transformer's
joint_attention_dim), CLIP context 77 as in SD3.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from conftest import randomize_

from sd3_jax.data.tokenizer import clip_vocab as _clip_vocab
from sd3_jax.data.tokenizer import make_clip_tokenizer as _make_clip_tokenizer

CLIP_WORDS = ("a", "photo", "of", "cat", "dog", "the", "an", "astronaut", "riding", "horse", "on", "moon")
T5_SENTENCES = (
    "a photo of a cat",
    "an astronaut riding a horse on the moon",
    "the quick brown fox jumps over the lazy dog",
    "a painting of a city at night with lights",
    "portrait of an old man, oil on canvas",
)
CLIP_MAX_LENGTH = 77
T5_VOCAB = 48  # sentencepiece pieces; the tiny T5 embeds 64 rows
DIMS = dict(clip_l=16, clip_g=24, t5=64, pooled=40)


def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """The tiny CLIP vocabulary over CLIP_WORDS (see sd3_jax.data.tokenizer.clip_vocab)."""
    return _clip_vocab(CLIP_WORDS)


def make_clip_tokenizer(
    path: str | os.PathLike, pad_token: str = "<|endoftext|>", model_max_length: int = 77
):
    """A CLIPTokenizer over CLIP_WORDS. SD3's tokenizer pads with <|endoftext|>, tokenizer_2 with "!"."""
    return _make_clip_tokenizer(path, CLIP_WORDS, pad_token=pad_token, model_max_length=model_max_length)


def make_t5_tokenizer(path: str | os.PathLike):
    """A T5TokenizerFast from a unigram sentencepiece model trained here on T5_SENTENCES (<pad> 0, </s> 1,
    <unk> 2, no extra ids)."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_SENTENCES * 20),
        model_prefix=str(path / "spiece"),
        vocab_size=T5_VOCAB,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    return T5TokenizerFast.from_pretrained(path, extra_ids=0)


def clip_configs():
    """transformers configs of the tiny CLIP-L (legacy eos_token_id 2, argmax pooling, as SD3's configs)
    and CLIP-G (eos by id)."""
    from transformers import CLIPTextConfig

    vocab = len(clip_vocab()[0])
    common = dict(
        vocab_size=vocab,
        num_hidden_layers=3,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=vocab - 2,
        pad_token_id=vocab - 1,
    )
    clip_l = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        projection_dim=16,
        hidden_act="quick_gelu",
        eos_token_id=2,
        **common,
    )
    clip_g = CLIPTextConfig(
        hidden_size=24,
        intermediate_size=40,
        num_attention_heads=3,
        projection_dim=24,
        hidden_act="gelu",
        eos_token_id=vocab - 1,
        **common,
    )
    return clip_l, clip_g


def t5_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=64,
        d_model=64,
        d_kv=8,
        num_heads=4,
        d_ff=80,
        num_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )


def make_tiny_sd3_components(seed: int = 0, with_t5: bool = True) -> dict:
    """The components StableDiffusion3Pipeline takes, random (never zero) and tiny."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    scratch = tempfile.TemporaryDirectory()
    path = Path(scratch.name)
    clip_l_cfg, clip_g_cfg = clip_configs()
    text_encoder = CLIPTextModelWithProjection(clip_l_cfg).eval()
    text_encoder_2 = CLIPTextModelWithProjection(clip_g_cfg).eval()
    randomize_(text_encoder, seed=seed)
    randomize_(text_encoder_2, seed=seed + 1)
    components = dict(
        text_encoder=text_encoder,
        tokenizer=make_clip_tokenizer(path / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_clip_tokenizer(path / "tokenizer_2", pad_token="!"),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    if with_t5:
        text_encoder_3 = T5EncoderModel(t5_config()).eval()
        randomize_(text_encoder_3, seed=seed + 2, std=0.05)  # unscaled logits: keep fp32 noise small
        components.update(text_encoder_3=text_encoder_3, tokenizer_3=make_t5_tokenizer(path / "tokenizer_3"))
    components["transformer"] = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=DIMS["t5"],
        caption_projection_dim=16,
        pooled_projection_dim=DIMS["pooled"],
        out_channels=4,
        pos_embed_max_size=8,
    ).eval()
    components["vae"] = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,  # as SD3's VAE
        use_post_quant_conv=False,
    ).eval()
    # Random, never default: default inits (GroupNorm and LayerNorm at 1 and 0, zeroed output layers)
    # would hide a norm or output mapped to the wrong param.
    randomize_(components["transformer"], seed=seed + 3)
    randomize_(components["vae"], seed=seed + 4)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scratch.cleanup()
    return components


def make_tiny_sd3_pipeline(path: str | os.PathLike, seed: int = 0, with_t5: bool = True):
    """A tiny StableDiffusion3Pipeline saved to `path` in diffusers' layout; returns the pipeline."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**make_tiny_sd3_components(seed=seed, with_t5=with_t5))
    pipe.save_pretrained(path)
    return pipe
