"""Build a small T5 tokenizer folder, laid out like the `tokenizer_2/` of FLUX.1 or `tokenizer_3/` of SD 3.

Real FLUX.1 and Stable Diffusion 3 read prompts a second (third) time with Google's T5 v1.1 XXL and
its 32,000-piece SentencePiece vocabulary. The tests' tiny FLUX and SD 3 models need a tokenizer of
the same kind, small and offline: a Unigram model with T5's special tokens (`<pad>` 0, `</s>` 1,
`<unk>` 2), its Metaspace pre-tokenizer, an `</s>` appended to every sequence and the 100 sentinel
tokens `<extra_id_99>` .. `<extra_id_0>` at the end of the vocabulary, trained with the `tokenizers`
library on words already in the repository: the whole words of the committed CLIP tokenizer
(trainer/assets/clip-tokenizer/vocab.json, `</w>` marks stripped) and the toy world's captions.
The result (`tokenizer.json`, `tokenizer_config.json`) loads offline with
`transformers.T5TokenizerFast.from_pretrained(out_dir)`.

    python tools/build_t5_tokenizer.py [--out trainer/assets/t5-tokenizer]

The same repository gives the same files: the trainer's scores differ between runs in their last
digits (it sums in hash-map order), so they are rounded and the pieces put in a fixed order.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "trainer" / "assets" / "t5-tokenizer"
CLIP_VOCAB = REPO_ROOT / "trainer" / "assets" / "clip-tokenizer" / "vocab.json"

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2, as in T5
SPACE = "▁"  # SentencePiece's word-start mark
NUM_PIECES = 3000  # trained pieces, the three special tokens included
EXTRA_IDS = 100  # T5's sentinel tokens, appended after the pieces: 3,100 tokens in all
MODEL_MAX_LENGTH = 512  # T5's; FLUX.1 and SD 3 truncate to 256 or 512 (max_sequence_length) anyway
# Every printable ASCII character is a piece, so no ASCII prompt maps to <unk>.
ALPHABET = string.ascii_letters + string.digits + string.punctuation
CAPTION_WEIGHT = 10  # the toy world's captions count ten times, so its words become whole pieces
SCORE_DECIMALS = 6


def corpus() -> list[str]:
    """The training text, in a fixed order: CLIP's whole words, the toy world's captions, the alphabet."""
    sys.path.insert(0, str(REPO_ROOT))
    from trainer.toyworld.example import EXAMPLE_PROMPTS
    from trainer.toyworld.world import BACKGROUNDS, COLORS, SHAPES, Scene

    clip_vocab = json.loads(CLIP_VOCAB.read_text(encoding="utf-8"))
    # Lower-case letters and digits only: the vocabulary's other entries are byte-level symbols.
    words = sorted({w for token in clip_vocab if re.fullmatch(r"[a-z0-9]+", w := token.removesuffix("</w>"))})
    captions = sorted(
        {
            Scene(shape, color, background).caption(with_color, with_background)
            for shape in SHAPES
            for color in COLORS
            for background in BACKGROUNDS
            for with_color in (True, False)
            for with_background in (True, False)
        }
        | set(EXAMPLE_PROMPTS)
    )
    return words + captions * CAPTION_WEIGHT + [" ".join(ALPHABET)]


def pre_tokenizer():
    """T5's, as transformers builds it: split on whitespace, then mark each word's start with `▁`."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        ]
    )


def train_pieces(texts: list[str]) -> list[tuple[str, float]]:
    """Train a Unigram model; its pieces with rounded log-probabilities, the special tokens first.

    Apart from the special tokens the pieces are sorted by score, best first, as SentencePiece
    orders them; ties (pieces seen equally often) by the piece itself, so the order is fixed.
    """
    from tokenizers import Tokenizer, models, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizer()
    trainer = trainers.UnigramTrainer(
        vocab_size=NUM_PIECES,
        special_tokens=[PAD, EOS, UNK],
        unk_token=UNK,
        initial_alphabet=list(ALPHABET),
        max_piece_length=16,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    trained = json.loads(tokenizer.to_str())["model"]["vocab"]
    special = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    if [piece for piece, _ in trained[:3]] != [PAD, EOS, UNK]:
        raise ValueError(f"Expected {PAD}, {EOS}, {UNK} first, got {trained[:3]}.")
    rounded = [(piece, round(score, SCORE_DECIMALS)) for piece, score in trained[3:]]
    pieces = sorted(rounded, key=lambda p: (-p[1], p[0]))
    if len(pieces) + 3 != NUM_PIECES:
        raise ValueError(f"Trained {len(pieces) + 3} pieces, expected {NUM_PIECES}.")
    return special + pieces


def build(out_dir: Path) -> Path:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import T5TokenizerFast

    pieces = train_pieces(corpus())
    # T5 keeps its sentinels at the end of the vocabulary, the last one first (<extra_id_0> is the last id).
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS))]
    # T5TokenizerFast builds the Unigram model, pre-tokenizer, decoder and `$A </s>` post-processor
    # itself from the scored vocabulary, exactly as it rebuilds them when loading the saved folder.
    tokenizer = T5TokenizerFast(
        vocab=pieces + sentinels,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_ids=EXTRA_IDS,
        model_max_length=MODEL_MAX_LENGTH,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    if not CLIP_VOCAB.is_file():
        parser.error(f"{CLIP_VOCAB} is missing: run `python tools/build_clip_tokenizer.py` first.")
    out_dir = build(args.out)
    print(f"Wrote a {NUM_PIECES + EXTRA_IDS}-token T5 tokenizer to {out_dir}")


if __name__ == "__main__":
    main()
