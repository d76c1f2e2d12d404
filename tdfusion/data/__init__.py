"""Data: image reading (Y channel and chroma), datasets, paired transforms, bundled sample."""

from tdfusion.data.datasets import (
    DetectionPairDataset,
    FMBDataset,
    LLVIPDataset,
    M3FDDataset,
    MSRSDataset,
    PairedImageDataset,
    SegmentationPairDataset,
)
from tdfusion.data.io import (
    read_image,
    read_luma,
    read_luma_pair,
    rgb_to_ycrcb,
    write_image,
    ycrcb_to_rgb,
)
from tdfusion.data.labels import read_mask, read_voc_boxes, read_yolo_boxes
from tdfusion.data.sample import sample_dataset, sample_folders, sample_root
from tdfusion.data.transforms import (
    Compose,
    RandomCrop,
    RandomExposure,
    RandomFlip,
    RandomHorizontalFlip,
    RandomVerticalFlip,
    Resize,
    SwapSources,
    detection_collate,
    segmentation_collate,
    swap_sources,
)

__all__ = [
    "Compose",
    "DetectionPairDataset",
    "FMBDataset",
    "LLVIPDataset",
    "M3FDDataset",
    "MSRSDataset",
    "PairedImageDataset",
    "RandomCrop",
    "RandomExposure",
    "RandomFlip",
    "RandomHorizontalFlip",
    "RandomVerticalFlip",
    "Resize",
    "SegmentationPairDataset",
    "SwapSources",
    "detection_collate",
    "read_image",
    "read_luma",
    "read_luma_pair",
    "read_mask",
    "read_voc_boxes",
    "read_yolo_boxes",
    "rgb_to_ycrcb",
    "sample_dataset",
    "sample_folders",
    "sample_root",
    "segmentation_collate",
    "swap_sources",
    "write_image",
    "ycrcb_to_rgb",
]
