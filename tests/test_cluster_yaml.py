"""cluster/: every YAML parses, has the fields its kind needs, and names the same Ray,
Python, torch and project versions as pyproject.toml (a drifted pin is a cluster whose
nodes disagree, or an image without the code the job runs).

Schemas: kubernetes-validate (PyPI, in the `dev` extra, so CI runs it) validates the core
objects and the pod templates inside the KubeRay objects offline. It carries no KubeRay
CRD, and no package on the registries CI may use does (the CRDs ship with the KubeRay Helm
chart and Go module), so KubeRay's own fields are validated against kuberay_schema.py, a
JSON Schema written from KubeRay's ray.io/v1 API types, and checked here by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from kuberay_schema import problems

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
IMAGE = re.compile(r"^ghcr\.io/[\w.-]+/raypurify:(?P<tag>[\w.-]+)$")
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>[\d.]+)-(?P<py>py\d+)(?:-(?P<kind>cpu|gpu))?$")


def pyproject() -> dict:
    text = (ROOT / "pyproject.toml").read_text()
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads(text)
    import tomli  # pragma: no cover (3.10)

    return tomli.loads(text)


def pins() -> dict[str, str]:
    """name -> version spec of pyproject's dependencies, e.g. torch -> ==2.14.1."""
    out = {}
    for dep in pyproject()["project"]["dependencies"]:
        m = re.match(r"^([\w-]+)(\[[\w,]+\])?(.*)$", dep)
        out[m.group(1)] = m.group(3)
    return out


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def images(node) -> list[str]:
    """Every `image`, `head_image` and `worker_image` value anywhere in `node`."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("image", "head_image", "worker_image") and isinstance(value, str):
                found.append(value)
            else:
                found += images(value)
    elif isinstance(node, list):
        for item in node:
            found += images(item)
    return found


def ray_version() -> str:
    """The one Ray release pyproject allows (>=2.60,<2.61 -> 2.60.0)."""
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(pins()["ray"])
    allowed = [v for v in (f"2.{m}.{p}" for m in range(50, 80) for p in range(5)) if v in spec]
    assert allowed, spec
    return allowed[0]


def python_tag() -> str:
    """The Python of the images: the one the project is developed and tested on (this
    interpreter), which must satisfy requires-python."""
    from packaging.specifiers import SpecifierSet

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert version in SpecifierSet(pyproject()["project"]["requires-python"])
    return "py" + version.replace(".", "")


def expected_tag(kind: str) -> str:
    return f"{pyproject()['project']['version']}-ray{ray_version()}-{python_tag()}-{kind}"


def test_every_yaml_parses():
    names = {str(p.relative_to(CLUSTER)) for p in YAMLS}
    assert {
        "aws.yaml",
        "gcp.yaml",
        "runtime_env.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/mlflow.yaml",
        "kuberay/storage.yaml",
    } <= names
    for path in YAMLS:
        assert docs(path), path


def test_versions_agree_with_pyproject():
    """Every project image has the tag of this version, Ray, Python and its kind; every
    official Ray image (the Dockerfile's bases) is the pinned Ray on the same Python; every
    torch pin anywhere is pyproject's; no job installs code from git or an unpinned pip."""
    p = pins()
    for path in [*YAMLS, CLUSTER / "Dockerfile"]:
        text = path.read_text()
        for pkg in ("torch", "torchvision"):
            for spec in re.findall(rf'"{pkg}(==[^"]+)"', text):
                assert spec == p[pkg], (path, pkg, spec)
        assert "git+" not in text, f"{path}: installs from a git URL"
        assert "pip:" not in text and "pip install" not in text.replace(
            "pip install --no-cache-dir", ""
        ), f"{path}: installs packages at run time; the image carries them"
        for ref in re.findall(r"rayproject/ray:[\w.-]+", text):
            m = RAY_IMAGE.match(ref)
            assert m and m["ray"] == ray_version() and m["py"] == python_tag(), (path, ref)
    for path in YAMLS:
        for image in [i for d in docs(path) for i in images(d)]:
            if image.startswith("ghcr.io/mlflow/"):
                continue  # the tracking server: checked in test_mlflow_server
            m = IMAGE.match(image)
            assert m, f"{path}: {image} is not the project image"
            assert m["tag"] in (expected_tag("cpu"), expected_tag("gpu")), (path, image)


def test_dockerfile_builds_the_pinned_stack():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M)[1]
    assert base == f"rayproject/ray:{ray_version()}-{python_tag()}-cpu"
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert f"--build-arg BASE=rayproject/ray:{ray_version()}-{python_tag()}-gpu" in text
    for kind in ("cpu", "gpu"):
        assert f"raypurify:{expected_tag(kind)}" in text, kind
    for pkg in ("torch", "torchvision"):
        assert f'"{pkg}{pins()[pkg]}"' in text
        assert f"'{pins()[pkg].lstrip('=')}'" in text  # the build's own version check
    assert f"ray.__version__ == '{ray_version()}'" in text
    for folder in ("raypurify", "tune_spaces"):  # what `pip install .` packages
        assert f"COPY --chown=ray:users {folder} ./{folder}" in text
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    kept = ["!pyproject.toml", "!README.md", "!raypurify/", "!tune_spaces/"]
    assert ignore[ignore.index("*") + 1 :][:4] == kept


def cluster_spec_checks(spec: dict, where: str) -> None:
    """KubeRay's RayClusterSpec: rayVersion, a head group and worker groups with
    container templates; a CPU head on the cpu image, GPU workers on the gpu image with
    `nvidia.com/gpu` limits; both mount the shared results volume at the same path."""
    assert spec["rayVersion"] == ray_version(), where
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head, where
    (head_c,) = head["template"]["spec"]["containers"]
    assert head_c["image"].endswith(expected_tag("cpu")), where
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"], where
    mounts = {m["mountPath"]: m["name"] for m in head_c["volumeMounts"]}
    assert "/mnt/results" in mounts, where
    assert spec["workerGroupSpecs"], where
    for group in spec["workerGroupSpecs"]:
        for key in ("groupName", "rayStartParams", "template"):
            assert key in group, (where, key)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        (c,) = group["template"]["spec"]["containers"]
        assert c["image"].endswith(expected_tag("gpu")), where
        assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1, where
        assert (
            c["resources"]["requests"]["nvidia.com/gpu"]
            == c["resources"]["limits"]["nvidia.com/gpu"]
        )
        assert "/mnt/results" in {m["mountPath"] for m in c["volumeMounts"]}, where
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in
                  group["template"]["spec"]["volumes"]}  # fmt: skip
        assert claims["results"] == "raypurify-results", where


def storage_claims() -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d
        for d in docs(CLUSTER / "kuberay" / "storage.yaml")
        if d["kind"] == "PersistentVolumeClaim"
    }


def test_raycluster_and_rayjobs():
    (rc,) = docs(CLUSTER / "kuberay" / "raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert rc["metadata"]["namespace"] == "raypurify"
    cluster_spec_checks(rc["spec"], "raycluster.yaml")
    jobs = [p for p in YAMLS if docs(p)[0].get("kind") == "RayJob"]
    assert len(jobs) >= 2  # the table and the sweep
    for path in jobs:
        (job,) = docs(path)
        assert job["apiVersion"] == "ray.io/v1"
        spec = job["spec"]
        assert spec["entrypoint"].startswith("python -m raypurify ")
        out = spec["entrypoint"].split("--out ")[1].split()[0]
        assert out.startswith("/mnt/results/"), "--out must be on the shared volume"
        assert spec["shutdownAfterJobFinishes"] is True
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert set(env) == {"env_vars"}, "the image carries the code: no pip/working_dir"
        assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.raypurify.svc")
        cluster_spec_checks(spec["rayClusterSpec"], path.name)
    # The shared volume is ReadWriteMany: every node writes checkpoints into it.
    for name, claim in storage_claims().items():
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], name


def test_mlflow_server():
    """Deployment + Service (+ volume, + policy): one SQLite writer on its own volume,
    reachable only inside the cluster, allowing the Service's host name, on a server
    version the project's client accepts."""
    from packaging.specifiers import SpecifierSet

    by_kind = {d["kind"]: d for d in docs(CLUSTER / "kuberay" / "mlflow.yaml")}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy"} <= set(by_kind)
    dep, svc = by_kind["Deployment"], by_kind["Service"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    version = c["image"].split(":v")[1]
    assert version in SpecifierSet(pins()["mlflow"]), c["image"]
    args = dict(a.lstrip("-").split("=", 1) for a in c["args"])
    assert args["backend-store-uri"].startswith("sqlite:////mlflow/")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/mlflow"] == "store"
    port = int(args["port"])
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"][0]["port"] == port
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    assert host in args["allowed-hosts"].split(",")
    for path in [*YAMLS]:
        if "kuberay" in str(path):
            assert f"http://{host}" in path.read_text() or path.name in (
                "mlflow.yaml",
                "storage.yaml",
            ), path


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs(name):
    cfg = docs(CLUSTER / name)[0]
    for key in ("cluster_name", "max_workers", "provider", "auth", "docker",
                "available_node_types", "head_node_type"):  # fmt: skip
        assert key in cfg, key
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert sum(t.get("max_workers", 0) for t in types.values()) <= cfg["max_workers"]
    for t in types.values():
        assert "node_config" in t and "resources" in t
    d = cfg["docker"]
    assert d["head_image"].endswith(expected_tag("cpu"))
    assert d["worker_image"].endswith(expected_tag("gpu"))
    assert "-v /mnt/results:/mnt/results" in d["run_options"]
    assert not cfg.get("setup_commands"), "the image has everything; nothing to install"
    mounts = " ".join(cfg["initialization_commands"])
    assert "/mnt/results" in mounts and "mount -t nfs" in mounts


def test_runtime_env_installs_nothing():
    env = docs(CLUSTER / "runtime_env.yaml")[0]
    assert set(env) == {"env_vars"}
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://")


def test_core_kinds_and_pod_templates_validate():
    """With kubernetes-validate installed (PyPI; it bundles the core Kubernetes schemas,
    offline): every core object validates strictly, and so does every pod template inside
    the KubeRay objects, wrapped as a core PodTemplate. KubeRay's own CRD fields are not in
    its schemas; test_raycluster_and_rayjobs checks those."""
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.utils.latest_version()
    checked = 0
    for path in (CLUSTER / "kuberay").glob("*.yaml"):
        for d in docs(path):
            if d["apiVersion"].startswith("ray.io/"):
                spec = d["spec"].get("rayClusterSpec", d["spec"])
                groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
                for g in groups:
                    wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                               "metadata": {"name": "t"}, "template": g["template"]}  # fmt: skip
                    kv.validate(wrapped, version, strict=True)
                    checked += 1
            else:
                kv.validate(d, version, strict=True)
                checked += 1
    assert checked >= 10


def kuberay_docs() -> list[tuple[str, dict]]:
    return [
        (path.name, d)
        for path in sorted((CLUSTER / "kuberay").glob("*.yaml"))
        for d in docs(path)
        if d["apiVersion"].startswith("ray.io/")
    ]


def test_kuberay_objects_match_kuberay_schema():
    """Every RayCluster and RayJob uses only fields KubeRay defines, of KubeRay's types
    (rayStartParams values are strings, replicas integers, the submission mode one of
    three)."""
    found = kuberay_docs()
    assert sorted(d["kind"] for _, d in found) == ["RayCluster", "RayJob", "RayJob"]
    for name, d in found:
        assert problems(d) == [], name


@pytest.mark.parametrize(
    "where, key, value, at, message",
    [
        ("spec/rayClusterSpec", "workerGroupSpec", [], "spec/rayClusterSpec",
         "'workerGroupSpec' was unexpected"),
        ("spec/rayClusterSpec/headGroupSpec/rayStartParams", "num-cpus", 0,
         "spec/rayClusterSpec/headGroupSpec/rayStartParams/num-cpus",
         "0 is not of type 'string'"),
        ("spec", "submissionMode", "K8sJob", "spec/submissionMode", "is not one of"),
        ("spec/rayClusterSpec/workerGroupSpecs/0", "replicas", "2",
         "spec/rayClusterSpec/workerGroupSpecs/0/replicas", "is not of type 'integer'"),
        ("spec", "activeDeadlineSeconds", 0, "spec/activeDeadlineSeconds",
         "less than the minimum"),
    ],
)  # fmt: skip
def test_kuberay_schema_rejects_what_the_operator_would(where, key, value, at, message):
    """The schema is strict where KubeRay's CRD is: a misspelt field, an integer where
    the CRD has a string map, an unknown enum value each give one problem, at its path."""
    import copy

    (job,) = [d for name, d in kuberay_docs() if name == "rayjob.yaml"]
    bad = copy.deepcopy(job)
    node = bad
    for part in where.split("/"):
        node = node[int(part)] if part.isdigit() else node[part]
    node[key] = value
    (problem,) = problems(bad)
    assert problem.startswith(at + ": ") and message in problem, problem
