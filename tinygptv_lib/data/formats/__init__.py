"""Readers and writers for the on-disk formats of TinyGPT-V's training data and benchmarks.

One reader serves both the small shipped samples (``data_samples/``) and the real full-size
datasets, because the samples are written in the real layouts. Every reader raises
``DataFormatError`` (a ValueError) naming the file, the record and the field when a record is
malformed, and refuses image paths that escape the data root. docs/DATA_FORMATS.md describes
each format with an example record.
"""
from ._common import DataFormatError, encode_image, open_image, resolve_under, save_image
from .align import ALIGN_FILE, ALIGN_IMAGE_DIR, AlignRecord, read_cc_sbu_align, write_cc_sbu_align
from .benchmarks import (IconQARecord, MemeRecord, VizWizRecord, VSRRecord, read_hateful_memes, read_iconqa,
                         read_vizwiz, read_vsr, write_hateful_memes, write_iconqa, write_vizwiz, write_vsr)
from .llava import ConversationRecord, read_llava, write_llava
from .refer import RefRecord, convert_refcoco, read_refcoco, write_refcoco
from .shards import ShardSample, list_shards, read_shard, read_shards, write_shard
from .vqa import GQARecord, VQARecord, read_gqa, read_vqav2, write_gqa, write_vqav2

__all__ = [
    "DataFormatError", "encode_image", "open_image", "resolve_under", "save_image",
    "ShardSample", "write_shard", "read_shard", "read_shards", "list_shards",
    "AlignRecord", "ALIGN_FILE", "ALIGN_IMAGE_DIR", "write_cc_sbu_align", "read_cc_sbu_align",
    "ConversationRecord", "write_llava", "read_llava",
    "VQARecord", "write_vqav2", "read_vqav2", "GQARecord", "write_gqa", "read_gqa",
    "RefRecord", "write_refcoco", "read_refcoco", "convert_refcoco",
    "VSRRecord", "write_vsr", "read_vsr", "IconQARecord", "write_iconqa", "read_iconqa",
    "VizWizRecord", "write_vizwiz", "read_vizwiz", "MemeRecord", "write_hateful_memes", "read_hateful_memes",
]
