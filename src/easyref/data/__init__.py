"""Data: the demo dataset, ingestion of raw sources into a manifest of groups, group splits and the training dataset.

The pipeline is ``demo-data`` (or any real source) -> ``ingest`` -> ``manifest.parquet`` -> ``split`` ->
``train.parquet`` / ``held_in.parquet`` / ``held_out.parquet`` -> :class:`easyref.data.dataset.GroupDataset`, or
``pack`` -> training shards in a folder or on S3 -> :class:`easyref.data.shards.ShardDataset` (the same samples).
Modules import their heavy dependencies (torch, pyarrow, boto3) lazily, so the CLI starts quickly.
"""
