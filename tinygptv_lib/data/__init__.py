"""Data for the course: a procedural shapes world and the on-disk formats of the real datasets.

    world     scenes of coloured shapes with exact ground truth, and every text made from them
    formats   readers/writers for webdataset shards, cc_sbu_align, LLaVA, VQAv2, GQA, RefCOCO,
              VSR, IconQA, VizWiz and Hateful Memes files
    generate  writes the shapes world in all those formats (python -m tinygptv_lib.data.generate)
"""
from .formats import DataFormatError
from .world import Scene, SceneObject, box_to_text, make_scene, parse_boxes

__all__ = ["DataFormatError", "Scene", "SceneObject", "box_to_text", "make_scene", "parse_boxes"]
