"""Runs left RUNNING by a process that died (SIGKILL, OOM killer, a lost VM) are ended KILLED.

Every run records the process that runs it (`pipeline.pid`, `pipeline.pid_start`,
`pipeline.host`, see `pipeline.lib.tracking.lineage`). Whenever a step opens the store, the
experiment's RUNNING runs started on this host are checked: a run whose process is gone (or
whose pid now belongs to a later process) is set KILLED and tagged `pipeline.ended_by`. Runs of
other hosts cannot be checked from here and are left alone.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from pipeline.lib.tracking.lineage import TAG_HOST, TAG_PID, TAG_PID_START, process_start

log = logging.getLogger(__name__)

TAG_ENDED_BY = "pipeline.ended_by"


def process_alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` still runs and is the one that started at `started` (see
    `lineage.process_start`; None: not checked)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    if started is not None:
        now = process_start(pid)
        return now is None or now == started
    return True


def dead_runs(client: Any, experiment_ids: list[str]) -> list[Any]:
    """The RUNNING runs of `experiment_ids` started on this host whose process is gone."""
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host}'",
        max_results=1000,
    )
    dead = []
    for run in runs:
        pid = run.data.tags.get(TAG_PID, "")
        if pid.isdigit() and not process_alive(int(pid), run.data.tags.get(TAG_PID_START)):
            dead.append(run)
    return dead


def end_dead_runs(client: Any, experiment_ids: list[str]) -> list[str]:
    """End KILLED every run of `experiment_ids` whose process died (see `dead_runs`); their ids."""
    ended = []
    for run in dead_runs(client, experiment_ids):
        pid = run.data.tags.get(TAG_PID)
        client.set_tag(
            run.info.run_id, TAG_ENDED_BY, f"its process {pid} on {socket.gethostname()} is gone"
        )
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning(
            "MLflow run %s (%s) was left RUNNING by process %s, which is gone: ended KILLED",
            run.info.run_id,
            run.info.run_name,
            pid,
        )
        ended.append(run.info.run_id)
    return ended
