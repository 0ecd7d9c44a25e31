"""Helpers for the data tests (the tiny-profile run itself lives in tests/conftest.py)."""

import shutil


def copy_upstream(src, dst, *names):
    for name in names:
        shutil.copytree(src / name, dst / name)
