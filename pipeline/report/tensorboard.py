"""TensorBoard scalars for every number in a metrics record, under RUN/tb/.

Names follow the record's nesting with "/" (`val/span`, `weights/countdown`,
`span/window_f1`, `type/recall/0`), so TensorBoard groups them by section; the global step is
the epoch. S3 run directories: TensorBoard's writer needs a local directory, so events are
written to a local temporary directory and the (small) event files are uploaded to RUN/tb/ after
every epoch, so a reader of the bucket never waits for the end of the run.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from pipeline import storage

TB_DIR = "tb"
SKIP = {"epoch", "run_id"}  # the step itself; not a number


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a (nested) record as {"a/b": value}; bools, strings, None skipped."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in SKIP:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            out.update(scalars({str(i): v for i, v in enumerate(value)}, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class TensorBoardLog:
    def __init__(self, run_dir: str):
        from torch.utils.tensorboard import SummaryWriter  # torch is loaded in the worker anyway

        self.uri = storage.join(run_dir, TB_DIR)
        self.remote = storage.is_s3(run_dir)
        self.local = tempfile.mkdtemp(prefix="moola-tb-") if self.remote else self.uri
        self.writer = SummaryWriter(log_dir=self.local, flush_secs=3600)

    def write(self, record: dict) -> int:
        """Add the record's scalars at step = epoch; flush (and upload). Returns the count."""
        step = int(record.get("epoch", 0))
        values = scalars(record)
        for name, value in values.items():
            # NaN/inf are kept: a non-finite loss is exactly what a reader must see
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        if self.remote:
            self._upload()
        return len(values)

    def _upload(self) -> None:
        for name in os.listdir(self.local):
            storage.upload_file(os.path.join(self.local, name), storage.join(self.uri, name))

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            self._upload()
            shutil.rmtree(self.local, ignore_errors=True)
