"""The ``xmc-dst`` command line: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    xmc-dst fit --config configs/debtags.yaml                       # train (and test: test_after_fit in the yaml)
    xmc-dst test --config configs/debtags.yaml --ckpt_path best.ckpt
    xmc-dst predict --config configs/debtags.yaml --ckpt_path best.ckpt --data.init_args.predict_file docs.txt

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
version directory (metrics appended, best checkpoint kept) and trains as the uninterrupted run would have.

Further subcommands that are not Lightning's (e.g. a memory estimate) go in :data:`EXTRA_SUBCOMMANDS`, directly
or with :func:`register_subcommand`: ``name -> (function, one-line help)``, where the function takes the remaining
arguments and returns an exit status, and may be given as ``"module:function"`` so that it is imported only when
its subcommand runs. :func:`main` dispatches them before the LightningCLI.

Errors: a bad value or file found by the project's code (a missing data directory, a fan-in wider than the head's
input, a cluster file for another label set) ends :func:`main` with exit status 2 and its own message on stderr,
``xmc-dst: error: ...``, even when jsonargparse wrapped it (see :func:`configuration_error`); :func:`cli` raises it.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.oom import OutOfMemoryAdvisor
from callbacks.resume import LastCheckpoint, RandomStateCheckpoint, RestoreLoaderPosition
from datamodules.base import XMCDataModule
from xmc_dst.inference import JsonLinesPredictionWriter
from xmc_dst.model import XMCModule, migrate_hparams, saved_hparams

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
        """``fit --ckpt_path last``: log to the version directory of the run being resumed (unless a version is
        given), where Lightning looks for ``last.ckpt`` and where the best-checkpoint state stays valid."""
        if self.subcommand != "fit" or _get_key(self.config[self.subcommand], "ckpt_path") != "last":
            return
        logger = _get_key(_get_key(self.config[self.subcommand], "trainer"), "logger")
        init_args = _get_key(logger, "init_args")
        if init_args is None or _get_key(init_args, "version") is not None:
            return
        save_dir, name = _get_key(init_args, "save_dir"), _get_key(init_args, "name")
        if save_dir is None or name is None:
            return
        version = latest_version_with_last_checkpoint(save_dir, str(name))
        if version is not None:
            init_args["version"] = version
            log.info("resuming %s/%s/version_%d from its last checkpoint", save_dir, name, version)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the model's hyperparameters from ``--ckpt_path`` into the config; those of a checkpoint
        written before the head was a component are migrated first (:func:`xmc_dst.model.migrate_hparams`)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
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
        return super().instantiate_trainer(**kwargs)

    # The subcommands run these methods instead of the Trainer's (LightningCLI looks them up by name).

    def fit(self, **kwargs: Any) -> None:
        self.trainer.fit(**kwargs)
        if self._get(self.config, "test_after_fit", default=False) and not self.trainer.interrupted:
            callback = self.trainer.checkpoint_callback
            best = getattr(callback, "best_model_path", "") if callback is not None else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None,
                              verbose=False)
            self.print_metrics("test")

    def validate(self, **kwargs: Any) -> None:
        kwargs["verbose"] = False
        self.trainer.validate(**kwargs)
        self.print_metrics("val")

    def test(self, **kwargs: Any) -> None:
        kwargs["verbose"] = False
        self.trainer.test(**kwargs)
        self.print_metrics("test")

    def predict(self, **kwargs: Any) -> None:
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # the writer has them; do not keep every batch in memory
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
    if argv and argv[0] in EXTRA_SUBCOMMANDS:
        function, _ = EXTRA_SUBCOMMANDS[argv[0]]
        return int(_resolve_subcommand(function)(argv[1:]) or 0)
    if EXTRA_SUBCOMMANDS and argv and argv[0] in ("-h", "--help"):
        extra = "\n".join(f"  {name:<16} {help}" for name, (_, help) in sorted(EXTRA_SUBCOMMANDS.items()))
        print(f"Further subcommands:\n{extra}\n")
    try:
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
