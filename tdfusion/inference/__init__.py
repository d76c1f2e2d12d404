"""Inference: fusing pairs (in tiles when large, with colour), options, and loss-weight maps."""

from tdfusion.inference.acceleration import PRECISIONS, AcceleratedFusion, accelerate
from tdfusion.inference.colour import blend_chroma, merge_chroma, to_uint8
from tdfusion.inference.folders import FolderReport, fuse_folders
from tdfusion.inference.fuse import fuse_files, fuse_tensors, load_fusion_model, min_max_stretch
from tdfusion.inference.tiling import blend_window, fuse_in_tiles, tile_starts
from tdfusion.inference.weight_maps import colorize, loss_weights, overlay, save_weight_maps

__all__ = [
    "PRECISIONS",
    "AcceleratedFusion",
    "FolderReport",
    "accelerate",
    "blend_chroma",
    "blend_window",
    "colorize",
    "fuse_files",
    "fuse_folders",
    "fuse_in_tiles",
    "fuse_tensors",
    "load_fusion_model",
    "loss_weights",
    "merge_chroma",
    "min_max_stretch",
    "overlay",
    "save_weight_maps",
    "tile_starts",
    "to_uint8",
]
