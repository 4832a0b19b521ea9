r"""`sae k8s simulate`: a job's rendered pods run here, with a simulated kubelet and Job controller.

    sae k8s simulate --overlay local --job all --root runs/k8s-sim --set PRESET=tiny
    sae k8s simulate --job train --workers 2 --root runs/k8s-sim --kill '1@/Epoch 3\//'

The objects are rendered and chosen as `sae k8s render` does (k8s_cli.build and select). For
each pod (each index of an Indexed Job) the container's command and args run as a local
process, from this checkout's environment: the `sae` on PATH is the one next to this Python,
not the image's (no image is built or pulled). What the pod would see is built from the
manifests:

  env        envFrom configMapRef, configMapKeyRef, literal values, fieldRef (metadata.name,
             .namespace, .labels[...], .annotations[...], status.podIP, spec.nodeName,
             spec.serviceAccountName), JOB_COMPLETION_INDEX of an Indexed Job, $(VAR)
             references in env, command and args; plus the Dockerfile's ENV
  volumes    a persistentVolumeClaim is ROOT/volumes/<claim>, an emptyDir is
             ROOT/pods/<pod>/<volume> (new for every pod, kept across in-place restarts);
             each mountPath is rewritten to its folder wherever it starts a path in env
             values, command and args (no mount namespace: paths a program builds from
             constants would not be mapped)
  network    pods of a Job with a `subdomain` (the headless Service) each get a network
             namespace on a bridge, their own address and hostname (`<job>-<index>`), and an
             /etc/hosts (ip netns exec's /etc/netns/NS/hosts) in which
             `<job>-<index>.<service>[.<namespace>.svc[.cluster.local]]` names every pod: the
             host names in TF_CONFIG are the real ones. That needs root and `ip`; without
             them (`--network loopback`) the names cannot resolve, so every pod gets
             SAE_WORKER_HOSTS=127.0.0.1:<port>,... instead (trainer/cluster.py), and TF_CONFIG
             names loopback ports, which the output says. An address stays with its index.

The Job controller part: completions and parallelism; restartPolicy Never (a failed pod is
replaced by a new pod with a new name) or OnFailure (the container restarts in the same pod);
podFailurePolicy rules (onExitCodes In/NotIn, onPodConditions DisruptionTarget, which
--evict gives) with FailJob, FailIndex, Ignore and Count; backoffLimit (failed pods, or
restarts under OnFailure) with the controller's delay (--backoff-delay, doubling per failure,
capped at 360 s); activeDeadlineSeconds. A CronJob's jobTemplate runs once, as `kubectl create
job --from=cronjob/...` would. Pod and Job status lines are those of `sae k8s submit`; each pod's
output is in ROOT/logs/<pod>.log.

Not simulated: scheduling, resources (requests, limits, OOM kills), the image and its user
(runAsUser, read-only root filesystem), real DNS, Services other than the pods' own names.
Exit codes: 0 every job complete; 1 a job failed; 2 bad flags or manifests, or no network
namespaces for --network netns; 124 --timeout reached (the pods are stopped).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.k8s_net import Network, network
from preprocessing import flags
from preprocessing.errors import UserError

EXIT_FAILED = 1
EXIT_TIMEOUT = 124
NAMESPACE = "default"  # of objects without one (kubectl's default)
# The Dockerfile's ENV lines (the container's environment before the manifest's env).
IMAGE_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HOME": "/tmp"}
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
MAX_BACKOFF = 360.0  # the Job controller's cap on its retry delay
POLL = 0.1
_SUFFIX = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' generated-name alphabet


# ----------------------------------------------------------------------------
# Flags.
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Trigger:
    """Stop the first pod of `index` after `seconds`, or when its output matches `pattern`."""

    index: int
    seconds: float | None = None
    pattern: re.Pattern | None = None
    evict: bool = False  # SIGTERM + grace period + DisruptionTarget, else SIGKILL (a crash)


def parse_trigger(text: str, evict: bool = False) -> Trigger:
    """`INDEX@SECONDS` or `INDEX@/REGEX/`."""
    index, sep, when = text.partition("@")
    if not sep or not index.isdigit():
        raise argparse.ArgumentTypeError(f"expected INDEX@SECONDS or INDEX@/REGEX/, got {text!r}")
    if len(when) >= 2 and when[0] == when[-1] == "/":
        try:
            return Trigger(int(index), pattern=re.compile(when[1:-1]), evict=evict)
        except re.error as e:
            raise argparse.ArgumentTypeError(f"invalid regular expression in {text!r}: {e}") from e
    try:
        return Trigger(int(index), seconds=flags.non_negative_number(when), evict=evict)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected INDEX@SECONDS or INDEX@/REGEX/, got {text!r}"
        ) from None


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """The `simulate` subcommand of `sae k8s` (flags shared with render come from `common`)."""
    s = sub.add_parser(
        "simulate",
        parents=[common],
        help="run the rendered jobs on this machine (kubelet and Job controller simulated)",
        description="Run --job's rendered pods as local processes with their env, volumes and "
        "host names, applying the Job's restart and failure policies (see pipeline/k8s_sim.py).",
    )
    s.add_argument(
        "--root", type=Path, required=True, metavar="DIR",
        help="volumes/<claim>, pods/<pod> (emptyDir) and logs/<pod>.log go here",
    )  # fmt: skip
    s.add_argument(
        "--timeout", type=flags.non_negative_number, default=86400.0, metavar="SECONDS",
        help="stop every pod and exit 124 after this long, per job (default: 86400)",
    )  # fmt: skip
    s.add_argument(
        "--kill", type=parse_trigger, action="append", default=[],
        metavar="INDEX@SECONDS|INDEX@/REGEX/",
        help="SIGKILL the first pod of INDEX (in each job run) that long after it started, or "
        "when its output matches REGEX (a crash: counts against backoffLimit; repeatable)",
    )  # fmt: skip
    s.add_argument(
        "--evict", type=lambda t: parse_trigger(t, evict=True), action="append", default=[],
        metavar="INDEX@SECONDS|INDEX@/REGEX/",
        help="evict instead: SIGTERM, terminationGracePeriodSeconds, SIGKILL; the pod gets the "
        "DisruptionTarget condition (repeatable)",
    )  # fmt: skip
    s.add_argument(
        "--network", choices=("auto", "netns", "loopback"), default="auto",
        help="netns: a network namespace per pod (root); loopback: 127.0.0.1 ports through "
        "SAE_WORKER_HOSTS; auto: netns if possible (default)",
    )  # fmt: skip
    s.add_argument(
        "--backoff-delay", type=flags.non_negative_number, default=10.0, metavar="SECONDS",
        help="delay before recreating a failed pod, doubled per failure (default: 10, as "
        "Kubernetes)",
    )  # fmt: skip


# ----------------------------------------------------------------------------
# The Job, as read from the manifests (pure).
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One podFailurePolicy rule."""

    action: str  # FailJob, FailIndex, Ignore, Count
    exit_codes: frozenset[int] | None = None
    operator: str = "In"
    container: str | None = None
    conditions: frozenset[str] = frozenset()  # pod condition types with status True


@dataclass(frozen=True)
class JobSpec:
    name: str
    completions: int
    parallelism: int
    indexed: bool
    restart_policy: str
    backoff_limit: int
    deadline: float | None
    rules: tuple[Rule, ...]
    grace: float  # terminationGracePeriodSeconds
    template: dict = field(repr=False)  # the pod template
    subdomain: str | None = None
    namespace: str = NAMESPACE


def _job_and_name(workload: dict) -> tuple[dict, str]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"], workload["metadata"]["name"] + "-sim"
    return workload, workload["metadata"]["name"]


def job_spec(workload: dict) -> JobSpec:
    """The Job-controller view of a Job (or a CronJob's jobTemplate: one run)."""
    job, name = _job_and_name(workload)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    completions = int(spec.get("completions", 1))
    rules = []
    for r in (spec.get("podFailurePolicy") or {}).get("rules") or []:
        codes = r.get("onExitCodes")
        rules.append(
            Rule(
                action=r["action"],
                exit_codes=frozenset(codes["values"]) if codes else None,
                operator=codes.get("operator", "In") if codes else "In",
                container=codes.get("containerName") if codes else None,
                conditions=frozenset(
                    c["type"] for c in r.get("onPodConditions") or [] if c.get("status") == "True"
                ),
            )
        )
    deadline = spec.get("activeDeadlineSeconds")
    return JobSpec(
        name=name,
        completions=completions,
        parallelism=int(spec.get("parallelism", completions)),
        indexed=spec.get("completionMode") == "Indexed",
        restart_policy=pod.get("restartPolicy", "Always"),
        backoff_limit=int(spec.get("backoffLimit", 6)),
        deadline=float(deadline) if deadline is not None else None,
        rules=tuple(rules),
        grace=float(pod.get("terminationGracePeriodSeconds", 30)),
        template=spec["template"],
        subdomain=pod.get("subdomain"),
        namespace=workload["metadata"].get("namespace", NAMESPACE),
    )


def failure_action(rules: Sequence[Rule], container: str, code: int, disrupted: bool) -> str:
    """The podFailurePolicy action for a failed pod: its first matching rule's, else Count."""
    for r in rules:
        if r.exit_codes is not None:
            if r.container not in (None, container):
                continue
            inside = code in r.exit_codes
            if inside == (r.operator == "In"):
                return r.action
        elif disrupted and "DisruptionTarget" in r.conditions:
            return r.action
    return "Count"


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, others stay."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


def _field(path: str, meta: Mapping, pod: Mapping) -> str:
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        values = meta.get(m.group(1)) or {}
        return values.get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", NAMESPACE),
        "status.podIP": pod.get("podIP", "127.0.0.1"),
        "status.hostIP": "127.0.0.1",
        "spec.nodeName": socket.gethostname(),
        "spec.serviceAccountName": pod.get("serviceAccountName", "default"),
    }
    if path not in simple:
        raise UserError(f"fieldRef {path!r} is not simulated; supported: {', '.join(simple)}")
    return simple[path]


def _config_map(objects: Sequence[dict], name: str) -> dict[str, str] | None:
    for o in objects:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name:
            return {k: str(v) for k, v in (o.get("data") or {}).items()}
    return None


def container_env(
    container: dict, objects: Sequence[dict], meta: Mapping, pod: Mapping
) -> dict[str, str]:
    """The container's environment: image ENV, envFrom, then env (later entries win)."""
    env = dict(IMAGE_ENV)
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref is None:
            raise UserError(f"envFrom {sorted(source)} is not simulated (only configMapRef)")
        data = _config_map(objects, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise UserError(f"envFrom names ConfigMap {ref['name']!r}, which is not rendered")
        env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for e in container.get("env") or []:
        name = e["name"]
        if "valueFrom" not in e:
            env[name] = _expand(str(e.get("value", "")), env)
            continue
        source = e["valueFrom"]
        if "fieldRef" in source:
            env[name] = _field(source["fieldRef"]["fieldPath"], meta, pod)
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            data = _config_map(objects, ref["name"]) or {}
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                raise UserError(
                    f"env {name}: key {ref['key']!r} of ConfigMap {ref['name']!r} is not rendered"
                )
        else:
            raise UserError(f"env {name}: valueFrom {sorted(source)} is not simulated")
    return env


def volume_dirs(pod_spec: dict, root: Path, pod_name: str) -> dict[str, Path]:
    """Volume name -> local folder: a claim is shared by every pod, an emptyDir is the pod's."""
    dirs = {}
    for v in pod_spec.get("volumes") or []:
        if "persistentVolumeClaim" in v:
            dirs[v["name"]] = root / "volumes" / v["persistentVolumeClaim"]["claimName"]
        elif "emptyDir" in v:
            dirs[v["name"]] = root / "pods" / pod_name / v["name"]
        else:
            kinds = sorted(set(v) - {"name"})
            raise UserError(f"volume {v['name']!r} ({', '.join(kinds)}) is not simulated")
    return dirs


def rewrite_paths(text: str, mounts: Mapping[str, Path]) -> str:
    """Every mountPath that starts a path in `text` (`/data`, `/data/x`) -> its folder.

    One pass, longest mountPath first: a replaced folder is not itself rewritten again."""
    if not mounts:
        return text
    paths = sorted((m.rstrip("/") or "/" for m in mounts), key=len, reverse=True)
    folders = {m.rstrip("/") or "/": str(f) for m, f in mounts.items()}
    alternatives = "|".join(re.escape(p) for p in paths)
    pattern = rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])"
    return re.sub(pattern, lambda m: folders[m.group(1)], text)


@dataclass(frozen=True)
class PodPlan:
    """What one pod runs: argv, env, and the folders to create."""

    name: str
    index: int
    hostname: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    folders: tuple[Path, ...] = ()


def pod_plan(
    spec: JobSpec,
    objects: Sequence[dict],
    root: Path,
    index: int,
    name: str,
    address: str,
    extra_env: Mapping[str, str] = {},
) -> PodPlan:
    """The rendered container of `spec`'s template as pod `name` (index `index`) would run it."""
    pod_spec = spec.template["spec"]
    containers = pod_spec["containers"]
    if len(containers) != 1 or pod_spec.get("initContainers"):
        raise UserError(f"job {spec.name}: only pods with one container are simulated")
    container = containers[0]
    labels = {**(spec.template.get("metadata", {}).get("labels") or {}),
              JOB_NAME_LABEL: spec.name, "job-name": spec.name}  # fmt: skip
    annotations = dict(spec.template.get("metadata", {}).get("annotations") or {})
    if spec.indexed:
        labels[INDEX_ANNOTATION] = annotations[INDEX_ANNOTATION] = str(index)
    meta = {"name": name, "namespace": spec.namespace, "labels": labels,
            "annotations": annotations}  # fmt: skip
    env = container_env(container, objects, meta, {**pod_spec, "podIP": address})
    if spec.indexed:
        env["JOB_COMPLETION_INDEX"] = str(index)
    env.update(extra_env)
    dirs = volume_dirs(pod_spec, root, name)
    mounts = {}
    for m in container.get("volumeMounts") or []:
        if m["name"] not in dirs:
            raise UserError(f"volumeMount {m['name']!r} names no volume of the pod")
        mounts[m["mountPath"]] = dirs[m["name"]] / m.get("subPath", "")
    hostname = f"{spec.name}-{index}" if spec.indexed and spec.subdomain else name
    env = {k: rewrite_paths(v, mounts) for k, v in env.items()}
    bin_dir = str(Path(sys.executable).parent)
    env.setdefault("PATH", f"{bin_dir}:/usr/local/bin:/usr/bin:/bin")
    env["HOSTNAME"] = hostname
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise UserError(f"job {spec.name}: the container has no command (the image's is unknown)")
    argv = [rewrite_paths(_expand(a, env), mounts) for a in argv]
    return PodPlan(name, index, hostname, tuple(argv), env, tuple(mounts.values()))


# ----------------------------------------------------------------------------
# Kubelet and Job controller.
# ----------------------------------------------------------------------------
@dataclass
class Pod:
    plan: PodPlan
    proc: subprocess.Popen
    log: Path
    started: float
    trigger: Trigger | None = None
    stop_at: float | None = None  # eviction: SIGKILL after the grace period
    disrupted: bool = False
    offset: int = 0  # of the log, for --kill INDEX@/REGEX/


def _start(plan: PodPlan, net: Network, root: Path, now: float) -> Pod:
    for folder in plan.folders:
        folder.mkdir(parents=True, exist_ok=True)
    log = root / "logs" / f"{plan.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            net.wrap(plan), env=dict(plan.env), stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=root,
        )  # fmt: skip
    return Pod(plan, proc, log, now)


def _signal(pod: Pod, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pod.proc.pid, sig)


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _fires(pod: Pod, now: float) -> bool:
    t = pod.trigger
    if t is None:
        return False
    if t.seconds is not None:
        return now - pod.started >= t.seconds
    with open(pod.log, "rb") as f:
        f.seek(pod.offset)
        text = f.read().decode(errors="replace")
    # Keep a line's start for the next look: a match may span the last read.
    cut = text.rfind("\n") + 1
    pod.offset += len(text[:cut].encode())
    return bool(t.pattern.search(text))


def _stop_all(pods: Mapping[int, Pod], grace: float) -> None:
    """Terminates every pod as a Job deletion does: SIGTERM, the grace period, SIGKILL."""
    for pod in pods.values():
        _signal(pod, signal.SIGTERM)
    end = time.monotonic() + grace
    for pod in pods.values():
        try:
            pod.proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(pod, signal.SIGKILL)
            pod.proc.wait()


def _pod_name(spec: JobSpec, index: int) -> str:
    suffix = "".join(secrets.choice(_SUFFIX) for _ in range(5))
    return f"{spec.name}-{index}-{suffix}" if spec.indexed else f"{spec.name}-{suffix}"


def run_job(
    spec: JobSpec,
    objects: Sequence[dict],
    root: Path,
    *,
    network_mode: str = "auto",
    triggers: Sequence[Trigger] = (),
    timeout: float = 86400.0,
    backoff_delay: float = 10.0,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
) -> None:
    """Runs the Job to Complete; UserError (exit 1) if it fails, 124 on --timeout."""
    if spec.restart_policy not in ("Never", "OnFailure"):
        raise UserError(f"job {spec.name}: restartPolicy {spec.restart_policy!r} is invalid")
    container = spec.template["spec"]["containers"][0]["name"]
    pending = {t.index: t for t in triggers}
    with network(spec, network_mode, say) as net:
        extra = {"SAE_WORKER_HOSTS": net.worker_hosts} if net.worker_hosts else {}

        def plan(index: int, name: str) -> PodPlan:
            address = net.addresses[index] if net.addresses else "127.0.0.1"
            return pod_plan(spec, objects, root, index, name, address, extra)

        plans = {i: plan(i, _pod_name(spec, i)) for i in range(spec.completions)}  # fail early
        start = time.monotonic()
        active: dict[int, Pod] = {}
        done: set[int] = set()
        not_before = dict.fromkeys(range(spec.completions), 0.0)
        failures = dict.fromkeys(range(spec.completions), 0)
        restarts = dict.fromkeys(range(spec.completions), 0)  # of the index's current pod
        failed = 0
        last = None

        def fail(reason: str, message: str) -> None:
            _stop_all(active, spec.grace)
            for pod in active.values():
                say(f"pod {pod.plan.name}: Failed (terminated: the job failed)")
            say(f"{spec.name}: active 0, succeeded {len(done)}, failed {failed + len(active)} "
                f"({time.monotonic() - start:.0f} s)")  # fmt: skip
            active.clear()
            raise UserError(f"job {spec.name} failed: {reason}: {message}", exit_code=EXIT_FAILED)

        try:
            while True:
                now = time.monotonic()
                for i in range(spec.completions):
                    if len(active) >= spec.parallelism:
                        break
                    if i in done or i in active or now < not_before[i]:
                        continue
                    p = plans[i]
                    active[i] = pod = _start(p, net, root, now)
                    pod.trigger = pending.pop(i, None)
                    where = f", {net.addresses[i]}" if net.addresses else ""
                    again = f"; restart {restarts[i]}" if restarts[i] else ""
                    say(f"pod {p.name}: Running (index {i}{where}{again}; log {pod.log})")
                counts = (len(active), len(done), failed)
                if counts != last:
                    say(f"{spec.name}: active {counts[0]}, succeeded {counts[1]}, "
                        f"failed {counts[2]} ({now - start:.0f} s)")  # fmt: skip
                    last = counts
                if len(done) == spec.completions:
                    say(f"{spec.name}: complete")
                    return
                for i, pod in list(active.items()):
                    code = pod.proc.poll()
                    if code is None:
                        if pod.stop_at is not None and now >= pod.stop_at:
                            _signal(pod, signal.SIGKILL)
                        elif _fires(pod, now):
                            t, pod.trigger = pod.trigger, None
                            if t.evict:
                                pod.disrupted, pod.stop_at = True, now + spec.grace
                                _signal(pod, signal.SIGTERM)
                                say(f"pod {pod.plan.name}: evicted (SIGTERM; DisruptionTarget)")
                            else:
                                _signal(pod, signal.SIGKILL)
                                say(f"pod {pod.plan.name}: killed (SIGKILL)")
                        continue
                    code = 128 - code if code < 0 else code  # a signal, as a container reports it
                    name = pod.plan.name
                    if code == 0:
                        del active[i]
                        done.add(i)
                        say(f"pod {name}: Succeeded")
                        continue
                    why = _last_line(pod.log)
                    say(f"pod {name}: Failed (exit code {code})" + (f": {why}" if why else ""))
                    del active[i]
                    action = "Count"
                    if spec.restart_policy == "Never":
                        action = failure_action(spec.rules, container, code, pod.disrupted)
                    if action != "Ignore":
                        failed += 1
                        failures[i] += 1
                    matched = f"failed with exit code {code} matching {action} rule at index {i}"
                    if action == "FailJob":
                        fail("PodFailurePolicy", f"Container {container} for pod "
                             f"{spec.namespace}/{name} {matched}")  # fmt: skip
                    if action == "FailIndex":
                        fail("FailedIndexes", f"index {i} {matched}")
                    if failed > spec.backoff_limit:
                        fail("BackoffLimitExceeded", "Job has reached the specified backoff limit")
                    delay = min(MAX_BACKOFF, backoff_delay * 2 ** max(0, failures[i] - 1))
                    not_before[i] = time.monotonic() + (delay if action != "Ignore" else 0.0)
                    if spec.restart_policy == "OnFailure":
                        # The kubelet restarts the container in the same pod (and its emptyDirs).
                        restarts[i] += 1
                    else:
                        plans[i], restarts[i] = plan(i, _pod_name(spec, i)), 0
                elapsed = time.monotonic() - start
                if spec.deadline is not None and elapsed >= spec.deadline:
                    fail("DeadlineExceeded", "Job was active longer than specified deadline")
                if elapsed >= timeout:
                    _stop_all(active, spec.grace)
                    active.clear()
                    raise UserError(
                        f"job {spec.name} still running after {timeout:g} s: its pods were "
                        "stopped", exit_code=EXIT_TIMEOUT,
                    )  # fmt: skip
                time.sleep(POLL)
        finally:
            _stop_all(active, 0.0)


def simulate(objects: list[dict], args: argparse.Namespace) -> None:
    """Runs each chosen job's workload in turn (--job all: preprocess, train, extract, retrain)."""
    from pipeline import k8s_cli

    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    print("simulate: no image, no scheduler: each container's command runs from "
          f"{Path(sys.executable).parent} (`sae` there), in {root}", flush=True)  # fmt: skip
    for job in [j for j in k8s_cli.JOBS if args.job in (j, "all")]:
        part = k8s_cli.select(objects, job)
        workload = next(o for o in part if o["kind"] in ("Job", "CronJob"))
        spec = job_spec(workload)
        if workload["kind"] == "CronJob":
            cron = workload["metadata"]["name"]
            print(f"{cron}: one run of its jobTemplate as job {spec.name} (the schedule, "
                  f"{workload['spec']['schedule']}, is not simulated)", flush=True)  # fmt: skip
        run_job(
            spec, part, root, network_mode=args.network, triggers=[*args.kill, *args.evict],
            timeout=args.timeout, backoff_delay=args.backoff_delay,
        )  # fmt: skip


def run(argv: Sequence[str] | None = None) -> list[dict]:
    """`sae k8s simulate ARGV`."""
    from pipeline import k8s_cli

    return k8s_cli.run(["simulate", *(argv or [])])
