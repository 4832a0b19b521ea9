"""Picks the tf.distribute strategy; one code path for 1 device, N devices, N workers.

    strategy = make_strategy("auto")        # first thing: before any other TF call
    with strategy.scope():
        model = build_model(config)

  auto         MultiWorkerMirroredStrategy when TF_CONFIG names more than one task;
               else MirroredStrategy over the GPUs when there are several, or over
               `cpu_replicas` logical CPUs when that is > 1; else the default strategy.
  default      the default (no-op) strategy: one device.
  mirrored     MirroredStrategy over all local GPUs, or over `cpu_replicas` logical CPUs.
  multiworker  MultiWorkerMirroredStrategy from TF_CONFIG (one worker without it).

`cpu_replicas=N` splits the CPU into N logical devices: useful to test the multi-replica
path without GPUs. Both it and MultiWorkerMirroredStrategy must come before TensorFlow
initializes its devices, i.e. before any op runs.

Only the chief writes final artifacts (`is_chief`); the other workers write to
`worker_temp_dir(workdir)`, which they may delete.
"""

from __future__ import annotations

import json
import os
import posixpath

import tensorflow as tf

from preprocessing.errors import UserError

STRATEGIES = ("auto", "default", "mirrored", "multiworker")


def _tf_config() -> dict:
    return json.loads(os.environ.get("TF_CONFIG") or "{}")


def num_workers() -> int:
    """Workers (chief included) in the cluster TF_CONFIG describes; 1 when there is none."""
    return max(1, _num_tasks(_tf_config()))


def _num_tasks(tf_config: dict) -> int:
    cluster = tf_config.get("cluster", {})
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def _split_cpu(n: int) -> list[str]:
    cpu = tf.config.list_physical_devices("CPU")[0]
    want = [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is None or len(current) != n:
        try:
            tf.config.set_logical_device_configuration(cpu, want)
        except RuntimeError as e:  # "Virtual devices cannot be modified after being initialized"
            raise RuntimeError(
                f"cannot split the CPU into {n} logical devices: TensorFlow has already "
                f"initialized its devices ({e}). Call make_strategy(..., cpu_replicas={n}) "
                "before any other TensorFlow operation."
            ) from None
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def make_strategy(name: str = "auto", cpu_replicas: int = 0) -> tf.distribute.Strategy:
    """The strategy called `name` (see the module docstring); unknown names raise UserError."""
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    if cpu_replicas < 0:
        raise UserError(f"invalid cpu_replicas={cpu_replicas}: expected an integer >= 0")
    multi_worker = _num_tasks(_tf_config()) > 1
    if name == "multiworker" or (name == "auto" and multi_worker):
        if cpu_replicas > 1:
            raise UserError(
                "cpu_replicas applies to one machine (mirrored); MultiWorkerMirroredStrategy "
                "uses one CPU device or all GPUs per worker"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "default":
        return tf.distribute.get_strategy()
    cpus = _split_cpu(cpu_replicas) if cpu_replicas > 1 else []
    gpus = tf.config.list_physical_devices("GPU")
    if name == "mirrored":
        # With GPUs present, MirroredStrategy() uses all of them; otherwise the logical CPUs.
        return tf.distribute.MirroredStrategy(None if gpus or not cpus else cpus)
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if cpus:
        return tf.distribute.MirroredStrategy(cpus)
    return tf.distribute.get_strategy()


def task() -> tuple[str, int]:
    """(task type, index) from TF_CONFIG; ("chief", 0) when running alone."""
    t = _tf_config().get("task", {})
    return t.get("type", "chief"), int(t.get("index", 0))


def is_chief() -> bool:
    """True for the task that writes final artifacts: type "chief", else worker 0."""
    tf_config = _tf_config()
    kind, index = task()
    if kind == "chief":
        return True
    has_chief = bool(tf_config.get("cluster", {}).get("chief"))
    return kind == "worker" and index == 0 and not has_chief


def worker_temp_dir(workdir: str) -> str:
    """`workdir` for the chief; a per-task scratch directory under it for the others."""
    if is_chief():
        return workdir
    kind, index = task()
    return posixpath.join(workdir.rstrip("/"), "tmp-workers", f"{kind}-{index}")
