"""Build shim: the package metadata is in pyproject.toml (PEP 621).

What stays here is what pyproject.toml cannot say: the shipped flow models, one data-file
entry per folder models/NAME/ -> <prefix>/share/hpcflow/models/NAME/ (found after
``pip install`` by hpcflow.models through ``sys.prefix``), computed from the folder so that a
new model needs no edit here.
"""

import glob
import os

from setuptools import setup


def _model_files() -> list:
    """models/NAME/* -> share/hpcflow/models/NAME."""
    out = []
    for d in sorted(glob.glob(os.path.join("models", "*"))):
        files = sorted(f for f in glob.glob(os.path.join(d, "*")) if os.path.isfile(f))
        if files:
            out.append((os.path.join("share", "hpcflow", d), files))
    return out


setup(data_files=_model_files())
