"""One module per DVC stage; `python -m stages.<name>` is the stage's DVC cmd and calls its `run(cfg)`."""
from pipeline import env as _env  # noqa: F401,E402  (environment before torch is imported)
