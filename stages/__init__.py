"""One module per DVC stage; `python -m stages.<name>` is the stage's DVC cmd and calls its `run(cfg)`."""
