"""Build the 49,408-token CLIP tokenizer folder from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

The result is what Stable Diffusion 1.x ships in its `tokenizer/` folder: `vocab.json`,
`merges.txt`, `tokenizer_config.json` and `special_tokens_map.json`, loadable offline with
`transformers.CLIPTokenizer.from_pretrained(out_dir)`.

    python tools/build_clip_tokenizer.py [--source PATH.gz] [--out trainer/assets/clip-tokenizer]

The source file comes with `open-clip-torch` (and OpenAI's `clip`); by default it is located
through the installed `open_clip` package without importing it, since that import needs extra
dependencies the file itself does not.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "trainer" / "assets" / "clip-tokenizer"
SOURCE_NAME = "bpe_simple_vocab_16e6.txt.gz"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges of the file: together with the 256 byte symbols, their
# 256 end-of-word twins and the two special tokens that makes exactly VOCAB_SIZE entries.
NUM_MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 77
# transformers' BPE reader skips a first line starting with "#version", as in SD 1.5's merges.txt.
MERGES_HEADER = "#version: 0.2"


def default_source() -> Path:
    """Locate the vocabulary file inside the installed `open_clip` package, without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Cannot find {SOURCE_NAME}: install it with `pip install --no-deps open-clip-torch` "
            "or pass --source."
        )
    return Path(next(iter(spec.submodule_search_locations))) / SOURCE_NAME


def byte_symbols() -> list[str]:
    """One printable unicode character per byte value, in CLIP's order.

    Bytes that are already visible characters (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves
    and come first; the others (control characters, space, soft hyphen) are mapped in increasing
    byte order onto code points 256, 257, ... so that BPE never sees whitespace or controls.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = set(visible)
    hidden = [b for b in range(256) if b not in shown]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]


def read_merges(source: Path) -> list[str]:
    """The merges CLIP uses: lines 1..NUM_MERGES of the file (line 0 is a version header)."""
    lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{source} does not look like CLIP's BPE file: expected {NUM_MERGES} merge pairs.")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    """Token -> id: byte symbols, the same with `</w>`, each merge's result, then BOS and EOS."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"Built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}.")
    return vocab


def tokenizer_config() -> dict[str, object]:
    """Settings of SD 1.5's `tokenizer/tokenizer_config.json` that matter for loading."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }


def special_tokens_map() -> dict[str, str]:
    return {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def build(source: Path, out_dir: Path) -> Path:
    merges = read_merges(source)
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compact, one line: the pretty-printed vocab would be several times larger for nothing.
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("\n".join([MERGES_HEADER, *merges]) + "\n", encoding="utf-8")
    write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    write_json(out_dir / "special_tokens_map.json", special_tokens_map())
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None, help=f"path to {SOURCE_NAME}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    source = args.source or default_source()
    if not source.is_file():
        parser.error(f"{source} does not exist.")
    out_dir = build(source, args.out)
    print(f"Wrote a {VOCAB_SIZE}-token CLIP tokenizer to {out_dir}")


if __name__ == "__main__":
    main()
