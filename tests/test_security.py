"""Security basics: loopback by default, no code-executing loaders, bounded requests."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_files():
    for folder in ("simsiam_tf", "serving", "benchmarks", "."):
        root = os.path.join(REPO, folder)
        for name in sorted(os.listdir(root)):
            if name.endswith(".py"):
                yield os.path.join(root, name)
        if folder == "simsiam_tf":
            sub = os.path.join(root, "diagnostics")
            yield from (os.path.join(sub, n) for n in sorted(os.listdir(sub)) if n.endswith(".py"))


def test_no_code_executing_loaders_on_user_files():
    banned_modules = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}
    banned_calls = {"eval", "exec"}
    for path in _python_files():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not {n.split(".")[0] for n in names} & banned_modules, f"{path}:{node.lineno}"
            if isinstance(node, ast.Call):
                fn = node.func
                if isinstance(fn, ast.Name):
                    assert fn.id not in banned_calls, f"{path}:{node.lineno}"
                for kw in node.keywords:
                    if kw.arg == "allow_pickle":
                        assert isinstance(kw.value, ast.Constant) and kw.value.value is False, f"{path}:{node.lineno}"
                if isinstance(fn, ast.Attribute) and fn.attr == "load" and isinstance(fn.value, ast.Name):
                    assert fn.value.id not in ("yaml", "torch"), f"{path}:{node.lineno}"


def test_server_binds_loopback_by_default(tmp_path):
    from serving import local_server

    srv, manager = local_server.serve("m", str(tmp_path), port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        manager.stop()
        srv.server_close()


def test_model_name_and_version_never_reach_the_filesystem(tmp_path):
    from serving import servables
    from serving.rest_api import RequestError

    manager = servables.ModelManager("m", str(tmp_path))
    for name, version in [("../etc", None), ("m", "../../1"), ("m", "1/../../x"), ("m", "-1"), ("m", "١")]:
        for call in (manager.get, manager.status):
            with pytest.raises(RequestError) as info:
                call(name, version)
            assert info.value.status in (400, 404)
