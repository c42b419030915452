"""The ``xmc-dst`` command line: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    xmc-dst fit --config configs/raw-text.yaml                       # train (and test: test_after_fit in the yaml)
    xmc-dst test --config configs/raw-text.yaml --ckpt_path best.ckpt
    xmc-dst predict --config configs/raw-text.yaml --ckpt_path best.ckpt --data.init_args.predict_file docs.txt

The DataModule is chosen in yaml (``data: {class_path, init_args}``); the model's label count, tokenizer and
bag-of-words width come from it by argument links (applied when the DataModule has been built), so they are never
written twice. Every run logs to CSV (``<save_dir>/<name>/version_<n>/metrics.csv``), shows a rich progress bar and
ends ``test``/``validate`` with a rich table of the metrics. Model selection and early stopping follow ``monitor``
(default ``val/P@3``, as the authors).

Resuming: ``last.ckpt`` is written every ``--last_checkpoint.every_n_train_steps`` optimizer steps (default 500),
also mid-epoch, atomically (:class:`callbacks.LastCheckpoint`); the checkpoint also holds the global random
states (:class:`callbacks.RandomStateCheckpoint`) and the training loader's position
(:class:`datamodules.base.ResumableDataLoader`, handed back by :class:`callbacks.RestoreLoaderPosition`).
``xmc-dst fit ... --ckpt_path last`` continues the newest run of the same logger ``save_dir``/``name`` in its own
version directory (the rows of ``metrics.csv`` up to the checkpoint kept, see :func:`callbacks.resume.keep_log_history`;
its ``config.yaml`` kept, the resumed run's beside it; best checkpoint kept) and trains as the uninterrupted run
would have. ``fit --ckpt_path CKPT --reinit_head true`` instead starts a new run from the checkpoint's encoder with
a new head (another label space); a checkpoint of another label set is refused otherwise.

Further subcommands that are not Lightning's (e.g. a memory estimate) go in :data:`EXTRA_SUBCOMMANDS`, directly
or with :func:`register_subcommand`: ``name -> (function, one-line help)``, where the function takes the remaining
arguments and returns an exit status, and may be given as ``"module:function"`` so that it is imported only when
its subcommand runs. :func:`main` dispatches them before the LightningCLI.

Errors: a bad value or file found by the project's code (a missing data directory, a fan-in wider than the head's
input, a cluster file for another label set) ends :func:`main` with exit status 2 and its own message on stderr,
``xmc-dst: error: ...``, even when jsonargparse wrapped it (see :func:`configuration_error`); :func:`cli` raises it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.oom import OutOfMemoryAdvisor
from callbacks.resume import LastCheckpoint, RandomStateCheckpoint, RestoreLoaderPosition, beside, keep_log_history
from datamodules.base import XMCDataModule
from xmc_dst.inference import JsonLinesPredictionWriter
from xmc_dst.model import CKPT_PATH_KEYWORDS, XMCModule, check_checkpoint, migrate_hparams, saved_hparams

__all__ = ["EXTRA_SUBCOMMANDS", "XMCLightningCLI", "cli", "configuration_error", "main", "metrics_table",
           "register_subcommand"]

log = logging.getLogger(__name__)

DEFAULT_MONITOR = "val/P@3"
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
               "init_args": {"save_dir": "logs", "name": "xmc-dst"}},
}

Subcommand = Callable[[list[str]], "int | None"]
EXTRA_SUBCOMMANDS: dict[str, tuple[Subcommand | str, str]] = {}


def register_subcommand(name: str, function: Subcommand | str, help: str = "") -> None:
    """Add a non-Lightning subcommand: ``xmc-dst <name> ...`` calls ``function(remaining argv)``; ``function`` may
    be a ``"module:function"`` string, imported when the subcommand runs."""
    if name in XMCLightningCLI.subcommands():
        raise ValueError(f"{name!r} is a Lightning subcommand")
    if isinstance(function, str) and ":" not in function:
        raise ValueError(f"expected 'module:function', got {function!r}")
    EXTRA_SUBCOMMANDS[name] = (function, help)


def _resolve_subcommand(function: Subcommand | str) -> Subcommand:
    if isinstance(function, str):
        module, _, attribute = function.partition(":")
        return getattr(importlib.import_module(module), attribute)
    return function


def _tokenizer_of(data: Any) -> str | None:
    return getattr(data, "tokenizer_name", None)


def _num_features_of(data: Any) -> int | None:
    return getattr(data, "num_features", None) if hasattr(type(data), "num_features") else None


def _num_lexical_features_of(data: Any) -> int | None:
    return getattr(data, "num_lexical_features", None)


def _get_key(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` of a jsonargparse Namespace or a dict, ``default`` when absent."""
    try:
        value = config[key] if isinstance(config, dict) else getattr(config, key)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def latest_version_with_last_checkpoint(save_dir: str | Path, name: str) -> int | None:
    """The ``version_<n>`` under ``save_dir/name`` whose ``checkpoints/last*.ckpt`` was written last, if any."""
    newest: tuple[float, int] | None = None
    for path in Path(save_dir, name).glob("version_*/checkpoints/last*.ckpt"):
        suffix = path.parent.parent.name.removeprefix("version_")
        if suffix.isdigit() and (newest is None or path.stat().st_mtime > newest[0]):
            newest = (path.stat().st_mtime, int(suffix))
    return None if newest is None else newest[1]


def _logger_init_args(config: Any) -> Any:
    """The ``init_args`` of the configured logger (None without one, or with ``logger: false``)."""
    return _get_key(_get_key(_get_key(config, "trainer"), "logger"), "init_args")


def resume_version(subcommand: str | None, config: Any) -> None:
    """``fit --ckpt_path last``: log to the version folder of the run being resumed (unless a version is given),
    where Lightning looks for ``last.ckpt`` and where the best-checkpoint state stays valid."""
    if subcommand != "fit" or _get_key(config, "ckpt_path") != "last":
        return
    init_args = _logger_init_args(config)
    if init_args is None or _get_key(init_args, "version") is not None:
        return
    save_dir, name = _get_key(init_args, "save_dir"), _get_key(init_args, "name")
    if save_dir is None or name is None:
        return
    version = latest_version_with_last_checkpoint(save_dir, str(name))
    if version is not None:
        init_args["version"] = version
        log.info("resuming %s/%s/version_%d from its last checkpoint", save_dir, name, version)


def _version_folder(config: Any) -> Path | None:
    """The CSV logger's version folder when the config names its version (else a new one is made)."""
    init_args = _logger_init_args(config)
    version = _get_key(init_args, "version")
    if init_args is None or version is None or _get_key(init_args, "save_dir") is None:
        return None
    folder = version if isinstance(version, str) else f"version_{version}"
    return Path(_get_key(init_args, "save_dir"), str(_get_key(init_args, "name", "")), folder)


def _check_trains_something(trainer: Any) -> None:
    """``fit`` with ``max_epochs 0`` (or ``max_steps 0``, ``limit_train_batches 0``) would end at once and test the
    untrained model as if it were a result."""
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        value = _get_key(trainer, key)
        if value is not None and not isinstance(value, bool) and value == 0:
            raise ValueError(f"--trainer.{key} {value}: fit would train nothing (and test_after_fit would report "
                             f"the untrained model); give a positive --trainer.{key}, or run test/predict with "
                             "--ckpt_path to evaluate a trained checkpoint")
    callbacks = _get_key(trainer, "callbacks") or []
    budget = any(str(_get_key(c, "class_path") or type(c).__name__).endswith("TrainingBudget") for c in callbacks)
    if _get_key(trainer, "max_epochs") == -1 and _get_key(trainer, "max_steps") in (None, -1) and not budget:
        raise ValueError("--trainer.max_epochs -1 without max_steps or a callbacks.TrainingBudget would never end: "
                         "give --trainer.max_epochs N (or keep the config's TrainingBudget callback)")


def check_writable(folder: str | Path, option: str) -> None:
    """Fail before anything is built when ``folder`` cannot be made or written: the nearest existing folder at or
    above it is a file, or this user cannot create a file there (tried, so read-only file systems count too)."""
    import tempfile

    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {folder} cannot be made: {existing} is a file, not a folder; pass a "
                                 f"folder to write to ({option} DIR)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PermissionError(f"{option} {folder} cannot be written ({existing}: {error.strerror}); pass a folder "
                              f"this user can write to ({option} DIR)") from None


def _check_output_folders(subcommand: str, config: Any) -> None:
    """The folders a subcommand writes to (logs, checkpoints, predictions), checked before the model is built."""
    trainer = _get_key(config, "trainer")
    folders = [(_get_key(_logger_init_args(config), "save_dir"), "--trainer.logger.init_args.save_dir"),
               (_get_key(trainer, "default_root_dir"), "--trainer.default_root_dir")]
    if subcommand == "fit":
        folders += [(_get_key(_get_key(config, "checkpoint"), "dirpath"), "--checkpoint.dirpath"),
                    (_get_key(_get_key(config, "last_checkpoint"), "dirpath"), "--last_checkpoint.dirpath")]
    if subcommand == "predict":
        output = _get_key(_get_key(config, "prediction_writer"), "output")
        folders.append((Path(output).parent if output else None, "--prediction_writer.output"))
    for folder, option in folders:
        if folder is not None:
            check_writable(folder, option)


def _name_run_after_own_folder(config: Any) -> None:
    """Name the logger's run after its data when the config leaves ``name`` null (a recipe shared by datasets): the
    named dataset's name, or the data folder's. A named dataset's config run on a user's own folder
    (``--data.data_dir``) is named after the folder, not the dataset (the DataModule also names its cache after the
    folder and skips the published statistics)."""
    from datamodules.named import NamedDataset

    data = _get_key(config, "data")
    class_path, data_dir = _get_key(data, "class_path"), _get_key(_get_key(data, "init_args"), "data_dir")
    init_args = _logger_init_args(config)
    if not isinstance(class_path, str) or init_args is None:
        return
    module, _, attribute = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError):
        return  # jsonargparse reports an unknown class itself
    named = isinstance(cls, type) and issubclass(cls, NamedDataset)
    own = named and (data_dir is None or cls.holds_own_data(data_dir))
    folder = Path(data_dir).expanduser().resolve().name if data_dir is not None else None
    name = _get_key(init_args, "name")
    if name is None:
        init_args["name"] = cls.default_name if own else (folder or "xmc-dst")
    elif named and not own and name == cls.default_name:
        init_args["name"] = folder
        log.info("%s is not %s's folder: runs are logged under %s", data_dir, cls.__name__, init_args["name"])


def _resumed_checkpoint(trainer: Trainer, ckpt_path: str) -> Path | None:
    """The file ``fit(ckpt_path=...)`` resumes from, when it continues the logger's version folder: ``last`` is
    that folder's newest ``last*.ckpt`` (or a checkpoint callback's, where it has its own folder)."""
    if ckpt_path != "last":
        return Path(ckpt_path) if Path(ckpt_path).is_file() else None
    folders = [Path(trainer.log_dir, "checkpoints")] if trainer.log_dir else []
    folders += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    found = [path for folder in folders for path in folder.glob("last*.ckpt") if not path.name.endswith(".partial")]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


@contextlib.contextmanager
def _removed_if_empty(trainer: Trainer) -> Iterator[None]:
    """A run that fails before it logged or saved anything leaves no version folder holding only its config: the
    folder this run created is removed again when it holds nothing but ``config.yaml``/``hparams.yaml``."""
    folder = Path(trainer.log_dir) if trainer.log_dir else None
    created = folder is not None and not folder.exists()
    try:
        yield
    except BaseException:
        if created and folder.is_dir() and trainer.is_global_zero and all(
                path.is_dir() or path.name in ("config.yaml", "hparams.yaml") for path in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s: the run failed before it logged anything", folder)
        raise


def metrics_table(metrics: dict[str, float], title: str) -> Any:
    """A rich table: one row per metric family (P, nDCG, PSP, PSnDCG), one column per k."""
    from rich.table import Table

    families: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        name = key.rsplit("/", 1)[-1]
        if "@" not in name:
            continue
        family, k = name.split("@", 1)
        if k.isdigit():
            families.setdefault(family, {})[int(k)] = float(value)
    ks = sorted({k for values in families.values() for k in values})
    table = Table(title=title)
    table.add_column("metric (%)", style="bold")
    for k in ks:
        table.add_column(f"@{k}", justify="right")
    for family in [f for f in ("P", "nDCG", "PSP", "PSnDCG") if f in families] + sorted(
            set(families) - {"P", "nDCG", "PSP", "PSnDCG"}):
        table.add_row(family, *[f"{families[family][k]:.2f}" if k in families[family] else "" for k in ks])
    return table


def keep_last_epoch(trainer: Trainer) -> None:
    """Without a validation loop there is nothing to select on: the checkpoint callback keeps the last epoch's
    weights (what ``test_after_fit`` then tests) instead of warning every epoch that ``monitor`` was never logged."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and not isinstance(callback, LastCheckpoint):
            callback.monitor = None
            callback.filename = "epoch{epoch:03d}-step{step}"


class XMCLightningCLI(LightningCLI):
    """LightningCLI with the data -> model links, checkpointing/early stopping on ``monitor``, a JSON-lines
    prediction writer, CSV logging and a rich progress bar by default, and an optional test after ``fit``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_data", True)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("prog", "xmc-dst")
        parser_kwargs.setdefault("description", "Extreme multi-label text classification with fixed fan-in sparse "
                                                "heads (dynamic sparse training).")
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--monitor", type=str, default=DEFAULT_MONITOR,
                            help="Metric (higher is better) for checkpoint selection and early stopping.")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="After fit, test the best checkpoint (the last weights without checkpointing).")
        parser.add_argument("--reinit_head", type=bool, default=False,
                            help="fit with --ckpt_path: a new run from the checkpoint's encoder (and intermediate "
                                 "layer) weights, with a head initialised afresh for this data's label set (transfer "
                                 "to another label space), instead of resuming.")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.mode": "max",
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-epoch{epoch:03d}-step{step}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.link_arguments("monitor", "checkpoint.monitor")
        # Always on: a periodic, atomically written last.ckpt that `fit --ckpt_path last` resumes from.
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({
            "early_stopping.mode": "max",
            "early_stopping.patience": 25,
            "early_stopping.min_delta": 0.005,  # the authors' 5e-5 on a 0-1 scale; metrics here are in percent
            "early_stopping.strict": False,  # no validation loop: never stops instead of failing
        })
        parser.link_arguments("monitor", "early_stopping.monitor")
        parser.add_lightning_class_args(JsonLinesPredictionWriter, "prediction_writer")
        # Always on: an out-of-memory error is re-raised with the breakdown by part and the knob to turn.
        parser.add_lightning_class_args(OutOfMemoryAdvisor, "oom_advisor")
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")
        parser.link_arguments("data", "model.tokenizer", compute_fn=_tokenizer_of, apply_on="instantiate")
        parser.link_arguments("data", "model.num_features", compute_fn=_num_features_of, apply_on="instantiate")
        parser.link_arguments("data", "model.num_lexical_features", compute_fn=_num_lexical_features_of,
                              apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Checks and names that must be settled before anything is built: a fit that would train nothing, folders
        that cannot be written, the run name of a user's folder under a named dataset's config, and (``fit
        --ckpt_path last``) the version folder of the run being resumed, whose files are kept."""
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        if self.subcommand == "fit":
            _check_trains_something(_get_key(config, "trainer"))
        elif _get_key(config, "reinit_head", False):
            raise ValueError(f"--reinit_head applies to fit only (it starts training from a checkpoint's encoder); "
                             f"{self.subcommand} needs the checkpoint of a run on this data's labels")
        _check_output_folders(self.subcommand, config)
        _name_run_after_own_folder(config)
        resume_version(self.subcommand, config)
        if self.subcommand == "fit":
            folder = _version_folder(config)
            if folder is not None and (folder / "config.yaml").exists():
                name = beside(folder / "config.yaml").name
                self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": name}
                log.info("continuing in %s: its config.yaml is kept, this run's is %s", folder, name)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the model's hyperparameters from ``--ckpt_path`` into the config; those of a checkpoint
        written before the head was a component are migrated first (:func:`xmc_dst.model.migrate_hparams`). A path
        that is not a readable checkpoint of this project fails here (:func:`xmc_dst.model.check_checkpoint`)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in CKPT_PATH_KEYWORDS:
            check_checkpoint(ckpt_path)  # missing, damaged or another program's: say so before anything is built
        if subcommand and _get_key(self.config[subcommand], "reinit_head", False):
            return  # a new run: the config builds the model, the checkpoint only lends its encoder's weights
        hparams = saved_hparams(ckpt_path) if ckpt_path and Path(ckpt_path).is_file() else None
        if not hparams:
            return
        hparams.pop("_instantiator", None)
        self.config = self.parser.parse_object({subcommand: {"model": migrate_hparams(hparams)}}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add what an exact resume needs (random states, the loader position) and a rich progress bar (unless the
        config has a progress bar or disables it)."""
        config = self._get(self.config_init, "trainer", default={}) or {}
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        for resume in (RandomStateCheckpoint, RestoreLoaderPosition):  # exact resume, always on
            if not any(isinstance(cb, resume) for cb in callbacks):
                callbacks.append(resume())
        if config.get("enable_progress_bar", True) is not False and not any(
                isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(RichProgressBar())
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        if not getattr(self.datamodule, "validates", True):
            keep_last_epoch(trainer)
        return trainer

    # The subcommands run these methods instead of the Trainer's (LightningCLI looks them up by name).

    def fit(self, **kwargs: Any) -> None:
        ckpt_path = kwargs.get("ckpt_path")
        if ckpt_path and self._get(self.config, "reinit_head", default=False):
            loaded = self.model.load_weights_except_head(ckpt_path)
            log.info("started from %d weights of %s; the head is new", len(loaded), ckpt_path)
            kwargs["ckpt_path"] = None
        start = 0
        if kwargs.get("ckpt_path"):
            path = _resumed_checkpoint(self.trainer, kwargs["ckpt_path"])
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True) if path else {}
            start = int(checkpoint.get("global_step", 0))
            if checkpoint:
                keep_log_history(self.trainer, checkpoint)
        with _removed_if_empty(self.trainer):
            self.trainer.fit(**kwargs)
        if not self.trainer.interrupted and self.trainer.global_step == start:
            print(f"xmc-dst: warning: fit trained no step (global step {self.trainer.global_step}, max_epochs="
                  f"{self.trainer.max_epochs}, max_steps={self.trainer.max_steps}): the weights are those of the "
                  "checkpoint or the initialisation", file=sys.stderr)
        if self._get(self.config, "test_after_fit", default=False) and not self.trainer.interrupted:
            callback = self.trainer.checkpoint_callback
            best = getattr(callback, "best_model_path", "") if callback is not None else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None,
                              verbose=False)
            self.print_metrics("test")

    def validate(self, **kwargs: Any) -> None:
        kwargs["verbose"] = False
        with _removed_if_empty(self.trainer):
            self.trainer.validate(**kwargs)
        self.print_metrics("val")

    def test(self, **kwargs: Any) -> None:
        kwargs["verbose"] = False
        with _removed_if_empty(self.trainer):
            self.trainer.test(**kwargs)
        self.print_metrics("test")

    def predict(self, **kwargs: Any) -> None:
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the writer has them; do not keep every batch in memory
        with _removed_if_empty(self.trainer):
            self.trainer.predict(**kwargs)

    def print_metrics(self, prefix: str) -> dict[str, float]:
        """Print the ``prefix/...`` metrics of the last run as a rich table (rank 0) and return them."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(f"{prefix}/")}
        if metrics and self.trainer.is_global_zero:
            from rich.console import Console

            name = type(self.datamodule).__name__ if self.datamodule is not None else ""
            Console().print(metrics_table(metrics, f"{'Test' if prefix == 'test' else 'Validation'} {name}"))
        return metrics


def cli(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> XMCLightningCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line (default ``sys.argv[1:]``)."""
    return XMCLightningCLI(XMCModule, XMCDataModule, args=None if args is None else list(args), run=run, **kwargs)


register_subcommand("estimate-memory", "xmc_dst.estimate:estimate_memory_main",
                    "predict training memory of a config, dense and sparse head side by side")
register_subcommand("data-info", "xmc_dst.data_info:data_info_main",
                    "statistics of a dataset folder (documents, labels, lengths) beside the published ones")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xmc-dst`` and ``python -m xmc_dst``."""
    given = argv is not None
    argv = list(argv if given else sys.argv[1:])
    if EXTRA_SUBCOMMANDS and argv and argv[0] in ("-h", "--help"):
        extra = "\n".join(f"  {name:<16} {help}" for name, (_, help) in sorted(EXTRA_SUBCOMMANDS.items()))
        print(f"Further subcommands:\n{extra}\n")
    try:
        if argv and argv[0] in EXTRA_SUBCOMMANDS:  # the same error handling as the Lightning subcommands
            function, _ = EXTRA_SUBCOMMANDS[argv[0]]
            return int(_resolve_subcommand(function)(argv[1:]) or 0)
        cli(argv if given else None)  # None: LightningCLI reads sys.argv itself
    except Exception as error:
        found = configuration_error(error)
        if found is None:
            raise
        print(_describe(found, error), file=sys.stderr)
        return 2
    return 0


# Where the project's own code lives: an error raised there with one of USER_ERRORS is a message for the user.
PROJECT_PACKAGES = tuple(Path(__file__).resolve().parents[1] / name for name in ("xmc_dst", "datamodules", "callbacks"))
# The kinds the project raises for a bad value or file (DataFormatError and ClusterFileError are ValueErrors, a
# missing data directory or cluster file a FileNotFoundError); anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _raised_at(error: BaseException) -> tuple[Path, int] | None:
    """File and line of the frame that raised ``error`` (its traceback's innermost frame)."""
    tb = error.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve(), tb.tb_lineno


def configuration_error(error: BaseException) -> BaseException | None:
    """The project's own message in ``error``'s chain, if any: the innermost :data:`USER_ERRORS` raised by the
    project's code. jsonargparse re-raises a DataModule's or callback's ``__init__`` error as ``ValueError: Does not
    validate against any of the Union subtypes ...`` *from* the original, which is the one the user needs to read."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        where = _raised_at(error)
        if isinstance(error, USER_ERRORS) and where is not None and any(
                where[0].is_relative_to(package) for package in PROJECT_PACKAGES):
            found = error
        error = error.__cause__ or error.__context__
    return found


def _describe(found: BaseException, error: BaseException) -> str:
    """``xmc-dst: error: <message>`` first, then where it was raised and what wrapped it (for a bug report)."""
    where = _raised_at(found)
    lines = [f"xmc-dst: error: {found}", f"  ({type(found).__name__}"
             + (f" raised at {where[0]}:{where[1]}" if where else "") + ")"]
    if error is not found:
        first_line = str(error).splitlines()[0] if str(error) else ""
        lines.append(f"  (wrapped as {type(error).__name__}: {first_line})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
