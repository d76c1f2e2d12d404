"""The learnable fusion loss against hand-computed values, and its functional/module forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tdfusion import LearnableFusionLoss
from tdfusion.losses import (
    gradient_loss,
    intensity_loss,
    learnable_fusion_loss,
    learnable_fusion_loss_terms,
    max_abs,
    max_abs_gradient,
    sobel,
)

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def reference_sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct per-pixel cross-correlation with zero padding, for comparison."""
    h, w = image.shape[-2:]
    padded = F.pad(image, (1, 1, 1, 1))
    gx = torch.zeros_like(image)
    gy = torch.zeros_like(image)
    for i in range(3):
        for j in range(3):
            window = padded[..., i : i + h, j : j + w]
            gx = gx + SOBEL_X[i, j] * window
            gy = gy + SOBEL_X.t()[i, j] * window
    return gx, gy


def test_sobel_matches_direct_cross_correlation_on_every_channel():
    image = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(3))
    gx, gy = sobel(image)
    ref_x, ref_y = reference_sobel(image)
    torch.testing.assert_close(gx, ref_x)
    torch.testing.assert_close(gy, ref_y)


def test_sobel_of_a_ramp_and_zero_padding_at_the_border():
    ramp = torch.arange(4.0).repeat(4, 1)[None, None]  # columns 0, 1, 2, 3
    gx, gy = sobel(ramp)
    assert gx[0, 0, 1, 1] == 8.0  # (2 - 0) * (1 + 2 + 1)
    assert gy[0, 0, 1, 1] == 0.0
    # Left border: the padded column is 0, so the response is 1 * (1 + 2 + 1) for rows inside.
    assert gx[0, 0, 1, 0] == 4.0
    # Top border: the padded row contributes nothing, so gy sees only the row below.
    assert gy[0, 0, 0, 1] == 1 * 0 + 2 * 1 + 1 * 2  # row 1 holds 0, 1, 2 under weights 1, 2, 1


def test_max_abs_keeps_sign_and_ties_go_to_first():
    first = torch.tensor([1.0, -3.0, 2.0, -2.0])
    second = torch.tensor([-2.0, 1.0, -2.0, 2.0])
    assert max_abs(first, second).tolist() == [-2.0, -3.0, 2.0, -2.0]
    with pytest.raises(ValueError, match="one shape"):
        max_abs(first, second[:3])


def test_loss_against_a_hand_computed_case():
    # a = 0 everywhere, b = 1 everywhere, fused = 0.25, w_a = 0.8, w_b = 0.2 on a 4x4 image.
    a = torch.zeros(1, 1, 4, 4)
    b = torch.ones(1, 1, 4, 4)
    fused = torch.full((1, 1, 4, 4), 0.25)
    weights = torch.cat([torch.full((1, 1, 4, 4), 0.8), torch.full((1, 1, 4, 4), 0.2)], dim=1)
    expected_intensity = 0.8 * 0.25**2 + 0.2 * 0.75**2
    # Sobel of a constant c with zero padding: only the border sees the step to 0. For the
    # gradient targets, a = 0 gives 0 and b = 1 gives the border responses of a constant 1,
    # so the target is b's response everywhere it is non-zero (|0| < |Sb|; where Sb = 0 the tie
    # goes to a, which is 0 as well).
    fused_x, fused_y = reference_sobel(fused)
    ones_x, ones_y = reference_sobel(b)
    expected_gradient = (fused_x - ones_x).abs().mean() + (fused_y - ones_y).abs().mean()
    terms = learnable_fusion_loss_terms(fused, a, b, weights, alpha=2.0)
    assert terms.intensity.item() == pytest.approx(expected_intensity)
    assert terms.gradient.item() == pytest.approx(expected_gradient.item())
    assert terms.total.item() == pytest.approx(expected_intensity + 2.0 * expected_gradient.item())
    assert learnable_fusion_loss(fused, a, b, weights, alpha=2.0).item() == pytest.approx(
        terms.total.item()
    )


def test_loss_equals_its_formula_on_random_images():
    generator = torch.Generator().manual_seed(7)
    a, b, fused = (torch.rand(3, 1, 11, 13, generator=generator) for _ in range(3))
    w_a = torch.rand(3, 1, 11, 13, generator=generator)
    weights = torch.cat([w_a, 1 - w_a], dim=1)
    ax, ay = reference_sobel(a)
    bx, by = reference_sobel(b)
    fx, fy = reference_sobel(fused)
    target_x = torch.where(ax.abs() >= bx.abs(), ax, bx)
    target_y = torch.where(ay.abs() >= by.abs(), ay, by)
    expected = (w_a * (fused - a) ** 2 + (1 - w_a) * (fused - b) ** 2).mean() + 0.5 * (
        (fx - target_x).abs().mean() + (fy - target_y).abs().mean()
    )
    loss = LearnableFusionLoss(alpha=0.5)(fused, a, b, weights)
    torch.testing.assert_close(loss, expected)


def test_squared_weighting_is_the_research_code_form():
    generator = torch.Generator().manual_seed(2)
    a, b, fused = (torch.rand(2, 1, 6, 6, generator=generator) for _ in range(3))
    w_a = torch.rand(2, 1, 6, 6, generator=generator)
    weights = torch.cat([w_a, 1 - w_a], dim=1)
    expected = F.mse_loss(w_a * (a - fused), torch.zeros_like(fused)) + F.mse_loss(
        (1 - w_a) * (b - fused), torch.zeros_like(fused)
    )
    torch.testing.assert_close(intensity_loss(fused, a, b, weights, "squared"), expected)
    assert LearnableFusionLoss(weighting="squared").terms(
        fused, a, b, weights
    ).intensity.item() == (pytest.approx(expected.item()))


def test_weights_equal_one_half_average_the_sources_errors():
    a, b = torch.rand(1, 1, 5, 5), torch.rand(1, 1, 5, 5)
    fused = torch.rand(1, 1, 5, 5)
    half = torch.full((1, 2, 5, 5), 0.5)
    expected = 0.5 * ((fused - a) ** 2).mean() + 0.5 * ((fused - b) ** 2).mean()
    torch.testing.assert_close(intensity_loss(fused, a, b, half), expected)


def test_gradient_loss_is_zero_when_fused_has_the_strongest_gradients():
    a = torch.zeros(1, 1, 8, 8)
    a[..., :, 4:] = 1.0
    b = torch.rand(1, 1, 8, 8) * 0.01
    target_x, target_y = max_abs_gradient(a, b)
    # A fused image equal to a reproduces a's gradients; b's weak texture loses everywhere a has
    # an edge but wins elsewhere, so the loss is small but positive; fused = a + b*0 is not 0.
    assert gradient_loss(a, a, torch.zeros_like(a)).item() == 0.0
    assert gradient_loss(a, a, b).item() > 0.0
    assert target_x.shape == a.shape and target_y.shape == a.shape


def test_multichannel_images_broadcast_the_weights():
    a, b, fused = torch.rand(2, 3, 6, 6), torch.rand(2, 3, 6, 6), torch.rand(2, 3, 6, 6)
    w_a = torch.rand(2, 1, 6, 6)
    weights = torch.cat([w_a, 1 - w_a], dim=1)
    expected = (w_a * (fused - a) ** 2 + (1 - w_a) * (fused - b) ** 2).mean()
    torch.testing.assert_close(intensity_loss(fused, a, b, weights), expected)


@pytest.mark.parametrize(
    ("weights_shape", "message"),
    [((1, 1, 6, 6), r"\(N, 2, H, W\)"), ((1, 2, 5, 6), r"\(1, 2, 6, 6\)"), ((2, 2, 6, 6), "got")],
)
def test_bad_weights_shape_is_named(weights_shape, message):
    a = torch.rand(1, 1, 6, 6)
    with pytest.raises(ValueError, match=message):
        learnable_fusion_loss(a, a, a, torch.rand(*weights_shape))


def test_image_shape_mismatch_is_named():
    a = torch.rand(1, 1, 6, 6)
    with pytest.raises(
        ValueError, match=r"fused \(1, 1, 6, 6\), a \(1, 1, 6, 6\), b \(1, 1, 6, 7\)"
    ):
        learnable_fusion_loss(a, a, torch.rand(1, 1, 6, 7), torch.rand(1, 2, 6, 6))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        gradient_loss(a[0], a[0], a[0])


def test_unknown_weighting_is_rejected():
    with pytest.raises(ValueError, match="weighting"):
        LearnableFusionLoss(weighting="quadratic")


def test_loss_is_differentiable_in_fused_and_weights_in_float64():
    a = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    b = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    fused = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    loss_fn = lambda f, z: learnable_fusion_loss(f, a, b, z.softmax(1))  # noqa: E731
    assert torch.autograd.gradcheck(loss_fn, (fused, logits))
