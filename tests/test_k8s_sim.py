"""`sae k8s simulate`: the rendered pods run here, under a simulated kubelet and Job controller.

1. Pure pieces: podFailurePolicy matching, the pod's env and argv from the rendered manifests
   (ConfigMap, fieldRef, JOB_COMPLETION_INDEX, volume paths), path rewriting, flags.
2. The Job controller on small hand-written Jobs whose container is `sh -c ...` (seconds):
   backoffLimit, new pods vs in-place restarts, Ignore on eviction, activeDeadlineSeconds,
   --timeout, and the per-pod network (host names resolve to each pod; cleaned up after).
3. The real jobs (slow): `--job all` (preprocess, 2-worker train, extract, the retrain
   CronJob's template) next to a train run whose worker 1 is SIGKILLed mid-run; the recreated
   pods resume and end with the uninterrupted run's weights. A bad PRESET fails the Job at once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli, k8s_cli, k8s_net, k8s_sim
from preprocessing.errors import UserError
from tests.helpers import finish, ok, start, stop
from trainer import cluster

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
needs_netns = pytest.mark.skipif(not k8s_net.netns_available(), reason="needs root and `ip`")
SAE = str(Path(sys.executable).parent / "sae")


def _rendered(job: str, workers: int | None = None, **settings: str) -> list[dict]:
    objects = k8s_cli.build(k8s_cli.default_manifests(), "local", workers=workers,
                            settings=settings)  # fmt: skip
    return k8s_cli.select(objects, job)


def _workload(objects: list[dict]) -> dict:
    return next(o for o in objects if o["kind"] in ("Job", "CronJob"))


def _job(script: str, **spec) -> dict:
    """A Job whose one container runs `sh -c script`, with a claim `pvc` at /data and an
    emptyDir at /scratch."""
    pod = {
        "restartPolicy": spec.pop("restartPolicy", "Never"),
        "terminationGracePeriodSeconds": 2,
        "containers": [{
            "name": "sae", "command": ["sh", "-c", script],
            "volumeMounts": [{"name": "data", "mountPath": "/data"},
                             {"name": "scratch", "mountPath": "/scratch"}],
        }],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}},
                    {"name": "scratch", "emptyDir": {}}],
    }  # fmt: skip
    pod.update(spec.pop("pod", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "toy"},
        "spec": {"backoffLimit": 0, "template": {"spec": pod}, **spec},
    }


def _run(tmp_path, job: dict, **kwargs) -> list[str]:
    """run_job on `job`; its status lines (a UserError propagates, lines in its .lines)."""
    lines: list[str] = []
    kwargs.setdefault("backoff_delay", 0.0)
    try:
        k8s_sim.run_job(k8s_sim.job_spec(job), [job], tmp_path, say=lines.append, **kwargs)
    except UserError as e:
        e.lines = lines
        raise
    return lines


def _pods(lines: list[str]) -> list[str]:
    return [m.group(1) for line in lines if (m := re.match(r"pod (\S+): Running \(index", line))]


def _netns_state() -> tuple[str, str, list[str]]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    etc = sorted(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else []
    return (
        " ".join(sorted(re.findall(r"saeb\w+|sv\w+", links))),
        " ".join(sorted(re.findall(r"sae-\w+-\d+", netns))),
        [n for n in etc if n.startswith("sae-")],
    )


# ----------------------------------------------------------------------------
# 1. Pure pieces.
# ----------------------------------------------------------------------------
@needs_kubectl
def test_the_train_jobs_failure_policy_fails_on_2_and_4_and_ignores_disruptions():
    spec = k8s_sim.job_spec(_workload(_rendered("train")))
    act = lambda code, disrupted=False: k8s_sim.failure_action(spec.rules, "sae", code, disrupted)  # noqa: E731
    assert (act(2), act(4)) == ("FailJob", "FailJob")
    assert (act(1), act(75), act(137)) == ("Count", "Count", "Count")
    assert act(143, disrupted=True) == "Ignore"
    assert k8s_sim.failure_action(spec.rules, "other", 2, False) == "Count"  # containerName
    not_in = [k8s_sim.Rule("FailJob", frozenset({0, 75}), "NotIn")]
    assert k8s_sim.failure_action(not_in, "sae", 3, False) == "FailJob"
    assert k8s_sim.failure_action(not_in, "sae", 75, False) == "Count"


@needs_kubectl
def test_a_train_pod_gets_the_rendered_env_volumes_and_service_host_names(tmp_path):
    objects = _rendered("train", workers=3, PRESET="tiny", TRAIN_FLAGS="--set hidden=8")
    spec = k8s_sim.job_spec(_workload(objects))
    assert (spec.completions, spec.parallelism, spec.indexed, spec.backoff_limit) == (3, 3, True, 9)
    plan = k8s_sim.pod_plan(spec, objects, tmp_path, 2, "sae-train-2-abcde", "10.0.0.12")
    env = plan.env
    assert env["JOB_COMPLETION_INDEX"] == "2" and env["SAE_NUM_WORKERS"] == "3"
    assert env["SAE_JOB_NAME"] == "sae-train"  # fieldRef to the job-name label
    assert env["PRESET"] == "tiny"  # envFrom the content-hashed sae-settings ConfigMap
    assert env["DATASET"] == f"{tmp_path}/volumes/sae-data/digits/data"  # the claim
    assert env["HOME"] == f"{tmp_path}/pods/sae-train-2-abcde/tmp"  # the pod's emptyDir
    assert plan.hostname == "sae-train-2" and env["HOSTNAME"] == "sae-train-2"
    assert plan.argv[:2] == ("sh", "-c") and "exec sae train" in plan.argv[2]
    assert Path(env["PATH"].split(":")[0]) == Path(sys.executable).parent
    config = cluster.ensure_tf_config(dict(env))
    assert config["cluster"]["worker"] == [f"sae-train-{i}.sae-train:2222" for i in range(3)]
    assert config["task"] == {"type": "worker", "index": 2}
    # The shell the container runs sees the rewritten paths.
    out = subprocess.run(["sh", "-c", 'echo "$DATASET $WORKDIR $TRAIN_FLAGS"'], env=env,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    assert out == [env["DATASET"], f"{tmp_path}/volumes/sae-data/digits/train", "--set", "hidden=8"]


@needs_kubectl
def test_every_pods_hosts_file_names_every_pod_in_the_jobs_namespace():
    objects = k8s_cli.select(k8s_cli.build(k8s_cli.default_manifests(), "local", workers=2,
                                           namespace="ml"), "train")  # fmt: skip
    spec = k8s_sim.job_spec(_workload(objects))
    hosts = k8s_net.hosts_file(spec, ["10.0.0.10", "10.0.0.11"], 1).splitlines()
    assert hosts[2:] == [
        "10.0.0.10 sae-train-0.sae-train.ml.svc.cluster.local sae-train-0.sae-train.ml.svc "
        "sae-train-0.sae-train",
        "10.0.0.11 sae-train-1.sae-train.ml.svc.cluster.local sae-train-1.sae-train.ml.svc "
        "sae-train-1.sae-train sae-train-1",  # its own short host name too
    ]


def test_env_resolution_follows_kubernetes_precedence_and_expansion(tmp_path):
    cm = {"kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"A": "from-cm", "B": "b"}}
    container = {
        "envFrom": [{"configMapRef": {"name": "cm"}}, {"configMapRef": {"name": "cm"},
                                                        "prefix": "P_"}],
        "env": [{"name": "A", "value": "literal-$(B)-$$(B)-$(NOPE)"},
                {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "B"}}},
                {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "I", "valueFrom": {"fieldRef": {"fieldPath":
                    f"metadata.annotations['{k8s_sim.INDEX_ANNOTATION}']"}}}],
    }  # fmt: skip
    meta = {"name": "pod-x", "annotations": {k8s_sim.INDEX_ANNOTATION: "4"}}
    env = k8s_sim.container_env(container, [cm], meta, {})
    assert env["A"] == "literal-b-$(B)-$(NOPE)" and env["P_A"] == "from-cm"
    assert (env["K"], env["N"], env["I"]) == ("b", "pod-x", "4")
    for bad, needle in [
        ({"envFrom": [{"configMapRef": {"name": "missing"}}]}, "ConfigMap 'missing'"),
        ({"envFrom": [{"secretRef": {"name": "s"}}]}, "only configMapRef"),
        ({"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.x"}}}]},
         "fieldRef 'spec.x'"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=re.escape(needle)):
            k8s_sim.container_env(bad, [cm], meta, {})


def test_mount_paths_are_rewritten_once_and_only_where_a_path_starts():
    mounts = {"/tmp": Path("/r/pods/p/tmp"), "/data": Path("/tmp/root/volumes/d")}
    cases = {
        "/data/digits/data": "/tmp/root/volumes/d/digits/data",  # not rewritten again as /tmp
        "--out=/data": "--out=/tmp/root/volumes/d",
        '"/tmp" /tmp/x': '"/r/pods/p/tmp" /r/pods/p/tmp/x',
        "/database gs://b/data a/data /data.x": "/database gs://b/data a/data /data.x",
    }
    assert {t: k8s_sim.rewrite_paths(t, mounts) for t in cases} == cases


def test_kill_flags_and_bad_invocations_are_one_line_exit_2(capsys, tmp_path):
    assert k8s_sim.parse_trigger("1@2.5") == k8s_sim.Trigger(1, seconds=2.5)
    t = k8s_sim.parse_trigger("0@/Epoch 3//")
    assert t.index == 0 and t.pattern.pattern == "Epoch 3/"
    root = str(tmp_path)
    for argv, needle in [
        (["--kill", "x@1"], "expected INDEX@SECONDS or INDEX@/REGEX/"),
        (["--kill", "1@-3"], "expected INDEX@SECONDS"),
        (["--kill", "1@/(/"], "invalid regular expression"),
        (["--network", "wifi"], "invalid choice: 'wifi'"),
        (["--timeout", "-1"], "expected a number >= 0"),
        (["--set", "NOPE=1"], "unknown setting(s) NOPE"),
    ]:
        assert cli.main(["k8s", "simulate", "--root", root, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (argv, err)
    assert cli.main(["k8s", "simulate"]) == 2
    assert "--root" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# 2. The Job controller, on `sh -c` containers.
# ----------------------------------------------------------------------------
def test_failed_pods_are_replaced_by_new_pods_until_the_backoff_limit(tmp_path):
    with pytest.raises(UserError) as e:
        _run(tmp_path, _job("echo try >> /data/tries; exit 1", backoffLimit=2))
    assert e.value.exit_code == 1
    assert str(e.value) == (
        "job toy failed: BackoffLimitExceeded: Job has reached the specified backoff limit"
    )
    pods = _pods(e.value.lines)
    assert len(pods) == len(set(pods)) == 3  # 1 + backoffLimit, each a new pod
    assert (tmp_path / "volumes" / "pvc" / "tries").read_text() == "try\n" * 3
    assert "toy: active 0, succeeded 0, failed 3" in e.value.lines[-1]


@pytest.mark.parametrize(
    ("policy", "volume", "completes"),
    [
        ("OnFailure", "/scratch", True),  # restarted in the same pod: its emptyDir remains
        ("Never", "/scratch", False),  # a new pod: a new, empty emptyDir
        ("Never", "/data", True),  # a new pod, the same claim
    ],
)
def test_restart_policy_decides_between_a_restart_in_place_and_a_new_pod(
    tmp_path, policy, volume, completes
):
    script = f"test -f {volume}/seen && exit 0; touch {volume}/seen; exit 1"
    job = _job(script, backoffLimit=1, restartPolicy=policy)
    if completes:
        lines = _run(tmp_path, job)
        assert lines[-1] == "toy: complete"
        assert any("; restart 1;" in line for line in lines) == (policy == "OnFailure")
    else:
        with pytest.raises(UserError, match="BackoffLimitExceeded"):
            _run(tmp_path, job)
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert len(logs) == (1 if policy == "OnFailure" else 2), logs


def test_an_eviction_is_ignored_by_the_policy_and_a_crash_is_counted(tmp_path):
    disrupted = [{"type": "DisruptionTarget", "status": "True"}]
    rules = {"rules": [{"action": "Ignore", "onPodConditions": disrupted}]}
    script = "test -f /data/seen && exit 0; touch /data/seen; echo ready; exec sleep 30"
    job = _job(script, backoffLimit=0, podFailurePolicy=rules)
    evict = k8s_sim.parse_trigger("0@/ready/", evict=True)
    lines = _run(tmp_path / "evict", job, triggers=[evict])
    assert any("evicted (SIGTERM; DisruptionTarget)" in line for line in lines)
    assert lines[-1] == "toy: complete" and "succeeded 1, failed 0 (" in lines[-2]
    with pytest.raises(UserError, match="BackoffLimitExceeded") as e:
        _run(tmp_path / "kill", job, triggers=[k8s_sim.parse_trigger("0@/ready/")])
    assert any(re.search(r"Failed \(exit code 137\)", line) for line in e.value.lines)


def test_an_indexed_job_runs_every_index_within_its_parallelism(tmp_path):
    script = "echo $JOB_COMPLETION_INDEX $(ls /data | wc -l) > /data/i-$JOB_COMPLETION_INDEX"
    job = _job(script, completionMode="Indexed", completions=3, parallelism=1)
    lines = _run(tmp_path, job)
    assert [p.rsplit("-", 1)[0] for p in _pods(lines)] == ["toy-0", "toy-1", "toy-2"]
    seen = [(tmp_path / "volumes/pvc" / f"i-{i}").read_text().split() for i in range(3)]
    assert seen == [["0", "0"], ["1", "1"], ["2", "2"]]  # one at a time, in order
    assert max(int(m) for m in re.findall(r"active (\d)", "\n".join(lines))) == 1


def test_active_deadline_fails_the_job_and_timeout_stops_it(tmp_path):
    job = _job("exec sleep 60", activeDeadlineSeconds=1)
    with pytest.raises(UserError, match="DeadlineExceeded: Job was active longer") as e:
        _run(tmp_path / "a", job)
    assert e.value.exit_code == 1
    with pytest.raises(UserError, match="still running after 0.5 s") as e:
        _run(tmp_path / "b", _job("exec sleep 60"), timeout=0.5)
    assert e.value.exit_code == 124


def _service_job(completions: int) -> dict:
    script = ("hostname > /data/host-$JOB_COMPLETION_INDEX; "
              "getent hosts toy-0.svc toy-1.svc > /data/hosts-$JOB_COMPLETION_INDEX; "
              "echo $SAE_WORKER_HOSTS > /data/workers-$JOB_COMPLETION_INDEX")  # fmt: skip
    return _job(script, completionMode="Indexed", completions=completions,
                parallelism=completions, pod={"subdomain": "svc"})  # fmt: skip


@needs_netns
def test_netns_pods_have_their_own_hostname_and_resolve_every_pods_service_name(tmp_path):
    before = _netns_state()
    lines = _run(tmp_path, _service_job(2), network_mode="netns")
    assert _netns_state() == before  # namespaces, veths, bridge and /etc/netns/* removed
    addresses = re.search(r"pods at (\S+), (\S+)$", lines[0]).groups()
    vol = tmp_path / "volumes" / "pvc"
    for i in range(2):
        assert (vol / f"host-{i}").read_text().strip() == f"toy-{i}"
        resolved = [line.split()[0] for line in (vol / f"hosts-{i}").read_text().splitlines()]
        assert resolved == list(addresses)
        assert (vol / f"workers-{i}").read_text().strip() == ""
    # Cleaned up after a failure too.
    with pytest.raises(UserError):
        _run(tmp_path, _job("exit 1", completionMode="Indexed", completions=2, parallelism=2,
                            pod={"subdomain": "svc"}), network_mode="netns")  # fmt: skip
    assert _netns_state() == before


def test_loopback_mode_says_that_the_host_names_are_replaced_by_ports(tmp_path):
    lines = _run(tmp_path, _service_job(2), network_mode="loopback")
    assert "network loopback: the Service's host names do not resolve here" in lines[0]
    hosts = (tmp_path / "volumes/pvc/workers-1").read_text().strip().split(",")
    assert len(hosts) == 2 and all(re.fullmatch(r"127\.0\.0\.1:\d+", h) for h in hosts)


# ----------------------------------------------------------------------------
# 3. The real jobs.
# ----------------------------------------------------------------------------
@needs_kubectl
def test_a_bad_preset_exits_2_and_fails_the_train_job_at_once(capsys, tmp_path):
    argv = ["k8s", "simulate", "--job", "train", "--root", str(tmp_path), "--set",
            "PRESET=nosuch", "--backoff-delay", "0"]  # fmt: skip
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert re.fullmatch(
        r"sae k8s: error: job sae-train failed: PodFailurePolicy: Container sae for pod "
        r"default/sae-train-\d-\w{5} failed with exit code 2 matching FailJob rule at index \d",
        err[0],
    ), err
    assert len(_pods(captured.out.splitlines())) == 2  # no pod was recreated
    assert "Failed (exit code 2): sae train: error: argument --preset" in captured.out


def _simulate(root: Path, *args: str) -> subprocess.Popen:
    return start([*_simulate_argv(root), *args], stderr=subprocess.STDOUT)


# 4 epochs of 10 steps, a checkpoint at each epoch end and nowhere else (tiny's 5 would put
# one 5 steps, some 50 ms, after the epoch-2 checkpoint: a kill on "Epoch 3/4", printed after
# that one, then lost the race on a loaded machine and the run resumed at step 25). The next
# checkpoint now comes after epoch 3's steps and its evaluation, seconds later.
TRAIN_FLAGS = ("--verbose 2 --set epochs=4 --set steps_per_epoch=10 "
               "--set checkpoint_every_steps=10")  # fmt: skip


def _fingerprints(root: Path) -> list[str]:
    logs = sorted((root / "logs").glob("sae-train-*.log"))
    return [f for log in logs for f in re.findall(r"weights fingerprint (\w+)", log.read_text())]


def _variables(export: Path) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(export / "variables" / "variables"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


@needs_kubectl
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_job_runs_and_a_killed_worker_resumes_to_the_uninterrupted_weights(tmp_path):
    import numpy as np

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # In parallel: --job all, and (its own dataset first) a train run whose worker 1 is
    # SIGKILLed after the epoch-2 checkpoint.
    # On a timeout, helpers.stop sends SIGTERM first: the simulator stops its pods and
    # removes its namespaces.
    procs = [_simulate(whole, "--job", "all"), _simulate(killed, "--job", "preprocess")]
    try:
        ok(finish(procs[1:], timeout=600, what="simulate --job preprocess")[0])
        procs[1] = _simulate(killed, "--job", "train", "--kill", "1@/Epoch 3\\//")
        outs = [ok(r).stdout for r in finish(procs, timeout=1100, what="simulate")]
    finally:
        for p in procs:
            stop(p)
    whole_out, killed_out = outs
    for job in ("sae-preprocess", "sae-train", "sae-extract", "sae-retrain-sim"):
        assert f"{job}: complete" in whole_out, whole_out
    data = whole / "volumes" / "sae-data"
    assert (data / "digits/train/export/saved_model.pb").is_file()  # the chief exported
    assert not (data / "digits/train/tmp-workers/worker-1").exists()
    assert list((data / "digits/features").iterdir())
    # One retrain run: a candidate version with its gate verdict (tiny may not pass the gate).
    assert len(list((data / "models" / "versions").glob("*/verdict.json"))) == 1
    # The killed run: worker 1 SIGKILLed, worker 0 then fails on its collective (one line,
    # exit 75), both recreated as new pods (restartPolicy Never), resumed from the checkpoint.
    assert re.search(r"pod sae-train-1-\w+: killed \(SIGKILL\)", killed_out)
    assert re.search(r"pod sae-train-1-\w+: Failed \(exit code 137\)", killed_out)
    assert re.search(r"pod sae-train-0-\w+: Failed \(exit code 75\): sae train: error: lost "
                     r"contact with another worker", killed_out), killed_out  # fmt: skip
    assert "sae-train: complete" in killed_out
    assert len(set(_pods(killed_out.splitlines()))) >= 4
    resumed = [log for log in (killed / "logs").glob("sae-train-*.log")
               if "resuming at step 20" in log.read_text()]  # fmt: skip
    assert resumed, killed_out
    shards = sorted((data / "digits/data").glob("*.tfrecord*"))  # the same data in both
    assert shards and all(
        s.read_bytes() == (killed / "volumes/sae-data/digits/data" / s.name).read_bytes()
        for s in shards
    )
    assert len(set(_fingerprints(whole) + _fingerprints(killed))) == 1
    a = _variables(data / "digits/train/export")
    b = _variables(killed / "volumes/sae-data/digits/train/export")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _simulate_argv(root: Path) -> list[str]:
    return [SAE, "k8s", "simulate", "--root", str(root), "--backoff-delay", "0.5",
            "--set", "PRESET=tiny", "--set", f"TRAIN_FLAGS={TRAIN_FLAGS}"]  # fmt: skip
