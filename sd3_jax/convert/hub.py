"""Model ids (`stabilityai/stable-diffusion-3.5-medium`) resolved to a local diffusers folder through
huggingface_hub, as diffusers resolves them: its cache, `HF_HOME` / `HF_HUB_CACHE`, `HF_TOKEN` and
`HF_HUB_OFFLINE` behave as there. Only the diffusers folder is fetched (model_index.json, scheduler,
transformer, vae, text encoders and tokenizers), not the single files or fp8 text encoders beside it.
"""

from __future__ import annotations

import os
import re

from sd3_jax.convert.mapping import CheckpointError

# What a diffusers SD3 pipeline folder needs; the repository's top-level single files and text_encoders/
# (Stability's layout, fp8 variants) are left on the Hub.
DIFFUSERS_FILES = [
    "model_index.json",
    "scheduler/*",
    "transformer/*.json",
    "transformer/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "text_encoder_2/*.json",
    "text_encoder_2/*.safetensors",
    "text_encoder_3/*.json",
    "text_encoder_3/*.safetensors",
    "tokenizer/*",
    "tokenizer_2/*",
    "tokenizer_3/*",
]
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_model_id(source: str) -> bool:
    """`org/name` that is not a local path."""
    return bool(_ID.match(source)) and not os.path.exists(source)


def resolve(model_id: str, revision: str | None = None) -> str:
    """The local snapshot folder of `model_id`'s diffusers files, downloaded where not cached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(model_id, revision=revision, allow_patterns=DIFFUSERS_FILES)
    except GatedRepoError:
        raise CheckpointError(
            f"{model_id} is gated: accept its licence at https://huggingface.co/{model_id} while logged in, "
            "then set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{model_id}: no such model on the Hugging Face Hub (or it is private: set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{model_id}: no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        where = constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise CheckpointError(
            f"{model_id} is not in the Hugging Face cache ({where}) and {why}: download it where there is "
            "a network (the same cache, or HF_HUB_CACHE pointing at a copy), or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{model_id}: could not fetch from the Hugging Face Hub ({first})") from None
