"""The real Phi-2 tokenizer, shipped with the package (no model hub needed).

GPT-2 byte-level BPE + 38 whitespace tokens = 50,295 entries; Phi-2's embedding has 51,200 rows
(padded for speed), so ids 50,295..51,199 are never produced. `<|endoftext|>` (id 50256) is BOS,
EOS and PAD at once. Rebuild the files with `python scripts/build_tokenizer.py`.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerFast

TOKENIZER_DIR = Path(__file__).parent / "assets" / "phi2_tokenizer"
ENDOFTEXT_ID = 50256  # BOS = EOS = PAD for Phi-2


@lru_cache(maxsize=None)
def _load(path: str) -> PreTrainedTokenizerFast:
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"tokenizer file {file} is missing; rebuild it with `python scripts/build_tokenizer.py`"
        )
    return PreTrainedTokenizerFast(
        tokenizer_file=str(file),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Phi-2's tokenizer (shared, cached). `path` may point at a `microsoft/phi-2` folder instead."""
    return _load(str(path or TOKENIZER_DIR))
