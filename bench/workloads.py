"""The user code every system runs: the same preprocess, models and postprocess, by import path.

*single*: ``tokenize`` (pure-Python, CPU-bound) -> ``build_classifier`` (a small transformer
encoder) -> ``top_k``. *chain*: ``tokenize`` -> ``build_embedder`` -> ``build_classifier_head``
-> (``rerank_input``) -> ``build_reranker`` -> ``top_k``. *device_single* and *device_chain*:
the same shapes, each model on a simulated device (``SimulatedDevice``: a lock per device,
held for a fixed time per row in ``time.sleep``, which uses no CPU and releases the GIL, around
a tiny real layer), the paper's shape of CPU work beside accelerators. *straggler*: no
preprocess (numeric features) -> ``build_sleep_model``, which sleeps per row, twice as long
where ``ANTBATCH_BENCH_SLOWDOWN=2``: a throttled worker without CPU contention.

Weights are seeded, so every system scores the same model. Importing this module registers
the ``latency://`` filesystem, so any process that loads these functions can read the input.
"""

from __future__ import annotations

import os
import threading
import time
import unicodedata
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import bench.latencyfs  # noqa: F401  (registers latency://)
from bench.vocab import CLS_ID, PAD_ID, UNK_ID, VOCAB_SIZE, wordpiece_vocab

if TYPE_CHECKING:
    from collections.abc import Callable

    import pyarrow as pa

MAX_TOKENS = 128  # [CLS] + at most 127 word pieces
MAX_PIECE_CHARS = 12
D_MODEL = 64
HEADS = 4
LAYERS = 1
FEEDFORWARD = 256
NUM_CLASSES = 10
HEAD_HIDDEN = 1024
SLEEP_PER_ROW_S = 0.001  # the straggler model's cost per row at full speed
# A simulated device's time per row; the harness sizes it to the tokenizer's time per row.
DEVICE_S_PER_ROW_ENV = "ANTBATCH_BENCH_DEVICE_S_PER_ROW"
DEVICE_S_PER_ROW_DEFAULT = 0.0008
# Each workload's model builders (names in this module), in chain order.
MODELS = {
    "single": ("build_classifier",),
    "chain": ("build_embedder", "build_classifier_head", "build_reranker"),
    "device_single": ("build_device_classifier",),
    "device_chain": ("build_device_embedder", "build_device_head", "build_device_reranker"),
}
CHAIN_STAGES = ("embed", "classify", "rerank")  # the stage names of a three-model chain


# -- preprocess --------------------------------------------------------------------------------


def _is_control(char: str) -> bool:
    if char in "\t\n\r":
        return False
    return unicodedata.category(char).startswith("C")


def _is_cjk(code: int) -> bool:
    return (
        0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x2FA1F
    )


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def basic_split(text: str) -> list[str]:
    """BERT's basic tokenizer, pass for pass as the reference (slow) implementation does it.

    Clean control characters, space out CJK characters, split on whitespace, lowercase and
    strip accents word by word, split on punctuation.
    """
    cleaned = []
    for char in text:
        code = ord(char)
        if code == 0 or code == 0xFFFD or _is_control(char):
            continue
        cleaned.append(" " if char.isspace() else char)
    spaced = [f" {char} " if _is_cjk(ord(char)) else char for char in cleaned]
    out: list[str] = []
    for word in "".join(spaced).split():
        word = unicodedata.normalize("NFD", word.lower())
        word = "".join(c for c in word if unicodedata.category(c) != "Mn")
        current: list[str] = []
        for char in word:
            if _is_punctuation(char):
                if current:
                    out.append("".join(current))
                    current = []
                out.append(char)
            else:
                current.append(char)
        if current:
            out.append("".join(current))
    return out


def word_pieces(word: str, vocab: dict[str, int]) -> list[int]:
    """Greedy longest-match-first WordPiece, as in BERT; a word with no match is [UNK]."""
    pieces: list[int] = []
    start = 0
    while start < len(word):
        end = min(len(word), start + MAX_PIECE_CHARS)
        found = None
        while start < end:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            found = vocab.get(piece)
            if found is not None:
                break
            end -= 1
        if found is None:
            return [UNK_ID]
        pieces.append(found)
        start = end
    return pieces


def token_ids(text: str) -> list[int]:
    vocab = wordpiece_vocab()
    ids = [CLS_ID]
    for word in basic_split(text):
        ids.extend(word_pieces(word, vocab))
        if len(ids) >= MAX_TOKENS:
            return ids[:MAX_TOKENS]
    return ids


def tokenize(batch: pa.RecordBatch) -> dict[str, torch.Tensor]:
    """WordPiece-tokenise the ``text`` column and pad to the batch's longest row."""
    rows = [token_ids(text) for text in batch.column("text").to_pylist()]
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


# -- models ------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Token + position embeddings, a transformer encoder, mean pooling over real tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB_SIZE, D_MODEL, padding_idx=PAD_ID)
        self.positions = nn.Embedding(MAX_TOKENS, D_MODEL)
        layer = nn.TransformerEncoderLayer(
            D_MODEL, HEADS, dim_feedforward=FEEDFORWARD, dropout=0.0, batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)[None]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TextClassifier(nn.Module):
    """*single*'s model: the encoder and a linear layer to the classes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = TextEncoder()
        self.head = nn.Linear(D_MODEL, NUM_CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))  # type: ignore[no-any-return]


class ClassifierHead(nn.Module):
    """*chain*'s second model: an MLP on the embedding; hands the embedding on with its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(D_MODEL, HEAD_HIDDEN),
            nn.GELU(),
            nn.Linear(HEAD_HIDDEN, HEAD_HIDDEN),
            nn.GELU(),
            nn.Linear(HEAD_HIDDEN, HEAD_HIDDEN),
            nn.GELU(),
            nn.Linear(HEAD_HIDDEN, NUM_CLASSES),
        )

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": embedding, "logits": self.mlp(embedding)}


class Reranker(nn.Module):
    """*chain*'s third model: rescored classes from the embedding and the classifier's logits."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(D_MODEL + NUM_CLASSES, HEAD_HIDDEN),
            nn.GELU(),
            nn.Linear(HEAD_HIDDEN, HEAD_HIDDEN),
            nn.GELU(),
            nn.Linear(HEAD_HIDDEN, HEAD_HIDDEN),
            nn.GELU(),
            nn.Linear(HEAD_HIDDEN, NUM_CLASSES),
        )

    def forward(self, embedding: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([embedding, logits], dim=1)) + logits  # type: ignore[no-any-return]


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def build_classifier() -> nn.Module:
    return _seeded(TextClassifier, 1)


def build_embedder() -> nn.Module:
    return _seeded(TextEncoder, 2)


def build_classifier_head() -> nn.Module:
    return _seeded(ClassifierHead, 3)


def build_reranker() -> nn.Module:
    return _seeded(Reranker, 4)


# -- simulated devices ---------------------------------------------------------------------------

_DEVICES = [threading.Lock() for _ in CHAIN_STAGES]  # one per simulated device, per process


def device_s_per_row() -> float:
    """The simulated devices' time per row, from the environment the harness sets."""
    return float(os.environ.get(DEVICE_S_PER_ROW_ENV) or DEVICE_S_PER_ROW_DEFAULT)


class SimulatedDevice(nn.Module):
    """A model on a simulated accelerator: holds device ``device`` for ``rows x s_per_row`` seconds
    per call without using the CPU (``time.sleep`` releases the GIL), running its tiny real layer
    meanwhile, so two calls on one device never overlap and calls on different devices do."""

    def __init__(self, device: int, inner: nn.Module) -> None:
        super().__init__()
        self.device = device
        self.inner = inner
        self.s_per_row = device_s_per_row()

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        rows = next(iter((*args, *kwargs.values()))).shape[0]
        with _DEVICES[self.device]:
            started = time.perf_counter()
            out = self.inner(*args, **kwargs)
            time.sleep(max(0.0, self.s_per_row * rows - (time.perf_counter() - started)))
        return out


class BagEncoder(nn.Module):
    """Mean of token embeddings over real tokens: a layer so cheap that the device's time is the cost."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB_SIZE, width, mode="sum", padding_idx=PAD_ID)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bag(input_ids) / attention_mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)  # type: ignore[no-any-return]


class LinearHead(nn.Module):
    """*device_chain*'s second model: logits from the embedding, the embedding handed on."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D_MODEL, NUM_CLASSES)

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": embedding, "logits": self.linear(embedding)}


class LinearReranker(nn.Module):
    """*device_chain*'s third model: rescored classes from the embedding and the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D_MODEL + NUM_CLASSES, NUM_CLASSES)

    def forward(self, embedding: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([embedding, logits], dim=1)) + logits  # type: ignore[no-any-return]


def build_device_classifier() -> nn.Module:
    return SimulatedDevice(0, _seeded(lambda: BagEncoder(NUM_CLASSES), 5))


def build_device_embedder() -> nn.Module:
    return SimulatedDevice(0, _seeded(lambda: BagEncoder(D_MODEL), 6))


def build_device_head() -> nn.Module:
    return SimulatedDevice(1, _seeded(LinearHead, 7))


def build_device_reranker() -> nn.Module:
    return SimulatedDevice(2, _seeded(LinearReranker, 8))


def build_models(workload: str) -> list[nn.Module]:
    """The workload's models, in chain order (one for a single model)."""
    try:
        names = MODELS[workload]
    except KeyError:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(MODELS)}") from None
    return [globals()[name]() for name in names]


def rerank_input(previous: dict[str, torch.Tensor], batch: pa.RecordBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter: the reranker is called as model(embedding, logits)."""
    return previous["embedding"], previous["logits"]


def run_chain(models: list[nn.Module], inputs: dict[str, torch.Tensor], batch: pa.RecordBatch) -> torch.Tensor:
    """The chain by hand, with the same calling convention as the worker (for the naive loop and the bound)."""
    embedder, head, reranker = models
    return reranker(*rerank_input(head(embedder(**inputs)), batch))  # type: ignore[no-any-return]


# -- postprocess -------------------------------------------------------------------------------


def top_k(output: torch.Tensor, batch: pa.RecordBatch) -> dict[str, Any]:
    """The best class, its probability, and the three best classes."""
    probs = torch.softmax(output.float(), dim=1)
    scores, classes = probs.topk(3, dim=1)
    return {"top_class": classes[:, 0], "top_score": scores[:, 0], "top3": classes}


# -- straggler ---------------------------------------------------------------------------------


class SleepModel(nn.Module):
    """Costs ``SLEEP_PER_ROW_S`` per row times ``ANTBATCH_BENCH_SLOWDOWN``, and no CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.slowdown = float(os.environ.get("ANTBATCH_BENCH_SLOWDOWN") or 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(SLEEP_PER_ROW_S * self.slowdown * x.shape[0])
        return x[:, :1] * 2.0


def build_sleep_model() -> nn.Module:
    return SleepModel()
