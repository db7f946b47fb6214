"""tokenmill orchestration and shared plumbing: config, stores, checkpoints, the Prefect flow, the CLI."""
from pipeline import env as _env  # noqa: F401  (sets analytics/offline environment before anything imports dvc/prefect)
