"""`sae k8s`: render the Kubernetes manifests of a job, or submit it and follow it to the end.

    sae k8s render --overlay local --job train --workers 2
    sae k8s render --overlay gke --job train --workers 4 \
        --image europe-west4-docker.pkg.dev/my-project/sae/sae-pipeline:gpu \
        --set WORKDIR=gs://my-bucket/sae/runs/1 > train.yaml
    sae k8s submit --overlay local --job all             # preprocess, train, extract in turn
    sae k8s submit --overlay gke --job retrain --now     # the CronJob, and one run right away
    sae k8s simulate --overlay local --job all --root runs/k8s-sim   # no cluster (k8s_sim.py)

Rendering needs kubectl (for `kubectl kustomize`), not a cluster. The k8s/ tree is copied to a
temporary folder; --image replaces the overlay's `sae-pipeline` image; a kustomization generated
on top of the overlay sets the namespace, merges --set into the sae-settings ConfigMap (keys:
those of k8s/base/settings.env) and sets the train Job's completions, parallelism,
SAE_NUM_WORKERS and backoffLimit from --workers. Objects are then chosen by their
`app.kubernetes.io/component` label (preprocess, train, extract, retrain); objects without one
(ServiceAccount, ConfigMap, volume claim) go with every job.

Submitting applies each job with `kubectl apply -f -` and polls `kubectl get job -o json` until
the Job is Complete or Failed. --job all runs preprocess, train and extract one after the
other, then applies the retrain CronJob.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from preprocessing import flags
from preprocessing.errors import ArgumentParser, UserError

JOBS = ("preprocess", "train", "extract", "retrain")  # also the order of --job all
COMPONENT = "app.kubernetes.io/component"
IMAGE = "sae-pipeline"  # the image name the base manifests use
SETTINGS = "sae-settings"  # the ConfigMap every job reads (envFrom)
TRAIN_JOB = "sae-train"
EXIT_FAILED = 1
EXIT_TIMEOUT = 124  # like timeout(1)


def default_manifests() -> Path:
    """The k8s/ folder next to this package (a checkout), else ./k8s."""
    here = Path(__file__).resolve().parents[1] / "k8s"
    return here if here.is_dir() else Path("k8s")


# ----------------------------------------------------------------------------
# Flags.
# ----------------------------------------------------------------------------
def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def make_parser() -> ArgumentParser:
    common = ArgumentParser(add_help=False)
    common.add_argument(
        "--overlay",
        default="local",
        help="k8s/overlays/NAME: local (CPU; default) or gke (GPU, GCS)",
    )
    common.add_argument(
        "--job",
        default="all",
        choices=(*JOBS, "all"),
        help="which job's objects (default: all)",
    )
    common.add_argument("--image", help="container image, e.g. REGISTRY/sae-pipeline:TAG")
    common.add_argument(
        "--workers",
        type=flags.positive_int,
        metavar="N",
        help="training workers: the train Job's completions and parallelism, SAE_NUM_WORKERS",
    )
    common.add_argument("--namespace", help="namespace of every object (default: kubectl's)")
    common.add_argument(
        "--set",
        dest="settings",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sae-settings entry, e.g. --set DATASET=gs://b/ds (repeatable; keys: "
        "k8s/base/settings.env)",
    )
    common.add_argument(
        "--manifests",
        type=Path,
        metavar="DIR",
        help="the k8s/ folder (default: the checkout's k8s/)",
    )
    common.add_argument("--kubectl", default="kubectl", help="kubectl binary (default: kubectl)")

    p = ArgumentParser(
        prog="sae k8s",
        description="Render the Kubernetes manifests of the pipeline's jobs (kustomize), "
        "submit them and follow them to completion, or simulate them on this machine.",
        epilog="Exit codes: 0 done; 1 a job failed; 2 bad flags, kubectl missing or failing; "
        "124 --timeout reached (the job keeps running).",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="{render,submit,simulate}")
    sub.add_parser(
        "render",
        parents=[common],
        help="print the manifests",
        description="Print the manifests of --job for --overlay (needs kubectl, no cluster).",
    )
    s = sub.add_parser(
        "submit",
        parents=[common],
        help="apply the manifests and follow the job",
        description="Apply the manifests with kubectl and follow each Job to completion "
        "(--job all: preprocess, train, extract in turn, then the retrain CronJob).",
    )
    s.add_argument(
        "--timeout",
        type=flags.non_negative_number,
        default=86400.0,
        metavar="SECONDS",
        help="stop following a job after this long (default: 86400)",
    )
    s.add_argument(
        "--poll",
        type=flags.non_negative_number,
        default=10.0,
        metavar="SECONDS",
        help="status poll interval",
    )
    s.add_argument(
        "--replace",
        action="store_true",
        help="delete a Job of the same name first (a Job runs once; train resumes from WORKDIR)",
    )
    s.add_argument(
        "--now", action="store_true", help="retrain: also start one run now and follow it"
    )
    from pipeline import k8s_sim

    k8s_sim.add_parser(sub, common)
    return p


# ----------------------------------------------------------------------------
# kubectl.
# ----------------------------------------------------------------------------
def kubectl(binary: str, args: Sequence[str], stdin: str | None = None) -> str:
    """stdout of `kubectl ARGS`; UserError (one line) if it is missing or fails."""
    exe = shutil.which(binary)
    if exe is None:
        raise UserError(
            f"{binary!r} not found: install kubectl "
            "(https://kubernetes.io/docs/tasks/tools/) or pass --kubectl PATH"
        )
    r = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
        words = [a for a in args if not a.startswith("-")][:2]
        raise UserError(
            f"`kubectl {' '.join(words)}` failed: {'; '.join(lines) or f'exit {r.returncode}'}"
        )
    return r.stdout


# ----------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------
def settings_keys(manifests: Path) -> list[str]:
    """The sae-settings keys, as documented in k8s/base/settings.env."""
    path = manifests / "base" / "settings.env"
    if not path.is_file():
        raise UserError(f"no {path}: pass --manifests with the repository's k8s/ folder")
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]


def image_entry(image: str) -> dict:
    """A kustomize `images:` entry that sets the sae-pipeline image to `image`.

    `name@sha256:...` pins a digest; `name:tag` a tag; a bare name means its `latest` tag
    (as in docker), not the tag the overlay had.
    """
    if not image or any(c.isspace() for c in image):
        raise UserError(f"invalid --image {image!r}: expected REGISTRY/NAME[:TAG|@DIGEST]")
    if "@" in image:
        name, digest = image.split("@", 1)
        return {"name": IMAGE, "newName": name, "digest": digest}
    slash, colon = image.rfind("/"), image.rfind(":")
    if colon > slash:
        return {"name": IMAGE, "newName": image[:colon], "newTag": image[colon + 1 :]}
    return {"name": IMAGE, "newName": image, "newTag": "latest"}


def _workers_patch(n: int) -> dict:
    # One incident (a lost worker) can fail every worker: allow about three.
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": TRAIN_JOB},
        "spec": {
            "completions": n,
            "parallelism": n,
            "backoffLimit": 3 * n,
            "template": {
                "spec": {
                    "containers": [
                        {"name": "sae", "env": [{"name": "SAE_NUM_WORKERS", "value": str(n)}]}
                    ]
                }
            },
        },
    }


def build(
    manifests: Path,
    overlay: str,
    *,
    image: str | None = None,
    workers: int | None = None,
    namespace: str | None = None,
    settings: dict[str, str] | None = None,
    kubectl_binary: str = "kubectl",
) -> list[dict]:
    """Every object of `overlay` with the overrides applied (see the module docstring)."""
    import yaml

    settings = settings or {}
    overlays = manifests / "overlays"
    if not (overlays / overlay / "kustomization.yaml").is_file():
        names = sorted(p.parent.name for p in overlays.glob("*/kustomization.yaml"))
        raise UserError(
            f"no overlay {overlay!r} in {overlays}; choose one of: {', '.join(names) or '(none)'}"
        )
    known = settings_keys(manifests)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
    with tempfile.TemporaryDirectory(prefix="sae-k8s-") as tmp:
        tree = Path(tmp) / "k8s"
        shutil.copytree(manifests, tree)
        if image:
            # In the overlay itself: an overlay may rename the image, so a layer on top of it
            # would no longer find `sae-pipeline`.
            path = tree / "overlays" / overlay / "kustomization.yaml"
            k = yaml.safe_load(path.read_text())
            others = [e for e in k.get("images") or [] if e.get("name") != IMAGE]
            k["images"] = [*others, image_entry(image)]
            path.write_text(yaml.safe_dump(k, sort_keys=False))
        top: dict = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f"../k8s/overlays/{overlay}"],
        }
        if namespace:
            top["namespace"] = namespace
        if settings:
            top["configMapGenerator"] = [
                {
                    "name": SETTINGS,
                    "behavior": "merge",
                    "literals": [f"{k}={v}" for k, v in settings.items()],
                }
            ]
        if workers:
            top["patches"] = [{"patch": yaml.safe_dump(_workers_patch(workers))}]
        (Path(tmp) / "render").mkdir()
        (Path(tmp) / "render" / "kustomization.yaml").write_text(yaml.safe_dump(top))
        out = kubectl(kubectl_binary, ["kustomize", str(Path(tmp) / "render")])
    return [d for d in yaml.safe_load_all(out) if d]


def select(objects: list[dict], job: str) -> list[dict]:
    """The objects `job` needs: its own (by component label) and the shared ones."""
    if job == "all":
        return list(objects)
    return [
        o
        for o in objects
        if (o.get("metadata", {}).get("labels") or {}).get(COMPONENT) in (None, job)
    ]


def to_yaml(objects: list[dict]) -> str:
    import yaml

    return yaml.safe_dump_all(objects, sort_keys=False, width=1000)


# ----------------------------------------------------------------------------
# Submitting.
# ----------------------------------------------------------------------------
def follow(
    kubectl_binary: str,
    name: str,
    namespace: str | None = None,
    timeout: float = 86400.0,
    poll: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Prints the Job's pod counts whenever they change; returns when it is Complete.

    Raises UserError with exit code 1 if the Job failed (with its reason), 124 on timeout.
    """
    ns = ["--namespace", namespace] if namespace else []
    start = clock()
    last = None
    while True:
        job = json.loads(kubectl(kubectl_binary, [*ns, "get", "job", name, "-o", "json"]))
        status = job.get("status") or {}
        counts = tuple(status.get(k, 0) for k in ("active", "succeeded", "failed"))
        if counts != last:
            print(
                f"{name}: active {counts[0]}, succeeded {counts[1]}, failed {counts[2]} "
                f"({clock() - start:.0f} s)",
                flush=True,
            )
            last = counts
        done = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
        if "Complete" in done:
            print(f"{name}: complete", flush=True)
            return
        if "Failed" in done:
            c = done["Failed"]
            raise UserError(
                f"job {name} failed: {c.get('reason', '?')}: {c.get('message', '')}".rstrip(": "),
                exit_code=EXIT_FAILED,
            )
        if clock() - start >= timeout:
            raise UserError(
                f"job {name} is still running after {timeout:g} s; it keeps running "
                f"(`kubectl get job {name}`)",
                exit_code=EXIT_TIMEOUT,
            )
        sleep(max(0.0, min(poll, timeout - (clock() - start))))


def _state(job: dict) -> str:
    done = [c["type"] for c in (job.get("status") or {}).get("conditions") or []]
    done = [t for t in done if t in ("Complete", "Failed")]
    return done[0].lower() if done else "running"


def submit(objects: list[dict], args: argparse.Namespace) -> None:
    """Applies each chosen job and follows it (see the module docstring)."""
    ns = ["--namespace", args.namespace] if args.namespace else []
    for job in [j for j in JOBS if args.job in (j, "all")]:
        part = select(objects, job)
        workload = next(o for o in part if o["kind"] in ("Job", "CronJob"))
        name = workload["metadata"]["name"]
        if workload["kind"] == "Job":
            existing = kubectl(
                args.kubectl, [*ns, "get", "job", name, "-o", "json", "--ignore-not-found"]
            )
            if existing.strip():
                state = _state(json.loads(existing))
                if not args.replace:
                    raise UserError(
                        f"job {name} already exists ({state}); pass --replace to delete it "
                        "and run it again"
                    )
                print(f"{name}: deleting the previous job ({state})", flush=True)
                kubectl(args.kubectl, [*ns, "delete", "job", name, "--cascade=foreground"])
        print(kubectl(args.kubectl, [*ns, "apply", "-f", "-"], stdin=to_yaml(part)), end="")
        if workload["kind"] == "Job":
            follow(args.kubectl, name, args.namespace, args.timeout, args.poll)
        elif args.now:
            run_name = f"{name}-now-{time.strftime('%Y%m%d-%H%M%S')}"
            kubectl(args.kubectl, [*ns, "create", "job", run_name, f"--from=cronjob/{name}"])
            follow(args.kubectl, run_name, args.namespace, args.timeout, args.poll)
        else:
            print(f"{name}: scheduled ({workload['spec']['schedule']}); --now starts one run")


def run(argv: Sequence[str] | None = None) -> list[dict]:
    """Renders (and for `submit` applies) the chosen job; returns the rendered objects."""
    args = make_parser().parse_args(argv)
    objects = build(
        args.manifests or default_manifests(),
        args.overlay,
        image=args.image,
        workers=args.workers,
        namespace=args.namespace,
        settings=dict(args.settings),
        kubectl_binary=args.kubectl,
    )
    if args.action == "render":
        chosen = select(objects, args.job)
        sys.stdout.write(to_yaml(chosen))
        return chosen
    if args.action == "simulate":
        from pipeline import k8s_sim

        k8s_sim.simulate(objects, args)
    else:
        submit(objects, args)
    return select(objects, args.job)
