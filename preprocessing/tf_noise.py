"""TensorFlow's start-up lines on a machine without a GPU, kept from the user.

While `tensorflow` is imported, its C++ libraries write lines such as "Could not find cuda
drivers on your machine" and "oneDNN custom operations are on" to file descriptor 2,
before TF_CPP_MIN_LOG_LEVEL is read, so that variable cannot silence them. A new user
reads them as failures. `quiet_import()` makes the first import of `tensorflow` (in this
process, wherever it happens) send fd 2 to a temporary file, then replays every line but
those start-up notices. Later C++ lines ("failed call to cuInit") obey
TF_CPP_MIN_LOG_LEVEL, which the CLI sets.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|TF-TRT Warning"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|rebuild TensorFlow with the appropriate compiler flags"
)


@contextlib.contextmanager
def filtered_stderr():
    """Fd 2 (C++ and Python alike) to a temporary file; replayed without NOISE lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            kept = [ln for ln in text.splitlines(keepends=True) if not NOISE.search(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # everything else (resources, get_code, ...) as before
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with filtered_stderr():
            self.loader.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; and so find_spec below finds the real one
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_import() -> None:
    """The next import of `tensorflow` in this process drops TF's start-up notices."""
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietFinder) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietFinder())
