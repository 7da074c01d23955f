"""The data wing: records read from files (records.py, tables.py), tasks that encode them (tasks.py), batches
(batches.py), the embedded corpora (corpora.py) and the multitask file (task_files.py)."""

from .batches import Batch, Example, collate
from .records import Records, read_records
from .tasks import TaskEncoder, fill

__all__ = ["Batch", "Example", "Records", "TaskEncoder", "collate", "fill", "read_records"]
