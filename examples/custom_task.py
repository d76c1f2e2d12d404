"""Your own fusion network and task: a frozen classifier decides what the fusion must keep.

Synthetic data: source a shows a class-dependent bright square, source b only texture; the
classifier reads the class, so the learned loss comes to favour a (mean w_a > 0.5).
Run: python examples/custom_task.py [epochs]
"""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdfusion import LossGenerator, MetaFusionTrainer


class ConvFusion(nn.Module):  # any module mapping (a, b) -> fused image works
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 1, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(torch.cat([a, b], dim=1)))


generator = torch.Generator().manual_seed(0)
labels = torch.randint(0, 2, (64,), generator=generator)
a = torch.rand(64, 1, 32, 32, generator=generator) * 0.2
a[labels == 1, :, 8:24, 8:24] += 0.7  # class 1 shows a bright square in source a only
b = torch.rand(64, 1, 32, 32, generator=generator)
loader = DataLoader(TensorDataset(a, b, labels), batch_size=8, shuffle=True, generator=generator)

classifier = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 2))
with torch.no_grad():  # a fixed "pretrained" classifier: brightness of the centre
    classifier[2].weight.zero_()
    classifier[2].weight[1, [5, 6, 9, 10]] = 10.0
    classifier[2].bias.copy_(torch.tensor([0.0, -14.0]))
classifier.requires_grad_(False)  # frozen: a fixed task, the trainer does not train it


def task_loss(fused: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(classifier.to(fused.device)(fused), labels)


generator_net = LossGenerator(dim=8, num_heads=4)
trainer = MetaFusionTrainer(
    ConvFusion(), task_loss, generator_net, inner_lr=0.1, generator_lr=0.01, fusion_lr=1e-2
)
trainer.fit(loader, epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 2, meta_steps=4)
with torch.no_grad():
    weights = trainer.loss_generator(a[:8].to(trainer.device), b[:8].to(trainer.device))
if trainer.is_main_process:  # under torchrun --nproc_per_node=N, print once
    print(f"mean w_a after training: {weights[:, 0].mean().item():.3f}")
