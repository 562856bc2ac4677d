"""infra/: every YAML parses and names the image, ports and commands infra/README.md says;
the Dockerfile's commands are the README's; the commands in the manifests parse as CLI calls."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
README = (INFRA / "README.md").read_text()
YAMLS = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def load(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def scalars(node) -> list[str]:
    """Every key and value as text; lists of strings also as one space-joined command line."""
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out += [str(key), *scalars(value)]
    elif isinstance(node, list):
        if node and all(isinstance(item, str) for item in node):
            out.append(" ".join(node))
        for item in node:
            out += scalars(item)
    elif node is not None:
        out.append(str(node))
    return out


def readme_table() -> list[dict[str, str]]:
    lines = [line for line in README.splitlines() if line.startswith("| `")]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append({"file": cells[0].strip("`"), "image": cells[2].strip("`"),
                     "ports": [int(p) for p in re.findall(r"\d+", cells[3])], "command": cells[4].strip("`")})
    return rows


def test_every_yaml_parses():
    assert len(YAMLS) >= 7
    for path in YAMLS:
        assert load(path), f"{path} is empty"


@pytest.mark.parametrize("row", readme_table(), ids=lambda r: r["file"])
def test_yaml_names_what_the_readme_says(row):
    path = INFRA / row["file"]
    assert path in YAMLS, f"README lists {row['file']}, which is not in infra/"
    texts = [t for doc in load(path) for t in scalars(doc)]
    if row["image"]:
        assert row["image"] in texts, f"{row['file']} does not use image {row['image']}"
    for port in row["ports"]:
        assert any(re.search(rf"(?<!\d){port}(?!\d)", t) for t in texts), f"{row['file']} does not name port {port}"
    assert any(row["command"] in t for t in texts), f"{row['file']} does not run {row['command']!r}"


def test_readme_table_covers_every_yaml():
    listed = {INFRA / row["file"] for row in readme_table()}
    assert listed == set(YAMLS)


def test_kubernetes_kinds():
    kinds = {p.name: [(d["apiVersion"], d["kind"]) for d in load(p)] for p in (INFRA / "k8s").glob("*.yaml")}
    assert kinds["raycluster.yaml"] == [("ray.io/v1", "RayCluster")]
    assert kinds["rayjob.yaml"] == [("ray.io/v1", "RayJob")]
    assert kinds["retrain-cronjob.yaml"] == [("batch/v1", "CronJob")]
    assert ("apps/v1", "Deployment") in kinds["retrain-scheduler.yaml"]


def test_no_secret_values_in_manifests():
    for path in YAMLS:
        for doc in load(path):
            for key, value in _pairs(doc):
                if re.search(r"SECRET|PASSWORD|TOKEN", str(key)) and isinstance(value, str):
                    assert value.startswith("${"), f"{path.name}: {key} holds a literal value"
    assert "stringData" not in (INFRA / "k8s" / "config.yaml").read_text()
    assert (INFRA / ".gitignore").read_text().split() == [".env"]


def _pairs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _pairs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _pairs(item)


def test_dockerfile_commands_are_the_readmes():
    dockerfile = (INFRA / "Dockerfile").read_text()
    builds = [line.strip() for line in README.splitlines() if line.strip().startswith("docker build")]
    assert len(builds) == 2
    for build in builds:
        assert build in dockerfile
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    assert f"The default command is `{' '.join(cmd)}`" in " ".join(README.split())
    assert "--build-arg TORCH_INDEX=" in dockerfile and "ARG TORCH_INDEX" in dockerfile


def _parses(args: list[str]) -> None:
    """Parse a `pipeline ...` command line with the real CLI (options, types), without running it."""
    group = typer.main.get_command(app)
    ctx = group.make_context("pipeline", list(args[:1]), resilient_parsing=True)
    command = group.get_command(ctx, args[0])
    assert command is not None, args[0]
    command.make_context(args[0], list(args[1:]), parent=ctx)


def test_manifest_commands_are_valid_cli_calls():
    cron = load(INFRA / "k8s" / "retrain-cronjob.yaml")[0]
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    scheduler = next(d for d in load(INFRA / "k8s" / "retrain-scheduler.yaml") if d["kind"] == "Deployment")
    for argv in (command, scheduler["spec"]["template"]["spec"]["containers"][0]["command"]):
        assert argv[0] == "pipeline"
        _parses(argv[1:])
        config = next(a for a in argv if a.startswith("configs/"))
        assert (REPO / config).is_file()
    rayjob = load(INFRA / "k8s" / "rayjob.yaml")[0]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/app/jobs/train.py"]  # jobs/train.py runs `pipeline train ARGS`
    _parses(["train", *argv[2:]])
    assert (REPO / argv[2].removeprefix("/app/")).is_file()
