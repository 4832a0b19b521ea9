"""The Kubernetes deployment, without a cluster.

1. Every overlay renders with the real `kubectl kustomize`, directly and through
   `sae k8s render` for every job, and every object validates (strict: unknown fields fail)
   against the Kubernetes 1.33 schemas of kubernetes-validate, offline. The properties the
   design relies on are asserted on the rendered objects.
2. `sae k8s submit` against a fake kubectl: what it applies, how it follows a Job, its exit codes.
3. trainer/cluster.py, the TF_CONFIG builder, and its agreement with the rendered train Job.
4. Two `sae train` processes whose TF_CONFIG comes from that builder (the Indexed Job's
   environment, host names mapped to 127.0.0.1) train in sync; only worker 0 writes.

Not exercised here: a real cluster (scheduling, DNS of the headless Service, GPUs, Workload
Identity, podFailurePolicy in action) and the Dockerfile (no container engine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline import cli, k8s_cli
from preprocessing.errors import UserError
from tests.helpers import finish, free_ports, ok, run, start
from trainer import cluster

K8S = Path(__file__).resolve().parents[1] / "k8s"
OVERLAYS = ("local", "gke")
KUBERNETES_VERSION = "1.33"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------
def _kustomize(path: Path) -> list[dict]:
    out = run([KUBECTL, "kustomize", path], timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _render(capsys, *args: str) -> list[dict]:
    """`sae k8s render ARGS` through the CLI dispatcher: its stdout, parsed."""
    assert cli.main(["k8s", "render", *args]) == 0, capsys.readouterr().err
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]


def _validate(objects: list[dict]) -> None:
    for o in objects:
        try:
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {path}: {e.message}")


def _pod_spec(o: dict) -> dict:
    spec = o["spec"]["jobTemplate"]["spec"] if o["kind"] == "CronJob" else o["spec"]
    return spec["template"]["spec"]


def _job_spec(o: dict) -> dict:
    return o["spec"]["jobTemplate"]["spec"] if o["kind"] == "CronJob" else o["spec"]


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Job", "CronJob")]


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, [(o["kind"], o["metadata"]["name"]) for o in objects]
    return found[0]


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def overlay_objects() -> dict[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return {name: _kustomize(K8S / "overlays" / name) for name in OVERLAYS}


# ----------------------------------------------------------------------------
# 1. Rendering and validation.
# ----------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("path", ["base", "overlays/local", "overlays/gke"])
def test_kustomize_builds_every_tree_and_every_object_validates(path):
    objects = _kustomize(K8S / path)
    _validate(objects)
    kinds = sorted((o["kind"], o["metadata"]["name"].split("-")[1]) for o in objects)
    expected = [
        ("ConfigMap", "settings"),
        ("CronJob", "retrain"),
        ("Job", "extract"),
        ("Job", "preprocess"),
        ("Job", "train"),
        ("Service", "train"),
        ("ServiceAccount", "pipeline"),
    ]
    if path == "overlays/local":
        expected.append(("PersistentVolumeClaim", "data"))
    assert kinds == sorted(expected)


@needs_kubectl
def test_strict_validation_rejects_a_misspelt_field(overlay_objects):
    job = json.loads(json.dumps(_one(overlay_objects["local"], "Job", "sae-train")))
    _pod_spec(job)["containers"][0]["resource"] = _pod_spec(job)["containers"][0]["resources"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("job", [*k8s_cli.JOBS, "all"])
def test_render_prints_the_chosen_job_with_the_shared_objects(capsys, overlay, job):
    image = "registry.example/team/sae-pipeline:1.2.3"
    objects = _render(capsys, "--overlay", overlay, "--job", job, "--image", image)
    _validate(objects)
    kinds = {o["kind"] for o in objects}
    assert {"ServiceAccount", "ConfigMap"} <= kinds
    components = {o["metadata"]["labels"].get(k8s_cli.COMPONENT) for o in objects} - {None}
    assert components == (set(k8s_cli.JOBS) if job == "all" else {job})
    assert ("Service" in kinds) == (job in ("train", "all"))
    assert "Secret" not in kinds
    for o in _workloads(objects):
        for c in _pod_spec(o)["containers"]:
            assert c["image"] == image


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_train_is_an_indexed_job_with_a_matching_headless_service(capsys, overlay):
    objects = _render(capsys, "--overlay", overlay, "--job", "train", "--workers", "3")
    job, service = _one(objects, "Job"), _one(objects, "Service")
    spec, pod = job["spec"], _pod_spec(job)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 9
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    assert pod["restartPolicy"] == "Never"

    # Headless, named like the pods' subdomain, selecting exactly the train pods.
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == pod["subdomain"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert labels[k8s_cli.COMPONENT] == "train"

    (container,) = pod["containers"]
    env = _env(container)
    assert env["SAE_NUM_WORKERS"]["value"] == "3"
    assert env["SAE_SERVICE"]["value"] == pod["subdomain"]
    assert env["SAE_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/job-name']"
    )
    port = int(env["SAE_PORT"]["value"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert [p["port"] for p in service["spec"]["ports"]] == [port]

    # Disruptions are retried for free; config errors (2) and NaN loss (4) fail the Job.
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["action"] == "FailJob"
    assert rules[1]["onExitCodes"] == {"containerName": "sae", "operator": "In", "values": [2, 4]}
    assert container["name"] == "sae"
    assert 75 not in rules[1]["onExitCodes"]["values"]  # preempted after a checkpoint: retry


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down_and_sized(overlay_objects, overlay):
    objects = overlay_objects[overlay]
    assert not [o for o in objects if o["kind"] == "Secret"]
    settings = _one(objects, "ConfigMap")
    for o in _workloads(objects):
        spec, pod = _job_spec(o), _pod_spec(o)
        assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
        assert spec["podFailurePolicy"]["rules"][0]["action"] == "Ignore"
        assert {2} <= set(spec["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"])
        assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
        assert pod["serviceAccountName"] == "sae-pipeline"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["tmp"]
        assert not any("secret" in v for v in volumes.values())
        for c in pod["containers"]:
            where = f"{o['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), where
            assert c["image"] and not c["image"].endswith(":latest"), where
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], where
            assert _env(c)["HOME"]["value"] == "/tmp", where
            assert c["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}]
            assert not any("secretKeyRef" in (e.get("valueFrom") or {}) for e in c["env"])
            # The pods run the same CLI users run; every $VAR it reads is a setting.
            (command,) = c["args"]
            assert re.search(r"exec sae (preprocess|train|extract|retrain) ", command), command
            for var in re.findall(r"\$(\w+)", command):
                assert var in settings["data"], (where, var)


@needs_kubectl
def test_retrain_cronjob_never_overlaps_and_keeps_a_short_history(overlay_objects):
    for objects in overlay_objects.values():
        spec = _one(objects, "CronJob")["spec"]
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec["startingDeadlineSeconds"] > 0
        assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
        assert set(spec["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"][
            "values"
        ]) == {2, 3, 4}  # fmt: skip


@needs_kubectl
def test_overlays_local_volume_and_gke_gpus_and_workload_identity(overlay_objects):
    local = overlay_objects["local"]
    claim = _one(local, "PersistentVolumeClaim")["metadata"]["name"]
    for o in _workloads(local):
        data = next(v for v in _pod_spec(o)["volumes"] if v["name"] == "data")
        assert data == {"name": "data", "persistentVolumeClaim": {"claimName": claim}}
        assert "nvidia.com/gpu" not in _pod_spec(o)["containers"][0]["resources"]["limits"]

    gke = overlay_objects["gke"]
    account = _one(gke, "ServiceAccount")
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
        ".iam.gserviceaccount.com"
    )
    assert account["automountServiceAccountToken"] is True  # Workload Identity needs it
    assert all(v.startswith("gs://") for k, v in _one(gke, "ConfigMap")["data"].items()
               if k in ("DATASET", "WORKDIR", "MODELS_ROOT", "MODEL", "FEATURES"))  # fmt: skip
    for name in ("sae-train", "sae-retrain"):
        o = next(o for o in _workloads(gke) if o["metadata"]["name"] == name)
        pod = _pod_spec(o)
        resources = pod["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert "cloud.google.com/gke-accelerator" in pod["nodeSelector"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        assert "docker.pkg.dev/" in pod["containers"][0]["image"]


@needs_kubectl
def test_render_overrides_settings_and_namespace_and_rejects_unknown_keys(capsys):
    objects = _render(
        capsys, "--job", "train", "--namespace", "ml", "--set", "PRESET=mnist",
        "--set", "TRAIN_FLAGS=--set hidden=64",
    )  # fmt: skip
    _validate(objects)
    data = _one(objects, "ConfigMap")["data"]
    assert data["PRESET"] == "mnist" and data["TRAIN_FLAGS"] == "--set hidden=64"
    assert data["DATASET"] == "/data/digits/data"  # the other settings are kept
    assert {o["metadata"].get("namespace") for o in objects} == {"ml"}

    assert cli.main(["k8s", "render", "--set", "PRESETT=mnist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown setting(s) PRESETT" in err and "PRESET" in err
    assert cli.main(["k8s", "render", "--overlay", "aws"]) == 2
    assert "choose one of: gke, local" in capsys.readouterr().err
    assert cli.main(["k8s", "render", "--workers", "0"]) == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_image_entries_follow_docker_reference_rules():
    assert k8s_cli.image_entry("reg:5000/a/sae:v1") == {
        "name": "sae-pipeline", "newName": "reg:5000/a/sae", "newTag": "v1"
    }  # fmt: skip
    assert k8s_cli.image_entry("reg:5000/a/sae") == {
        "name": "sae-pipeline", "newName": "reg:5000/a/sae", "newTag": "latest"
    }  # fmt: skip
    assert k8s_cli.image_entry("a/sae@sha256:abc") == {
        "name": "sae-pipeline", "newName": "a/sae", "digest": "sha256:abc"
    }  # fmt: skip
    with pytest.raises(UserError):
        k8s_cli.image_entry("a b")


# ----------------------------------------------------------------------------
# 2. Submitting, against a fake kubectl.
# ----------------------------------------------------------------------------
FAKE_KUBECTL = """#!{python}
import json, os, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_KUBECTL_STATE"])
args = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] == "kustomize":
    sys.exit(subprocess.call([{kubectl!r}, *args]))
if "apply" in args:
    text = sys.stdin.read()
    (state / "applied.yaml").write_text(text)
    with open(state / "applied-all.yaml", "a") as f:
        f.write(text + "---\\n")
    print("applied")
elif "create" in args:
    print("job.batch created")
elif "get" in args and "--ignore-not-found" in args:
    if (state / "existing.json").exists():
        print((state / "existing.json").read_text())
elif "get" in args:
    statuses = json.loads((state / "statuses.json").read_text())
    polls = state / "polls"
    n = int(polls.read_text()) if polls.exists() else 0
    polls.write_text(str(n + 1))
    print(json.dumps({{"status": statuses[min(n, len(statuses) - 1)]}}))
elif "delete" in args:
    (state / "existing.json").unlink()
else:
    sys.exit("fake kubectl: unexpected " + " ".join(args))
"""


@pytest.fixture
def fake_kubectl(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(fake kubectl, its state dir): it records calls, keeps what is applied, and answers
    `get job` with statuses.json, one entry per poll."""
    state = tmp_path / "state"
    state.mkdir()
    exe = tmp_path / "kubectl"
    exe.write_text(FAKE_KUBECTL.format(python=sys.executable, kubectl=KUBECTL))
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_KUBECTL_STATE", str(state))
    return exe, state


def _calls(state: Path) -> list[list[str]]:
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def _submit(exe: Path, *args: str) -> int:
    return cli.main(["k8s", "submit", "--kubectl", str(exe), "--poll", "0", *args])


@needs_kubectl
def test_submit_applies_the_job_and_follows_it_to_completion(fake_kubectl, capsys):
    exe, state = fake_kubectl
    (state / "statuses.json").write_text(json.dumps([
        {},
        {"active": 2},
        {"active": 2},
        {"active": 1, "succeeded": 1},
        {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]},
    ]))  # fmt: skip
    assert _submit(exe, "--job", "train", "--workers", "2", "--namespace", "ml") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("sae-train:")]
    assert [re.sub(r" \(\d+ s\)$", "", line) for line in lines] == [
        "sae-train: active 0, succeeded 0, failed 0",
        "sae-train: active 2, succeeded 0, failed 0",  # printed once: only changes are
        "sae-train: active 1, succeeded 1, failed 0",
        "sae-train: active 0, succeeded 2, failed 0",
        "sae-train: complete",
    ]
    applied = [d for d in yaml.safe_load_all((state / "applied.yaml").read_text()) if d]
    kinds = {o["kind"] for o in applied}
    assert kinds == {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Service", "Job"}
    _validate(applied)
    verbs = [[a for a in c if not a.startswith("-")][:2] for c in _calls(state)]
    assert verbs[:3] == [["kustomize", verbs[0][1]], ["ml", "get"], ["ml", "apply"]]
    assert all(c[:2] == ["--namespace", "ml"] for c in _calls(state)[1:])


@needs_kubectl
def test_submit_all_runs_the_jobs_in_order_then_schedules_retrain(fake_kubectl, capsys):
    exe, state = fake_kubectl
    done = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    (state / "statuses.json").write_text(json.dumps([done]))
    assert _submit(exe, "--job", "all", "--now") == 0
    out = capsys.readouterr().out
    applied = [d for d in yaml.safe_load_all((state / "applied-all.yaml").read_text()) if d]
    workloads = [o["metadata"]["name"] for o in _workloads(applied)]
    assert workloads == ["sae-preprocess", "sae-train", "sae-extract", "sae-retrain"]
    followed = [c[2] for c in _calls(state) if c[:2] == ["get", "job"] and len(c) == 5]
    assert followed[:3] == ["sae-preprocess", "sae-train", "sae-extract"]
    (create,) = [c for c in _calls(state) if c[0] == "create"]
    assert create[3] == "--from=cronjob/sae-retrain" and followed[3:] == [create[2]]
    assert out.count(": complete") == 4


@needs_kubectl
def test_submit_reports_a_failed_job_and_an_existing_one(fake_kubectl, capsys):
    exe, state = fake_kubectl
    failed = {
        "failed": 1,
        "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                        "message": "Container sae for pod default/sae-train-0-x failed with "
                                   "exit code 2 matching FailJob rule at index 1"}],
    }  # fmt: skip
    (state / "statuses.json").write_text(json.dumps([failed]))
    assert _submit(exe, "--job", "train") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "job sae-train failed: PodFailurePolicy: " in err

    # A Job runs once: an existing one is an error unless --replace deletes it first.
    (state / "existing.json").write_text(json.dumps({"status": failed}))
    assert _submit(exe, "--job", "train") == 2
    assert "job sae-train already exists (failed); pass --replace" in capsys.readouterr().err
    (state / "statuses.json").write_text(
        json.dumps([{"conditions": [{"type": "Complete", "status": "True"}]}])
    )
    assert _submit(exe, "--job", "train", "--replace") == 0
    assert not (state / "existing.json").exists()


@needs_kubectl
def test_submit_times_out_and_kubectl_must_exist(fake_kubectl, capsys):
    exe, state = fake_kubectl
    (state / "statuses.json").write_text(json.dumps([{"active": 1}]))
    assert _submit(exe, "--job", "extract", "--timeout", "0") == 124
    assert "still running after 0 s" in capsys.readouterr().err
    assert cli.main(["k8s", "submit", "--kubectl", "no-such-kubectl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'no-such-kubectl' not found" in err


# ----------------------------------------------------------------------------
# 3. The TF_CONFIG builder.
# ----------------------------------------------------------------------------
def test_tf_config_names_every_indexed_job_pod_and_this_worker():
    config = cluster.tf_config_for_indexed_job(2, 3, "sae-train", "sae-train")
    assert config == {
        "cluster": {"worker": [f"sae-train-{i}.sae-train:2222" for i in range(3)]},
        "task": {"type": "worker", "index": 2},
    }
    fqdn = cluster.tf_config_for_indexed_job(0, 2, "j", "svc", port=3000, namespace="ml")
    assert fqdn["cluster"]["worker"] == ["j-0.svc.ml.svc:3000", "j-1.svc.ml.svc:3000"]
    mapped = cluster.tf_config_for_indexed_job(1, 2, "", "", worker_hosts=["h:1", " h:2"])
    assert mapped["cluster"]["worker"] == ["h:1", "h:2"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"index": 2, "num_workers": 2}, "invalid worker index 2: expected 0..1"),
        ({"index": -1}, "invalid worker index -1"),
        ({"num_workers": 0, "index": 0}, "invalid number of workers 0"),
        ({"job_name": "Sae_Train"}, "invalid job name 'Sae_Train'"),
        ({"job_name": "j" * 62}, "invalid host name"),
        ({"service": ""}, "invalid service name ''"),
        ({"port": 70000}, "invalid port 70000"),
        ({"worker_hosts": ["h:1"]}, "1 worker host(s) given for 2 workers"),
        ({"worker_hosts": ["h:1", "h"]}, "invalid worker host 'h'"),
    ],
)
def test_tf_config_rejects_invalid_values(kwargs, needle):
    args = {"index": 0, "num_workers": 2, "job_name": "sae-train", "service": "sae-train"}
    with pytest.raises(UserError, match=re.escape(needle)):
        cluster.tf_config_for_indexed_job(**{**args, **kwargs})


def test_ensure_tf_config_sets_it_only_for_a_multi_worker_indexed_job():
    pod = {"JOB_COMPLETION_INDEX": "1", "SAE_NUM_WORKERS": "2", "SAE_JOB_NAME": "sae-train",
           "SAE_SERVICE": "workers", "SAE_PORT": "2345"}  # fmt: skip
    env = dict(pod)
    config = cluster.ensure_tf_config(env)
    assert (
        json.loads(env["TF_CONFIG"])
        == config
        == cluster.tf_config_for_indexed_job(1, 2, "sae-train", "workers", port=2345)
    )
    # An explicit TF_CONFIG wins; one worker, or no SAE_NUM_WORKERS, needs none.
    for env in ({**pod, "TF_CONFIG": "{}"}, {**pod, "SAE_NUM_WORKERS": "1"}, {"PATH": "/bin"}):
        before = dict(env)
        assert cluster.ensure_tf_config(env) is None and env == before
    env = {**pod, "SAE_WORKER_HOSTS": "127.0.0.1:1,127.0.0.1:2"}
    assert cluster.ensure_tf_config(env)["cluster"]["worker"] == ["127.0.0.1:1", "127.0.0.1:2"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"JOB_COMPLETION_INDEX": None}, "JOB_COMPLETION_INDEX is not set"),
        ({"JOB_COMPLETION_INDEX": "x"}, "invalid JOB_COMPLETION_INDEX='x'"),
        ({"SAE_NUM_WORKERS": "two"}, "invalid SAE_NUM_WORKERS='two'"),
        ({"SAE_SERVICE": None}, "SAE_SERVICE is not set"),
        ({"SAE_PORT": "p"}, "invalid SAE_PORT='p'"),
        ({"SAE_WORKER_HOSTS": "a:1,b:2,c:3"}, "3 worker host(s) given for 2 workers"),
    ],
)
def test_ensure_tf_config_names_the_bad_variable(change, needle):
    env = {"JOB_COMPLETION_INDEX": "0", "SAE_NUM_WORKERS": "2", "SAE_JOB_NAME": "j",
           "SAE_SERVICE": "s"}  # fmt: skip
    env.update(change)
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(UserError, match=re.escape(needle)):
        cluster.ensure_tf_config(env)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rendered_train_pods_get_the_service_host_names(capsys, overlay):
    """What each pod's environment will be, fed to the builder: its hosts are the Service's."""
    objects = _render(capsys, "--overlay", overlay, "--job", "train", "--workers", "4")
    job, service = _one(objects, "Job"), _one(objects, "Service")
    env = _env(_pod_spec(job)["containers"][0])
    port = service["spec"]["ports"][0]["port"]
    name, svc = job["metadata"]["name"], service["metadata"]["name"]
    for index in range(4):
        pod_env = {k: e["value"] for k, e in env.items() if "value" in e}
        # Kubernetes fills these two: the index, and the job-name label through fieldRef.
        pod_env.update(JOB_COMPLETION_INDEX=str(index), SAE_JOB_NAME=name)
        config = cluster.ensure_tf_config(pod_env)
        assert config["cluster"]["worker"] == [f"{name}-{i}.{svc}:{port}" for i in range(4)]
        assert config["task"] == {"type": "worker", "index": index}


# ----------------------------------------------------------------------------
# 4. Two workers, TF_CONFIG from the builder.
# ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_indexed_job_workers_train_in_sync_and_only_worker_0_writes(digits, tmp_path):
    data = digits
    workdir = tmp_path / "run"
    hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    base_env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    train = [sys.executable, "-m", "pipeline.cli", "train", "--data", str(data),
             "--workdir", str(workdir), "--preset", "tiny", "--verbose", "0"]  # fmt: skip
    # What the Indexed Job gives each pod, with the Service's host names mapped to local ports.
    pod_env = {"TF_CPP_MIN_LOG_LEVEL": "2", "SAE_NUM_WORKERS": "2", "SAE_JOB_NAME": "sae-train",
               "SAE_SERVICE": "sae-train", "SAE_WORKER_HOSTS": hosts}  # fmt: skip
    procs = [
        start(train, env={**base_env, **pod_env, "JOB_COMPLETION_INDEX": str(index)})
        for index in range(2)
    ]
    results = finish(procs, timeout=240, what="two train workers")  # a hung collective fails
    for r in results:
        ok(r)
        assert "2 replica(s)" in r.stdout, r.stdout  # one CPU replica per worker, in one cluster
    outputs = [r.stdout for r in results]
    fingerprints = [re.findall(r"weights fingerprint (\w+)", out) for out in outputs]
    assert fingerprints[0] == fingerprints[1] and len(fingerprints[0]) == 1
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]
    assert (workdir / "export" / "saved_model.pb").is_file()
    assert not (workdir / "tmp-workers" / "worker-1").exists()
