"""Dependencies point one way in the whole package (docs/design/index.md): every import, function-level ones
included, goes to a module of the same layer or a lower one, and no group of modules imports itself in a
circle. The layers, lowest first; a module belongs to the longest prefix that names it."""
import os

from import_graph import ROOT, cycles, graph

LAYERS = [
    # what everything builds on: no gdrd_fast import but each other's
    ("gdrd_fast.numerics", "gdrd_fast.params", "gdrd_fast.backends", "gdrd_fast.validation",
     "gdrd_fast.collectives", "gdrd_fast.repdistiller_state", "gdrd_fast.testing", "gdrd_fast.atomic"),
    ("gdrd_fast.reference", "gdrd_fast.env"),
    ("gdrd_fast.ops",),                                   # custom ops, autograd, backend tables
    ("gdrd_fast.functional",),                            # validate -> resolve -> call -> reduce
    ("gdrd_fast.memory", "gdrd_fast.losses"),             # Modules
    ("gdrd_fast.integrations", "gdrd_fast.distributed"),  # adapters and multi-process forms of the Modules
    ("gdrd_fast.models", "gdrd_fast.data", "gdrd_fast.eval"),
    ("gdrd_fast.train",),
    ("gdrd_fast.demo",),
    ("gdrd_fast.cli", "gdrd_fast.__main__"),
    ("gdrd_fast",),                                       # the package's public surface
]
EDGES = graph()


def layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/lib/test_layers.py"
    return best[0]


def test_the_graph_sees_function_level_and_relative_imports():
    """The reader must see what the test relies on, or the test could not fail."""
    assert "gdrd_fast.ops.infonce" in EDGES["gdrd_fast.ops.infonce_pairs"]       # from . import infonce
    assert "gdrd_fast.functional" in EDGES["gdrd_fast.memory"]                   # from . import functional
    assert EDGES["gdrd_fast.demo.run"] & {"gdrd_fast.demo.ablate", "gdrd_fast.demo.analyze"}  # inside functions
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_runs_back_up_a_layer():
    up = [f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})"
          for source, targets in EDGES.items() for target in sorted(targets) if layer(target) > layer(source)]
    assert not up, "imports that run back up:\n" + "\n".join(up)


def test_no_import_circle_outside_the_demo():
    found = [c for c in cycles(EDGES) if not all(m.startswith("gdrd_fast.demo") for m in c)]
    assert not found, f"import circles: {found}"


def test_the_demo_has_no_import_circle():
    found = cycles({k: v for k, v in EDGES.items() if k.startswith("gdrd_fast.demo")})
    assert not found, f"import circles in the demo: {found}"


def test_no_fast_path_takes_shared_helpers_from_the_reference():
    """Shared numerics helpers live in gdrd_fast/numerics.py and gdrd_fast/params.py; the reference is only the
    ground truth."""
    import ast
    helpers = {"compute_dtype", "reduce_rows", "pair_indices", "off_diagonal", "RelationalParams"}
    package = os.path.join(ROOT, "gdrd_fast")
    for folder, _, files in os.walk(package):
        for file in (f for f in files if f.endswith(".py")):
            for node in ast.walk(ast.parse(open(os.path.join(folder, file)).read())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "reference":
                    taken = helpers & {a.name for a in node.names}
                    assert not taken, f"{file} takes {taken} from reference"
    source = open(os.path.join(package, "reference.py")).read()
    assert "def compute_dtype" not in source and "class RelationalParams" not in source


def test_old_import_paths_still_work():
    from gdrd_fast import collectives, repdistiller_state
    from gdrd_fast.distributed import comm
    from gdrd_fast.integrations import repdistiller
    assert comm.gather_rows is collectives.gather_rows
    assert repdistiller.convert_crd_state is repdistiller_state.convert_crd_state
