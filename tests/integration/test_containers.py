"""The container recipes agree with each other and with pyproject.toml, and the image health check works.

The Docker image is built and run by tests/integration/test_container_image.py (podman, on a local Debian
base, through container/build-local.sh); Apptainer and a GPU are not available in the test environment. What
can drift silently between the two recipes, the build script and the dependency list is checked here.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from spython.main.parse.parsers import DockerParser, SingularityParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "container" / "Dockerfile"
DEF = ROOT / "container" / "hpc_retrain.def"
BUILD_LOCAL = ROOT / "container" / "build-local.sh"
CONSTRAINTS = ROOT / "container" / "constraints.txt"
CONSTRAINTS_REL = "container/constraints.txt"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(include_extras: bool = True) -> list[Requirement]:
    proj = pyproject()["project"]
    reqs = [Requirement(r) for r in proj["dependencies"]]
    if include_extras:
        for extra in proj.get("optional-dependencies", {}).values():
            reqs += [Requirement(r) for r in extra]
    return reqs


def pins() -> dict[str, Version]:
    out = {}
    for n, raw in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert m, f"{CONSTRAINTS}:{n}: '{raw}' is not an exact pin NAME==VERSION"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"{CONSTRAINTS}:{n}: {name} is pinned twice"
        out[name] = Version(m.group(2))
    return out


def docker_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def docker_base() -> str:
    """The image the Dockerfile builds on by default: FROM ${BASE}, with ARG BASE=IMAGE before it."""
    ins = docker_instructions()
    at = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    assert len(at) == 1, f"{DOCKERFILE}: expected one FROM, got {len(at)}"
    image = ins[at[0]][1]
    m = re.fullmatch(r"\$\{?(\w+)\}?", image)
    if not m:
        return image
    defaults = dict(args.split("=", 1) for word, args in ins[: at[0]] if word == "ARG" and "=" in args)
    assert m.group(1) in defaults, f"{DOCKERFILE}: FROM {image} without a default (ARG {m.group(1)}=IMAGE)"
    return defaults[m.group(1)]


def docker_pairs(word: str) -> dict[str, str]:
    """KEY=VALUE pairs of every ENV or LABEL instruction."""
    out = {}
    for w, args in docker_instructions():
        if w == word:
            out.update(pair.split("=", 1) for pair in shlex.split(args))
    return out


def docker_copies() -> dict[str, str]:
    """Build-context path -> path in the image, of every COPY."""
    copies = {}
    for word, args in docker_instructions():
        if word == "COPY":
            *srcs, dest = [a for a in args.split() if not a.startswith("--")]
            for src in srcs:
                copies[src] = dest if not dest.endswith("/") else dest + Path(src).name
    return copies


def build_arg(name: str) -> str:
    """The value container/build-local.sh passes as --build-arg NAME=..."""
    m = re.findall(rf"--build-arg {name}=(\S+)", BUILD_LOCAL.read_text())
    assert len(m) == 1, f"{BUILD_LOCAL}: --build-arg {name}= {m}"
    return m[0].strip('"')


@pytest.fixture(scope="module")
def singularity():
    return SingularityParser(str(DEF)).recipe["spython-base"]


@pytest.fixture(scope="module")
def docker():
    return DockerParser(str(DOCKERFILE)).recipe["spython-base"]


def pip_constraint_paths(commands: list[str]) -> list[str]:
    """The -c/--constraint file of every `pip install` among shell commands ("<none>" when it has none)."""
    found = []
    for cmd in commands:
        lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        simple, words = [], []
        for tok in list(lexer) + [";"]:
            if tok in ("&&", "||", ";", "|"):
                simple.append(words)
                words = []
            else:
                words.append(tok)
        for words in simple:
            if "pip" not in words or "install" not in words:
                continue
            paths = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-c", "--constraint")]
            paths += [w.split("=", 1)[1] for w in words if w.startswith("--constraint=")]
            found += paths or ["<none>"]
    return found


def test_both_recipes_use_the_same_pinned_base(singularity, docker):
    assert DEF.read_text().lstrip().lower().startswith("bootstrap: docker")
    image = docker_base()
    assert docker.fromHeader == image  # spython resolves the ARG's default
    assert singularity.fromHeader == image.lower()  # spython lower-cases the def's From:
    tag_or_digest = "@sha256:" in image or re.search(r":[^/:]+$", image)
    assert tag_or_digest and not image.endswith(":latest"), f"base image {image} is not pinned"
    assert image.startswith("tensorflow/tensorflow:") and "gpu" in image


def test_dockerfile_base_and_wheelhouse_are_build_arguments():
    """By default the Dockerfile builds the GPU image from PyPI; container/build-local.sh passes another base and
    a wheelhouse, which only its temporary context holds (it is bind-mounted, never copied into the image)."""
    ins = docker_instructions()
    assert ins[0][0] == "ARG" and ins[0][1].startswith("BASE=") and ins[1] == ("FROM", "${BASE}")
    args = [a for word, a in ins if word == "ARG"]
    assert "WHEELHOUSE=" in args, "WHEELHOUSE must default to empty: the default build uses PyPI"
    pip_runs = [a for word, a in ins if word == "RUN" and "pip install" in a]
    assert pip_runs
    for run in pip_runs:
        m = re.match(r"--mount=type=bind,target=(\S+)\s", run)
        assert m, f"{DOCKERFILE}: a pip install without the build context bind-mounted: {run}"
        option = f"${{WHEELHOUSE:+--no-index --find-links {m.group(1)}/$WHEELHOUSE}}"
        assert option in run, run
        # What /bin/sh makes of it: nothing by default (pip uses PyPI), the wheels only with a wheelhouse.
        for value, words in (("", []), ("container/wheelhouse",
                                         ["--no-index", "--find-links", f"{m.group(1)}/container/wheelhouse"])):
            out = subprocess.run(["sh", "-c", f'for w in {option}; do echo "$w"; done'], capture_output=True,
                                 text=True, env={"WHEELHOUSE": value}, check=True)
            assert out.stdout.split() == words
    # What build-local.sh passes.
    assert build_arg("BASE") == "$BASE" and "BASE=${BASE:-localhost/debian-py:bookworm}" in BUILD_LOCAL.read_text()
    wheelhouse = build_arg("WHEELHOUSE")
    allowed = {ln.strip()[1:] for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")}
    assert wheelhouse in allowed, f".dockerignore must let {wheelhouse} into build-local.sh's context"
    assert not any(src.startswith(wheelhouse) for src in docker_copies()), "the wheels must not be COPYed"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", wheelhouse], capture_output=True, text=True)
    assert tracked.returncode != 0 or not tracked.stdout.strip(), f"{wheelhouse} is in git; it must not be"


def test_apptainer_recipe_has_its_sections(singularity):
    sources = {entry.split()[0]: entry.split()[1] for entry in singularity.files}
    for needed in (CONSTRAINTS_REL, "pyproject.toml", "hpc_retrain"):
        assert needed in sources, f"{DEF}: %files does not copy {needed}"
        assert (ROOT / needed).exists()
    assert singularity.install, f"{DEF}: no %post"
    assert singularity.cmd == 'exec hpc-retrain "$@"'
    # spython turns %test into a script written by extra %post lines.
    assert singularity.test is not None
    assert any("hpc_retrain.inference.healthcheck" in line for line in singularity.install)
    labels = dict(label.split(None, 1) for label in singularity.labels)
    assert labels.get("License") == "GPL-3.0-or-later"
    assert labels.get("org.opencontainers.image.licenses") == pyproject()["project"]["license"]


def test_dockerfile_entrypoint_healthcheck_and_weights_check(docker):
    ins = docker_instructions()
    assert docker.entrypoint == ["hpc-retrain"]
    assert "hpc-retrain" in pyproject()["project"]["scripts"]
    health = [args for word, args in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and "hpc_retrain.inference.healthcheck" in health[0]
    runs = " ".join(args for word, args in ins if word == "RUN")
    assert "pretrained_path()" in runs, "the build must fail when the MISIC weights are missing"
    labels = " ".join(args for word, args in ins if word == "LABEL")
    assert 'org.opencontainers.image.licenses="GPL-3.0-or-later"' in labels


def test_both_recipes_install_with_the_constraints_file(singularity):
    # Docker: the -c path must be where COPY put container/constraints.txt.
    ins = docker_instructions()
    copies = {}
    for word, args in ins:
        if word == "COPY":
            *srcs, dest = args.split()
            for src in srcs:
                copies[src] = dest if not dest.endswith("/") else dest + Path(src).name
    used = pip_constraint_paths([args for word, args in ins if word == "RUN"])
    assert used and all(p == copies.get(CONSTRAINTS_REL) for p in used), (
        f"{DOCKERFILE}: pip installs with constraints {used}, but {CONSTRAINTS_REL} is copied to "
        f"{copies.get(CONSTRAINTS_REL)}"
    )
    # Apptainer: same, through %files.
    files = {entry.split()[0]: entry.split()[1] for entry in singularity.files}
    used = pip_constraint_paths(singularity.install)
    assert used and all(p == files.get(CONSTRAINTS_REL) for p in used), (
        f"{DEF}: pip installs with constraints {used}, but {CONSTRAINTS_REL} is copied to "
        f"{files.get(CONSTRAINTS_REL)}"
    )


def test_apptainer_recipe_agrees_with_the_dockerfile(singularity, docker):
    """The .def and the Dockerfile copy the same files to the same places, set the same run-time environment and
    labels, install the same way and run the same command and health check."""
    files = dict(entry.split(None, 1) for entry in singularity.files)
    assert files == docker_copies()
    # Run-time environment: the .def's %environment equals the Dockerfile's ENV (less what only Docker needs:
    # HOME and KERAS_HOME, since Apptainer keeps the caller's home; PYTHONDONTWRITEBYTECODE, a .sif is read-only).
    env = docker_pairs("ENV")
    build_only = {k for k in env if k.startswith("PIP_")}
    docker_only = {"HOME", "KERAS_HOME", "PYTHONDONTWRITEBYTECODE"}
    def_env = dict(line.removeprefix("export ").split("=", 1) for line in singularity.environ)
    assert def_env == {k: v for k, v in env.items() if k not in build_only | docker_only}
    # pip's settings for the build: the .def exports the Dockerfile's PIP_* values in %post.
    exports = {}
    for line in singularity.install:
        if line.startswith("export "):
            exports.update(pair.split("=", 1) for pair in line.split()[1:])
    assert {k: exports.get(k) for k in build_only} == {k: env[k] for k in build_only}
    # Labels: the same values under the same keys, the version pyproject's.
    labels = docker_pairs("LABEL")
    def_labels = dict(label.split(None, 1) for label in singularity.labels)
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                "org.opencontainers.image.licenses"):
        assert key in labels and key in def_labels, key
    shared = labels.keys() & def_labels.keys()
    assert {k: def_labels[k] for k in shared} == {k: labels[k] for k in shared}
    assert labels["org.opencontainers.image.version"] == pyproject()["project"]["version"]
    # Install: into the base's python3 with pip, ending with the same weights check.
    runs = [args for word, args in docker_instructions() if word == "RUN"]
    weights_check = [ln.strip() for ln in singularity.install if "pretrained_path()" in ln]
    assert len(weights_check) == 1 and any(weights_check[0] in run for run in runs)
    assert any(ln.startswith("python3 -m pip install ") for ln in singularity.install)
    assert all("python3 -m pip install " in run for run in runs if "pip install" in run)
    # Entry point and health check.
    assert singularity.cmd == 'exec hpc-retrain "$@"' and docker.entrypoint == ["hpc-retrain"]
    health = [args for word, args in docker_instructions() if word == "HEALTHCHECK"][0]
    cmd = json.loads(health.split("CMD", 1)[1])
    assert f"exec {' '.join(cmd)}" in " ".join(singularity.install)  # spython writes %test into /tests.sh


def test_constraints_pin_every_dependency_within_its_range():
    pinned = pins()
    problems = []
    for req in requirements():
        name = canonicalize_name(req.name)
        if name not in pinned:
            problems.append(f"{req.name}: not pinned")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{req.name}: pin {pinned[name]} is outside pyproject's range '{req.specifier}'")
    assert not problems, f"{CONSTRAINTS}: " + "; ".join(problems)


def test_environment_runs_the_pinned_versions():
    # The tests validate what the containers will run only while the two agree.
    pinned = pins()
    drift = []
    for req in requirements():
        name = canonicalize_name(req.name)
        if name not in pinned:
            continue  # reported by the test above
        try:
            # A local build label (torch 2.13.0+cpu, +cu130) is the pinned release built for a device.
            have = Version(Version(version(req.name)).public)
        except PackageNotFoundError:
            continue  # an extra not installed here; its pin is checked above
        if have != pinned[name]:
            drift.append(f"{req.name} {have} installed, {pinned[name]} pinned")
    assert not drift, f"{CONSTRAINTS} does not match this environment: " + "; ".join(drift)


def test_healthcheck_loads_pretrained_model_in_a_subprocess(tmp_path):
    from hpc_retrain.inference.model import PRETRAINED_SHA256

    # A real interpreter from an unrelated folder, as the container's HEALTHCHECK runs it.
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_retrain.inference.healthcheck"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, f"healthcheck failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert report["ok"] is True
    assert report["sha256"] == PRETRAINED_SHA256
    assert report["output_shape"] == [1, 256, 256, 2]
    assert Path(report["model"]).name == "MiSiDC04082020.h5"
    assert isinstance(report["gpus"], list)


def test_image_runs_as_a_non_root_user_from_a_small_build_context(docker):
    """The image's last USER is not root; .dockerignore keeps .venv, .git and outputs out of the build context
    and lets in exactly what the Dockerfile copies."""
    ins = docker_instructions()
    users = [args.strip() for word, args in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: nothing enters the context unless named
    allowed = {ln[1:] for ln in ignore if ln.startswith("!")}
    # What the image copies, and the wheelhouse of an offline build (bind-mounted for pip, not copied).
    assert allowed == set(docker_copies()) | {build_arg("WHEELHOUSE")}, allowed
