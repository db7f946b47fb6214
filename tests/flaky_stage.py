"""Run a stage; its first run fails with a transient I/O error right after its first output shard is complete.

The `cmd` of a DVC stage in a throwaway project (tests/test_orchestration.py): the Prefect flow must retry the stage
and end with exactly the outputs of a clean run, nothing duplicated or left behind.
    python flaky_stage.py <marker file> <stage module> [stage args...]
The marker file records that the one failure has happened.
"""
import errno
import runpy
import sys
from pathlib import Path

marker, module = Path(sys.argv[1]), sys.argv[2]
sys.argv = [module] + sys.argv[3:]
if not marker.exists():
    marker.write_text("failed once\n")
    from pipeline import shards

    close = shards.ShardWriter._close

    def close_then_fail(self) -> None:
        close(self)
        if self.shards:  # a shard was just completed under its final name
            raise OSError(errno.EIO, "Input/output error (injected, transient)", str(self._final))

    shards.ShardWriter._close = close_then_fail
runpy.run_module(module, run_name="__main__", alter_sys=True)
