"""What a training run leaves in its WORKDIR, and the typed readers every stage uses.

    WORKDIR/config.json       the TrainConfig (`TrainConfig.to_dict`), written first
    WORKDIR/metrics.json      the final eval metrics and the per-unit rho_hat, written last
    WORKDIR/export/           the SavedModel (trainer/export.py) with EXPORT_INFO beside it:
                              {"config", "image_shape", "label_names", "data", "step"}
    WORKDIR/filters.png, reconstructions.png

    cfg = artifacts.read_config(workdir)          # TrainConfig
    m = artifacts.read_metrics(workdir)           # Metrics: m.loss, m.step, m.rho_hat, ...
    info = artifacts.read_export_info(export_dir) # ExportInfo: info.config.rho, ...

No TensorFlow here (readers such as `sae run`'s report and `sae extract`'s launcher
start without it); storage goes through preprocessing/storage.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preprocessing import storage
from preprocessing.errors import UserError
from preprocessing.storage import join
from trainer import EXPORT_INFO
from trainer.config import TrainConfig

CONFIG = "config.json"
METRICS = "metrics.json"
FILTERS = "filters.png"
RECONSTRUCTIONS = "reconstructions.png"


def read_config(workdir: str) -> TrainConfig:
    """WORKDIR/config.json as a validated TrainConfig."""
    path = join(workdir, CONFIG)
    data = storage.read_json(
        path, missing=f"no training run at {workdir}: {path} is missing; run `sae train`"
    )
    return TrainConfig.from_dict(data)


def config_if_any(workdir: str) -> TrainConfig | None:
    """The run's config, or None when WORKDIR holds no run yet."""
    return read_config(workdir) if storage.exists(join(workdir, CONFIG)) else None


def write_config(workdir: str, cfg: TrainConfig) -> None:
    storage.publish_json(join(workdir, CONFIG), cfg.to_dict())


_REQUIRED = ("loss", "reconstruction", "mean_rho_hat", "dead_fraction",
             "fraction_variance_explained")  # fmt: skip


@dataclass(frozen=True)
class Metrics:
    """metrics.json: a split's final eval values (trainer/model.py `evaluate_metrics`), the
    step they were taken at and the per-unit mean activations rho_hat [s]."""

    values: dict[str, float]  # every scalar, by name (loss, reconstruction, sparsity, ...)
    step: int
    rho_hat: tuple[float, ...]

    @property
    def loss(self) -> float:
        """UFLDL's J over the whole split."""
        return self.values["loss"]

    @property
    def reconstruction(self) -> float:
        return self.values["reconstruction"]

    @property
    def mean_rho_hat(self) -> float:
        return self.values["mean_rho_hat"]

    @property
    def dead_fraction(self) -> float:
        return self.values["dead_fraction"]

    @property
    def fraction_variance_explained(self) -> float:
        return self.values["fraction_variance_explained"]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "metrics.json") -> Metrics:
        try:
            rho_hat = tuple(float(v) for v in d["rho_hat"])
            step = int(d["step"])
            values = {k: float(v) for k, v in d.items() if k not in ("rho_hat", "step")}
            missing = [k for k in _REQUIRED if k not in values]
            if missing:
                raise KeyError(", ".join(missing))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{where} is not a sae-pipeline metrics file ({type(e).__name__}: {e}); "
                "rerun `sae train`"
            ) from None
        return cls(values, step, rho_hat)

    def to_dict(self) -> dict[str, Any]:
        return {**self.values, "step": self.step, "rho_hat": list(self.rho_hat)}


def read_metrics(workdir: str) -> Metrics:
    path = join(workdir, METRICS)
    data = storage.read_json(
        path,
        missing=f"{path} is missing: the training run at {workdir} has not finished; "
        "run or resume `sae train`",
    )
    return Metrics.from_dict(data, path)


def write_metrics(workdir: str, metrics: Metrics) -> None:
    storage.publish_json(join(workdir, METRICS), metrics.to_dict())


def is_trained(workdir: str) -> bool:
    """metrics.json is written last: its presence means the run finished."""
    return storage.exists(join(workdir, METRICS))


@dataclass(frozen=True)
class ExportInfo:
    """EXPORT_INFO beside a SavedModel export."""

    config: TrainConfig
    image_shape: tuple[int, int, int]  # what `encode` takes
    label_names: tuple[str, ...]
    data: str  # the dataset it was trained on
    step: int

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = EXPORT_INFO) -> ExportInfo:
        try:
            h, w, c = (int(v) for v in d["image_shape"])
            return cls(
                TrainConfig.from_dict(d["config"]),
                (h, w, c),
                tuple(str(n) for n in d.get("label_names") or ()),
                str(d.get("data", "")),
                int(d.get("step", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{where} is not a sae-pipeline export description ({type(e).__name__}: {e}); "
                "rerun `sae train`"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "image_shape": list(self.image_shape),
            "label_names": list(self.label_names),
            "data": self.data,
            "step": self.step,
        }


def read_export_info(export_dir: str) -> ExportInfo:
    path = join(export_dir, EXPORT_INFO)
    data = storage.read_json(
        path, missing=f"{export_dir} has no {EXPORT_INFO}: not a `sae train` export"
    )
    return ExportInfo.from_dict(data, path)
