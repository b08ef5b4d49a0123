"""Where an Optuna study lives: a sqlite file, so a sweep that crashes or is stopped continues.

``conf/hparams_search/*.yaml`` build the sweeper's ``storage`` with ``sqlite_storage``; the
sweeper opens the study with ``load_if_exists=True``, so running the same command again adds
trials to the same study instead of starting over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def sqlite_storage(path: str) -> Any:
    """An ``optuna.storages.RDBStorage`` on the sqlite file ``path`` (its folder is created).

    optuna 2.x (the version hydra-optuna-sweeper 1.3 allows) needs SQLAlchemy < 2 for this; the
    ``sweep`` extra pins it.
    """
    try:
        import sqlalchemy
        from optuna.storages import RDBStorage
    except ImportError as error:
        raise ImportError(f"the Optuna study storage needs optuna and SQLAlchemy ({error}); "
                          'install them with pip install "dac-detr[sweep]"') from error
    if int(sqlalchemy.__version__.split(".")[0]) >= 2:
        raise RuntimeError(
            f"optuna {_optuna_version()} cannot create its sqlite tables with SQLAlchemy "
            f"{sqlalchemy.__version__}; install SQLAlchemy<2 (pip install \"dac-detr[sweep]\"), or keep the "
            "study in memory with hydra.sweeper.storage=null (it is then lost when the sweep stops)"
        )
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return RDBStorage(f"sqlite:///{file}")


def _optuna_version() -> str:
    import optuna

    return optuna.__version__
