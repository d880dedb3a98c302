"""User code of the GPU check (``bench.gpu``): models built in code, and the CPU-side decode.

- *images*: a ResNet-50 (bottleneck blocks 3-4-6-3, 25.6 M parameters) on 224x224 images
  stored as deflate-coded pixels, as PNG stores them, and decoded on the CPU by the preprocess
  (``decode_images``); the model normalises on the device.
- *text*: a BERT-base-sized encoder (12 layers, width 768, 12 heads, 110 M parameters) on the
  bench's WordPiece tokenizer (``bench.workloads.tokenize``), mean-pooled into a classifier.

``ANTBATCH_GPU_TINY=1`` (what ``--dry-run`` sets) builds each at toy size on 32x32 images, so the
whole check runs on a CPU in seconds. Factories read it because the worker builds models from
an import path, in its own process.
"""

from __future__ import annotations

import os
import zlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from bench.vocab import PAD_ID
from bench.workloads import MAX_TOKENS
from bench.workloads import tokenize as tokenize  # the text job's preprocess, re-exported by path

if TYPE_CHECKING:
    import pyarrow as pa

TINY_ENV = "ANTBATCH_GPU_TINY"
NUM_CLASSES = 1000
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def tiny() -> bool:
    return os.environ.get(TINY_ENV) == "1"


def image_side() -> int:
    return 32 if tiny() else 224


# -- images ----------------------------------------------------------------------------------


def encode_image(rng: np.random.Generator, side: int) -> bytes:
    """A smooth synthetic picture (gradients, blobs, a little noise), deflate-coded like PNG."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    channels = []
    for _ in range(3):
        a, b, c = rng.random(3) * 6
        plane = 0.5 + 0.25 * np.sin(a * x + b * y + c) + 0.25 * np.cos((a + 1) * x * y)
        texture = np.kron(rng.normal(0, 0.05, size=(side // 4, side // 4)), np.ones((4, 4)))  # coarse grain
        channels.append(plane + texture)
    pixels = np.clip(np.stack(channels) * 255, 0, 255).astype(np.uint8)
    return zlib.compress(pixels.tobytes(), 6)


def decode_images(batch: pa.RecordBatch) -> torch.Tensor:
    """The preprocess: inflate each image on the CPU into one uint8 (N, 3, H, W) tensor."""
    side = image_side()
    images = batch.column("image").to_pylist()
    out = np.empty((len(images), 3, side, side), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(3, side, side)
    return torch.from_numpy(out)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    """ResNet-50's shape (torchvision's ``resnet50`` without the download), uint8 in."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, blocks: tuple[int, ...], base: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1) * 255)
        layers: list[nn.Module] = [
            nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        cin = base
        for stage, count in enumerate(blocks):
            width = base * 2**stage
            for index in range(count):
                layers.append(Bottleneck(cin, width, 2 if index == 0 and stage > 0 else 1))
                cin = width * 4
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        x = self.features(x.contiguous(memory_format=torch.channels_last))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))  # type: ignore[no-any-return]


def build_resnet50() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet((1, 1, 1, 1), 8) if tiny() else ResNet((3, 4, 6, 3), 64)
    return model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]


# -- text ------------------------------------------------------------------------------------


class BertClassifier(nn.Module):
    """BERT-base's encoder shape (post-norm, GELU), mean-pooled over real tokens, then a linear layer."""

    def __init__(self, layers: int, width: int, heads: int, vocab: int = 30_000) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width, padding_idx=PAD_ID)
        self.positions = nn.Embedding(MAX_TOKENS, width)
        self.norm = nn.LayerNorm(width)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.tokens(input_ids) + self.positions(positions)[None])
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * weights).sum(1) / weights.sum(1).clamp(min=1.0))  # type: ignore[no-any-return]


def build_bert_base() -> nn.Module:
    torch.manual_seed(0)
    model = BertClassifier(1, 32, 2) if tiny() else BertClassifier(12, 768, 12)
    return model.eval()


def top1(output: torch.Tensor, batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """The postprocess of both jobs: the predicted class, as the naive loop writes it."""
    return {"label": output.float().argmax(1).numpy()}
