# conf/ and recipes/ live at the repository root; they are installed as the data packages
# slipstream._conf (one subpackage per config group) and slipstream._recipes so that a
# non-editable install finds them too.
from pathlib import Path

from setuptools import find_packages, setup

groups = sorted(p.name for p in Path("conf").iterdir() if p.is_dir())
data_packages = {"slipstream._conf": "conf", "slipstream._recipes": "recipes"}
data_packages.update({f"slipstream._conf.{g}": f"conf/{g}" for g in groups})

setup(
    packages=find_packages(include=["slipstream", "slipstream.*"]) + sorted(data_packages),
    package_dir=data_packages,
    package_data={name: ["*.yaml"] for name in data_packages},
)
