"""Checks of the prompts and the identifier that need the tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from trainer.config import ConfigError, TrainConfig

# CLIP's BPE vocabulary is ordered by merge frequency: a whole-word token with a low id is a
# word the text encoder already knows well, which DreamBooth would have to overwrite.
COMMON_TOKEN_ID = 10_000
MAX_IDENTIFIER_TOKENS = 3


def check_prompts(config: TrainConfig, tokenizer: PreTrainedTokenizerBase,
                  captions: Sequence[tuple[Path, str]] = ()) -> list[str]:
    """Raise ConfigError for prompts (or caption files) the text encoder would truncate; return warnings."""
    limit = tokenizer.model_max_length
    named = [("instance_prompt", config.instance_prompt)]
    named += [(f"instance_data` caption of `{path.name}", caption) for path, caption in captions]
    if config.with_prior_preservation:
        named.append(("class_prompt", config.class_prompt))
    named += [(f"validation_prompts[{i}]", p) for i, p in enumerate(config.validation_prompts)]
    for field, prompt in named:
        n = len(tokenizer(prompt).input_ids)  # includes the start and end tokens
        if n > limit:
            raise ConfigError(
                f"`{field}` is {n} tokens long; the text encoder reads at most {limit} (start and end included)"
            )

    warnings = []
    ident = config.identifier.strip()
    pieces = tokenizer.tokenize(ident)
    if len(pieces) > MAX_IDENTIFIER_TOKENS:
        warnings.append(
            f"The identifier {ident!r} splits into {len(pieces)} tokens ({' '.join(pieces)}); "
            "a rare word of 1-3 tokens (e.g. 'sks', 'zwx', 'ohwx') binds to the subject more easily."
        )
    elif len(pieces) == 1:
        token_id = tokenizer.convert_tokens_to_ids(pieces[0])
        if token_id < COMMON_TOKEN_ID:
            warnings.append(
                f"The identifier {ident!r} is a common word (token {token_id}); training will overwrite what "
                "the model knows about it. Prefer a rare token such as 'sks' or 'zwx'."
            )
    return warnings
