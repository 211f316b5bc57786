"""What the package index and a user's ``pip install`` get: metadata, the sdist and wheel, optional dependencies.

The sdist and the wheel are built here as pip builds them (setuptools' PEP 517 hooks, the wheel from the
unpacked sdist), from a copy of the checkout, in a second or two: our package is pure Python.

The optional-dependency tests run a real training in a virtual environment that lacks a distribution
(``lightning``, or ``tensorboard``): its site-packages holds symlinks to every top-level entry of this
interpreter's site-packages except that distribution's files (listed by its own ``RECORD``) and the
editable install of lightning-decay (the code under test comes from ``src`` on ``PYTHONPATH``). Nothing is
downloaded or reinstalled (torch stays where it is), and the missing distribution is really missing: its
modules cannot be found and ``importlib.metadata`` does not know it, as after ``pip uninstall``. A meta-path
blocker would leave the metadata behind, which Lightning reads (``RequirementCache``) to pick its defaults.
"""

from __future__ import annotations

import csv
import email.parser
import email.policy
import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from tests.extras import require

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "tensorboard", "tensorboardX")


# --- sdist and wheel -------------------------------------------------------------------------------------------------


def _build(hook: str, source: Path, out: Path) -> Path:
    """Run setuptools' PEP 517 ``hook`` (build_sdist, build_wheel) in ``source``, as ``pip``/``build`` do."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # trove-classifiers installed makes setuptools validate every classifier, as the index does (issue 22).
    require(("trove_classifiers",), "the classifier check at build time")
    tmp = tmp_path_factory.mktemp("build")
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", "site", "runs", "*_logs")
    source = shutil.copytree(ROOT, tmp / "checkout", ignore=ignore)
    sdist = _build("build_sdist", source, tmp / "dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    [unpacked] = (tmp / "unpacked").iterdir()
    wheel = _build("build_wheel", unpacked, tmp / "wheel")  # from the sdist: it holds all the wheel needs
    return {"sdist": sdist, "wheel": wheel, "unpacked": unpacked}


def _metadata(built: dict[str, Path]) -> email.message.Message:
    with zipfile.ZipFile(built["wheel"]) as whl:
        [name] = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser(policy=email.policy.compat32).parsestr(whl.read(name).decode())


def test_classifiers_are_the_index_ones_with_python_versions_and_status(built: dict[str, Path]) -> None:
    from trove_classifiers import classifiers as valid

    got = _metadata(built).get_all("Classifier")
    assert got, "no classifiers"
    assert [c for c in got if c not in valid] == []
    assert sum(c.startswith("Development Status :: ") for c in got) == 1
    versions = sorted(c.rsplit(" ", 1)[1] for c in got if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    requires = _metadata(built)["Requires-Python"]
    assert requires == ">=3.10" and versions and versions[0] == "3.10", (requires, versions)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in versions, "the version CI runs is listed"


def test_dependencies_leave_tensorboard_and_the_second_namespace_to_extras(built: dict[str, Path]) -> None:
    meta = _metadata(built)
    requires = meta.get_all("Requires-Dist")
    core = {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r}
    assert core == {"torch", "pytorch-lightning", "torchmetrics"}, core  # `lightning` depends on pytorch-lightning
    extras = set(meta.get_all("Provides-Extra"))
    assert {"lightning", "tensorboard", "examples", "test", "docs"} <= extras
    for extra, wanted in (("tensorboard", "tensorboard"), ("lightning", "lightning"), ("examples", "tensorboard")):
        assert any(r.startswith(wanted) and f'extra == "{extra}"' in r for r in requires), (extra, wanted)


def test_license_is_the_apache_text_in_the_repository_sdist_and_wheel(built: dict[str, Path]) -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    meta = _metadata(built)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None, "the deprecated free-text field is gone"
    with tarfile.open(built["sdist"]) as tar:
        [member] = [m for m in tar.getmembers() if m.name.endswith("/LICENSE")]
        assert tar.extractfile(member).read().decode() == text
    with zipfile.ZipFile(built["wheel"]) as whl:
        [name] = [n for n in whl.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert whl.read(name).decode() == text


def test_sdist_holds_the_package_and_its_metadata_and_no_tests_it_could_not_run(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as tar:
        files = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    package = {str(p.relative_to(ROOT)) for p in (ROOT / "src" / "lightning_decay").iterdir() if p.is_file()}
    generated = {"PKG-INFO", "setup.cfg"} | {f for f in files if f.startswith("src/lightning_decay.egg-info/")}
    assert files - generated == package | {"LICENSE", "MANIFEST.in", "README.md", "pyproject.toml", "setup.py"}
    # The wheel built from it has every module of the checkout.
    with zipfile.ZipFile(built["wheel"]) as whl:
        in_wheel = {n for n in whl.namelist() if n.startswith("lightning_decay/")}
    assert in_wheel == {p.removeprefix("src/") for p in package}


def test_long_description_links_are_absolute_and_point_at_files_of_the_repository(built: dict[str, Path]) -> None:
    meta = _metadata(built)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) == {"Source", "Documentation", "Issues"}
    repo = urls["Source"]
    assert urls["Issues"] == f"{repo}/issues"
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    if m := re.search(r"^repo_url:\s*(\S+)", mkdocs, flags=re.M):  # one address: the site's and the index's
        assert m.group(1).rstrip("/") == repo
    if m := re.search(r"^site_url:\s*(\S+)", mkdocs, flags=re.M):
        assert m.group(1).rstrip("/") == urls["Documentation"].rstrip("/")

    description = meta.get_payload()
    assert meta["Description-Content-Type"] == "text/markdown"
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", description)
    assert len(targets) == len(re.findall(r"\]\(([^)\s]+)\)", readme)) > 0
    assert [t for t in targets if not re.match(r"https?://", t)] == [], "relative links break on the index page"
    owner_repo = repo.removeprefix("https://github.com/")
    prefixes = (f"{repo}/blob/main/", f"https://raw.githubusercontent.com/{owner_repo}/main/")
    into_repo = [t for t in targets if t.startswith(prefixes)]
    assert into_repo, "the README links into the repository"
    for target in into_repo:
        path = target.removeprefix(prefixes[0]).removeprefix(prefixes[1]).split("#", 1)[0]
        assert (ROOT / path).is_file(), target
    # Nothing but the links changed: the README's text, with the absolute prefixes removed, is the description.
    assert re.sub("|".join(map(re.escape, prefixes)), "", description).strip() == readme.strip()


# --- optional dependencies, in environments without them --------------------------------------------------------------

SCRIPT = """
import copy, importlib, json, sys
import lightning_decay
loaded_by_import = sorted({m.split(".")[0] for m in sys.modules} & set(FRAMEWORKS))

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from lightning_decay import WeightDecay, WeightNormMonitor, decay_param_groups

ns = importlib.import_module(sys.argv[1])
loggers = importlib.import_module(sys.argv[1] + ".loggers")


class Regressor(ns.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(decay_param_groups(self, weight_decay=0.0), lr=0.01, foreach=False)


torch.manual_seed(0)
x = torch.randn(32, 4)
loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)
model = Regressor()
ref = copy.deepcopy(model)
logger = loggers.CSVLogger(sys.argv[2], name="run")
trainer = ns.Trainer(
    max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[WeightDecay(0.1), WeightNormMonitor()],
    accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
)
trainer.fit(model, loader)

# torch's AdamW on the same decay groups, the same batches in the same order.
opt = torch.optim.AdamW(decay_param_groups(ref, weight_decay=0.1), lr=0.01, foreach=False)
for _ in range(2):
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.mse_loss(ref.net(xb), yb).backward()
        opt.step()
cli_groups = None
if len(sys.argv) > 3:  # DecayLightningCLI on this namespace's LightningCLI, its automatic AdamW over decay groups
    from lightning_decay import DecayLightningCLI, DecayRules

    class Automatic(Regressor):
        configure_optimizers = ns.LightningModule.configure_optimizers

        def train_dataloader(self):
            return loader

    args = ["fit", "--optimizer=AdamW", "--optimizer.weight_decay=0.1", "--trainer.max_steps=1",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={sys.argv[2]}"]
    cli = DecayLightningCLI(Automatic, args=args)
    plan = DecayRules().classify(cli.model)
    params = dict(cli.model.named_parameters())
    groups = cli.trainer.optimizers[0].param_groups
    cli_groups = {
        "cli_bases": [c.__module__.split(".")[0] for c in type(cli).__mro__ if c.__name__ == "LightningCLI"],
        "got": sorted((g["weight_decay"], sorted(map(id, g["params"]))) for g in groups),
        "want": sorted([(0.1, sorted(id(params[n]) for n in plan.decay_names)),
                        (0.0, sorted(id(params[n]) for n in plan.no_decay_names))]),
    }
print(json.dumps({
    "cli": cli_groups,
    "package": lightning_decay.__file__,
    "loaded_by_import": loaded_by_import,
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(FRAMEWORKS)),
    "findable": sorted(m for m in FRAMEWORKS if importlib.util.find_spec(m) is not None),
    "csv": str(logger.log_dir) + "/metrics.csv",
    "steps": trainer.global_step,
    "unequal": [n for n, p in model.named_parameters() if not torch.equal(p, dict(ref.named_parameters())[n])],
    "norms": {n: torch.linalg.vector_norm(p.detach().double()).item() for n, p in model.named_parameters()},
}))
"""


def _top_level(dist: str) -> set[str]:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {f.parts[0] for f in files if not f.parts[0].startswith("..")}


def _venv_without(tmp_path: Path, dists: tuple[str, ...]) -> Path:
    """A venv with this interpreter's packages but ``dists`` and lightning-decay; returns its python."""
    env = tmp_path / "venv"
    venv.create(env, with_pip=False, symlinks=True)
    python = env / "bin" / "python"
    target = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True
    ).stdout.strip()
    excluded = set().union(*(_top_level(d) for d in (*dists, "lightning-decay"))) | {"__pycache__"}
    excluded |= {p.name for p in Path(site.getsitepackages()[0]).glob("*lightning_decay*")}  # editable finders
    for directory in dict.fromkeys(site.getsitepackages()):
        for entry in Path(directory).iterdir():
            link = Path(target) / entry.name
            if entry.name not in excluded and not link.exists():
                link.symlink_to(entry)
    return python


def _fit_in(tmp_path: Path, without: tuple[str, ...], namespace: str, cli: bool = False) -> dict:
    python = _venv_without(tmp_path, without)
    script = tmp_path / "fit.py"
    script.write_text(f"FRAMEWORKS = {FRAMEWORKS!r}\nimport importlib.util\n{SCRIPT}")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [python, script, namespace, str(tmp_path / "logs"), *(["cli"] if cli else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(run["package"]).is_relative_to(ROOT / "src"), run["package"]
    return run


def _assert_trained_and_logged(run: dict) -> None:
    # Adam + WeightDecay is torch's AdamW on the decay groups, bitwise (same ops in the same order), and the
    # last logged weight norms are those of the final weights.
    assert run["steps"] == 8 and run["unequal"] == []
    rows: dict[int, dict[str, float]] = {}
    with open(run["csv"]) as f:
        for row in csv.DictReader(f):  # CSVLogger writes a step's metrics over several rows
            rows.setdefault(int(row.pop("step")), {}).update({k: float(v) for k, v in row.items() if v != ""})
    assert max(rows) == run["steps"] - 1
    for name, norm in run["norms"].items():
        assert rows[max(rows)][f"weight_norm/{name}"] == pytest.approx(norm, rel=1e-6), name


def test_pytorch_lightning_alone_without_lightning(tmp_path: Path) -> None:
    # A user of `import pytorch_lightning` with only the `pytorch-lightning` distribution (the dependency):
    # the package imports that namespace alone and its callbacks train with that Trainer.
    run = _fit_in(tmp_path, ("lightning",), "pytorch_lightning", cli=True)
    assert "lightning" not in run["findable"], "the venv still has lightning"
    assert "lightning" not in run["loaded_by_import"] and "lightning" not in run["loaded"]
    assert "pytorch_lightning" in run["loaded_by_import"]
    _assert_trained_and_logged(run)
    assert run["cli"]["cli_bases"] == ["pytorch_lightning"]
    assert run["cli"]["got"] == run["cli"]["want"]  # decayed at 0.1 and not, as DecayRules splits them


def test_csv_logger_and_monitor_without_tensorboard(tmp_path: Path) -> None:
    # W&B, MLflow, CSV users need no TensorBoard: without it installed, the package imports and a fit with
    # CSVLogger + WeightNormMonitor + WeightDecay runs and logs.
    run = _fit_in(tmp_path, ("tensorboard", "tensorboardX", "tensorboard-data-server"), "lightning.pytorch")
    assert "tensorboard" not in run["findable"] and "tensorboardX" not in run["findable"]
    assert [m for m in run["loaded"] if m.startswith("tensorboard")] == []
    _assert_trained_and_logged(run)


def test_importing_the_package_loads_no_tensorboard() -> None:
    # With TensorBoard installed too: only a TensorBoard logger's writer imports it, not the package.
    code = "import sys, lightning_decay; print(sorted(m for m in sys.modules if m.startswith('tensorboard')))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_without_any_lightning_the_import_error_says_what_to_install(tmp_path: Path) -> None:
    python = _venv_without(tmp_path, ("lightning", "pytorch-lightning"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([python, "-c", "import lightning_decay"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("ImportError: lightning-decay needs PyTorch Lightning")
    assert "`pip install pytorch-lightning`" in out.stderr
