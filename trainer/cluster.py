"""TF_CONFIG for a Kubernetes Indexed Job: worker i of N finds its peers by stable host name.

An Indexed Job gives each pod JOB_COMPLETION_INDEX and the host name `<job>-<index>`; with a
headless Service named like the pods' `subdomain`, cluster DNS resolves
`<job>-<index>.<service>` (and `<job>-<index>.<service>.<namespace>.svc`). So every worker can
write the same cluster spec at start-up, with no operator and no API calls:

    {"cluster": {"worker": ["sae-train-0.sae-train:2222", "sae-train-1.sae-train:2222"]},
     "task": {"type": "worker", "index": 1}}

Worker 0 is the chief (`trainer.distribute.is_chief`). `ensure_tf_config` reads the pod's
environment (k8s/base/train-job.yaml sets it):

  TF_CONFIG             if already set, it wins and nothing else is read
  JOB_COMPLETION_INDEX  this worker's index (set by Kubernetes)
  SAE_NUM_WORKERS       N; <= 1 means a single worker (no TF_CONFIG)
  SAE_JOB_NAME          the Job's name (the pod's `batch.kubernetes.io/job-name` label)
  SAE_SERVICE           the headless Service (= the pod template's `subdomain`)
  SAE_PORT              gRPC port of every worker (default 2222)
  SAE_NAMESPACE         optional: use fully qualified `<host>.<service>.<namespace>.svc` names
  SAE_WORKER_HOSTS      optional: comma-separated host:port per index, replacing the DNS
                        names (other platforms; tests map the workers to 127.0.0.1 ports)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import MutableMapping, Sequence

from preprocessing.errors import UserError

DEFAULT_PORT = 2222
# RFC 1123 label: what Kubernetes allows in a host name or a Service name.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _check_label(what: str, value: str) -> None:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise UserError(
            f"invalid {what} {value!r}: expected a DNS label (lowercase letters, digits and "
            "'-', at most 63 characters, starting and ending with a letter or digit)"
        )


def _check_port(what: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"invalid {what} {port}: expected a port in 1..65535")


def worker_host(
    index: int, job_name: str, service: str, port: int = DEFAULT_PORT, namespace: str | None = None
) -> str:
    """`<job>-<index>.<service>[.<namespace>.svc]:<port>`: the DNS name of an Indexed Job pod."""
    host = f"{job_name}-{index}"
    _check_label("host name (job name + index)", host)
    return f"{host}.{service}" + (f".{namespace}.svc" if namespace else "") + f":{port}"


def tf_config_for_indexed_job(
    index: int,
    num_workers: int,
    job_name: str,
    service: str,
    port: int = DEFAULT_PORT,
    namespace: str | None = None,
    worker_hosts: Sequence[str] | None = None,
) -> dict:
    """The TF_CONFIG dict of worker `index` of an Indexed Job with `num_workers` completions.

    Workers are listed in index order, so worker 0 (the chief) is `<job>-0`. `worker_hosts`
    (one `host:port` per index) replaces the DNS names; `job_name` and `service` are then
    not used. Raises UserError on an invalid value.
    """
    if num_workers < 1:
        raise UserError(f"invalid number of workers {num_workers}: expected an integer >= 1")
    if not 0 <= index < num_workers:
        raise UserError(
            f"invalid worker index {index}: expected 0..{num_workers - 1} for {num_workers} "
            "workers (JOB_COMPLETION_INDEX must be below the Job's completions)"
        )
    if worker_hosts is not None:
        workers = [h.strip() for h in worker_hosts]
        if len(workers) != num_workers:
            raise UserError(
                f"{len(workers)} worker host(s) given for {num_workers} workers: "
                "expected one host:port per worker"
            )
        for w in workers:
            host, sep, port_text = w.rpartition(":")
            if not (host and sep and port_text.isdigit() and 1 <= int(port_text) <= 65535):
                raise UserError(
                    f"invalid worker host {w!r}: expected host:port with a port in 1..65535"
                )
    else:
        _check_label("job name", job_name)
        _check_label("service name", service)
        if namespace:
            _check_label("namespace", namespace)
        _check_port("port", port)
        workers = [worker_host(i, job_name, service, port, namespace) for i in range(num_workers)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def _int(env: MutableMapping[str, str], name: str) -> int:
    text = env[name].strip()
    try:
        return int(text)
    except ValueError:
        raise UserError(f"invalid {name}={text!r}: expected an integer") from None


def _required(env: MutableMapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise UserError(
            f"{name} is not set: SAE_NUM_WORKERS > 1 needs SAE_JOB_NAME and SAE_SERVICE "
            "(or SAE_WORKER_HOSTS) to build TF_CONFIG"
        )
    return value


def ensure_tf_config(env: MutableMapping[str, str] = os.environ) -> dict | None:
    """Sets env["TF_CONFIG"] from the Indexed Job environment and returns it (as a dict).

    Returns None, changing nothing, when TF_CONFIG is already set or when this is not a
    multi-worker Indexed Job (SAE_NUM_WORKERS unset or <= 1). Raises UserError on invalid
    values. Call it before the tf.distribute strategy is made.
    """
    if env.get("TF_CONFIG"):
        return None
    if not env.get("SAE_NUM_WORKERS", "").strip():
        return None
    num_workers = _int(env, "SAE_NUM_WORKERS")
    if num_workers <= 1:
        return None
    if not env.get("JOB_COMPLETION_INDEX", "").strip():
        raise UserError(
            f"SAE_NUM_WORKERS={num_workers} but JOB_COMPLETION_INDEX is not set: run the "
            "workers as an Indexed Job (completionMode: Indexed) or set TF_CONFIG"
        )
    index = _int(env, "JOB_COMPLETION_INDEX")
    hosts_text = env.get("SAE_WORKER_HOSTS", "").strip()
    if hosts_text:
        config = tf_config_for_indexed_job(
            index, num_workers, "", "", worker_hosts=hosts_text.split(",")
        )
    else:
        config = tf_config_for_indexed_job(
            index,
            num_workers,
            _required(env, "SAE_JOB_NAME"),
            _required(env, "SAE_SERVICE"),
            port=_int(env, "SAE_PORT") if env.get("SAE_PORT", "").strip() else DEFAULT_PORT,
            namespace=env.get("SAE_NAMESPACE", "").strip() or None,
        )
    env["TF_CONFIG"] = json.dumps(config)
    return config
