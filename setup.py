# conf/ and recipes/ live at the repository root; they are installed as the data packages
# slipstream._conf and slipstream._recipes so that a non-editable install finds them too.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["slipstream", "slipstream.*"]) + ["slipstream._conf", "slipstream._recipes"],
    package_dir={"slipstream._conf": "conf", "slipstream._recipes": "recipes"},
)
