"""The console side of genlab's log (conf/hydra/job_logging/genlab.yaml)."""

from __future__ import annotations

import logging

from tqdm import tqdm


class ConsoleHandler(logging.StreamHandler):
    """Writes each log line above the progress bars on its stream instead of onto them.

    A plain StreamHandler writes at the cursor, which a progress bar leaves at the end of
    its own line: the per-epoch line would continue the bar's. ``tqdm.write`` clears the
    bars of the stream, writes the line and draws the bars again below it.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: a broken console never stops the run
            self.handleError(record)
