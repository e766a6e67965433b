"""The package's house rules (issue #26): floors whose imports point down, short functions and modules,
the public names at the top, and the training flags built from the configuration's fields."""

import ast
import dataclasses
from pathlib import Path

import pytest

import pyro_srvae
from pyro_srvae.cli import build_train_parser, config_from_args, resume_overrides
from pyro_srvae.training.config import TrainConfig

PACKAGE = Path(pyro_srvae.__file__).parent
#: The floors, lowest first: a module may import from its own floor or a lower one, never a higher one.
FLOORS = ("utils", "model", "data", "plots", "metrics", "training", "sr", "experiments", "cli", "__init__")
MAX_FUNCTION_LINES = 80  # lines of code: not blank, not only a comment, not the docstring
MAX_MODULE_LINES = 700


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE), ast.parse(path.read_text())


def floor(relative: Path) -> str:
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def package_imports(relative: Path, tree):
    """(line, imported module as a path under the package, at module level?) of each relative import."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = list(relative.parts[:-1])[: len(relative.parts) - node.level]
            for alias in node.names:
                target = base + (node.module.split(".") if node.module else [alias.name])
                yield node.lineno, Path(*target), id(node) in top


def test_imports_point_down_the_floors():
    upward = []
    for relative, tree in modules():
        for line, target, _ in package_imports(relative, tree):
            if FLOORS.index(floor(target)) > FLOORS.index(floor(relative)):
                upward.append(f"{relative}:{line} imports {target.as_posix()}")
    assert upward == []


def test_no_import_cycle():
    graph = {}
    for relative, tree in modules():
        name = relative.with_suffix("").as_posix()
        graph[name] = set()
        for _, target, _ in package_imports(relative, tree):
            module = target.as_posix()
            package = module + "/__init__"
            graph[name].add(package if (PACKAGE / package).with_suffix(".py").exists() else module)
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open" and nxt != node:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_package_import_inside_a_function():
    inner = [f"{relative}:{line}" for relative, tree in modules() for line, _, top in package_imports(relative, tree) if not top]
    assert inner == []


def code_lines(source_lines, node) -> int:
    docstring = set()
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        docstring = set(range(first.lineno, first.end_lineno + 1))
    return sum(
        1
        for number in range(node.lineno, node.end_lineno + 1)
        if number not in docstring and source_lines[number - 1].strip() and not source_lines[number - 1].strip().startswith("#")
    )


def test_functions_and_modules_are_short():
    long = []
    for relative, tree in modules():
        lines = (PACKAGE / relative).read_text().splitlines()
        if len(lines) > MAX_MODULE_LINES:
            long.append(f"{relative}: {len(lines)} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(lines, node) > MAX_FUNCTION_LINES:
                long.append(f"{relative}:{node.lineno} {node.name}: {code_lines(lines, node)} lines of code")
    assert long == []


def test_code_lines_count_code_only():
    source = 'def f():\n    """Doc.\n\n    More."""\n    # why\n\n    return 1\n'
    node = ast.parse(source).body[0]
    assert code_lines(source.splitlines(), node) == 2  # the def and the return


@pytest.mark.parametrize(
    "name",
    ["SRVAE", "VAE", "make_elbo", "IWAE_DReG", "train", "TrainConfig", "superresolve", "superresolve_image",
     "load_model", "iw_log_likelihood", "evaluate_model", "bits_per_dim", "calibrate_checkpoint", "UpdateGuard",
     "MixtureOfGaussiansPrior", "kl_per_image", "__version__"],
)  # fmt: skip
def test_public_names_import_from_the_top(name):
    assert getattr(pyro_srvae, name) is not None
    assert name == "__version__" or name in pyro_srvae.__all__


def test_every_configuration_field_is_a_flag():
    flags = {action.dest for action in build_train_parser()._actions}
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert fields - flags == {"recipe"}  # which recipe filled the rest: set by the run, not by a flag


def test_no_flags_make_the_default_configuration():
    parser = build_train_parser()
    assert config_from_args(parser, parser.parse_args([])) == TrainConfig().validate()


def test_flags_set_their_fields_with_their_types():
    parser = build_train_parser()
    argv = ["--lr", "0.01", "--batch-size", "8", "--no-figures", "--no-augment", "--guide", "full", "--compile"]
    config = config_from_args(parser, parser.parse_args(argv))
    assert (config.lr, config.batch_size, config.figures, config.augment) == (0.01, 8, False, False)
    assert (config.guide, config.compile) == ("full", True)


def test_a_resumed_run_takes_only_the_resumable_flags_given():
    parser = build_train_parser()
    args = parser.parse_args(["--resume", "run/checkpoint.pt", "--epochs", "5", "--no-figures", "--lr", "0.1"])
    assert config_from_args(parser, args) is None
    assert resume_overrides(args) == {"epochs": 5, "figures": False}


def test_a_flag_s_help_shows_its_default():
    text = build_train_parser().format_help()
    assert "[0.004; --dataset folder: 0.002]" in text  # --lr: each recipe's
    assert "[--arch; --dataset folder: densenet]" in text  # --sr-arch: None means --arch
    assert "[runs/<date>-<model>-<guide>]" in text  # --out: a note of its own
