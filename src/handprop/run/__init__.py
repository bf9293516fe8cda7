"""handprop.run: training one config into a run folder, and reading run folders.

========================  =============================================================
``build``                 config -> split, network, optimizer; the :class:`Run` state
``fit``                   the loop: :func:`fit`, :func:`run_epoch`, the divergence guard
``callbacks``             the jobs at an epoch's end: evaluation, early stopping, ...
``checkpoint``            checkpoint.npz: written at epoch ends, read to resume
``train``                 the entry points :func:`train_run` and :func:`resume_run`
``writer`` / ``reader``   a run folder's files, written / read back
``claim``                 making a run folder, owning and locking it
``diagnostics``           per-layer norms and unit health (diagnostics.csv)
========================  =============================================================
"""

from handprop.run.build import Run, Split, build_network, build_run, load_split
from handprop.run.callbacks import EarlyStopping
from handprop.run.checkpoint import CHECKPOINT_SECONDS
from handprop.run.fit import fit, run_epoch
from handprop.run.train import RunResult, resume_run, train_run
from handprop.run.writer import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    SPLIT_FILE,
    is_complete,
)

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_SECONDS",
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "SPLIT_FILE",
    "EarlyStopping",
    "Run",
    "RunResult",
    "Split",
    "build_network",
    "build_run",
    "fit",
    "is_complete",
    "load_split",
    "resume_run",
    "run_epoch",
    "train_run",
]
