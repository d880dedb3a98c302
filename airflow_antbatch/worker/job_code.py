"""The job's user code, loaded once per worker: preprocess, the model stages and postprocess."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from airflow_antbatch.spec import ModelStage
from airflow_antbatch.worker.inference import NumericFeatures, OutputAssembler
from airflow_antbatch.worker.model_stage import ModelRunner
from airflow_antbatch.worker.user_code import load_callable, load_model

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from airflow_antbatch.spec import JobSpec
    from airflow_antbatch.worker.inference import Postprocess, Preprocess


@dataclasses.dataclass
class JobCode:
    """What the pipeline runs.

    ``preprocess_ref`` is the hook's import path: with it, preprocessing runs in child
    processes that import it themselves. Without it (the default numeric features, or a
    function handed over in plain Python), ``preprocess`` runs in a thread of the worker.
    """

    runners: list[ModelRunner]
    assembler: OutputAssembler
    preprocess: Preprocess
    preprocess_ref: str | None = None

    @classmethod
    def load(cls, spec: JobSpec) -> JobCode:
        """Import everything before any shard is claimed, so a typo fails fast and holds no lease."""
        options = dict(spec.storage_options)
        runners = [
            ModelRunner(
                stage,
                load_model(stage.model, device=stage.device or "cpu", storage_options=options),
                load_callable(stage.adapter, f"stage {stage.name!r} adapter") if stage.adapter else None,
            )
            for stage in spec.model_stages
        ]
        assembler = OutputAssembler(
            postprocess=load_callable(spec.postprocess, "postprocess hook") if spec.postprocess else None,
            id_column=spec.id_column,
            keep_columns=spec.keep_columns,
        )
        if spec.preprocess:
            return cls(runners, assembler, load_callable(spec.preprocess, "preprocess hook"), spec.preprocess)
        return cls(runners, assembler, NumericFeatures(assembler.passthrough))

    @classmethod
    def in_process(
        cls,
        model: torch.nn.Module,
        *,
        preprocess: Preprocess | None = None,
        postprocess: Postprocess | None = None,
        id_column: str | None = None,
        keep_columns: Sequence[str] = (),
        device: str = "cpu",
        batch_size: int = 256,
    ) -> JobCode:
        """One model and hooks given as Python objects (tests, notebooks): everything runs in threads."""
        assembler = OutputAssembler(postprocess=postprocess, id_column=id_column, keep_columns=keep_columns)
        runner = ModelRunner(
            ModelStage(name="model", model="<in-process>", device=device, batch_size=batch_size), model
        )
        return cls([runner], assembler, preprocess or NumericFeatures(assembler.passthrough))
