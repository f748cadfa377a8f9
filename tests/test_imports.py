"""The package's import graph, read from the source: no circles, and nothing imports
the layers above it. Imports inside functions count too: a lazy import is still a
dependency, only a later one."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "simsiam_tf")


def _module(path):
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _graph():
    """{module: {simsiam_tf modules it imports}}, package __init__s included."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                modules[_module(os.path.join(root, name))] = os.path.join(root, name)
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                # A module's own packages run before it whatever it imports: not an edge.
                if target and target != name and not name.startswith(target + "."):
                    found.add(target)
        graph[name] = found
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 30 and "simsiam_tf.input.catalog" in graph["simsiam_tf.input"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# What each layer may not import: the layers above it.
ABOVE = {
    "simsiam_tf.errors": ("simsiam_tf.",),
    "simsiam_tf.input": ("simsiam_tf.model", "simsiam_tf.training", "simsiam_tf.callbacks", "simsiam_tf.checkpoints",
                         "simsiam_tf.diagnostics", "simsiam_tf.export", "simsiam_tf.optim", "simsiam_tf.losses"),
    "simsiam_tf.diagnostics": ("simsiam_tf.training", "simsiam_tf.callbacks", "simsiam_tf.checkpoints"),
    "simsiam_tf.model": ("simsiam_tf.training", "simsiam_tf.callbacks", "simsiam_tf.checkpoints",
                         "simsiam_tf.diagnostics", "simsiam_tf.export"),
    "simsiam_tf.callbacks": ("simsiam_tf.training",),
    "simsiam_tf.checkpoints": ("simsiam_tf.training", "simsiam_tf.callbacks"),
}


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_nothing_imports_the_layers_above_it(layer):
    graph = _graph()
    for module, imports in graph.items():
        if module == layer or module.startswith(layer + "."):
            upward = sorted(i for i in imports if i.startswith(ABOVE[layer]) and not i.startswith(layer))
            assert not upward, f"{module} imports {upward}"
