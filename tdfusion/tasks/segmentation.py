"""Semantic segmentation as the task network: SegFormer from segmentation-models-pytorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tdfusion.errors import DataError, OptionalDependencyError
from tdfusion.tasks.base import check_fused_image, evaluation_mode, pad_to_multiple

__all__ = ["SegmentationTask"]

INSTALL_HINT = "pip install 'tdfusion[seg]'"


def _build_segformer(
    encoder: str, in_channels: int, num_classes: int, decoder_channels: int
) -> nn.Module:
    try:
        import segmentation_models_pytorch as smp
    except ImportError as error:
        raise OptionalDependencyError(
            "the segmentation task needs segmentation-models-pytorch and timm, which could not be "
            f"imported ({error}); install them with: {INSTALL_HINT}"
        ) from error
    try:
        return smp.Segformer(
            encoder_name=encoder,
            encoder_weights=None,
            in_channels=in_channels,
            classes=num_classes,
            decoder_segmentation_channels=decoder_channels,
        )
    except KeyError as error:
        raise ValueError(
            f"unknown SegFormer encoder {encoder!r}; use an encoder name of "
            "segmentation-models-pytorch such as 'mit_b0'"
        ) from error


def _conv_output_side(side: int, conv: nn.Conv2d, dim: int) -> int:
    """Output length along ``dim`` (0 height, 1 width) of ``conv`` for an input ``side`` long."""
    if isinstance(conv.padding, str):  # "same" keeps the length, "valid" pads nothing
        if conv.padding == "same":
            return side
        padding = 0
    else:
        padding = conv.padding[dim]
    kernel = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
    return (side + 2 * padding - kernel) // conv.stride[dim] + 1


def _minimum_input_size(encoder: nn.Module) -> tuple[int, int]:
    """Smallest ``(H, W)`` an unpadded input may have for ``encoder`` to run.

    Worked out from the MiT (SegFormer) encoder's own layers: each stage ``i`` is an overlapping
    patch embedding ``patch_embed{i}.proj`` (a strided convolution) followed by blocks whose
    attention shrinks the keys with a spatial-reduction convolution ``attn.sr`` (kernel = stride
    = the stage's reduction ratio). A convolution needs its padded input at least as large as its
    kernel; for ``mit_b0`` .. ``mit_b5`` the binding one is the first stage's kernel-8 reduction
    at 1/4 scale, which gives 29 pixels per side. Encoders without these layers (not MiT) are not
    analysed and get ``(1, 1)``.
    """
    depth = int(getattr(encoder, "_depth", 5))
    stages: list[tuple[nn.Conv2d, list[nn.Conv2d]]] = []
    for stage in range(1, min(depth - 1, 4) + 1):  # smp runs stage i when depth >= i + 1
        embed = getattr(encoder, f"patch_embed{stage}", None)
        blocks = getattr(encoder, f"block{stage}", None)
        if not isinstance(getattr(embed, "proj", None), nn.Conv2d) or blocks is None:
            break
        reductions = [
            block.attn.sr
            for block in blocks
            if isinstance(getattr(getattr(block, "attn", None), "sr", None), nn.Conv2d)
        ]
        stages.append((embed.proj, reductions))

    def runs(side: int, dim: int) -> bool:
        for projection, reductions in stages:
            side = _conv_output_side(side, projection, dim)
            if side < 1 or any(_conv_output_side(side, sr, dim) < 1 for sr in reductions):
                return False
        return True

    # The output length of a convolution never decreases with its input's, so the first side that
    # runs is the minimum; MiT's is a few tens of pixels.
    return tuple(  # type: ignore[return-value]
        next(side for side in range(1, 1 << 16) if runs(side, dim)) for dim in (0, 1)
    )


class SegmentationTask(nn.Module):
    """SegFormer trained from scratch with pixel-wise cross-entropy (the paper's segmentation T).

    The network is ``segmentation_models_pytorch.Segformer`` with random initialisation
    (``encoder_weights=None``: nothing is downloaded). Images of any size are accepted (with
    ``pad=False``, of at least ``min_input_size``): by default the input is padded at the
    bottom/right to a multiple of 32 by edge replication and the logits are cropped back, then
    bilinearly resized to the mask size when it differs (the paper upsamples the logits to the
    label size).

    The research code's loss is ``pad=False, align_corners=True`` with masks at the dataset's
    full label resolution (e.g. 480 x 640 for MSRS while the task input is 240 x 320): the
    unpadded input goes through the network and the logits are upsampled to the label map with
    ``align_corners=True``.

    Parameters
    ----------
    num_classes : int
        Number of classes including background/unlabelled (MSRS 9, FMB 15).
    encoder : str
        segmentation-models-pytorch encoder; ``"mit_b0"`` is SegFormer-B0.
    in_channels : int
        Channels of the fused image (1 for the Y channel).
    ignore_index : int or None
        Mask value excluded from the loss (e.g. 255); ``None`` uses every pixel.
    decoder_channels : int
        Width of the all-MLP decoder (256 for SegFormer-B0).
    pad : bool
        Pad the input to a multiple of the encoder's stride (32). ``False`` feeds it as it is
        (the research code) and the logits, whose size may then differ from the input's by a
        few pixels, are resized. Unpadded, the MiT encoders need at least 29 pixels per side
        (their first stage's kernel-8 spatial-reduction convolution runs at 1/4 scale; see
        ``min_input_size``): smaller images raise ``ValueError``.
    align_corners : bool
        ``align_corners`` of the bilinear resizing of the logits to the mask size (the research
        code: ``True``).
    check_targets : bool
        Check that every mask value is a class index or ``ignore_index`` (one device-to-host
        synchronisation per call) and raise :class:`~tdfusion.errors.DataError` otherwise,
        instead of an opaque indexing error inside the loss.

    Shape
    -----
    - fused: ``(N, in_channels, H, W)``, floating point (values in [0, 1]).
    - masks: ``(N, H', W')``, integer class indices; ``(H', W')`` may differ from ``(H, W)``.
    - output of ``forward``: scalar; of ``predict``: ``(N, H, W)`` int64.

    Notes
    -----
    In training mode the MiT encoder applies stochastic depth (drop path 0.1), so two calls on the
    same input give different losses; use evaluation mode where a deterministic loss is needed
    (e.g. finite-difference checks). Requires the ``seg`` extra (timm and
    segmentation-models-pytorch).

    Example
    -------
    >>> task = SegmentationTask(num_classes=9)
    >>> fused = torch.rand(2, 1, 240, 320, requires_grad=True)
    >>> masks = torch.randint(0, 9, (2, 240, 320))
    >>> task(fused, masks).backward()
    >>> task.predict(fused).shape
    torch.Size([2, 240, 320])

    The research code's loss, at the full label resolution:

    >>> research = SegmentationTask(num_classes=9, pad=False, align_corners=True)
    >>> research(fused, torch.randint(0, 9, (2, 480, 640))).shape
    torch.Size([])
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str = "mit_b0",
        in_channels: int = 1,
        ignore_index: int | None = None,
        *,
        decoder_channels: int = 256,
        check_targets: bool = True,
        pad: bool = True,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.ignore_index = ignore_index
        self.check_targets = check_targets
        self.pad = bool(pad)
        self.align_corners = bool(align_corners)
        self.network = _build_segformer(encoder, in_channels, num_classes, decoder_channels)
        self.stride = int(self.network.encoder.output_stride)
        if not self.pad:  # smp refuses sizes that are not multiples of the stride
            self.network.requires_divisible_input_shape = False
        #: Smallest ``(H, W)`` the network accepts unpadded (only checked with ``pad=False``:
        #: padding makes every side a multiple of the stride, large enough for MiT).
        self.min_input_size = _minimum_input_size(self.network.encoder)

    def logits(self, fused: torch.Tensor) -> torch.Tensor:
        """Class scores at the input resolution.

        Parameters
        ----------
        fused : torch.Tensor
            Shape ``(N, in_channels, H, W)``.

        Returns
        -------
        torch.Tensor
            Shape ``(N, num_classes, H, W)``, unnormalised.
        """
        check_fused_image(fused, self.in_channels)
        return self._resize(self._network_logits(fused), fused.shape[-2:])

    def _network_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """The network's logits: at the input size when padded, about it otherwise."""
        if not self.pad:
            height, width = fused.shape[-2:]
            min_height, min_width = self.min_input_size
            if height < min_height or width < min_width:
                raise ValueError(
                    f"SegFormer with pad=False needs images of at least {min_height} x "
                    f"{min_width} pixels (H x W), got {height} x {width}; use larger images "
                    "or pad=True"
                )
            return self.network(fused)
        height, width = fused.shape[-2:]
        padded = pad_to_multiple(fused, self.stride, mode="replicate")
        return self.network(padded)[..., :height, :width]

    def _resize(self, logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        if logits.shape[-2:] == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, fused: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the SegFormer logits against ``masks``.

        Parameters
        ----------
        fused : torch.Tensor
            Shape ``(N, in_channels, H, W)``.
        masks : torch.Tensor
            Shape ``(N, H', W')``, integer class indices (``ignore_index`` allowed).

        Returns
        -------
        torch.Tensor
            Scalar loss, averaged over the pixels that are not ignored; ``0`` (with zero
            gradients) when every pixel of the batch is ``ignore_index``, where a plain mean
            would be ``0 / 0 = nan``.
        """
        check_fused_image(fused, self.in_channels)
        masks = self._check_masks(fused, masks)
        logits = self._resize(self._network_logits(fused), masks.shape[-2:])
        ignore_index = -100 if self.ignore_index is None else self.ignore_index
        total = F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum")
        # The count stays on the device (no synchronisation); clamped at 1 it leaves the mean
        # unchanged when some pixel is labelled and gives 0 when none is.
        labelled = (masks != ignore_index).sum().clamp(min=1)
        return total / labelled.to(total.dtype)

    def predict(self, fused: torch.Tensor) -> torch.Tensor:
        """Label maps, computed in evaluation mode without gradients.

        Parameters
        ----------
        fused : torch.Tensor
            Shape ``(N, in_channels, H, W)``.

        Returns
        -------
        torch.Tensor
            Shape ``(N, H, W)``, int64 class indices.
        """
        with evaluation_mode(self), torch.no_grad():
            return self.logits(fused).argmax(dim=1)

    def _check_masks(self, fused: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if not isinstance(masks, torch.Tensor) or masks.ndim != 3:
            shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks)
            raise ValueError(f"masks must be an integer tensor (N, H, W), got {shape}")
        if masks.is_floating_point() or masks.is_complex() or masks.dtype == torch.bool:
            raise ValueError(f"masks must hold integer class indices, got dtype {masks.dtype}")
        if masks.shape[0] != fused.shape[0]:
            raise ValueError(
                f"masks hold {masks.shape[0]} image(s) but fused holds {fused.shape[0]} "
                f"(masks {tuple(masks.shape)}, fused {tuple(fused.shape)})"
            )
        masks = masks.long()
        if self.check_targets:
            valid = (masks >= 0) & (masks < self.num_classes)
            if self.ignore_index is not None:
                valid |= masks == self.ignore_index
            if not bool(valid.all()):
                bad = torch.unique(masks[~valid])[:5].tolist()
                allowed = f"0..{self.num_classes - 1}"
                if self.ignore_index is not None:
                    allowed += f" or ignore_index {self.ignore_index}"
                raise DataError(
                    f"segmentation masks contain labels {bad}; expected {allowed} "
                    "(set ignore_index for void labels such as 255)"
                )
        return masks
