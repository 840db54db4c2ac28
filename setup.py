"""Maps the top-level services/, kvtransfer/ and kernels/ folders into the splitserve package."""
from setuptools import find_packages, setup

MOUNTED = {"services": "splitserve.services", "kvtransfer": "splitserve.kvtransfer", "kernels": "splitserve.kernels"}

packages = find_packages(include=["splitserve", "splitserve.*"])
package_dir = {"splitserve": "splitserve"}
for folder, name in MOUNTED.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir=package_dir, package_data={"splitserve.v1": ["*.pyi"]})
