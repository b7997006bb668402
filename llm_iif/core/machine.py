"""The machine a run trains on, as far as it changes results."""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def package_versions(packages) -> dict[str, str]:
    """{package: its installed version, or "not installed"} for each of ``packages``."""
    versions = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@cache
def cpu_model() -> str:
    """The CPU model, e.g. ``"AMD EPYC (family 25, model 17, stepping 1)"``: ``/proc/cpuinfo``'s first
    processor on Linux (a virtual machine's model name alone can hide the generation, the numbers do not),
    else `platform.processor`.

    Float results differ across CPU models (their vector units take different kernels), so a seeded run is
    exactly reproducible on one model but may take another trajectory on a different one; a suite pairs only
    runs made on the same model."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    first: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    if first.get("model name"):
        numbers = [f"{label} {first[key]}" for label, key in (("family", "cpu family"), ("model", "model"),
                                                              ("stepping", "stepping")) if first.get(key)]
        return f"{first['model name']} ({', '.join(numbers)})" if numbers else first["model name"]
    return platform.processor() or platform.machine() or "unknown"
