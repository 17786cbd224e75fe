"""Data: slides -> patches (`slides`), the patch index (`index`), feature storage (`features`), training samples (`datasets`),
streaming parquet shards (`shards`)."""
