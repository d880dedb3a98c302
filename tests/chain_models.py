"""A three-model chain for the pipeline tests: embedder -> classifier -> reranker.

The classifier passes the embedding on beside its logits, so that the reranker's adapter can
feed it both; every model is seeded, so a test can recompute the chain by hand.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from airflow_antbatch.examples.tabular import FEATURES


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return module.eval()


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(8, 3)

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": embedding, "logits": self.head(embedding)}


def build_embedder() -> torch.nn.Module:
    return _seeded(torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh()), 1)


def build_classifier() -> torch.nn.Module:
    return _seeded(Classifier(), 2)


def build_reranker() -> torch.nn.Module:
    return _seeded(torch.nn.Linear(8 + 3, 1), 3)


def rerank_input(previous: dict[str, torch.Tensor], batch: pa.RecordBatch) -> torch.Tensor:
    return torch.cat([previous["embedding"], previous["logits"]], dim=1)


def score_column(output: torch.Tensor, batch: pa.RecordBatch) -> dict[str, torch.Tensor]:
    return {"score": output[:, 0]}
