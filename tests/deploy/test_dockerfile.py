"""deploy/Dockerfile. Docker cannot build here, so the checks read the instructions: the
two variants, what each installs, the non-root user, the port and the health check, and
that the files copied into the build are enough to build the wheel (built here with pip)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, ROOT, check_settings_env

DOCKERFILE = DEPLOY / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (the last, unnamed stage is "final")."""
    out: dict[str, list] = {}
    name = None
    for word, args in instructions():
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else "final"
            out[name] = [(word, args)]
        elif name is not None:
            out[name].append((word, args))
    return out


def global_args() -> dict[str, str]:
    args = {}
    for word, rest in instructions():
        if word == "FROM":
            break
        if word == "ARG":
            k, _, v = rest.partition("=")
            args[k] = v
    return args


def test_variants_select_the_runtime_stage():
    s = stages()
    assert global_args()["VARIANT"] == "cpu", "the default image must be the slim one"
    assert s["final"][0] == ("FROM", "runtime-${VARIANT}")
    assert {"runtime-cpu", "runtime-cuda", "wheel"} <= set(s)
    assert global_args()["PYTHON_IMAGE"] == "python:3.11-slim"
    assert s["runtime-cpu"][0][1].split()[0] == "${PYTHON_IMAGE}"
    assert global_args()["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert s["runtime-cuda"][0][1].split()[0] == "${CUDA_IMAGE}"


def pip_installs(stage: str) -> list[str]:
    return [a for w, a in stages()[stage] if w == "RUN" and "pip install" in a]


def test_cpu_variant_installs_only_the_base_dependencies():
    (install,) = pip_installs("runtime-cpu")
    assert install.rstrip().endswith("pip install --no-cache-dir /wheels/*.whl")
    assert "torch" not in install and "[" not in install


def test_cuda_variant_installs_the_engine_and_gpu_extras():
    (install,) = pip_installs("runtime-cuda")
    assert '[engine,gpu]"' in install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("torch") for d in extras["engine"])
    assert any(d.startswith("triton") for d in extras["gpu"])


def final(word: str) -> list[str]:
    return [a for w, a in stages()["final"] if w == word]


def test_runs_as_a_non_root_user():
    (user,) = final("USER")
    assert user not in ("root", "0")
    (useradd,) = [a for a in final("RUN") if "useradd" in a]
    assert f"--uid {user}" in useradd


def test_port_entrypoint_and_environment():
    assert final("EXPOSE") == ["8000"]
    env = dict(kv.split("=", 1) for a in final("ENV") for kv in shlex.split(a)
               if kv.startswith("DSML_PROXY_"))
    assert env == {"DSML_PROXY_HOST": "0.0.0.0", "DSML_PROXY_PORT": "8000"}
    check_settings_env(env, "Dockerfile ENV")
    assert json.loads(final("ENTRYPOINT")[0]) == ["dsml-proxy"]
    assert json.loads(final("CMD")[0]) == ["serve"]


def test_healthcheck_polls_health_on_the_configured_port():
    (hc,) = final("HEALTHCHECK")
    options, _, command = hc.partition("CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "/health" in argv[2] and "DSML_PROXY_PORT" in argv[2]
    compile(argv[2], "HEALTHCHECK", "exec")  # the inline program is valid Python
    assert "--timeout=" in options and "--interval=" in options


def copied_sources() -> list[str]:
    out = []
    for w, a in stages()["wheel"]:
        if w == "COPY":
            *sources, _dest = a.split()
            out += sources
    return out


def test_build_context_has_what_the_image_copies():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    copied = set(copied_sources())
    for pattern in packages:  # "dsml*" -> the dsml package folder
        assert pattern.rstrip("*") in copied, f"package {pattern} not copied into the image"
    assert {"pyproject.toml", "README.md"} <= copied  # pyproject's readme is read at build
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**", "exclude everything first, then re-include what is copied"
    for source in copied:
        assert (ROOT / source).exists(), source
        assert f"!{source}/" in ignore or f"!{source}" in ignore, \
            f"{source} is excluded by Dockerfile.dockerignore"


@pytest.mark.slow
def test_copied_files_build_a_complete_wheel(tmp_path: Path):
    # What `pip wheel .` in the wheel stage sees: only the COPYed files. Built without
    # build isolation (no network here) with this environment's setuptools.
    src = tmp_path / "src"
    src.mkdir()
    for source in copied_sources():
        path = ROOT / source
        if path.is_dir():
            subprocess.run(["cp", "-r", str(path), str(src / source)], check=True)
        else:
            subprocess.run(["cp", str(path), str(src / source)], check=True)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "--wheel-dir", str(tmp_path / "wheels"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("dsml_proxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("dsml", "schemas", "proxy", "engine"):
        assert f"{package}/__init__.py" in names, package
    assert any(n.startswith("schemas/json/") and n.endswith(".json") for n in names) or not list(
        (ROOT / "schemas" / "json").glob("*.json")), "schemas/json package data missing"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dsml-proxy = proxy.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
