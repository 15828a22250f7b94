"""Build hook for the C frame scanner: cffi needs cffi_modules, which pyproject cannot declare."""
from setuptools import setup

setup(cffi_modules=["csrc/build_scan.py:ffibuilder"])
