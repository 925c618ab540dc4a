"""Generated datasets in the file formats LAVIS's recipes read (see ``synthetic``)."""

from aurora_pet.data.synthetic import (
    lavis_datasets_config,
    vocabulary,
    write_retrieval_dataset,
    write_vqa_dataset,
)

__all__ = ["lavis_datasets_config", "vocabulary", "write_retrieval_dataset", "write_vqa_dataset"]
